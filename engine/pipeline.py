"""`unclip.Pipeline`: prompt → prior → decoder → upsampler(s) → images, with diffusers' keywords and seeds.

Every stage runs through `sampling.run_loop`; what differs between stages (networks, guidance, sampler,
sizes) is data built in `_prior_stage`, `_decoder_stage` and `_super_res_stage`.
"""
from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import samplers
from .graphs import GraphStage, StageGraphs
from .loading import CALL_DEFAULT_KEYS, Components, load_components, save_components
from .samplers import seeded_randn as randn
from .sampling import guided, run_loop

BACKENDS = ("torch", "fast", "onnxruntime", "tensorrt")
OUTPUT_TYPES = ("pil", "np", "pt")
SAMPLERS = ("ddpm", "ddim")


class NonFiniteError(FloatingPointError):
    """A stage produced NaN or Inf (typically fp16 overflow); the message names the stage."""


@dataclass
class UnCLIPOutput:
    images: object  # list[PIL.Image] | np.ndarray (B, H, W, 3) | torch.Tensor (B, 3, H, W), values in [0, 1]
    image_embeddings: torch.Tensor | None = None


def _dtype_of(dtype) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or the torch dtypes); got {dtype!r}")


def _check_steps(name: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in 1..{limit}; got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be in 1..{limit}; got {value}")
    return int(value)


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite real number; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return float(value)


def _per_stage(name: str, value, stages: list[str], default, check: Callable) -> dict:
    """`value` for every stage, or a dict {stage: value} overriding `default` for some stages."""
    if isinstance(value, dict):
        unknown = set(value) - set(stages)
        if unknown:
            raise ValueError(f"{name}: unknown stage(s) {sorted(unknown)}; stages are {stages}")
        return {s: check(value.get(s, default)) for s in stages}
    return {s: check(value) for s in stages}


def networks(c: Components) -> list[torch.nn.Module]:
    """Every network of a cascade, once each (the last-step upsampler may be the first one)."""
    nets = [c.text_encoder, c.prior, c.text_proj, c.decoder, c.image_encoder]
    for up in c.upsamplers:
        nets += [up.first, up.last]
    unique = {id(n): n for n in nets if n is not None}
    return list(unique.values())


def _use_fast_kernels(c: Components, device: torch.device) -> None:
    """The `fast` backend: the same modules with the Triton kernels at their attention and group-norm swap
    points. Needs CUDA, or TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (for testing)."""
    import os
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'fast' runs Triton kernels: it needs a CUDA device (got {device}), or "
                         "TRITON_INTERPRET=1 to run them in Triton's CPU interpreter; use backend='torch' here")
    from .kernels import use_kernels
    for net in networks(c):
        use_kernels(net)


class Pipeline:
    """The unCLIP cascade. Build with `from_pretrained(dir)` or `from_preset(name)`, then call with a prompt."""

    def __init__(self, components: Components, *, device="cpu", dtype=torch.float32, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if backend == "fast":
            _use_fast_kernels(components, torch.device(device))
        elif backend in ("onnxruntime", "tensorrt"):  # networks become exported graphs; sampling is unchanged
            from .export.loader import prepare_components
            components = prepare_components(components, backend, device=device, dtype=dtype)
        elif backend != "torch":
            raise NotImplementedError(f"backend {backend!r} is not available yet in this version")
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.backend = backend
        self._lock = threading.Lock()  # guards the plan cache; calls themselves share no mutable state
        self._plans: dict = {}  # (schedule, steps, sampler, eta) -> plan: coefficients are computed once
        # backend "fast" on CUDA: each stage's whole loop is captured in a CUDA graph (engine/graphs.py); else None
        self._graphs = StageGraphs.for_backend(backend, self.device)
        if backend == "tensorrt" and self._graphs is None:  # TensorRT enqueues are capturable: whole stage loops
            from .export.tensorrt import stage_graphs
            self._graphs = stage_graphs(self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, *, device="cpu", dtype=torch.float32, backend: str = "torch") -> "Pipeline":
        """Load a diffusers-layout unCLIP folder (e.g. Karlo v1 alpha). Never writes into `path`."""
        dtype = _dtype_of(dtype)
        if backend in ("onnxruntime", "tensorrt"):  # an `unclip export` folder (or a model folder exported now)
            from .export.loader import load_for_backend
            return cls(load_for_backend(str(path), backend, device=device, dtype=dtype), device=device, dtype=dtype,
                       backend=backend)
        return cls(load_components(str(path), device=device, dtype=dtype), device=device, dtype=dtype,
                   backend=backend)

    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, device="cpu", dtype=torch.float32,
                    backend: str = "torch") -> "Pipeline":
        """A random-weight cascade: "tiny" (fast on a CPU), "karlo" (Karlo's exact configs), "dalle2"."""
        from .presets import build_preset
        dtype = _dtype_of(dtype)
        return cls(build_preset(name, seed=seed, device=device, dtype=dtype), device=device, dtype=dtype,
                   backend=backend)

    def save_pretrained(self, path: str, dtype=None) -> None:
        """Write the cascade in the diffusers layout (loadable by diffusers' UnCLIPPipeline too)."""
        save_components(self.components, str(path), dtype=None if dtype is None else _dtype_of(dtype))

    # ------------------------------------------------------------------ properties
    @property
    def stage_names(self) -> list[str]:
        c = self.components
        return (["prior"] if c.prior is not None else []) + ["decoder"] + [u.name for u in c.upsamplers]

    @property
    def image_size(self) -> int:
        return self.components.upsamplers[-1].first.config.sample_size

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1, guidance: bool = True):
        """CLIP text features in the layout every stage expects: ([uncond] + cond rows, each prompt repeated
        `num_images_per_prompt` times). Returns (text_embeds, hidden_states, mask)."""
        c = self.components
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds, hidden, mask = self._encode_texts(prompts)
        n = num_images_per_prompt
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask))
        return self._with_uncond(embeds, hidden, mask, len(prompts), n) if guidance else (embeds, hidden, mask)

    def _encode_texts(self, prompts: list[str]):
        tokens = self.components.tokenizer(prompts)
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        embeds, hidden = self.components.text_encoder(ids)
        return embeds, hidden, mask

    def _with_uncond(self, embeds, hidden, mask, batch: int, n: int):
        """Prepend the empty caption's features. They are encoded as a batch of `batch` rows, as diffusers
        does: CPU kernels round differently with the batch size, and Karlo's first super-resolution step
        amplifies even one-ulp differences, so the same batch shape keeps us bit-identical."""
        u = self._encode_texts([""] * batch)
        u_embeds, u_hidden, u_mask = (t.repeat_interleave(n, dim=0) for t in u)
        return torch.cat([u_embeds, embeds]), torch.cat([u_hidden, hidden]), torch.cat([u_mask, mask])

    # ------------------------------------------------------------------ stages
    def _plan(self, scheduler, steps, sampler, eta):
        key = (scheduler, steps, sampler, eta)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = samplers.make_plan(scheduler, steps, sampler=sampler, eta=eta, device=self.device)
            with self._lock:
                if len(self._plans) >= 64:  # bounded: a service cycling through step counts must not grow
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _initial(self, shape, latents, generator, name):
        if latents is None:
            return randn(shape, generator, self.device, self.dtype)
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def _noise(self, plan, shape, generator):
        return [randn(shape, generator, self.device, self.dtype) if draws else None
                for draws in plan.draws_noise]

    def _run(self, name, plan, x, denoise, generator, callback, progress, graph: GraphStage | None = None):
        # Noise for every stochastic step is drawn before the loop: same order as diffusers (initial
        # latents, then one draw per step with t > 0), and the loop itself does no random draws.
        noise = self._noise(plan, tuple(x.shape), generator)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=plan.num_steps, desc=name, leave=False)
        stage_cb = None if callback is None else (lambda i, t, xi: callback(name, i, t, xi))
        try:
            x, noise = x.float(), [None if n is None else n.float() for n in noise]
            out = None
            if graph is not None and self._graphs is not None and callback is None:  # per-step callbacks: eager
                out = self._graphs.run(name, plan, x, noise, graph, self.dtype)  # None: run this one eagerly
            if out is None:
                out = run_loop(plan, x, denoise, noise, stage_cb, bar)
            elif bar is not None:
                bar.update(plan.num_steps)
            x = out
        finally:
            if bar is not None:
                bar.close()
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"stage '{name}' produced non-finite values (dtype {self.dtype}); "
                                 "try float32 or bfloat16")
        return x

    def call_default(self, name: str, value=None):
        """`value` if given, else the model's recommended setting for keyword `name` (Karlo's if it has none)."""
        if value is not None:
            return value
        return self.components.call_defaults.get(name, CALL_DEFAULT_KEYS[name])

    # ------------------------------------------------------------------ call
    @torch.inference_mode()
    def __call__(self, prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 prior_num_inference_steps: int = 25, decoder_num_inference_steps: int = 25,
                 super_res_num_inference_steps: int | list[int] = 7, generator=None,
                 prior_latents: torch.Tensor | None = None, decoder_latents: torch.Tensor | None = None,
                 super_res_latents: torch.Tensor | list | None = None, text_model_output=None,
                 text_attention_mask: torch.Tensor | None = None, prior_guidance_scale: float | None = None,
                 decoder_guidance_scale: float | None = None, output_type: str = "pil", return_dict: bool = True, *,
                 sampler: str | dict = "ddpm", eta: float | dict = 0.0, prior_candidates: int = 1,
                 callback: Callable | None = None, progress: bool = True):
        """Generate images. Keywords shared with diffusers' UnCLIPPipeline mean the same, and with the same
        CPU generator the random draws are the same (seed compatibility). Extras:

        Guidance scales left at None take the model's recommended values (`call_default`): 4 and 8 as in
        Karlo, unless the model folder says otherwise (the toy model does).
        sampler: "ddpm" (Karlo's strided DDPM) or "ddim", for all stages or as {stage: name}.
        eta: DDIM η (0 = deterministic), for all stages or as {stage: value}.
        prior_candidates: draw k prior embeddings per image, keep the one whose direction is closest to the
            text embedding (highest dot product of the unit vectors; the paper's trick). k > 1 draws extra noise.
        callback: called as callback(stage, step_index, timestep, latents) after every step.
        progress: tqdm bars per stage.
        """
        c = self.components
        if c.prior is None:
            raise ValueError("this pipeline has no prior (an image-variation model): use pipe.variations(...)")
        # ---- validate everything before any work, so a bad call leaves nothing half-done
        if prompt is None and text_model_output is None:
            raise ValueError("prompt must be a str or a list of str (or pass text_model_output)")
        if prompt is not None:
            if isinstance(prompt, str):
                prompts = [prompt]
            elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = list(prompt)
            else:
                raise TypeError("prompt must be a str or a non-empty list of str; "
                                f"got {type(prompt).__name__}" + (" (empty)" if prompt == [] else ""))
            batch = len(prompts)
        else:
            if text_attention_mask is None:
                raise ValueError("text_attention_mask is required with text_model_output")
            batch = text_model_output[0].shape[0]
        n = _check_steps("num_images_per_prompt", num_images_per_prompt, 10**6)
        k = _check_steps("prior_candidates", prior_candidates, 64)
        stages = self.stage_names
        train = c.decoder_scheduler.num_train_timesteps
        steps = {"prior": _check_steps("prior_num_inference_steps", prior_num_inference_steps,
                                       c.prior_scheduler.num_train_timesteps),
                 "decoder": _check_steps("decoder_num_inference_steps", decoder_num_inference_steps, train)}
        sr_steps = super_res_num_inference_steps
        sr_steps = list(sr_steps) if isinstance(sr_steps, (list, tuple)) else [sr_steps] * len(c.upsamplers)
        if len(sr_steps) != len(c.upsamplers):
            raise ValueError(f"super_res_num_inference_steps: give one int or {len(c.upsamplers)} (one per upsampler)")
        for up, s in zip(c.upsamplers, sr_steps):
            steps[up.name] = _check_steps("super_res_num_inference_steps", s, up.scheduler.num_train_timesteps)
        prior_scale = _check_scale("prior_guidance_scale", self.call_default("prior_guidance_scale", prior_guidance_scale))
        decoder_scale = _check_scale("decoder_guidance_scale",
                                     self.call_default("decoder_guidance_scale", decoder_guidance_scale))
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")
        sampler_of = _per_stage("sampler", sampler, stages, "ddpm", self._check_sampler)
        eta_of = _per_stage("eta", eta, stages, 0.0, self._check_eta)
        if generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
            raise TypeError(f"generator must be a torch.Generator or a list of them; got {type(generator).__name__}")
        if super_res_latents is not None and not isinstance(super_res_latents, (list, tuple)):
            super_res_latents = [super_res_latents] + [None] * (len(c.upsamplers) - 1)
        super_res_latents = list(super_res_latents or [None] * len(c.upsamplers))

        rows = batch * n
        # As in diffusers: guidance (an [uncond, cond] batch) is on for both text-conditioned stages when
        # either scale is > 1, and then each stage combines with its own scale.
        cfg = prior_scale > 1.0 or decoder_scale > 1.0

        # ---- text
        if prompt is not None:
            text_embeds, text_hidden, text_mask = self.encode_prompt(prompts, n, guidance=cfg)
        else:
            text_embeds, text_hidden, text_mask = self._text_from_output(text_model_output, text_attention_mask, n, cfg)

        # ---- prior
        image_embeds = self._prior_stage(text_embeds, text_hidden, text_mask, rows, k, cfg, prior_scale, steps,
                                         sampler_of, eta_of, prior_latents, generator, callback, progress)
        # ---- decoder
        x = self._decoder_stage(image_embeds, text_embeds, text_hidden, text_mask, rows, cfg, decoder_scale, steps,
                                sampler_of, eta_of, decoder_latents, generator, callback, progress)
        # ---- upsamplers
        for up, latents in zip(c.upsamplers, super_res_latents):
            x = self._super_res_stage(up, x, rows, steps, sampler_of, eta_of, latents, generator, callback, progress)

        images = self._to_output((x * 0.5 + 0.5).clamp(0, 1), output_type)
        return UnCLIPOutput(images, image_embeds) if return_dict else (images,)

    # ------------------------------------------------------------------ CLIP latent space (unclip.latent_space)
    def encode_image(self, images=None, *, pixel_values=None) -> torch.Tensor:
        """CLIP image embeddings (B, D) of images of any size/mode; see `unclip.latent_space.encode_image`."""
        from . import latent_space
        return latent_space.encode_image(self, images, pixel_values=pixel_values)

    def variations(self, image=None, *args, **kwargs):
        """Image variations, seed-compatible with diffusers' UnCLIPImageVariationPipeline; see
        `unclip.latent_space.variations`."""
        from . import latent_space
        return latent_space.variations(self, image, *args, **kwargs)

    def invert(self, image=None, num_inference_steps: int = 50, **kwargs):
        """DDIM inversion of the decoder (image → x_T given z_i); see `unclip.latent_space.invert`."""
        from . import latent_space
        return latent_space.invert(self, image, num_inference_steps, **kwargs)

    def reconstruct(self, inversion, **kwargs) -> torch.Tensor:
        """Decode an inversion back with DDIM η = 0; see `unclip.latent_space.reconstruct`."""
        from . import latent_space
        return latent_space.reconstruct(self, inversion, **kwargs)

    def interpolate(self, start, end, num: int = 5, **kwargs):
        """Images along the slerp between two embeddings; see `unclip.latent_space.interpolate`."""
        from . import latent_space
        return latent_space.interpolate(self, start, end, num, **kwargs)

    def text_diff(self, image, from_caption: str, to_caption: str, *args, **kwargs):
        """Edit an image along a caption difference (z_d); see `unclip.latent_space.text_diff`."""
        from . import latent_space
        return latent_space.text_diff(self, image, from_caption, to_caption, *args, **kwargs)

    # ------------------------------------------------------------------ stage builders
    def _check_sampler(self, s):
        if s not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {s!r}")
        return s

    def _check_eta(self, e):
        e = _check_scale("eta", e)
        if e < 0:
            raise ValueError(f"eta must be >= 0; got {e}")
        return e

    def _text_from_output(self, text_model_output, mask, n, cfg):
        embeds, hidden = text_model_output[0].to(self.device, self.dtype), text_model_output[1].to(self.device, self.dtype)
        batch = embeds.shape[0]
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask.to(self.device).bool()))
        return self._with_uncond(embeds, hidden, mask, batch, n) if cfg else (embeds, hidden, mask)

    def _prior_stage(self, text_embeds, text_hidden, text_mask, rows, k, cfg, scale, steps, sampler_of, eta_of,
                     latents, generator, callback, progress):
        c = self.components
        prior = c.prior
        dim = prior.config.embedding_dim
        plan = self._plan(c.prior_scheduler, steps["prior"], sampler_of["prior"], eta_of["prior"])
        if k > 1:  # candidates: every text row repeated k times (rows stay grouped per image)
            text_embeds, text_hidden, text_mask = (t.repeat_interleave(k, dim=0) for t in (text_embeds, text_hidden, text_mask))
        x = self._initial((rows * k, dim), latents, generator, "prior_latents")

        def make_denoise(cond, scale):
            def call(x_in, t, i):
                return prior(x_in.to(self.dtype), t, cond["text_embeds"], cond["text_hidden"], cond["text_mask"])
            return guided(call, scale) if cfg else call
        conditioning = {"text_embeds": text_embeds, "text_hidden": text_hidden, "text_mask": text_mask}
        graph = GraphStage(make_denoise, conditioning, scale if cfg else None, key=(cfg,), modules=(prior,))
        x = self._run("prior", plan, x, make_denoise(conditioning, scale), generator, callback, progress, graph=graph)
        embeds = prior.post_process_latents(x.to(self.dtype))
        if k > 1:
            cond = text_embeds[-rows * k:].reshape(rows, k, -1)[:, 0]
            cand = embeds.reshape(rows, k, -1)
            score = (F.normalize(cand.float(), dim=-1) * F.normalize(cond.float(), dim=-1)[:, None]).sum(-1)
            embeds = cand[torch.arange(rows, device=embeds.device), score.argmax(dim=1)]
        return embeds

    def _decoder_denoiser(self, image_embeds, text_embeds, text_hidden, text_mask, rows, cfg, scale, *,
                          with_graph: bool = False):
        """The decoder's denoise(x, t, i) conditioned on these embeddings (guided when `cfg`); shared by the
        decoder stage and the latent-space tools (DDIM inversion, decoding from given latents).
        `with_graph`: return (denoise, GraphStage) so the stage can be captured."""
        c = self.components
        k = text_embeds.shape[0] // (rows * (2 if cfg else 1))
        if k > 1:  # undo the candidate repetition done for the prior
            text_embeds, text_hidden, text_mask = (t[::k] for t in (text_embeds, text_hidden, text_mask))
        context, time_embed = c.text_proj(image_embeds, text_embeds, text_hidden, cfg)
        extra = context.shape[1] - text_mask.shape[1]
        mask = F.pad(text_mask, (extra, 0), value=True)
        dec = c.decoder

        learned = dec.config.in_channels if c.decoder_scheduler.variance_type == "learned_range" else None

        def make_denoise(cond, scale):
            def call(x_in, t, i):
                return dec(x_in.to(self.dtype), t, cond["context"], cond["time_embed"], cond["mask"])
            return guided(call, scale, learned_variance_channels=learned) if cfg else call
        cond = {"context": context, "time_embed": time_embed, "mask": mask}
        denoise = make_denoise(cond, scale)
        if not with_graph:
            return denoise
        return denoise, GraphStage(make_denoise, cond, scale if cfg else None, key=(cfg, learned), modules=(dec,))

    def _decoder_stage(self, image_embeds, text_embeds, text_hidden, text_mask, rows, cfg, scale, steps, sampler_of,
                       eta_of, latents, generator, callback, progress):
        c = self.components
        denoise, graph = self._decoder_denoiser(image_embeds, text_embeds, text_hidden, text_mask, rows, cfg, scale,
                                                with_graph=True)
        dec = c.decoder
        size, channels = dec.config.sample_size, dec.config.in_channels
        plan = self._plan(c.decoder_scheduler, steps["decoder"], sampler_of["decoder"], eta_of["decoder"])
        x = self._initial((rows, channels, size, size), latents, generator, "decoder_latents")
        x = self._run("decoder", plan, x, denoise, generator, callback, progress, graph=graph)
        return x.clamp(-1, 1)

    def _super_res_stage(self, up, low_res, rows, steps, sampler_of, eta_of, latents, generator, callback, progress):
        size = up.first.config.sample_size
        channels = up.first.config.in_channels // 2
        plan = self._plan(up.scheduler, steps[up.name], sampler_of[up.name], eta_of[up.name])
        x = self._initial((rows, channels, size, size), latents, generator,
                          "super_res_latents" if up.name == "super_res" else f"super_res_latents[{up.name}]")
        # Resample in fp32 (the CPU has no half-precision antialiased bicubic), then cast for the network.
        upscaled = F.interpolate(low_res.float(), size=[size, size], mode="bicubic", align_corners=False,
                                 antialias=True).to(self.dtype)
        last_step = plan.num_steps - 1

        def make_denoise(cond, scale):
            def call(x_in, t, i):
                net = up.last if i == last_step else up.first  # static per step: capturable
                return net(torch.cat([x_in.to(self.dtype), cond["upscaled"]], dim=1), t)
            return call
        cond = {"upscaled": upscaled}
        graph = GraphStage(make_denoise, cond, None, key=(), modules=(up.first, up.last))
        return self._run(up.name, plan, x, make_denoise(cond, None), generator, callback, progress, graph=graph)

    # ------------------------------------------------------------------ output
    @staticmethod
    def _to_output(images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images.float().cpu()
        array = images.float().cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        from PIL import Image
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
