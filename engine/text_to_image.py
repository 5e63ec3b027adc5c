"""Text to image: prompt → prior → decoder → each upsampler, for a validated `GenerateRequest`.

A client of the cascade core only. Stages are built and run in cascade order, so the random draws follow
diffusers' UnCLIPPipeline (prior latents and step noise, decoder latents and step noise, then each upsampler's).

`generate_stages` is the call as a coroutine: it yields each `Stage` as it is built and is sent the stage's
final latents back. `generate` runs it stage by stage on the cascade; a server (unclip.serve) runs the stages
of many requests batched together and sends each request its own rows.
"""
from __future__ import annotations

from typing import Generator

from .cascade import Cascade, UnCLIPOutput
from .observers import Observer
from .request import GenerateRequest


def generate_stages(cascade: Cascade, r: GenerateRequest, observer: Observer) -> Generator:
    """Yields the call's stages in cascade order (each is sent its final latents, float32); returns what
    `generate` returns. Text encoding and the work between stages happen here, per request."""
    c = cascade.components
    guided = r.guided
    negative = r.negative_prompts  # None: the empty caption (diffusers' uncond rows)
    if r.prompts is not None:
        text = cascade.encode_prompts(r.prompts, r.num_images_per_prompt, guided, observer, negative)
    else:
        text = cascade.text_from_output(r.text_model_output, r.text_attention_mask, r.num_images_per_prompt, guided,
                                        negative)
    prior_plan = cascade.plan(c.prior_scheduler, r.steps["prior"], r.sampler["prior"], r.eta["prior"])
    stage = cascade.prior_stage(text, rows=r.rows, candidates=r.prior_candidates,
                                guidance=r.prior_guidance_scale if guided else None, plan=prior_plan,
                                latents=r.prior_latents, generator=r.generator)
    embeds = cascade.prior_embeddings(stage, (yield stage))
    decoder_plan = cascade.plan(c.decoder_scheduler, r.steps["decoder"], r.sampler["decoder"], r.eta["decoder"])
    stage = cascade.decoder_stage(embeds, text, rows=r.rows, guidance=r.decoder_guidance_scale if guided else None,
                                  plan=decoder_plan, latents=r.decoder_latents, generator=r.generator)
    x = (yield stage).clamp(-1, 1)
    for up, latents in zip(c.upsamplers, r.super_res_latents):
        plan = cascade.plan(up.scheduler, r.steps[up.name], r.sampler[up.name], r.eta[up.name])
        x = yield cascade.super_res_stage(up, x, rows=r.rows, plan=plan, latents=latents, generator=r.generator)
    images = cascade.to_output(x, r.output_type)
    return UnCLIPOutput(images, embeds) if r.return_dict else (images,)


def generate(cascade: Cascade, r: GenerateRequest, observer: Observer) -> UnCLIPOutput | tuple:
    """Text to image for a validated `GenerateRequest`: text → prior → decoder → each upsampler."""
    steps = generate_stages(cascade, r, observer)
    try:
        stage = next(steps)
        while True:
            stage = steps.send(cascade.run(stage, observer))
    except StopIteration as done:
        return done.value
