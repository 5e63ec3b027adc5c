"""One request object per entry point, validated in one place before any work.

`Pipeline.__call__`, `variations`, `invert`, `interpolate` and `text_diff` build their request here from
their keyword arguments: types, ranges, shapes and dtypes of every argument, including every latents tensor
(one entry per upsampler for `super_res_latents`), `text_model_output` / `text_attention_mask`, the
generator(s) and the callback. A bad argument raises ValueError/TypeError naming it and what is allowed;
the cascade is untouched and stays usable.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

OUTPUT_TYPES = ("pil", "np", "pt")
SAMPLERS = ("ddpm", "ddim")
NOISE_MODES = ("fixed", "inverted")
MAX_CANDIDATES = 64
MAX_INTERPOLATION_IMAGES = 1000
MAX_RERANK = 64
MAX_RESAMPLE_JUMPS = 20
MASK_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")  # PIL modes a mask may have (read as grey, alpha ignored)


# --------------------------------------------------------------------------------------------- fields

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    """A model dtype from its name (fp32, fp16, bf16 and aliases) or the torch dtype itself."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype must be one of fp32, fp16, bf16 (or the torch dtypes); got {dtype!r}")


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in {low}..{high}; got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}; got {value}")
    return int(value)


def check_steps(name: str, value, schedule) -> int:
    return check_int(name, value, 1, schedule.num_train_timesteps)


def check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite real number; got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    return float(value)


def check_unit(name: str, value, *, low_open: bool = False) -> float:
    """A float in [0, 1] (or (0, 1] with low_open)."""
    v = check_scale(name, value)
    if not ((0.0 < v) if low_open else (0.0 <= v)) or v > 1.0:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1]; got {v}")
    return v


def check_sampler(value) -> str:
    if value not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {value!r}")
    return value


def check_eta(value) -> float:
    e = check_scale("eta", value)
    if e < 0:
        raise ValueError(f"eta must be >= 0; got {e}")
    return e


def per_stage(name: str, value, stages: list[str], default, check: Callable) -> dict:
    """`value` for every stage, or a dict {stage: value} overriding `default` for some stages."""
    if isinstance(value, dict):
        unknown = set(value) - set(stages)
        if unknown:
            raise ValueError(f"{name}: unknown stage(s) {sorted(unknown)}; stages are {stages}")
        return {s: check(value.get(s, default)) for s in stages}
    return {s: check(value) for s in stages}


def check_output_type(value) -> str:
    if value not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_callback(value):
    if value is not None and not callable(value):
        raise TypeError(f"callback must be callable as callback(stage, step_index, timestep, latents); got "
                        f"{type(value).__name__}")
    return value


def check_generator(value, rows: int | None):
    """None, one torch.Generator, or a list of exactly `rows` of them (one per image)."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in value):
            bad = next(type(g).__name__ for g in value if not isinstance(g, torch.Generator))
            raise TypeError(f"generator: every entry of a list must be a torch.Generator; got {bad}")
        if rows is not None and len(value) != rows:
            raise ValueError(f"generator: a list needs exactly one torch.Generator per image ({rows}); got "
                             f"{len(value)}")
        if len(value) == 0:
            raise ValueError("generator: the list is empty")
        return list(value)
    raise TypeError(f"generator must be a torch.Generator or a list of them; got {type(value).__name__}")


def check_latents(name: str, value, shape: tuple) -> torch.Tensor | None:
    """None, or a floating-point tensor of exactly `shape` with finite values."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(shape)}; got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def check_super_res_latents(value, upsamplers, rows: int) -> list:
    """One entry (tensor or None) per upsampler. A lone tensor is accepted only with exactly one upsampler."""
    shapes = [(rows, up.first.config.in_channels // 2, up.first.config.sample_size, up.first.config.sample_size)
              for up in upsamplers]
    n = len(upsamplers)
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        if n != 1:
            raise ValueError(f"super_res_latents: this cascade has {n} upsamplers; give a list of {n} entries "
                             f"(tensors of shapes {', '.join(map(str, shapes))}, or None each)")
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"super_res_latents must be a tensor or a list of {n} (one per upsampler); got "
                        f"{type(value).__name__}")
    if len(value) != n:
        raise ValueError(f"super_res_latents: give exactly {n} entries (one per upsampler); got {len(value)}")
    names = ["super_res_latents"] if n == 1 else [f"super_res_latents[{i}]" for i in range(n)]
    return [check_latents(nm, v, s) for nm, v, s in zip(names, value, shapes)]


def check_super_res_steps(value, upsamplers) -> dict:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(upsamplers)
    if len(values) != len(upsamplers):
        raise ValueError(f"super_res_num_inference_steps: give one int or {len(upsamplers)} (one per upsampler)")
    return {up.name: check_steps("super_res_num_inference_steps", v, up.scheduler) for up, v in zip(upsamplers, values)}


def check_prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise TypeError("prompt must be a str or a non-empty list of str; "
                        f"got {type(prompt).__name__}" + (" (empty)" if prompt == [] else ""))
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt holds text that is not valid Unicode ({e.reason} at position {e.start}: "
                             f"{p[max(0, e.start - 10):e.start + 1]!r})") from None
    return prompts


def check_negative_prompts(value, batch: int) -> list[str] | None:
    """None, one str for every prompt, or a list of exactly one str per prompt."""
    if value is None:
        return None
    if isinstance(value, str):
        return check_prompts(value) * batch
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"negative_prompt must be a str or a list of str (one per prompt); got "
                        f"{type(value).__name__}")
    if len(value) != batch:
        raise ValueError(f"negative_prompt: give one str for all prompts or exactly one per prompt ({batch}); "
                         f"got {len(value)}")
    return check_prompts(list(value))


def check_rerank(cascade, value) -> int:
    k = check_int("rerank", value, 1, MAX_RERANK)
    if k > 1 and cascade.components.image_encoder is None:
        raise ValueError("rerank needs a CLIP image encoder to score the images, and this pipeline has none "
                         "(load a folder with image_encoder/, or use rerank=1)")
    return k


def check_embeddings(name: str, value, dim: int, *, ndim: int = 2) -> torch.Tensor:
    shape = f"(batch, {dim})" if ndim == 2 else f"({dim},)"
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of shape {shape}; got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if value.dim() != ndim or value.shape[-1] != dim or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def check_thetas(thetas) -> list[float]:
    if isinstance(thetas, torch.Tensor):
        thetas = thetas.flatten().tolist()
    if isinstance(thetas, (str, bytes)) or not isinstance(thetas, Sequence) or len(thetas) == 0:
        raise ValueError(f"thetas must be a non-empty list of numbers in [0, 1]; got {thetas!r}")
    out = []
    for theta in thetas:
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta):
            raise ValueError(f"thetas must be a finite real number (each); got {theta!r}")
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"thetas must lie in [0, 1]; got {theta}")
        out.append(float(theta))
    return out


def check_images_per_call(components, dtype, rows: int, name: str = "num_images_per_prompt") -> None:
    """The call's image count against what the loaded cascade can hold in memory (engine/memory.py)."""
    try:
        from .memory import estimate_call_bytes, max_images_per_call
    except ImportError:
        return
    limit = max_images_per_call(components, dtype)
    if rows > limit:
        estimate = estimate_call_bytes(components, rows, dtype)
        raise ValueError(f"{name}: this call would draw {rows} images, estimated at {estimate / 2**30:.1f} GiB "
                         f"of activations; the limit for this cascade here is {limit} images per call")


# --------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class DecodeRequest:
    """The fields every request that ends in the decoder and the upsamplers shares."""
    batch: int
    num_images_per_prompt: int
    steps: dict
    sampler: dict
    eta: dict
    decoder_guidance_scale: float
    decoder_latents: torch.Tensor | None
    super_res_latents: list
    generator: object
    output_type: str
    return_dict: bool
    callback: Callable | None
    progress: bool

    @property
    def rows(self) -> int:
        return self.batch * self.num_images_per_prompt


@dataclass(frozen=True)
class GenerateRequest(DecodeRequest):
    """A validated text-to-image call (`Pipeline.__call__`)."""
    prompts: list[str] | None
    text_model_output: tuple | None
    text_attention_mask: torch.Tensor | None
    prior_guidance_scale: float
    prior_candidates: int
    prior_latents: torch.Tensor | None
    negative_prompts: list[str] | None = None   # the uncond rows of guidance (None: the empty caption)
    rerank: int = 1                             # draw k images per image, keep the best by CLIP score

    @property
    def guided(self) -> bool:
        # As in diffusers: guidance is on for both text-conditioned stages when either scale is > 1.
        return self.prior_guidance_scale > 1.0 or self.decoder_guidance_scale > 1.0


def _check_text_model_output(value, mask):
    if not isinstance(value, (tuple, list)) or len(value) < 2 or not all(
            isinstance(t, torch.Tensor) for t in value[:2]):
        raise TypeError("text_model_output must be a pair (text_embeds (B, P), last_hidden_state (B, L, W)) "
                        "of tensors, e.g. the text encoder's output")
    embeds, hidden = value[0], value[1]
    if embeds.dim() != 2 or hidden.dim() != 3 or embeds.shape[0] != hidden.shape[0] or embeds.shape[0] < 1:
        raise ValueError(f"text_model_output: expected text_embeds (B, P) and last_hidden_state (B, L, W) with "
                         f"the same B; got {tuple(embeds.shape)} and {tuple(hidden.shape)}")
    if mask is None:
        raise ValueError("text_attention_mask is required with text_model_output")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"text_attention_mask must be a tensor (B, L); got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"text_attention_mask must have shape {tuple(hidden.shape[:2])} (B, L of "
                         f"last_hidden_state); got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.is_complex():
        raise TypeError(f"text_attention_mask must be a bool or integer tensor; got {mask.dtype}")
    return (embeds, hidden), mask


def generate_request(cascade, *, prompt, num_images_per_prompt, prior_num_inference_steps,
                     decoder_num_inference_steps, super_res_num_inference_steps, generator, prior_latents,
                     decoder_latents, super_res_latents, text_model_output, text_attention_mask,
                     prior_guidance_scale, decoder_guidance_scale, output_type, return_dict, sampler, eta,
                     prior_candidates, callback, progress, call_default, negative_prompt=None,
                     rerank=1) -> GenerateRequest:
    c = cascade.components
    if c.prior is None:
        raise ValueError("this pipeline has no prior (an image-variation model): use pipe.variations(...)")
    if prompt is None and text_model_output is None:
        raise ValueError("prompt must be a str or a list of str (or pass text_model_output)")
    if prompt is not None and text_model_output is not None:
        raise ValueError("give prompt or text_model_output, not both")
    prompts, text, mask = None, None, None
    if prompt is not None:
        prompts = check_prompts(prompt)
        batch = len(prompts)
    else:
        text, mask = _check_text_model_output(text_model_output, text_attention_mask)
        batch = text[0].shape[0]
    n = check_int("num_images_per_prompt", num_images_per_prompt, 1, 10**6)
    k = check_int("prior_candidates", prior_candidates, 1, MAX_CANDIDATES)
    steps = {"prior": check_steps("prior_num_inference_steps", prior_num_inference_steps, c.prior_scheduler),
             "decoder": check_steps("decoder_num_inference_steps", decoder_num_inference_steps, c.decoder_scheduler),
             **check_super_res_steps(super_res_num_inference_steps, c.upsamplers)}
    prior_scale = check_scale("prior_guidance_scale", call_default("prior_guidance_scale", prior_guidance_scale))
    decoder_scale = check_scale("decoder_guidance_scale",
                                call_default("decoder_guidance_scale", decoder_guidance_scale))
    stage_names = cascade.stage_names
    rows = batch * n
    dec = c.decoder.config
    request = GenerateRequest(
        prompts=prompts, text_model_output=text, text_attention_mask=mask, batch=batch, num_images_per_prompt=n,
        steps=steps, sampler=per_stage("sampler", sampler, stage_names, "ddpm", check_sampler),
        eta=per_stage("eta", eta, stage_names, 0.0, check_eta), prior_guidance_scale=prior_scale,
        decoder_guidance_scale=decoder_scale, prior_candidates=k,
        prior_latents=check_latents("prior_latents", prior_latents, (rows * k, c.prior.config.embedding_dim)),
        decoder_latents=check_latents("decoder_latents", decoder_latents,
                                      (rows, dec.in_channels, dec.sample_size, dec.sample_size)),
        super_res_latents=check_super_res_latents(super_res_latents, c.upsamplers, rows),
        generator=check_generator(generator, None), output_type=check_output_type(output_type),
        return_dict=check_bool("return_dict", return_dict), callback=check_callback(callback),
        progress=check_bool("progress", progress), negative_prompts=check_negative_prompts(negative_prompt, batch),
        rerank=check_rerank(cascade, rerank))
    _check_list_generator(request.generator, rows, k)
    if request.negative_prompts is not None and not request.guided:
        raise ValueError("negative_prompt replaces the unconditional half of classifier-free guidance, so it needs "
                         "guidance: prior_guidance_scale or decoder_guidance_scale > 1")
    if request.rerank > 1:
        given = [name for name, v in (("prior_latents", prior_latents), ("decoder_latents", decoder_latents))
                 if v is not None] + (["super_res_latents"] if any(v is not None for v in
                                                                  request.super_res_latents) else [])
        if given:
            raise ValueError(f"rerank > 1 draws {request.rerank} images per image, so {', '.join(given)} cannot be "
                             "given (they hold one image's latents per image)")
        if isinstance(request.generator, list):
            raise ValueError("generator: a list of generators cannot be combined with rerank > 1; pass one "
                             "torch.Generator")
    check_images_per_call(c, cascade.dtype, rows * k * request.rerank)
    return request


def _check_list_generator(generator, rows: int, k: int = 1) -> None:
    # A list of generators draws one batch row each; the prior draws rows × candidates rows.
    if isinstance(generator, list):
        if k > 1:
            raise ValueError("generator: a list of generators cannot be combined with prior_candidates > 1 "
                             "(the prior draws k rows per image); pass one torch.Generator")
        check_generator(generator, rows)


@dataclass(frozen=True)
class VariationsRequest(DecodeRequest):
    """A validated `variations` call: decode image embeddings with fresh noise, then upsample."""
    images: list | None
    image_embeddings: torch.Tensor | None
    pixel_values: torch.Tensor | None
    negative_prompts: list[str] | None = None   # the decoder's uncond rows (None: the empty caption)


def image_source(cascade, image, image_embeddings, pixel_values):
    """(images list | None, embeddings | None, pixel_values | None, batch) for the exactly-one-of rule."""
    from . import image_processing
    if sum(x is not None for x in (image, image_embeddings, pixel_values)) != 1:
        raise ValueError("give exactly one of image, image_embeddings and pixel_values")
    c = cascade.components
    if image_embeddings is not None:
        z = check_embeddings("image_embeddings", image_embeddings, c.text_proj.config.clip_embeddings_dim)
        return None, z, None, z.shape[0]
    if c.image_encoder is None:
        raise ValueError("this pipeline has no image encoder: load a folder with image_encoder/ (e.g. Karlo's "
                         "image-variation release), use a preset, or pass image_embeddings")
    if pixel_values is not None:
        size = c.image_encoder.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError(f"pixel_values must be a float tensor (B, 3, {size}, {size})")
        if pixel_values.dim() != 4 or pixel_values.shape[0] < 1 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must have shape (B, 3, {size}, {size}); got {tuple(pixel_values.shape)}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")
        return None, None, pixel_values, pixel_values.shape[0]
    images = image_processing.as_image_list(image, "image")
    return images, None, None, len(images)


def variations_request(cascade, *, image, num_images_per_prompt, decoder_num_inference_steps,
                       super_res_num_inference_steps, generator, decoder_latents, super_res_latents,
                       image_embeddings, decoder_guidance_scale, output_type, return_dict, pixel_values, sampler,
                       eta, callback, progress, call_default, negative_prompt=None) -> VariationsRequest:
    c = cascade.components
    images, z, pixels, batch = image_source(cascade, image, image_embeddings, pixel_values)
    n = check_int("num_images_per_prompt", num_images_per_prompt, 1, 10**6)
    rows = batch * n
    stage_names = ["decoder"] + [up.name for up in c.upsamplers]
    dec = c.decoder.config
    request = VariationsRequest(
        images=images, image_embeddings=z, pixel_values=pixels, batch=batch, num_images_per_prompt=n,
        steps={"decoder": check_steps("decoder_num_inference_steps", decoder_num_inference_steps,
                                      c.decoder_scheduler),
               **check_super_res_steps(super_res_num_inference_steps, c.upsamplers)},
        sampler=per_stage("sampler", sampler, stage_names, "ddpm", check_sampler),
        eta=per_stage("eta", eta, stage_names, 0.0, check_eta),
        decoder_guidance_scale=check_scale("decoder_guidance_scale",
                                           call_default("decoder_guidance_scale", decoder_guidance_scale)),
        decoder_latents=check_latents("decoder_latents", decoder_latents,
                                      (rows, dec.in_channels, dec.sample_size, dec.sample_size)),
        super_res_latents=check_super_res_latents(super_res_latents, c.upsamplers, rows),
        generator=check_generator(generator, rows), output_type=check_output_type(output_type),
        return_dict=check_bool("return_dict", return_dict), callback=check_callback(callback),
        progress=check_bool("progress", progress), negative_prompts=check_negative_prompts(negative_prompt, batch))
    if request.negative_prompts is not None and request.decoder_guidance_scale <= 1.0:
        raise ValueError("negative_prompt replaces the unconditional half of classifier-free guidance, so it needs "
                         "guidance: decoder_guidance_scale > 1")
    check_images_per_call(c, cascade.dtype, rows)
    return request


@dataclass(frozen=True)
class InvertRequest:
    images: list | None
    decoder_image: torch.Tensor | None
    image_embeddings: torch.Tensor | None
    num_inference_steps: int
    decoder_guidance_scale: float
    callback: Callable | None


def check_decoder_image(cascade, value, name: str) -> torch.Tensor:
    dec = cascade.components.decoder.config
    shape = (dec.in_channels, dec.sample_size, dec.sample_size)
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor (B, {', '.join(map(str, shape))}) in [-1, 1]")
    if value.dim() != 4 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}); got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value


def invert_request(cascade, *, image, num_inference_steps, image_embeddings, decoder_image, decoder_guidance_scale,
                   callback) -> InvertRequest:
    from . import image_processing
    c = cascade.components
    steps = check_steps("num_inference_steps", num_inference_steps, c.decoder_scheduler)
    scale = check_scale("decoder_guidance_scale", decoder_guidance_scale)
    if (image is None) == (decoder_image is None):
        raise ValueError("give exactly one of image and decoder_image")
    images = None
    if image is not None:
        images = image_processing.as_image_list(image, "image")
        batch = len(images)
    else:
        decoder_image = check_decoder_image(cascade, decoder_image, "decoder_image")
        batch = decoder_image.shape[0]
    if image_embeddings is not None:
        image_embeddings = check_embeddings("image_embeddings", image_embeddings, c.text_proj.config.clip_embeddings_dim)
        if image_embeddings.shape[0] != batch:
            raise ValueError(f"image_embeddings has {image_embeddings.shape[0]} rows but there are {batch} images")
    elif images is None:
        raise ValueError("image_embeddings is required with decoder_image (there is no image to encode)")
    elif c.image_encoder is None:
        raise ValueError("this pipeline has no image encoder: pass image_embeddings")
    return InvertRequest(images, decoder_image, image_embeddings, steps, scale, check_callback(callback))


@dataclass(frozen=True)
class SeriesRequest:
    """A validated `interpolate` or `text_diff` call (a series of images along a path in latent space)."""
    steps: int
    super_res_steps: dict
    decoder_guidance_scale: float
    generator: object
    output_type: str
    return_dict: bool
    callback: Callable | None
    progress: bool
    # interpolate
    endpoints: tuple = ()
    num: int = 0
    noise: str = "fixed"
    prior_steps: int = 0
    prior_guidance_scale: float = 0.0
    # text_diff
    image: object = None
    image_embeddings: torch.Tensor | None = None
    from_caption: str = ""
    to_caption: str = ""
    thetas: tuple = ()


def _endpoint(cascade, value, name: str):
    """('prompt', str) | ('embedding', (D,) tensor) | ('image', image)."""
    from . import image_processing
    c = cascade.components
    if isinstance(value, str):
        if c.prior is None:
            raise ValueError(f"{name}: prompts need a prior, and this pipeline has none (an image-variation "
                             "model): give images or embeddings instead")
        return "prompt", check_prompts(value)[0]
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return "embedding", check_embeddings(name, value, c.text_proj.config.clip_embeddings_dim, ndim=1)
    images = image_processing.as_image_list(value, name)
    if len(images) != 1:
        raise ValueError(f"{name} must be a single image; got {len(images)}")
    if c.image_encoder is None:
        raise ValueError(f"{name}: images need an image encoder, and this pipeline has none")
    return "image", images[0]


def _series_common(cascade, decoder_num_inference_steps, super_res_num_inference_steps, generator, output_type,
                   return_dict, callback, progress):
    c = cascade.components
    return dict(steps=check_steps("decoder_num_inference_steps", decoder_num_inference_steps, c.decoder_scheduler),
                super_res_steps=check_super_res_steps(super_res_num_inference_steps, c.upsamplers),
                generator=check_generator(generator, None), output_type=check_output_type(output_type),
                return_dict=check_bool("return_dict", return_dict), callback=check_callback(callback),
                progress=check_bool("progress", progress))


def interpolate_request(cascade, *, start, end, num, noise, generator, decoder_num_inference_steps,
                        super_res_num_inference_steps, decoder_guidance_scale, prior_num_inference_steps,
                        prior_guidance_scale, output_type, return_dict, callback, progress,
                        call_default) -> SeriesRequest:
    num = check_int("num", num, 2, MAX_INTERPOLATION_IMAGES)
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}; got {noise!r}")
    common = _series_common(cascade, decoder_num_inference_steps, super_res_num_inference_steps, generator,
                            output_type, return_dict, callback, progress)
    if isinstance(common["generator"], list):
        raise ValueError("generator: interpolate draws shared noise for the whole series; pass one torch.Generator")
    if decoder_guidance_scale is None:
        decoder_guidance_scale = call_default("decoder_guidance_scale") if noise == "fixed" else 1.0
    c = cascade.components
    prior_steps = check_steps("prior_num_inference_steps", prior_num_inference_steps,
                              c.prior_scheduler or c.decoder_scheduler)
    prior_scale = check_scale("prior_guidance_scale", call_default("prior_guidance_scale", prior_guidance_scale))
    ends = (_endpoint(cascade, start, "start"), _endpoint(cascade, end, "end"))
    if noise == "inverted" and any(kind != "image" for kind, _ in ends):
        raise ValueError("noise='inverted' needs images for both start and end (their x_T come from DDIM inversion)")
    check_images_per_call(c, cascade.dtype, num, "num")
    return SeriesRequest(decoder_guidance_scale=check_scale("decoder_guidance_scale", decoder_guidance_scale),
                         endpoints=ends, num=num, noise=noise, prior_steps=prior_steps,
                         prior_guidance_scale=prior_scale, **common)


def text_diff_request(cascade, *, image, from_caption, to_caption, thetas, generator, decoder_num_inference_steps,
                      super_res_num_inference_steps, decoder_guidance_scale, image_embeddings, output_type,
                      return_dict, callback, progress) -> SeriesRequest:
    from . import image_processing
    for name, caption in (("from_caption", from_caption), ("to_caption", to_caption)):
        if not isinstance(caption, str):
            raise TypeError(f"{name} must be a str; got {type(caption).__name__}")
        check_prompts(caption)
    thetas = check_thetas(thetas)
    common = _series_common(cascade, decoder_num_inference_steps, super_res_num_inference_steps, generator,
                            output_type, return_dict, callback, progress)
    if isinstance(common["generator"], list):
        raise ValueError("generator: text_diff draws shared noise for the whole series; pass one torch.Generator")
    images = image_processing.as_image_list(image, "image")
    if len(images) != 1:
        raise ValueError(f"image must be a single image; got {len(images)}")
    c = cascade.components
    if image_embeddings is not None:
        image_embeddings = check_embeddings("image_embeddings", image_embeddings,
                                            c.text_proj.config.clip_embeddings_dim, ndim=1)
    elif c.image_encoder is None:
        raise ValueError("this pipeline has no image encoder: pass image_embeddings")
    check_images_per_call(c, cascade.dtype, len(thetas), "thetas")
    return SeriesRequest(decoder_guidance_scale=check_scale("decoder_guidance_scale", decoder_guidance_scale),
                         image=images[0], image_embeddings=image_embeddings, from_caption=from_caption,
                         to_caption=to_caption, thetas=tuple(thetas), **common)


# --------------------------------------------------------------------------------------------- editing

@dataclass(frozen=True)
class EditRequest(DecodeRequest):
    """A validated `inpaint` (mode "inpaint") or `img2img` (mode "img2img") call.

    source: the images at the output resolution, (batch, 3, O, O) float32 in [0, 1]; mask: (batch, 1, O, O)
    bool, True = repaint (None for img2img). Conditioning: `prompts` (through the prior), else
    `image_embeddings`, else (both None) the images' own CLIP embeddings."""
    mode: str
    source: torch.Tensor
    mask: torch.Tensor | None
    images: list
    prompts: list[str] | None
    image_embeddings: torch.Tensor | None
    negative_prompts: list[str] | None
    strength: float
    resample_jumps: int
    prior_guidance_scale: float

    @property
    def guided(self) -> bool:
        # With a prompt both text-conditioned stages are guided when either scale is > 1 (as text-to-image).
        if self.prompts is not None:
            return self.prior_guidance_scale > 1.0 or self.decoder_guidance_scale > 1.0
        return self.decoder_guidance_scale > 1.0


def _unit_pixels(rgb, name: str):
    """An (H, W, 3) array as float32 in [0, 1]: uint8 / integers / integer-valued floats are 0..255."""
    import numpy as np
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float32) / 255
    if rgb.dtype.kind in "iu" or (np.allclose(rgb, np.round(rgb)) and rgb.max() > 1):
        if rgb.min() < 0 or rgb.max() > 255:
            raise ValueError(f"{name}: integer pixels must lie in 0..255; got [{rgb.min()}, {rgb.max()}]")
        return rgb.astype(np.float32) / 255
    if rgb.min() < 0 or rgb.max() > 1:
        raise ValueError(f"{name}: float pixels must lie in [0, 1] (or be integers in 0..255); got "
                         f"[{rgb.min()}, {rgb.max()}]")
    return rgb.astype(np.float32)


def _square(t: torch.Tensor) -> torch.Tensor:
    """The centred square crop of (..., H, W) (offsets rounded down, as `image_processing.center_crop`)."""
    h, w = t.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return t[..., top:top + side, left:left + side]


def read_source(images: list, size: int) -> torch.Tensor:
    """The images at the output resolution: (B, 3, size, size) float32 in [0, 1], each cropped to its centred
    square, then resized (bicubic, antialiased) unless it already is size × size (then its pixels are exact)."""
    import torch.nn.functional as F

    from . import image_processing
    out = []
    for i, image in enumerate(images):
        name = "image" if len(images) == 1 else f"image[{i}]"
        rgb = _unit_pixels(image_processing.to_rgb(image, name), name)
        x = _square(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None])
        if x.shape[-1] != size:
            x = F.interpolate(x, size=[size, size], mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        out.append(x)
    return torch.cat(out)


def _mask_array(value, name: str):
    """One mask as a float64 (H, W) array in [0, 1] (see `read_masks` for what is accepted)."""
    import numpy as np
    from PIL import Image
    if isinstance(value, Image.Image):
        if value.mode not in MASK_MODES:
            raise ValueError(f"{name}: a PIL mask must have mode {', '.join(MASK_MODES)}; got {value.mode!r}")
        if value.width < 1 or value.height < 1:
            raise ValueError(f"{name} is an empty image (size {value.width}x{value.height})")
        return np.asarray(value.convert("L"), dtype=np.float64) / 255
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a PIL.Image, a numpy array or a torch.Tensor; got {type(value).__name__}")
    a = value
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a[0] if a.shape[0] == 1 else a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be one channel, (H, W) or (1, H, W) / (H, W, 1); got shape {value.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold bools or numbers; got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if value.dtype.kind in "iu" and a.max() > 1:  # 0..255 (0/1 integer masks are taken as they are)
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: integer values must lie in 0..255 (or be 0/1); got [{a.min()}, {a.max()}]")
        return a / 255
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1] (floats), 0..255 (integers) or be bools; got "
                         f"[{a.min()}, {a.max()}]")
    return a


def read_masks(mask, images: list, size: int) -> torch.Tensor:
    """(B, 1, size, size) bool, True = repaint. `mask`: one mask for every image or a list of one per image;
    PIL (modes MASK_MODES, read as grey), arrays or tensors (H, W) of bools, floats in [0, 1] or integers in
    0..255; white / >= 0.5 = repaint. Any size with the image's aspect ratio: it is resized to the image
    (nearest), cropped to the same centred square, then to `size` (`stages.resize_mask`: a pixel that is
    partly repainted is repainted)."""
    import torch.nn.functional as F

    from .image_processing import to_rgb
    from .stages import resize_mask
    if mask is None:
        raise ValueError("mask is required: white (1) where the image is repainted, black (0) where it is kept")
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * len(images)
    if len(masks) != len(images):
        raise ValueError(f"mask: give one mask for all images or exactly one per image ({len(images)}); got "
                         f"{len(masks)}")
    out = []
    for i, (m, image) in enumerate(zip(masks, images)):
        name = "mask" if not isinstance(mask, (list, tuple)) else f"mask[{i}]"
        a = _mask_array(m, name)
        h, w = to_rgb(image, "image").shape[:2]
        mh, mw = a.shape
        if abs(mh * w - mw * h) > 0.01 * h * mw:
            raise ValueError(f"{name} has size {mw}x{mh} (width x height), which is not the image's aspect "
                             f"ratio ({w}x{h}); give a mask of the image's shape (any size)")
        t = torch.from_numpy(a >= 0.5)[None, None]
        if (mh, mw) != (h, w):
            t = F.interpolate(t.float(), size=[h, w], mode="nearest") > 0.5
        t = resize_mask(_square(t), size)
        if not t.any():
            raise ValueError(f"{name} marks no pixel to repaint (inside the centred square the image is read "
                             "at): white (1) = repaint")
        out.append(t)
    return torch.cat(out)


def edit_request(cascade, *, mode: str, image, mask, prompt, image_embeddings, negative_prompt, strength,
                 resample_jumps, num_images_per_prompt, prior_num_inference_steps, decoder_num_inference_steps,
                 super_res_num_inference_steps, prior_guidance_scale, decoder_guidance_scale, generator, sampler,
                 eta, output_type, return_dict, callback, progress, call_default) -> EditRequest:
    from . import image_processing
    c = cascade.components
    images = image_processing.as_image_list(image, "image")
    batch = len(images)
    n = check_int("num_images_per_prompt", num_images_per_prompt, 1, 10**6)
    rows = batch * n
    strength = check_unit("strength", strength, low_open=True)
    jumps = check_int("resample_jumps", resample_jumps, 0, MAX_RESAMPLE_JUMPS)
    if prompt is not None and image_embeddings is not None:
        raise ValueError("give prompt or image_embeddings (or neither: the image's own CLIP embedding), not both")
    prompts, z = None, None
    if prompt is not None:
        if c.prior is None:
            raise ValueError("prompt needs a prior, and this pipeline has none (an image-variation model): pass "
                             "image_embeddings, or neither (the image's own embedding)")
        prompts = check_prompts(prompt)
        if len(prompts) == 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise ValueError(f"prompt: give one prompt for all images or exactly one per image ({batch}); got "
                             f"{len(prompts)}")
    elif image_embeddings is not None:
        z = check_embeddings("image_embeddings", image_embeddings, c.text_proj.config.clip_embeddings_dim)
        if z.shape[0] != batch:
            raise ValueError(f"image_embeddings has {z.shape[0]} rows but there are {batch} images")
    elif c.image_encoder is None:
        raise ValueError(f"{mode} without a prompt or image_embeddings conditions on the image's own CLIP "
                         "embedding, and this pipeline has no image encoder: pass prompt or image_embeddings")
    steps = {"decoder": check_steps("decoder_num_inference_steps", decoder_num_inference_steps, c.decoder_scheduler),
             **check_super_res_steps(super_res_num_inference_steps, c.upsamplers)}
    stage_names = cascade.stage_names
    if c.prior is not None:
        steps["prior"] = check_steps("prior_num_inference_steps", prior_num_inference_steps, c.prior_scheduler)
    prior_scale = check_scale("prior_guidance_scale", call_default("prior_guidance_scale", prior_guidance_scale))
    size = cascade.image_size
    request = EditRequest(
        batch=batch, num_images_per_prompt=n, steps=steps,
        sampler=per_stage("sampler", sampler, stage_names, "ddpm", check_sampler),
        eta=per_stage("eta", eta, stage_names, 0.0, check_eta),
        decoder_guidance_scale=check_scale("decoder_guidance_scale",
                                           call_default("decoder_guidance_scale", decoder_guidance_scale)),
        decoder_latents=None, super_res_latents=[None] * len(c.upsamplers),
        generator=check_generator(generator, rows), output_type=check_output_type(output_type),
        return_dict=check_bool("return_dict", return_dict), callback=check_callback(callback),
        progress=check_bool("progress", progress), mode=mode, source=read_source(images, size),
        mask=read_masks(mask, images, size) if mode == "inpaint" else None, images=images, prompts=prompts,
        image_embeddings=z, negative_prompts=check_negative_prompts(negative_prompt, batch), strength=strength,
        resample_jumps=jumps, prior_guidance_scale=prior_scale)
    if request.negative_prompts is not None and not request.guided:
        raise ValueError("negative_prompt replaces the unconditional half of classifier-free guidance, so it needs "
                         "guidance: decoder_guidance_scale > 1")
    check_images_per_call(c, cascade.dtype, rows)
    return request
