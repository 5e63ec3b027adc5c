"""Editing with the decoder the cascade has: inpainting / outpainting (RePaint), img2img (SDEdit) and CLIP
re-ranking of text-to-image samples.

A client of the cascade core only (like `unclip.text_to_image` and `unclip.latent_space`, neither of which it
imports). Every edit is ordinary stages with extra data (engine/stages.py `with_source`, `KnownRegion`); the
one loop (engine/runner.py `run_loop`) does the rest:

* Inpainting (Lugmayr et al. 2022, RePaint): no inpainting model is needed. After every step of the decoder
  and of every upsampler, the known region of x (mask 0) is replaced by the source image noised to where the
  step lands, q(x_s | x0) = √ā_s·x0 + √(1−ā_s)·ε with a fresh ε per step, so the generated region is
  denoised in agreement with its surroundings. `resample_jumps` J repeats every decoder step J more times,
  re-noising x_s back to x_t in between (RePaint's resampling, which harmonises the boundary; the
  upsamplers, conditioned on the harmonised low-resolution image, run their own schedule). The mask and the
  source are resized to each stage's resolution (a partly repainted pixel is repainted). `strength` < 1
  starts the decoder part-way, from the noised source (the upsamplers always run their whole schedule).
  Finally every unmasked pixel of the output is the source's pixel, exactly (the source read at the output
  resolution: its centred square, resized only if it is not already that size).
* Outpainting: the image padded (edges repeated) onto a larger canvas whose new border is the mask.
* img2img (Meng et al. 2021, SDEdit): the decoder, and then each upsampler, starts from the source (at its
  resolution) noised to `strength` of its schedule; no known region.
* Conditioning: a prompt (through the prior, its text features also condition the decoder), else given
  `image_embeddings`, else the images' own CLIP embeddings (then the decoder sees the empty caption, as in
  variations). `negative_prompts` replace the empty caption in the unconditional half of guidance.
* Re-ranking (`best_of`): k images per requested image, the one whose CLIP image embedding has the highest
  cosine with the prompt's CLIP text embedding kept (DALL·E 1 kept CLIP's best samples).

Random draws, in order: the prior's (with a prompt), then per stage its latents and step noise, then (with a
mask) one ε per step for the known region and the noise of every resampling jump.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from . import image_processing
from .cascade import Cascade, EditSource, UnCLIPOutput, check_finite
from .observers import Observer
from .request import EditRequest, GenerateRequest, check_int

MAX_PAD = 4096


def edit(cascade: Cascade, r: EditRequest, observer: Observer) -> UnCLIPOutput | tuple:
    """Inpainting (r.mode "inpaint") or img2img ("img2img") for a validated `EditRequest`."""
    c = cascade.components
    n, rows = r.num_images_per_prompt, r.rows
    guided = r.guided
    if r.prompts is not None:
        text = cascade.encode_prompts(r.prompts, n, guided, observer, r.negative_prompts)
        prior_plan = cascade.plan(c.prior_scheduler, r.steps["prior"], r.sampler["prior"], r.eta["prior"])
        embeds = cascade.prior(text, rows=rows, candidates=1, guidance=r.prior_guidance_scale if guided else None,
                               plan=prior_plan, generator=r.generator, observer=observer)
    else:
        if r.image_embeddings is not None:
            z = r.image_embeddings.to(cascade.device, cascade.dtype)
        else:
            pixels = image_processing.preprocess(r.images, image_processing.processor_config_for(c), name="image")
            z = cascade.encode_images(pixels, observer)
        embeds = z.repeat_interleave(n, dim=0)
        text = cascade.empty_captions(r.batch, n, guided, r.negative_prompts)

    source01 = r.source.to(cascade.device).repeat_interleave(n, dim=0)
    mask = None if r.mask is None else r.mask.to(cascade.device).repeat_interleave(n, dim=0)
    plan, jump_after = cascade.edit_plan(c.decoder_scheduler, r.steps["decoder"], r.sampler["decoder"],
                                         r.eta["decoder"], r.strength, r.resample_jumps)
    source = EditSource(source01 * 2 - 1, mask, {"decoder": jump_after})
    stage = cascade.decoder_stage(embeds, text, rows=rows, guidance=r.decoder_guidance_scale if guided else None,
                                  plan=plan, generator=r.generator, source=source)
    x = cascade.run(stage, observer).clamp(-1, 1)
    for up in c.upsamplers:
        # Inpainting: each upsampler runs its whole schedule, held to the known region. img2img: each starts,
        # like the decoder, from the source (at its resolution) noised to `strength` of its schedule.
        up_plan, _ = cascade.edit_plan(up.scheduler, r.steps[up.name], r.sampler[up.name], r.eta[up.name],
                                       1.0 if mask is not None else r.strength, 0)
        stage = cascade.super_res_stage(up, x, rows=rows, plan=up_plan, generator=r.generator, source=source)
        x = cascade.run(stage, observer)
    images = check_finite((x * 0.5 + 0.5).clamp(0, 1), "output", cascade.dtype)
    if mask is not None:  # the exact composite: every kept pixel is the source's own value
        images = torch.where(mask, images.float(), source01)
    images = cascade.format_images(images, r.output_type)
    return UnCLIPOutput(images, embeds) if r.return_dict else (images,)


def check_pad(pad) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels to add, ints >= 0, at least one > 0."""
    if isinstance(pad, (bool, str)) or not isinstance(pad, (list, tuple)) or len(pad) != 4:
        raise TypeError(f"pad must be (left, top, right, bottom), four ints in 0..{MAX_PAD}; got {pad!r}")
    out = tuple(check_int(f"pad[{i}]", p, 0, MAX_PAD) for i, p in enumerate(pad))
    if not any(out):
        raise ValueError("pad must add at least one pixel on some side; got (0, 0, 0, 0)")
    return out


def outpaint_canvas(image, pad) -> tuple[list, list]:
    """([canvas (H + top + bottom, W + left + right, 3)], [mask (same H, W) bool, True on the added border]),
    one pair per image: its pixels in the middle, the border filled by repeating its edge pixels (what the
    first steps see before the known region takes over)."""
    left, top, right, bottom = check_pad(pad)
    canvases, masks = [], []
    images = image_processing.as_image_list(image, "image")
    for i, im in enumerate(images):
        rgb = image_processing.to_rgb(im, "image" if len(images) == 1 else f"image[{i}]")
        h, w = rgb.shape[:2]
        canvases.append(np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge"))
        mask = np.ones(canvases[-1].shape[:2], dtype=bool)
        mask[top:top + h, left:left + w] = False
        masks.append(mask)
    return canvases, masks


def best_of(cascade: Cascade, r: GenerateRequest, run: Callable, observer: Observer) -> UnCLIPOutput | tuple:
    """Text to image with CLIP re-ranking: `run(request)` (text_to_image.generate) draws r.rerank images per
    requested image; each group keeps the image with the highest CLIP image–text cosine against its prompt.
    The output's `scores` hold the kept images' cosines (rows,)."""
    k, n = r.rerank, r.num_images_per_prompt
    wide = dataclasses.replace(r, num_images_per_prompt=n * k, output_type="pt", return_dict=True, rerank=1)
    out = run(wide)
    if r.prompts is not None:
        text_embeds = cascade.encode_prompts(r.prompts, 1, False, observer)[0]
    else:
        text_embeds = r.text_model_output[0].to(cascade.device, cascade.dtype)
    scores = cascade.clip_scores(out.images, text_embeds.repeat_interleave(n * k, dim=0), observer)
    grouped = scores.reshape(r.rows, k)
    best = grouped.argmax(dim=1)
    index = torch.arange(r.rows) * k + best.cpu()
    images = cascade.format_images(out.images[index], r.output_type)
    embeds = out.image_embeddings[index.to(out.image_embeddings.device)]
    chosen = grouped.max(dim=1).values.cpu()
    return UnCLIPOutput(images, embeds, chosen) if r.return_dict else (images,)
