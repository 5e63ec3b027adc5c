"""The CLIP latent space as an interface (DALL·E 2, §3): the decoder driven by image embeddings, no prior.

An image is represented by the bipartite latent (z_i, x_T): its CLIP image embedding z_i and the decoder noise
x_T that deterministic DDIM (η = 0) maps back to the image given z_i (found by DDIM inversion). On top of that:

* `variations`: decode z_i with fresh noise, the whole cascade (diffusers' `UnCLIPImageVariationPipeline`,
  same random draws in the same order).
* `invert` / `reconstruct`: x0 → x_T and back.
* `interpolate`: slerp between two embeddings (of images, prompts via the prior, or given vectors), the decoder
  noise either fixed or the two images' inverted x_T slerped as well.
* `text_diff`: z_d = norm(z_t − z_t0), z_θ = slerp(z_i, z_d, θ), decoded from the image's inverted x_T.

Every function takes a `unclip.Pipeline` first; the Pipeline's methods of the same names delegate here. The
decoder sees the empty caption throughout (as in the image-variation pipeline): the embedding carries the content.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import image_processing
from .pipeline import OUTPUT_TYPES, UnCLIPOutput, _check_scale, _check_steps, _per_stage
from .samplers import seeded_randn as randn

NOISE_MODES = ("fixed", "inverted")
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
    t = _check_real("t", t)
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
    thetas = _check_thetas(thetas)
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


# ---------------------------------------------------------------------------------------- validation

def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number; got {value!r}")
    return float(value)


def _check_thetas(thetas) -> list[float]:
    if isinstance(thetas, torch.Tensor):
        thetas = thetas.flatten().tolist()
    if isinstance(thetas, (str, bytes)) or not isinstance(thetas, Sequence) or len(thetas) == 0:
        raise ValueError(f"thetas must be a non-empty list of numbers in [0, 1]; got {thetas!r}")
    out = []
    for theta in thetas:
        theta = _check_real("thetas", theta)
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"thetas must lie in [0, 1]; got {theta}")
        out.append(theta)
    return out


def _check_embeddings(pipe, value, name: str, *, ndim: int = 2) -> torch.Tensor:
    dim = pipe.components.text_proj.config.clip_embeddings_dim
    shape = "(batch, %d)" % dim if ndim == 2 else "(%d,)" % dim
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of shape {shape}; got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if value.dim() != ndim or value.shape[-1] != dim or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.to(pipe.device, pipe.dtype)


def _check_output_type(output_type):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}")


def _check_generator(generator):
    if generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
        raise TypeError(f"generator must be a torch.Generator or a list of them; got {type(generator).__name__}")


def _super_res_steps(pipe, value) -> dict:
    ups = pipe.components.upsamplers
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(ups)
    if len(values) != len(ups):
        raise ValueError(f"super_res_num_inference_steps: give one int or {len(ups)} (one per upsampler)")
    return {up.name: _check_steps("super_res_num_inference_steps", v, up.scheduler.num_train_timesteps)
            for up, v in zip(ups, values)}


def _decoder_steps(pipe, name: str, value) -> int:
    return _check_steps(name, value, pipe.components.decoder_scheduler.num_train_timesteps)


# -------------------------------------------------------------------------------------------- encoding

@torch.inference_mode()
def encode_image(pipe, images=None, *, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP image embeddings z_i (B, D) of one image or a list of images (PIL images of any mode and size,
    numpy arrays (H, W, C) / (C, H, W), tensors (C, H, W) / (B, C, H, W); see `unclip.image_processing`), or
    of `pixel_values` that are already CLIP-preprocessed (what diffusers passes as a tensor `image`)."""
    return _encode(pipe, images, pixel_values, "images")


def _encode(pipe, images, pixel_values, name: str) -> torch.Tensor:
    c = pipe.components
    if c.image_encoder is None:
        raise ValueError("this pipeline has no image encoder: load a folder with image_encoder/ (e.g. Karlo's "
                         "image-variation release) or use a preset")
    if (images is None) == (pixel_values is None):
        raise ValueError(f"give exactly one of {name} and pixel_values")
    if pixel_values is None:
        pixel_values = image_processing.preprocess(images, image_processing.processor_config_for(c), name=name)
    else:
        size = c.image_encoder.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            raise TypeError("pixel_values must be a float tensor (B, 3, %d, %d)" % (size, size))
        if pixel_values.dim() != 4 or pixel_values.shape[0] < 1:
            raise ValueError(f"pixel_values must have shape (B, 3, {size}, {size}); got {tuple(pixel_values.shape)}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")
    expected = c.image_encoder.config.image_size
    if tuple(pixel_values.shape[-2:]) != (expected, expected):
        raise ValueError(f"images are preprocessed to {tuple(pixel_values.shape[-2:])} but the image encoder takes "
                         f"({expected}, {expected}): check feature_extractor/preprocessor_config.json")
    weight = c.image_encoder.visual_projection.weight
    embeds, _ = c.image_encoder(pixel_values.to(weight.device, weight.dtype))
    return embeds.to(pipe.device, pipe.dtype)


def _prior_embeddings(pipe, prompts: list[str], generator, steps: int, scale: float, progress: bool):
    """One prior image embedding per prompt (diffusers' draw order: the prior's latents, then its step noise)."""
    c = pipe.components
    if c.prior is None:
        raise ValueError("prompts need a prior, and this pipeline has none (an image-variation model): "
                         "give images or embeddings instead")
    cfg = scale > 1.0
    text_embeds, text_hidden, text_mask = pipe.encode_prompt(prompts, 1, guidance=cfg)
    return pipe._prior_stage(text_embeds, text_hidden, text_mask, len(prompts), 1, cfg, scale, {"prior": steps},
                             {"prior": "ddpm"}, {"prior": 0.0}, None, generator, None, progress)


# ------------------------------------------------------------------------------------------ variations

def _empty_captions(pipe, batch: int, n: int, cfg: bool):
    """Text features of the empty caption for `batch` × `n` rows ([uncond] + cond halves with `cfg`).

    Both halves come from one text-encoder run over `batch` empty captions, as in diffusers: a batch-1 run
    can round differently in the last bit, which random-weight upsamplers amplify into visible differences."""
    c = pipe.components
    tokens = c.tokenizer([""] * batch)
    embeds, hidden = c.text_encoder(tokens.input_ids.to(pipe.device))
    mask = tokens.attention_mask.to(pipe.device)
    embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask))
    if cfg:
        embeds, hidden, mask = (torch.cat([t, t]) for t in (embeds, hidden, mask))
    return embeds, hidden, mask


@torch.inference_mode()
def variations(pipe, image=None, num_images_per_prompt: int = 1, decoder_num_inference_steps: int = 25,
               super_res_num_inference_steps: int | list[int] = 7, generator=None,
               decoder_latents: torch.Tensor | None = None, super_res_latents=None,
               image_embeddings: torch.Tensor | None = None, decoder_guidance_scale: float | None = None,
               output_type: str = "pil", return_dict: bool = True, *, pixel_values: torch.Tensor | None = None,
               sampler: str | dict = "ddpm", eta: float | dict = 0.0, callback: Callable | None = None,
               progress: bool = True):
    """Variations of images: their CLIP embeddings decoded with fresh noise, then upsampled.

    Keywords mean what they mean in diffusers' `UnCLIPImageVariationPipeline`, and with the same CPU generator
    the random draws are the same (decoder latents, decoder step noise, upsampler latents, upsampler step noise).
    One difference: a tensor `image` is an image here (preprocessed like any other); pass CLIP-preprocessed
    tensors as `pixel_values=` (diffusers takes those as `image`). Extras as in `Pipeline.__call__`: sampler,
    eta (per stage or as {stage: value}), callback, progress. Returns UnCLIPOutput(images, image_embeddings)."""
    c = pipe.components
    if sum(x is not None for x in (image, image_embeddings, pixel_values)) != 1:
        raise ValueError("give exactly one of image, image_embeddings and pixel_values")
    n = _check_steps("num_images_per_prompt", num_images_per_prompt, 10**6)
    steps = {"decoder": _decoder_steps(pipe, "decoder_num_inference_steps", decoder_num_inference_steps),
             **_super_res_steps(pipe, super_res_num_inference_steps)}
    scale = _check_scale("decoder_guidance_scale", pipe.call_default("decoder_guidance_scale", decoder_guidance_scale))
    _check_output_type(output_type)
    stages = ["decoder"] + [up.name for up in c.upsamplers]
    sampler_of = _per_stage("sampler", sampler, stages, "ddpm", pipe._check_sampler)
    eta_of = _per_stage("eta", eta, stages, 0.0, pipe._check_eta)
    _check_generator(generator)
    if super_res_latents is not None and not isinstance(super_res_latents, (list, tuple)):
        super_res_latents = [super_res_latents] + [None] * (len(c.upsamplers) - 1)
    super_res_latents = list(super_res_latents or [None] * len(c.upsamplers))
    if len(super_res_latents) != len(c.upsamplers):
        raise ValueError(f"super_res_latents: give one tensor or {len(c.upsamplers)} (one per upsampler)")

    if image_embeddings is not None:
        embeds = _check_embeddings(pipe, image_embeddings, "image_embeddings")
    else:
        embeds = _encode(pipe, image, pixel_values, "image")
    batch = embeds.shape[0]
    rows = batch * n
    cfg = scale > 1.0
    text_embeds, text_hidden, text_mask = _empty_captions(pipe, batch, n, cfg)
    embeds = embeds.repeat_interleave(n, dim=0)
    x = pipe._decoder_stage(embeds, text_embeds, text_hidden, text_mask, rows, cfg, scale, steps, sampler_of, eta_of,
                            decoder_latents, generator, callback, progress)
    for up, latents in zip(c.upsamplers, super_res_latents):
        x = pipe._super_res_stage(up, x, rows, steps, sampler_of, eta_of, latents, generator, callback, progress)
    images = pipe._to_output((x * 0.5 + 0.5).clamp(0, 1), output_type)
    return UnCLIPOutput(images, embeds) if return_dict else (images,)


# ------------------------------------------------------------------------------- DDIM inversion / decoding

def _empty_caption_denoiser(pipe, embeds: torch.Tensor, scale: float):
    """The decoder's denoise(x, t, i) for these image embeddings and the empty caption (guided if scale > 1)."""
    rows = embeds.shape[0]
    cfg = scale > 1.0
    text_embeds, text_hidden, text_mask = _empty_captions(pipe, 1, rows, cfg)
    return pipe._decoder_denoiser(embeds, text_embeds, text_hidden, text_mask, rows, cfg, scale)


def _ddim_plan(pipe, steps: int, clip_sample: bool):
    # Inversion must be the exact inverse of the sampler, so its x0 prediction is not clipped (a clip has no
    # inverse); `clip_sample=True` keeps the scheduler's own setting, for decoding fresh noise.
    schedule = pipe.components.decoder_scheduler
    if not clip_sample:
        schedule = dataclasses.replace(schedule, clip_sample=False)
    return pipe._plan(schedule, steps, "ddim", 0.0)


def _ddim_invert(plan, denoise, x0: torch.Tensor, channels: int, callback=None) -> torch.Tensor:
    """Walk the DDIM (η = 0) steps backwards, x0 → x_T.

    Sampling step i maps x_t (timestep t_i) to x_s (the next, smaller timestep; x0 after the last step) with
    ε = ε(x_t, t_i): x_s = √ā_s·(x_t − √(1−ā_t)·ε)/√ā_t + √(1−ā_s)·ε. Its inverse needs ε(x_t), unknown
    until x_t is; the standard approximation uses ε(x_s, t_i), whose error shrinks with the step size. An x0
    ("sample") model's output m at (x_s, t_i) stands for ε(x_s, t_i) = (x_s − √ā_t·m)/√(1−ā_t)."""
    x = x0.float()
    for i in reversed(range(plan.num_steps)):
        t = plan.timesteps[i]
        eps = denoise(x, t, i)[:, :channels].float()
        if plan.prediction_type == "sample":
            eps = (x - plan.sqrt_alpha_bar[i] * eps) / plan.sqrt_one_minus_alpha_bar[i]
        x0_pred = (x - plan.direction_coef[i] * eps) / plan.sqrt_alpha_bar_prev[i]
        x = plan.sqrt_alpha_bar[i] * x0_pred + plan.sqrt_one_minus_alpha_bar[i] * eps
        if callback is not None:
            callback("inversion", plan.num_steps - 1 - i, t, x)
    return x


def _ddim_decode(pipe, embeds, latents, steps: int, scale: float, *, clip_sample: bool, callback=None,
                 progress=False) -> torch.Tensor:
    plan = _ddim_plan(pipe, steps, clip_sample)
    denoise = _empty_caption_denoiser(pipe, embeds, scale)
    return pipe._run("decoder", plan, latents.to(pipe.device, pipe.dtype), denoise, None, callback, progress)


def _decoder_image(pipe, value, name: str) -> torch.Tensor:
    dec = pipe.components.decoder.config
    shape = (dec.in_channels, dec.sample_size, dec.sample_size)
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor (B, {', '.join(map(str, shape))}) in [-1, 1]")
    if value.dim() != 4 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}); got {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.to(pipe.device, torch.float32)


@torch.inference_mode()
def invert(pipe, image=None, num_inference_steps: int = 50, *, image_embeddings: torch.Tensor | None = None,
           decoder_image: torch.Tensor | None = None, decoder_guidance_scale: float = 1.0,
           callback: Callable | None = None) -> Inversion:
    """DDIM inversion of the decoder: images → x_T given z_i, so that DDIM with η = 0 (`reconstruct`) maps
    x_T back to the images. The bipartite latent (z_i, x_T) is returned as an `Inversion`.

    image: one image or a list (read at the decoder's resolution: shorter side resized with PIL bicubic,
        center crop, [-1, 1]); or give `decoder_image`, a (B, C, S, S) tensor in [-1, 1], directly.
    image_embeddings: z_i (B, D); by default the CLIP embedding of `image`.
    decoder_guidance_scale: guidance used for the inversion (and needed again to decode back). 1 (no
        guidance) inverts best: guidance amplifies the error of the approximation.
    """
    c = pipe.components
    steps = _decoder_steps(pipe, "num_inference_steps", num_inference_steps)
    scale = _check_scale("decoder_guidance_scale", decoder_guidance_scale)
    if (image is None) == (decoder_image is None):
        raise ValueError("give exactly one of image and decoder_image")
    if image is not None:
        x0 = image_processing.decoder_pixels(image, c.decoder.config.sample_size).to(pipe.device)
    else:
        x0 = _decoder_image(pipe, decoder_image, "decoder_image")
    if image_embeddings is not None:
        embeds = _check_embeddings(pipe, image_embeddings, "image_embeddings")
    elif image is not None:
        embeds = _encode(pipe, image, None, "image")
    else:
        raise ValueError("image_embeddings is required with decoder_image (there is no image to encode)")
    if embeds.shape[0] != x0.shape[0]:
        raise ValueError(f"image_embeddings has {embeds.shape[0]} rows but there are {x0.shape[0]} images")
    plan = _ddim_plan(pipe, steps, clip_sample=False)
    denoise = _empty_caption_denoiser(pipe, embeds, scale)
    latents = _ddim_invert(plan, denoise, x0, c.decoder.config.in_channels, callback)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"DDIM inversion produced non-finite values (dtype {pipe.dtype})")
    return Inversion(latents.to(pipe.dtype), embeds, x0, steps, scale)


@torch.inference_mode()
def reconstruct(pipe, inversion: Inversion, *, callback: Callable | None = None) -> torch.Tensor:
    """Decode an `Inversion` back with DDIM (η = 0, same steps, guidance and embeddings): the decoder-resolution
    images (B, C, S, S) in [-1, 1] (not clamped), ≈ `inversion.image`."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (from pipe.invert); got {type(inversion).__name__}")
    return _ddim_decode(pipe, inversion.image_embeddings, inversion.latents, inversion.num_inference_steps,
                        inversion.decoder_guidance_scale, clip_sample=False, callback=callback)


def _upsample(pipe, x, steps, generator, callback, progress):
    """Every upsampler on the decoder output, deterministically: DDIM η = 0 from one latent draw shared by all
    rows, so neighbouring images of a series differ only where their embeddings do."""
    for up in pipe.components.upsamplers:
        cfg = up.first.config
        shape = (1, cfg.in_channels // 2, cfg.sample_size, cfg.sample_size)
        latents = randn(shape, generator, pipe.device, pipe.dtype).expand(x.shape[0], -1, -1, -1).contiguous()
        x = pipe._super_res_stage(up, x, x.shape[0], steps, {up.name: "ddim"}, {up.name: 0.0}, latents, generator,
                                  callback, progress)
    return x


# ------------------------------------------------------------------------------------------ interpolation

def _endpoint(pipe, value, name: str):
    """('prompt', str) | ('embedding', (D,) tensor) | ('image', image)."""
    if isinstance(value, str):
        return "prompt", value
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return "embedding", _check_embeddings(pipe, value, name, ndim=1)
    images = image_processing.as_image_list(value, name)
    if len(images) != 1:
        raise ValueError(f"{name} must be a single image; got {len(images)}")
    return "image", images[0]


@torch.inference_mode()
def interpolate(pipe, start, end, num: int = 5, *, noise: str = "fixed", generator=None,
                decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int | list[int] = 7,
                decoder_guidance_scale: float | None = None, prior_num_inference_steps: int = 25,
                prior_guidance_scale: float | None = None, output_type: str = "pil", return_dict: bool = True,
                callback: Callable | None = None, progress: bool = True):
    """`num` images along the slerp from `start`'s CLIP image embedding to `end`'s (paper §3.2, figure 4).

    start, end: an image (PIL/array/tensor), a prompt (embedded by the prior; needs a prior), or a (D,)
        embedding tensor.
    noise: "fixed": every image is decoded from the same x_T (one draw from `generator`; decoder
        guidance defaults to the model's, 8 for Karlo); "inverted": both endpoints must be images, each is DDIM-inverted with its
        own embedding, and x_T is slerped along with the embedding (guidance defaults to 1, so the end images
        reconstruct the inputs).
    Decoding is DDIM with η = 0 (deterministic), and the upsamplers run DDIM η = 0 from one shared latent
    draw, so the series changes smoothly. Draw order: prior latents and noise (prompt endpoints, in order),
    decoder x_T ("fixed" only), then one latent draw per upsampler.
    Returns LatentSeriesOutput(images, image_embeddings, thetas, latents)."""
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or not 2 <= num <= 1000:
        raise ValueError(f"num must be an int in 2..1000; got {num!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}; got {noise!r}")
    steps = _decoder_steps(pipe, "decoder_num_inference_steps", decoder_num_inference_steps)
    sr_steps = _super_res_steps(pipe, super_res_num_inference_steps)
    if decoder_guidance_scale is None:
        decoder_guidance_scale = pipe.call_default("decoder_guidance_scale") if noise == "fixed" else 1.0
    scale = _check_scale("decoder_guidance_scale", decoder_guidance_scale)
    prior_steps = _check_steps("prior_num_inference_steps", prior_num_inference_steps, 10**6)
    prior_scale = _check_scale("prior_guidance_scale", pipe.call_default("prior_guidance_scale", prior_guidance_scale))
    _check_output_type(output_type)
    _check_generator(generator)
    ends = [_endpoint(pipe, start, "start"), _endpoint(pipe, end, "end")]
    if noise == "inverted" and any(kind != "image" for kind, _ in ends):
        raise ValueError("noise='inverted' needs images for both start and end (their x_T come from DDIM inversion)")

    # ---- the two endpoint embeddings
    embeds = [None, None]
    prompts = [(i, v) for i, (kind, v) in enumerate(ends) if kind == "prompt"]
    if prompts:
        from_prior = _prior_embeddings(pipe, [p for _, p in prompts], generator, prior_steps, prior_scale, progress)
        for (i, _), e in zip(prompts, from_prior):
            embeds[i] = e
    for i, (kind, value) in enumerate(ends):
        if kind == "embedding":
            embeds[i] = value
        elif kind == "image":
            embeds[i] = _encode(pipe, value, None, ("start", "end")[i])[0]
    thetas = [k / (num - 1) for k in range(num)]
    z = torch.stack([slerp(embeds[0], embeds[1], th) for th in thetas])

    # ---- decoder noise
    dec = pipe.components.decoder.config
    shape = (dec.in_channels, dec.sample_size, dec.sample_size)
    if noise == "fixed":
        x_T = randn((1,) + shape, generator, pipe.device, pipe.dtype).expand(num, -1, -1, -1)
    else:
        inv = [invert(pipe, ends[i][1], steps, image_embeddings=embeds[i][None], decoder_guidance_scale=scale)
               for i in (0, 1)]
        a, b = (v.latents.reshape(1, -1) for v in inv)
        x_T = torch.cat([slerp(a, b, th) for th in thetas]).reshape((num,) + shape)
    x = _ddim_decode(pipe, z, x_T, steps, scale, clip_sample=noise == "fixed", callback=callback,
                     progress=progress).clamp(-1, 1)
    x = _upsample(pipe, x, sr_steps, generator, callback, progress)
    images = pipe._to_output((x * 0.5 + 0.5).clamp(0, 1), output_type)
    out = LatentSeriesOutput(images, z, thetas, x_T.contiguous())
    return out if return_dict else (images,)


# -------------------------------------------------------------------------------------------- text diffs

@torch.inference_mode()
def text_diff(pipe, image, from_caption: str, to_caption: str, thetas: Sequence[float] = DEFAULT_EDIT_THETAS, *,
              generator=None, decoder_num_inference_steps: int = 50,
              super_res_num_inference_steps: int | list[int] = 7, decoder_guidance_scale: float = 1.0,
              image_embeddings: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
              callback: Callable | None = None, progress: bool = True):
    """Edit an image along a text direction (paper §3.3, figure 5): z_d = norm(z_t − z_t0) from the CLIP text
    embeddings of `to_caption` (z_t) and `from_caption` (z_t0), z_θ = |z_i|·slerp(ẑ_i, z_d, θ) for each θ
    (see `text_diff_embeddings`), each decoded with DDIM η = 0 from the image's inverted x_T (so θ = 0
    reconstructs the image), then upsampled (DDIM η = 0 from one shared latent draw of `generator`).

    thetas: positions in [0, 1]; the paper shows 0 to 0.5. decoder_num_inference_steps: used for the
    inversion and the decoding. Returns LatentSeriesOutput(images, image_embeddings, thetas, latents)."""
    for name, caption in (("from_caption", from_caption), ("to_caption", to_caption)):
        if not isinstance(caption, str):
            raise TypeError(f"{name} must be a str; got {type(caption).__name__}")
    thetas = _check_thetas(thetas)
    steps = _decoder_steps(pipe, "decoder_num_inference_steps", decoder_num_inference_steps)
    sr_steps = _super_res_steps(pipe, super_res_num_inference_steps)
    scale = _check_scale("decoder_guidance_scale", decoder_guidance_scale)
    _check_output_type(output_type)
    _check_generator(generator)
    images = image_processing.as_image_list(image, "image")
    if len(images) != 1:
        raise ValueError(f"image must be a single image; got {len(images)}")
    if image_embeddings is not None:
        z_i = _check_embeddings(pipe, image_embeddings, "image_embeddings", ndim=1)[None]
    else:
        z_i = _encode(pipe, images[0], None, "image")
    text, _, _ = pipe.encode_prompt([from_caption, to_caption], 1, guidance=False)
    z = text_diff_embeddings(z_i[0].float(), text[0].float(), text[1].float(), thetas).to(pipe.dtype)
    inv = invert(pipe, images[0], steps, image_embeddings=z_i, decoder_guidance_scale=scale)
    x_T = inv.latents.expand(len(thetas), -1, -1, -1)
    x = _ddim_decode(pipe, z, x_T, steps, scale, clip_sample=False, callback=callback,
                     progress=progress).clamp(-1, 1)
    x = _upsample(pipe, x, sr_steps, generator, callback, progress)
    out_images = pipe._to_output((x * 0.5 + 0.5).clamp(0, 1), output_type)
    out = LatentSeriesOutput(out_images, z, thetas, x_T.contiguous())
    return out if return_dict else (out_images,)
