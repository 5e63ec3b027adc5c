"""The cascade core: a cascade's components, the runner that executes its stages, and the steps between stages.

`Cascade` is what `Pipeline` (text-to-image) and `unclip.latent_space` (variations, inversion, interpolation,
text diffs) are built on; neither knows the other. It encodes text and images, builds each stage
(engine/stages.py), hands it to the runner, checks the result is finite, and does the plain tensor work
between stages. Arguments arrive validated (engine/request.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import samplers, stages
from .errors import NonFiniteError
from .observers import Observer
from .runner import Runner, runner_class


@dataclass(frozen=True)
class EditSource:
    """A source image for img2img / inpainting, held at the output resolution and resized for each stage.

    image: (rows, 3, O, O) float32 in [-1, 1]. mask: bool (rows or 1, 1, O, O), True = generate, or None
    (img2img: no known region). jump_after: {stage name: [bool per step]} from `Cascade.edit_plan`
    (resampling jumps; stages not named have none)."""
    image: torch.Tensor
    mask: torch.Tensor | None
    jump_after: dict

    def at(self, size: int):
        """(x0, mask) at size × size: the image resized (bicubic, antialiased), the mask by `stages.resize_mask`."""
        x0 = self.image
        if x0.shape[-1] != size:
            x0 = F.interpolate(x0, size=[size, size], mode="bicubic", align_corners=False,
                               antialias=True).clamp(-1, 1)
        return x0, None if self.mask is None else stages.resize_mask(self.mask, size)


@dataclass
class UnCLIPOutput:
    """images: list[PIL.Image] | np.ndarray (B, H, W, 3) | torch.Tensor (B, 3, H, W), values in [0, 1];
    image_embeddings: the CLIP image embeddings the decoder was conditioned on (B, D);
    scores: with `rerank=k`, the CLIP image–text cosine of each returned image (B,), else None."""
    images: object
    image_embeddings: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def check_finite(x: torch.Tensor, what: str, dtype) -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"stage '{what}' produced non-finite values (dtype {dtype}); try float32 or bfloat16")
    return x


class Cascade:
    """Components + runner + prepared networks. Thread-safe: calls share only the plan cache (locked)."""

    MAX_PLANS = 64  # a service cycling through step counts must not grow the cache without bound

    def __init__(self, components, runner: Runner):
        self.components = components
        self.runner = runner
        self.device = runner.device
        self.dtype = runner.dtype
        self.networks = runner.prepare(components)
        self._lock = threading.Lock()
        self._plans: dict = {}

    @classmethod
    def build(cls, components, *, backend="torch", device="cpu", dtype=torch.float32, runner_options=None):
        """`backend`: a registered name, a Runner subclass, or a Runner instance (then device/dtype are its own)."""
        if isinstance(backend, Runner):
            if runner_options:
                raise ValueError("runner_options apply when backend is a name or a class, not a Runner instance")
            return cls(components, backend)
        klass = runner_class(backend)
        ok, reason = klass.available(device)
        if not ok:
            raise ValueError(f"backend {klass.name!r} is not available here: {reason}")
        return cls(components, klass(device=device, dtype=dtype, **(runner_options or {})))

    # ------------------------------------------------------------------ facts
    @property
    def backend(self) -> str:
        return self.runner.name

    @property
    def stage_names(self) -> list[str]:
        c = self.components
        return (["prior"] if c.prior is not None else []) + ["decoder"] + [u.name for u in c.upsamplers]

    @property
    def image_size(self) -> int:
        return self.components.upsamplers[-1].first.config.sample_size

    def plan(self, schedule, steps: int, sampler: str = "ddpm", eta: float = 0.0):
        """The sampler plan (cached: coefficients are computed once per configuration)."""
        return self._cached((schedule, steps, sampler, eta), lambda: (
            samplers.make_inverse_plan(schedule, steps, device=self.device) if sampler == "ddim_inverse"
            else samplers.make_plan(schedule, steps, sampler=sampler, eta=eta, device=self.device)))

    def edit_plan(self, schedule, steps: int, sampler: str = "ddpm", eta: float = 0.0, strength: float = 1.0,
                  resample_jumps: int = 0):
        """(plan, jump_after) of an editing stage: the last round(strength·steps) steps of `plan(...)`, each but
        the last repeated resample_jumps + 1 times (`stages.edit_steps`). Cached like plans, so a captured
        loop sees the same plan object again."""
        def build():
            base = self.plan(schedule, steps, sampler, eta)
            index, jump_after = stages.edit_steps(base.num_steps, strength, resample_jumps)
            plan = base if index == list(range(base.num_steps)) else stages.index_plan(base, index)
            return plan, jump_after
        return self._cached((schedule, steps, sampler, eta, "edit", strength, resample_jumps), build)

    def alpha_bar(self, schedule) -> torch.Tensor:
        """ā_t (T,) float32 of a stage's schedule, on the device (for noising a source image to a timestep)."""
        def build():
            sc = samplers.ScheduleConfig.of(schedule)
            betas = samplers.betas_for(sc.beta_schedule, sc.num_train_timesteps, sc.beta_start, sc.beta_end)
            return samplers.alphas_cumprod_for(betas).to(self.device)
        return self._cached((schedule, "alpha_bar"), build)

    def _cached(self, key, build):
        with self._lock:
            value = self._plans.get(key)
        if value is None:
            value = build()
            with self._lock:
                if len(self._plans) >= self.MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = value
        return value

    # ------------------------------------------------------------------ text and images
    def _encode(self, prompts: list[str]):
        tokens = self.components.tokenizer(prompts)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        embeds, hidden = self.networks["text_encoder"](ids)
        return embeds, hidden, mask

    def _with_uncond(self, embeds, hidden, mask, batch: int, n: int, negative_prompts: list[str] | None = None):
        """Prepend the unconditional rows: the empty caption's features, or the negative prompts' (one per
        prompt). They are encoded as a batch of `batch` rows, as diffusers does: CPU kernels round differently
        with the batch size, and Karlo's first super-resolution step amplifies even one-ulp differences, so
        the same batch shape keeps us bit-identical."""
        captions = [""] * batch if negative_prompts is None else list(negative_prompts)
        u_embeds, u_hidden, u_mask = (t.repeat_interleave(n, dim=0) for t in self._encode(captions))
        return torch.cat([u_embeds, embeds]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])

    def encode_prompts(self, prompts: list[str], n: int = 1, guidance: bool = True, observer=None,
                       negative_prompts: list[str] | None = None):
        """CLIP text features ([uncond] + cond rows, each prompt repeated n times): (embeds, hidden, mask).
        The uncond rows are the empty caption's, or with `negative_prompts` (one per prompt) theirs: the
        unconditional half of classifier-free guidance then steers away from them."""
        observer = observer or Observer()
        observer.on_stage_start("text", None)
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in self._encode(prompts))
        out = self._with_uncond(embeds, hidden, mask, len(prompts), n, negative_prompts) if guidance \
            else (embeds, hidden, mask)
        observer.on_stage_end("text", None, None)
        return out

    def text_from_output(self, text_model_output, mask, n: int, guidance: bool,
                         negative_prompts: list[str] | None = None):
        """Given text-encoder outputs (embeds, hidden) and their mask, in the same row layout."""
        embeds = text_model_output[0].to(self.device, self.dtype)
        hidden = text_model_output[1].to(self.device, self.dtype)
        batch = embeds.shape[0]
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask.to(self.device).bool()))
        return self._with_uncond(embeds, hidden, mask, batch, n, negative_prompts) if guidance \
            else (embeds, hidden, mask)

    def empty_captions(self, batch: int, n: int, guidance: bool, negative_prompts: list[str] | None = None):
        """The empty caption's features for batch × n rows (twice with guidance), from one text-encoder run
        over `batch` empty captions, as diffusers' image-variation pipeline does (same rounding). With
        `negative_prompts` (one per image) and guidance, the uncond rows are the negative captions' instead."""
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in self._encode([""] * batch))
        if guidance and negative_prompts is not None:
            return self._with_uncond(embeds, hidden, mask, batch, n, negative_prompts)
        if guidance:
            embeds, hidden, mask = (torch.cat([t, t]) for t in (embeds, hidden, mask))
        return embeds, hidden, mask

    def clip_scores(self, images: torch.Tensor, text_embeds: torch.Tensor, observer=None) -> torch.Tensor:
        """CLIP image–text cosine (R,) of images (R, 3, H, W) in [0, 1] against text embeddings (R, D): the
        images as 8-bit pixels (what a saved PNG holds) through the image processor and image encoder."""
        from . import image_processing
        if self.components.image_encoder is None:
            raise ValueError("this pipeline has no image encoder, so it cannot score images with CLIP")
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pixel_values = image_processing.preprocess(list(pixels), image_processing.processor_config_for(
            self.components), name="images")
        image_embeds = self.encode_images(pixel_values, observer).float()
        return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)

    def encode_images(self, pixel_values: torch.Tensor, observer=None) -> torch.Tensor:
        """CLIP image embeddings of CLIP-preprocessed pixel values (B, 3, S, S)."""
        observer = observer or Observer()
        observer.on_stage_start("image_encoder", None)
        embeds, _ = self.networks["image_encoder"](pixel_values.to(self.device, self.dtype))
        observer.on_stage_end("image_encoder", None, None)
        return check_finite(embeds.to(self.device, self.dtype), "image_encoder", self.dtype)

    # ------------------------------------------------------------------ stages
    def run(self, stage, observer=None) -> torch.Tensor:
        """Run one stage on the runner; its output checked finite (the error names the stage)."""
        observer = observer or Observer()
        observer.on_stage_start(stage.name, stage)
        try:
            x = check_finite(self.runner.run(stage, self.networks, observer), stage.name, self.dtype)
        except BaseException:
            observer.on_stage_end(stage.name, stage, None)  # a progress bar closes, a timer stops
            raise
        observer.on_stage_end(stage.name, stage, x)
        return x

    def call_default(self, name: str, value=None):
        """`value` if given, else the model's recommended setting for keyword `name` (Karlo's if it has none)."""
        from .loading import CALL_DEFAULT_KEYS
        if value is not None:
            return value
        return self.components.call_defaults.get(name, CALL_DEFAULT_KEYS[name])

    def prior_stage(self, text, *, rows: int, candidates: int, guidance: float | None, plan, latents=None,
                    generator=None):
        """The prior's `Stage` (its random numbers drawn now from `generator`), not yet run."""
        return stages.prior_stage(plan, text, rows=rows, candidates=candidates, guidance=guidance,
                                  embedding_dim=self.components.prior.config.embedding_dim, latents=latents,
                                  generator=generator, device=self.device, dtype=self.dtype)

    def prior_embeddings(self, stage, x: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (rows, D) from a prior stage's final latents: post-processing (clip_mean /
        clip_std), then the best of the stage's candidates per image."""
        embeds = check_finite(self.networks["prior.post_process"](x.to(self.dtype)), "prior (post-processing: "
                              "clip_mean/clip_std)", self.dtype)
        return stages.select_candidates(embeds, stage.conditioning["text_embeds"], stage.rows // stage.candidates,
                                        stage.candidates)

    def prior(self, text, *, rows: int, candidates: int, guidance: float | None, plan, latents=None,
              generator=None, observer=None) -> torch.Tensor:
        """CLIP image embeddings (rows, D) from text features (guided layout when `guidance` is not None)."""
        stage = self.prior_stage(text, rows=rows, candidates=candidates, guidance=guidance, plan=plan,
                                 latents=latents, generator=generator)
        return self.prior_embeddings(stage, self.run(stage, observer))

    def decoder_conditioning(self, image_embeds, text, guidance: bool):
        """text_proj: (context tokens, additive time embedding, token mask incl. the extra context tokens)."""
        embeds, hidden, mask = text
        context, time_embed = self.networks["text_proj"](image_embeds, embeds, hidden, guidance)
        check_finite(context, "text_proj", self.dtype)
        extra = context.shape[1] - mask.shape[1]
        return context, time_embed, F.pad(mask, (extra, 0), value=True)

    def _learned_variance(self):
        c = self.components
        return c.decoder.config.in_channels if c.decoder_scheduler.variance_type == "learned_range" else None

    def decoder_stage(self, image_embeds, text, *, rows: int, guidance: float | None, plan, latents=None,
                      generator=None, source: "EditSource | None" = None):
        """The decoder's `Stage` (text_proj run now, its random numbers drawn now), not yet run. `source`:
        img2img / inpainting (`EditSource`), with `plan` from `edit_plan`."""
        context, time_embed, mask = self.decoder_conditioning(image_embeds, text, guidance is not None)
        cfg = self.components.decoder.config
        stage = stages.decoder_stage(plan, context, time_embed, mask, rows=rows, guidance=guidance,
                                     channels=cfg.in_channels, size=cfg.sample_size,
                                     learned_variance_channels=self._learned_variance(), latents=latents,
                                     generator=generator, device=self.device, dtype=self.dtype)
        return stage if source is None else self._edited(stage, source, self.components.decoder_scheduler,
                                                           generator)

    def decoder(self, image_embeds, text, *, rows: int, guidance: float | None, plan, latents=None,
                generator=None, observer=None, clamp: bool = True) -> torch.Tensor:
        """The decoder's images (rows, C, S, S) in [-1, 1] (unclamped with clamp=False)."""
        stage = self.decoder_stage(image_embeds, text, rows=rows, guidance=guidance, plan=plan, latents=latents,
                                   generator=generator)
        x = self.run(stage, observer)
        return x.clamp(-1, 1) if clamp else x

    def invert(self, image, image_embeds, text, *, guidance: float | None, plan, observer=None) -> torch.Tensor:
        """DDIM inversion of decoder-resolution images x0 (B, C, S, S) → x_T given their embeddings."""
        context, time_embed, mask = self.decoder_conditioning(image_embeds, text, guidance is not None)
        stage = stages.inversion_stage(plan, image.to(self.device), context, time_embed, mask, guidance=guidance,
                                       learned_variance_channels=self._learned_variance(), dtype=self.dtype)
        return self.run(stage, observer)

    def super_res_stage(self, up, low_res, *, rows: int, plan, latents=None, generator=None,
                        source: "EditSource | None" = None):
        """Upsampler `up`'s `Stage` for the low-resolution images (resized now, random numbers drawn now)."""
        cfg = up.first.config
        stage = stages.super_res_stage(plan, up.name, low_res, rows=rows, channels=cfg.in_channels // 2,
                                       size=cfg.sample_size, latents=latents, generator=generator,
                                       device=self.device, dtype=self.dtype)
        return stage if source is None else self._edited(stage, source, up.scheduler, generator)

    def _edited(self, stage, source: "EditSource", schedule, generator):
        """`stage` started from / held to the source image at the stage's resolution (`stages.with_source`)."""
        x0, mask = source.at(stage.latents.shape[-1])
        return stages.with_source(stage, x0.to(self.device), None if mask is None else mask.to(self.device),
                                  alpha_bar=self.alpha_bar(schedule), jump_after=source.jump_after.get(stage.name),
                                  generator=generator,
                                  device=self.device, dtype=self.dtype)

    def super_res(self, up, low_res, *, rows: int, plan, latents=None, generator=None, observer=None):
        stage = self.super_res_stage(up, low_res, rows=rows, plan=plan, latents=latents, generator=generator)
        return self.run(stage, observer)

    # ------------------------------------------------------------------ output
    def to_output(self, x: torch.Tensor, output_type: str):
        """Images from latents in [-1, 1]: "pt" (B, 3, H, W), "np" (B, H, W, 3) floats in [0, 1], or PIL."""
        return self.format_images(check_finite((x * 0.5 + 0.5).clamp(0, 1), "output", self.dtype), output_type)

    @staticmethod
    def format_images(images: torch.Tensor, output_type: str):
        """Images (B, 3, H, W) in [0, 1] as "pt" (float32, CPU), "np" (B, H, W, 3) or a list of PIL images."""
        if output_type == "pt":
            return images.float().cpu()
        array = images.float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        from PIL import Image
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def weights_bytes(self) -> int:
        """Bytes of the torch weights the prepared networks use (0 for runtimes that hold their own)."""
        seen, total = set(), 0
        for m in self.networks.modules:
            for p in list(m.parameters()) + list(m.buffers()):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
        return total
