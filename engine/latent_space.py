"""The CLIP latent space as an interface (DALL·E 2, §3): the decoder driven by image embeddings, no prior.

An image is represented by the bipartite latent (z_i, x_T): its CLIP image embedding z_i and the decoder noise
x_T that deterministic DDIM (η = 0) maps back to the image given z_i (found by DDIM inversion). On top of that:

* `variations`: decode z_i with fresh noise, the whole cascade (diffusers' `UnCLIPImageVariationPipeline`,
  same random draws in the same order).
* `invert` / `reconstruct`: x0 → x_T and back.
* `interpolate`: slerp between two embeddings (of images, prompts via the prior, or given vectors), the decoder
  noise either fixed or the two images' inverted x_T slerped as well.
* `text_diff`: z_d = norm(z_t − z_t0), z_θ = slerp(z_i, z_d, θ), decoded from the image's inverted x_T.

Every function takes the cascade core (`unclip.cascade.Cascade`, what `Pipeline.cascade` holds) first; the
Pipeline's methods of the same names delegate here. Arguments are validated into requests (engine/request.py)
before any work. The decoder sees the empty caption throughout (as in the image-variation pipeline): the
embedding carries the content.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import image_processing, request as req
from .cascade import UnCLIPOutput
from .observers import call_observer, check_observer
from .samplers import seeded_randn

DEFAULT_EDIT_THETAS = (0.0, 0.125, 0.25, 0.375, 0.5)


@dataclass
class Inversion:
    """The bipartite latent of a batch of images.

    latents: x_T (B, C, S, S), the decoder noise that DDIM with η = 0 maps back to `image`.
    image_embeddings: z_i (B, D), the conditioning used for the inversion (and needed to decode back).
    image: x0 (B, C, S, S) in [-1, 1], the decoder-resolution images that were inverted.
    """
    latents: torch.Tensor
    image_embeddings: torch.Tensor
    image: torch.Tensor
    num_inference_steps: int
    decoder_guidance_scale: float


@dataclass
class LatentSeriesOutput:
    """A series of images along a path in latent space (interpolation, text diff).

    images: as `UnCLIPOutput.images` (one per position); image_embeddings: the embedding decoded at each
    position (K, D); thetas: the position of each image along the path (0 = start); latents: the decoder
    noise x_T of each image (K, C, S, S)."""
    images: object
    image_embeddings: torch.Tensor
    thetas: list[float]
    latents: torch.Tensor


# ------------------------------------------------------------------------------------------- pure math

def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation along the great circle from `a` to `b`, row-wise over the last dim.

    slerp(a, b, t) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with Ω the angle between a and b. t = 0 gives
    `a` and t = 1 gives `b` exactly; for unit vectors every result is a unit vector. Nearly parallel rows fall
    back to linear interpolation; opposite rows have no unique great circle and raise ValueError."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("slerp: a and b must be tensors")
    if a.shape != b.shape or a.dim() == 0:
        raise ValueError(f"slerp: a and b must have the same shape (at least 1 dim); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t must be a finite real number; got {t!r}")
    t = float(t)
    a64, b64 = a.double(), b.double()
    cos = (torch.nn.functional.normalize(a64, dim=-1) * torch.nn.functional.normalize(b64, dim=-1)).sum(-1)
    cos = cos.clamp(-1.0, 1.0)
    omega = torch.arccos(cos)[..., None]
    sin = torch.sin(omega)
    parallel = sin < 1e-7
    if bool((parallel & (cos[..., None] < 0)).any()):
        raise ValueError("slerp: a and b point in opposite directions; the path between them is not unique")
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe_sin)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe_sin)
    return (wa * a64 + wb * b64).to(a.dtype)


def text_diff_embeddings(image_embedding: torch.Tensor, from_text_embedding: torch.Tensor,
                         to_text_embedding: torch.Tensor, thetas: Sequence[float]) -> torch.Tensor:
    """z_θ for each θ (paper §3.3): z_d = norm(z_t − z_t0), z_θ = |z_i| · slerp(ẑ_i, z_d, θ).

    The rotation happens on the unit sphere (so slerp(ẑ_i, z_d, θ) is unit-norm) and the result keeps the image
    embedding's length, which the decoder was trained on; θ = 0 gives z_i. Inputs are (D,) vectors; returns
    (len(thetas), D)."""
    thetas = req.check_thetas(thetas)
    vectors = {"image_embedding": image_embedding, "from_text_embedding": from_text_embedding,
               "to_text_embedding": to_text_embedding}
    for name, v in vectors.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D float tensor (D,)")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if not (image_embedding.shape == from_text_embedding.shape == to_text_embedding.shape):
        raise ValueError("image_embedding, from_text_embedding and to_text_embedding must have the same size; got "
                         f"{image_embedding.shape[0]}, {from_text_embedding.shape[0]}, {to_text_embedding.shape[0]}")
    diff = to_text_embedding.double() - from_text_embedding.double()
    if diff.norm() < 1e-8:
        raise ValueError("the two captions have the same CLIP text embedding: there is no direction to edit along")
    norm = image_embedding.double().norm()
    if norm < 1e-12:
        raise ValueError("image_embedding is zero: it has no direction to rotate")
    direction = diff / diff.norm()
    unit_image = image_embedding.double() / norm
    rows = [image_embedding.double() if theta == 0.0 else norm * slerp(unit_image, direction, theta)
            for theta in thetas]
    return torch.stack(rows).to(image_embedding.dtype)


# -------------------------------------------------------------------------------------------- encoding

@torch.inference_mode()
def encode_image(cascade, images=None, *, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP image embeddings z_i (B, D) of one image or a list of images (PIL images of any mode and size,
    numpy arrays (H, W, C) / (C, H, W), tensors (C, H, W) / (B, C, H, W); see `unclip.image_processing`), or
    of `pixel_values` that are already CLIP-preprocessed (what diffusers passes as a tensor `image`)."""
    if (images is None) == (pixel_values is None):
        raise ValueError("give exactly one of images and pixel_values")
    found, _, pixels, _ = req.image_source(cascade, images, None, pixel_values)
    return _embed(cascade, found, pixels, "images")


def _embed(cascade, images, pixel_values, name: str, observer=None) -> torch.Tensor:
    c = cascade.components
    if pixel_values is None:
        pixel_values = image_processing.preprocess(images, image_processing.processor_config_for(c), name=name)
    expected = c.image_encoder.config.image_size
    if tuple(pixel_values.shape[-2:]) != (expected, expected):
        raise ValueError(f"images are preprocessed to {tuple(pixel_values.shape[-2:])} but the image encoder takes "
                         f"({expected}, {expected}): check feature_extractor/preprocessor_config.json")
    return cascade.encode_images(pixel_values, observer)


def _prior_embeddings(cascade, prompts: list[str], generator, steps: int, scale: float, observer):
    """One prior image embedding per prompt (diffusers' draw order: the prior's latents, then its step noise)."""
    guided = scale > 1.0
    text = cascade.encode_prompts(prompts, 1, guided, observer)
    plan = cascade.plan(cascade.components.prior_scheduler, steps, "ddpm", 0.0)
    return cascade.prior(text, rows=len(prompts), candidates=1, guidance=scale if guided else None, plan=plan,
                         generator=generator, observer=observer)


def _upsample(cascade, x, steps: dict, generator, observer):
    """Every upsampler on the decoder output, deterministically: DDIM η = 0 from one latent draw shared by all
    rows, so neighbouring images of a series differ only where their embeddings do."""
    for up in cascade.components.upsamplers:
        cfg = up.first.config
        shape = (1, cfg.in_channels // 2, cfg.sample_size, cfg.sample_size)
        latents = seeded_randn(shape, generator, cascade.device, cascade.dtype).expand(x.shape[0], -1, -1, -1)
        plan = cascade.plan(up.scheduler, steps[up.name], "ddim", 0.0)
        x = cascade.super_res(up, x, rows=x.shape[0], plan=plan, latents=latents, generator=generator,
                              observer=observer)
    return x


# ------------------------------------------------------------------------------------------ variations

@torch.inference_mode()
def variations(cascade, image=None, num_images_per_prompt: int = 1, decoder_num_inference_steps: int = 25,
               super_res_num_inference_steps: int | list[int] = 7, generator=None,
               decoder_latents: torch.Tensor | None = None, super_res_latents=None,
               image_embeddings: torch.Tensor | None = None, decoder_guidance_scale: float | None = None,
               output_type: str = "pil", return_dict: bool = True, *, pixel_values: torch.Tensor | None = None,
               sampler: str | dict = "ddpm", eta: float | dict = 0.0, callback: Callable | None = None,
               progress: bool = True, observer=None, negative_prompt: str | list[str] | None = None):
    """Variations of images: their CLIP embeddings decoded with fresh noise, then upsampled.

    Keywords mean what they mean in diffusers' `UnCLIPImageVariationPipeline`, and with the same CPU generator
    the random draws are the same (decoder latents, decoder step noise, upsampler latents, upsampler step noise).
    One difference: a tensor `image` is an image here (preprocessed like any other); pass CLIP-preprocessed
    tensors as `pixel_values=` (diffusers takes those as `image`). Extras as in `Pipeline.__call__`: sampler,
    eta (per stage or as {stage: value}), callback, progress; negative_prompt (one str, or one per image): the
    decoder's unconditional guidance rows use that caption instead of the empty one. Returns
    UnCLIPOutput(images, image_embeddings)."""
    r = req.variations_request(
        cascade, image=image, num_images_per_prompt=num_images_per_prompt,
        decoder_num_inference_steps=decoder_num_inference_steps,
        super_res_num_inference_steps=super_res_num_inference_steps, generator=generator,
        decoder_latents=decoder_latents, super_res_latents=super_res_latents, image_embeddings=image_embeddings,
        decoder_guidance_scale=decoder_guidance_scale, output_type=output_type, return_dict=return_dict,
        pixel_values=pixel_values, sampler=sampler, eta=eta, callback=callback, progress=progress,
        call_default=cascade.call_default, negative_prompt=negative_prompt)
    obs = call_observer(check_observer(observer), r.callback, r.progress)
    c = cascade.components
    if r.image_embeddings is not None:
        embeds = r.image_embeddings.to(cascade.device, cascade.dtype)
    else:
        embeds = _embed(cascade, r.images, r.pixel_values, "image", obs)
    n = r.num_images_per_prompt
    guided = r.decoder_guidance_scale > 1.0
    text = cascade.empty_captions(r.batch, n, guided, r.negative_prompts)
    embeds = embeds.repeat_interleave(n, dim=0)
    plan = cascade.plan(c.decoder_scheduler, r.steps["decoder"], r.sampler["decoder"], r.eta["decoder"])
    x = cascade.decoder(embeds, text, rows=r.rows, guidance=r.decoder_guidance_scale if guided else None, plan=plan,
                        latents=r.decoder_latents, generator=r.generator, observer=obs)
    for up, latents in zip(c.upsamplers, r.super_res_latents):
        up_plan = cascade.plan(up.scheduler, r.steps[up.name], r.sampler[up.name], r.eta[up.name])
        x = cascade.super_res(up, x, rows=r.rows, plan=up_plan, latents=latents, generator=r.generator,
                              observer=obs)
    images = cascade.to_output(x, r.output_type)
    return UnCLIPOutput(images, embeds) if r.return_dict else (images,)


# ------------------------------------------------------------------------------- DDIM inversion / decoding

def _ddim_plan(cascade, steps: int, clip_sample: bool):
    # Decoding an inversion must be the exact inverse of it, so its x0 prediction is not clipped (a clip has
    # no inverse); `clip_sample=True` keeps the scheduler's own setting, for decoding fresh noise.
    schedule = cascade.components.decoder_scheduler
    if not clip_sample:
        schedule = dataclasses.replace(schedule, clip_sample=False)
    return cascade.plan(schedule, steps, "ddim", 0.0)


def _ddim_decode(cascade, embeds, latents, steps: int, scale: float, *, clip_sample: bool, observer) -> torch.Tensor:
    guided = scale > 1.0
    text = cascade.empty_captions(1, embeds.shape[0], guided)
    return cascade.decoder(embeds, text, rows=embeds.shape[0], guidance=scale if guided else None,
                           plan=_ddim_plan(cascade, steps, clip_sample), latents=latents, observer=observer,
                           clamp=False)


@torch.inference_mode()
def invert(cascade, image=None, num_inference_steps: int = 50, *, image_embeddings: torch.Tensor | None = None,
           decoder_image: torch.Tensor | None = None, decoder_guidance_scale: float = 1.0,
           callback: Callable | None = None, observer=None) -> Inversion:
    """DDIM inversion of the decoder: images → x_T given z_i, so that DDIM with η = 0 (`reconstruct`) maps
    x_T back to the images. The bipartite latent (z_i, x_T) is returned as an `Inversion`.

    image: one image or a list (read at the decoder's resolution: shorter side resized with PIL bicubic,
        center crop, [-1, 1]); or give `decoder_image`, a (B, C, S, S) tensor in [-1, 1], directly.
    image_embeddings: z_i (B, D); by default the CLIP embedding of `image`.
    decoder_guidance_scale: guidance used for the inversion (and needed again to decode back). 1 (no
        guidance) inverts best: guidance amplifies the error of the approximation.
    The inverse steps are `unclip.samplers.ddim_inverse_step` (see `DDIMInversePlan` for the approximation)."""
    r = req.invert_request(cascade, image=image, num_inference_steps=num_inference_steps,
                           image_embeddings=image_embeddings, decoder_image=decoder_image,
                           decoder_guidance_scale=decoder_guidance_scale, callback=callback)
    obs = call_observer(check_observer(observer), r.callback, False)
    c = cascade.components
    if r.images is not None:
        x0 = image_processing.decoder_pixels(r.images, c.decoder.config.sample_size).to(cascade.device)
    else:
        x0 = r.decoder_image.to(cascade.device, torch.float32)
    if r.image_embeddings is not None:
        embeds = r.image_embeddings.to(cascade.device, cascade.dtype)
    else:
        embeds = _embed(cascade, r.images, None, "image", obs)
    scale = r.decoder_guidance_scale
    guided = scale > 1.0
    text = cascade.empty_captions(1, embeds.shape[0], guided)
    plan = cascade.plan(c.decoder_scheduler, r.num_inference_steps, "ddim_inverse")
    latents = cascade.invert(x0, embeds, text, guidance=scale if guided else None, plan=plan, observer=obs)
    return Inversion(latents.to(cascade.dtype), embeds, x0, r.num_inference_steps, scale)


@torch.inference_mode()
def reconstruct(cascade, inversion: Inversion, *, callback: Callable | None = None, observer=None) -> torch.Tensor:
    """Decode an `Inversion` back with DDIM (η = 0, same steps, guidance and embeddings): the decoder-resolution
    images (B, C, S, S) in [-1, 1] (not clamped), ≈ `inversion.image`."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (from pipe.invert); got {type(inversion).__name__}")
    req.check_callback(callback)
    obs = call_observer(check_observer(observer), callback, False)
    return _ddim_decode(cascade, inversion.image_embeddings, inversion.latents, inversion.num_inference_steps,
                        inversion.decoder_guidance_scale, clip_sample=False, observer=obs)


# ------------------------------------------------------------------------------------------ interpolation

@torch.inference_mode()
def interpolate(cascade, start, end, num: int = 5, *, noise: str = "fixed", generator=None,
                decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int | list[int] = 7,
                decoder_guidance_scale: float | None = None, prior_num_inference_steps: int = 25,
                prior_guidance_scale: float | None = None, output_type: str = "pil", return_dict: bool = True,
                callback: Callable | None = None, progress: bool = True, observer=None):
    """`num` images along the slerp from `start`'s CLIP image embedding to `end`'s (paper §3.2, figure 4).

    start, end: an image (PIL/array/tensor), a prompt (embedded by the prior; needs a prior), or a (D,)
        embedding tensor.
    noise: "fixed": every image is decoded from the same x_T (one draw from `generator`; decoder
        guidance defaults to the model's, 8 for Karlo); "inverted": both endpoints must be images, each is
        DDIM-inverted with its own embedding, and x_T is slerped along with the embedding (guidance defaults
        to 1, so the end images reconstruct the inputs).
    Decoding is DDIM with η = 0 (deterministic), and the upsamplers run DDIM η = 0 from one shared latent
    draw, so the series changes smoothly. Draw order: prior latents and noise (prompt endpoints, in order),
    decoder x_T ("fixed" only), then one latent draw per upsampler.
    Returns LatentSeriesOutput(images, image_embeddings, thetas, latents)."""
    r = req.interpolate_request(
        cascade, start=start, end=end, num=num, noise=noise, generator=generator,
        decoder_num_inference_steps=decoder_num_inference_steps,
        super_res_num_inference_steps=super_res_num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
        prior_num_inference_steps=prior_num_inference_steps, prior_guidance_scale=prior_guidance_scale,
        output_type=output_type, return_dict=return_dict, callback=callback, progress=progress,
        call_default=cascade.call_default)
    obs = call_observer(check_observer(observer), r.callback, r.progress)
    ends = r.endpoints
    embeds = [None, None]
    prompts = [(i, v) for i, (kind, v) in enumerate(ends) if kind == "prompt"]
    if prompts:
        from_prior = _prior_embeddings(cascade, [p for _, p in prompts], r.generator, r.prior_steps,
                                       r.prior_guidance_scale, obs)
        for (i, _), e in zip(prompts, from_prior):
            embeds[i] = e
    for i, (kind, value) in enumerate(ends):
        if kind == "embedding":
            embeds[i] = value.to(cascade.device, cascade.dtype)
        elif kind == "image":
            embeds[i] = _embed(cascade, [value], None, ("start", "end")[i], obs)[0]
    thetas = [k / (r.num - 1) for k in range(r.num)]
    z = torch.stack([slerp(embeds[0], embeds[1], th) for th in thetas])

    dec = cascade.components.decoder.config
    shape = (dec.in_channels, dec.sample_size, dec.sample_size)
    scale = r.decoder_guidance_scale
    if r.noise == "fixed":
        x_T = seeded_randn((1,) + shape, r.generator, cascade.device, cascade.dtype).expand(r.num, -1, -1, -1)
    else:
        inv = [invert(cascade, ends[i][1], r.steps, image_embeddings=embeds[i][None], decoder_guidance_scale=scale)
               for i in (0, 1)]
        a, b = (v.latents.reshape(1, -1) for v in inv)
        x_T = torch.cat([slerp(a, b, th) for th in thetas]).reshape((r.num,) + shape)
    x = _ddim_decode(cascade, z, x_T, r.steps, scale, clip_sample=r.noise == "fixed", observer=obs).clamp(-1, 1)
    x = _upsample(cascade, x, r.super_res_steps, r.generator, obs)
    images = cascade.to_output(x, r.output_type)
    out = LatentSeriesOutput(images, z, thetas, x_T.contiguous())
    return out if r.return_dict else (images,)


# -------------------------------------------------------------------------------------------- text diffs

@torch.inference_mode()
def text_diff(cascade, image, from_caption: str, to_caption: str, thetas: Sequence[float] = DEFAULT_EDIT_THETAS,
              *, generator=None, decoder_num_inference_steps: int = 50,
              super_res_num_inference_steps: int | list[int] = 7, decoder_guidance_scale: float = 1.0,
              image_embeddings: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
              callback: Callable | None = None, progress: bool = True, observer=None):
    """Edit an image along a text direction (paper §3.3, figure 5): z_d = norm(z_t − z_t0) from the CLIP text
    embeddings of `to_caption` (z_t) and `from_caption` (z_t0), z_θ = |z_i|·slerp(ẑ_i, z_d, θ) for each θ
    (see `text_diff_embeddings`), each decoded with DDIM η = 0 from the image's inverted x_T (so θ = 0
    reconstructs the image), then upsampled (DDIM η = 0 from one shared latent draw of `generator`).

    thetas: positions in [0, 1]; the paper shows 0 to 0.5. decoder_num_inference_steps: used for the
    inversion and the decoding. Returns LatentSeriesOutput(images, image_embeddings, thetas, latents)."""
    r = req.text_diff_request(
        cascade, image=image, from_caption=from_caption, to_caption=to_caption, thetas=thetas, generator=generator,
        decoder_num_inference_steps=decoder_num_inference_steps,
        super_res_num_inference_steps=super_res_num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
        image_embeddings=image_embeddings, output_type=output_type, return_dict=return_dict, callback=callback,
        progress=progress)
    obs = call_observer(check_observer(observer), r.callback, r.progress)
    if r.image_embeddings is not None:
        z_i = r.image_embeddings.to(cascade.device, cascade.dtype)[None]
    else:
        z_i = _embed(cascade, [r.image], None, "image", obs)
    text, _, _ = cascade.encode_prompts([r.from_caption, r.to_caption], 1, False, obs)
    thetas = list(r.thetas)
    z = text_diff_embeddings(z_i[0].float(), text[0].float(), text[1].float(), thetas).to(cascade.dtype)
    inv = invert(cascade, r.image, r.steps, image_embeddings=z_i, decoder_guidance_scale=r.decoder_guidance_scale)
    x_T = inv.latents.expand(len(thetas), -1, -1, -1)
    x = _ddim_decode(cascade, z, x_T, r.steps, r.decoder_guidance_scale, clip_sample=False,
                     observer=obs).clamp(-1, 1)
    x = _upsample(cascade, x, r.super_res_steps, r.generator, obs)
    out_images = cascade.to_output(x, r.output_type)
    out = LatentSeriesOutput(out_images, z, thetas, x_T.contiguous())
    return out if r.return_dict else (out_images,)
