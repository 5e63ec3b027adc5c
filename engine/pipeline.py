"""`unclip.Pipeline`: the package's face. Text to image (engine/text_to_image.py) with diffusers' keywords and
seeds, and the CLIP latent-space tools (engine/latent_space.py), over one cascade core (engine/cascade.py).

Each method validates its call into a request (engine/request.py) and hands it to the client module that
does the work; the two clients use only the core, never each other.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import editing, latent_space, text_to_image
from .cascade import Cascade, UnCLIPOutput
from .errors import NonFiniteError
from .loading import Components, save_components
from .observers import Observer, call_observer, check_observer
from .request import edit_request, generate_request, resolve_dtype
from .runner import Runner, runner_class

__all__ = ["Pipeline", "UnCLIPOutput", "NonFiniteError"]


class Pipeline:
    """The unCLIP cascade. Build with `from_pretrained(dir)` or `from_preset(name)`, then call with a prompt.

    backend: a registered runner name ("torch", "fast", "onnxruntime", "tensorrt", see `unclip info`), a
    `unclip.Runner` subclass, or a Runner instance; runner_options go to the runner's constructor (e.g.
    {"cuda_graphs": False} for "fast")."""

    def __init__(self, components: Components, *, device="cpu", dtype=torch.float32, backend="torch",
                 runner_options: dict | None = None):
        self.cascade = Cascade.build(components, backend=backend, device=device, dtype=resolve_dtype(dtype),
                                     runner_options=runner_options)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, *, device="cpu", dtype=torch.float32, backend="torch",
                        runner_options: dict | None = None) -> "Pipeline":
        """Load a cascade folder. Never writes into `path`.

        path: a diffusers-layout unCLIP folder (Karlo v1 alpha, its image-variation release, anything
            `save_pretrained` wrote), or an `unclip export` folder for the backend that runs it.
        device: "cpu", "cuda", "cuda:N", ... (a str or torch.device).
        dtype: "fp32" | "fp16" | "bf16" or the torch dtype; weights are loaded in it (fp16/bf16 are for GPUs: on
            a CPU they run slower than fp32).
        backend: a registered runner name ("torch", "fast", "onnxruntime", "tensorrt", "native"; `unclip info`
            says which run here), a `unclip.Runner` subclass or instance.
        runner_options: keywords for the runner's constructor, e.g. {"cuda_graphs": False} for "fast".

        Returns the Pipeline. Raises ValueError for a bad argument or a backend not available on `device`,
        unclip.ConfigError / unclip.WeightsError naming the file for a bad folder."""
        dtype = resolve_dtype(dtype)
        klass = type(backend) if isinstance(backend, Runner) else runner_class(backend)
        ok, reason = klass.available(device)
        if not ok:
            raise ValueError(f"backend {klass.name!r} is not available here: {reason}")
        components = klass.load(str(path), device=device, dtype=dtype)
        if components.source is None:
            components.source = str(path)
        return cls(components, device=device, dtype=dtype, backend=backend, runner_options=runner_options)

    @classmethod
    def from_preset(cls, name: str, *, seed: int = 0, device="cpu", dtype=torch.float32, backend="torch",
                    runner_options: dict | None = None) -> "Pipeline":
        """A cascade of a known shape.

        name: "toy" (the trained shapes-world cascade shipped in the package, engine/assets/toy; `seed` unused),
            or random weights: "tiny" (fast on a CPU), "karlo" (Karlo v1 alpha's exact configs), "dalle2" (the
            paper's sizes, two upsamplers).
        seed: draws the random weights (the same seed, the same weights).
        device, dtype, backend, runner_options: as in `from_pretrained`.

        Returns the Pipeline; ValueError for an unknown name."""
        from .presets import build_preset
        dtype = resolve_dtype(dtype)
        components = build_preset(name, seed=seed, device=device, dtype=dtype)
        components.source = f"preset {name}" + ("" if name == "toy" else f" (seed {seed})")
        return cls(components, device=device, dtype=dtype, backend=backend, runner_options=runner_options)

    def save_pretrained(self, path: str, dtype=None, *, overwrite: bool = False) -> None:
        """Write the cascade to the folder `path` in the diffusers layout, atomically (a staging folder renamed
        into place; an existing model folder is replaced only when the new one is complete).

        dtype: store the weights in this dtype (default: as held). overwrite: also replace a non-empty folder
        that is not a model folder (otherwise refused).

        The folder loads here and in diffusers 0.42's `UnCLIPPipeline.from_pretrained` (tests/test_readme.py:
        the same images at the same seed, fp32 CPU, max |Δ| ≤ 1e-4); each component folder also loads alone
        in diffusers/transformers. `model_index.json` names text_proj's library as the module diffusers 0.42
        keeps `UnCLIPTextProjModel` in (see the README). Returns None; FileExistsError when `path` is a file or
        a non-empty folder that is not a model folder (unless `overwrite`)."""
        from .request import check_bool
        save_components(self.components, str(path), dtype=None if dtype is None else resolve_dtype(dtype),
                        overwrite=check_bool("overwrite", overwrite))

    # ------------------------------------------------------------------ properties
    @property
    def components(self) -> Components:
        return self.cascade.components

    @property
    def runner(self):
        return self.cascade.runner

    @property
    def backend(self) -> str:
        return self.cascade.backend

    @property
    def device(self) -> torch.device:
        return self.cascade.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cascade.dtype

    @property
    def stage_names(self) -> list[str]:
        return self.cascade.stage_names

    @property
    def image_size(self) -> int:
        return self.cascade.image_size

    def call_default(self, name: str, value=None):
        """The value a call uses for keyword `name` ("prior_guidance_scale" or "decoder_guidance_scale"):
        `value` if it is not None, else the model's recommended setting (model_index.json
        "_unclip_call_defaults"), else Karlo's (4 and 8). The toy model recommends 4 and 2."""
        return self.cascade.call_default(name, value)

    def encode_prompt(self, prompt: str | list[str], num_images_per_prompt: int = 1, guidance: bool = True):
        """CLIP text features in the layout every stage expects.

        prompt: a str or a non-empty list of str. num_images_per_prompt: rows per prompt (each prompt repeated).
        guidance: also encode the empty caption as the unconditional rows, first ([uncond; cond]).

        Returns (text_embeds (R, D), hidden_states (R, 77, W), mask (R, 77) bool), R = (2 if guidance else 1)
        × prompts × num_images_per_prompt."""
        from .request import check_int, check_prompts
        prompts = check_prompts(prompt)
        n = check_int("num_images_per_prompt", num_images_per_prompt, 1, 10**6)
        with torch.inference_mode():
            return self.cascade.encode_prompts(prompts, n, guidance)

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
                 callback: Callable | None = None, progress: bool = True, observer: Observer | None = None,
                 negative_prompt: str | list[str] | None = None, rerank: int = 1):
        """Generate images from text. Keywords shared with diffusers' UnCLIPPipeline mean the same, and with
        the same CPU generator the random draws are the same (seed compatibility):

        prompt: a str or a list of str (None only with text_model_output).
        num_images_per_prompt: images per prompt (int >= 1).
        prior_/decoder_/super_res_num_inference_steps: sampling steps per stage (1..the schedule's training
            steps); super_res takes one int per upsampler too.
        generator: a CPU torch.Generator (or one per image) for every random draw; None: torch's global one.
        prior_latents, decoder_latents, super_res_latents: initial noise of a stage instead of drawing it
            (shapes (B, D), (B, 3, S, S), (B, 3, S', S') or a list with one entry per upsampler).
        text_model_output, text_attention_mask: precomputed CLIP text features instead of `prompt`.
        prior_guidance_scale, decoder_guidance_scale: classifier-free guidance; guidance is on for both stages
            when either is > 1 (as in diffusers).
        output_type: "pil" (list of PIL images), "np" (float (B, H, W, 3) in [0, 1]), "pt" ((B, 3, H, W) in
            [0, 1]). return_dict: False returns a tuple.

        Extras:

        Guidance scales left at None take the model's recommended values (`call_default`): 4 and 8 as in
        Karlo, unless the model folder says otherwise (the toy model does).
        sampler: "ddpm" (Karlo's strided DDPM) or "ddim", for all stages or as {stage: name}.
        eta: DDIM η (0 = deterministic), for all stages or as {stage: value}.
        prior_candidates: draw k prior embeddings per image, keep the one whose direction is closest to the
            text embedding (highest dot product of the unit vectors; the paper's trick). k > 1 draws extra noise.
        callback: called as callback(stage, step_index, timestep, latents) after every step.
        progress: tqdm bars per stage. observer: a `unclip.Observer` told about every stage (and step).
        negative_prompt: a str (for every prompt) or one per prompt: the unconditional half of classifier-free
            guidance uses its text features in the prior and the decoder instead of the empty caption's.
            None keeps the empty caption (and diffusers' images, bit for bit).
        rerank: draw k images per requested image and keep the one with the highest CLIP image–text cosine
            (needs an image encoder); the kept images' cosines are the output's `scores`.

        Every argument is checked before any work (ValueError/TypeError naming it). Returns
        UnCLIPOutput(images, image_embeddings[, scores]), or (images,) with return_dict=False.
        """
        cascade = self.cascade
        r = generate_request(
            cascade, prompt=prompt, num_images_per_prompt=num_images_per_prompt,
            prior_num_inference_steps=prior_num_inference_steps,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, generator=generator,
            prior_latents=prior_latents, decoder_latents=decoder_latents, super_res_latents=super_res_latents,
            text_model_output=text_model_output, text_attention_mask=text_attention_mask,
            prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
            output_type=output_type, return_dict=return_dict, sampler=sampler, eta=eta,
            prior_candidates=prior_candidates, callback=callback, progress=progress,
            call_default=cascade.call_default, negative_prompt=negative_prompt, rerank=rerank)
        obs = call_observer(check_observer(observer), r.callback, r.progress)
        if r.rerank > 1:
            return editing.best_of(cascade, r, lambda wide: text_to_image.generate(cascade, wide, obs), obs)
        return text_to_image.generate(cascade, r, obs)

    # ------------------------------------------------------------------ CLIP latent space (unclip.latent_space)
    def encode_image(self, images=None, *, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP image embeddings of images (needs the cascade's image encoder).

        images: one image or a list: PIL of any size/mode, uint8 arrays (H, W, C) / (C, H, W), tensors
            (C, H, W) / (B, C, H, W); preprocessed exactly as transformers' CLIPImageProcessor does.
        pixel_values: CLIP-preprocessed (B, 3, size, size) instead of `images` (exactly one of the two).

        Returns a float tensor (B, D) on the pipeline's device."""
        return latent_space.encode_image(self.cascade, images, pixel_values=pixel_values)

    def variations(self, image=None, num_images_per_prompt: int = 1, decoder_num_inference_steps: int = 25,
                   super_res_num_inference_steps: int | list[int] = 7, generator=None,
                   decoder_latents: torch.Tensor | None = None, super_res_latents=None,
                   image_embeddings: torch.Tensor | None = None, decoder_guidance_scale: float | None = None,
                   output_type: str = "pil", return_dict: bool = True, *, pixel_values: torch.Tensor | None = None,
                   sampler: str | dict = "ddpm", eta: float | dict = 0.0, callback: Callable | None = None,
                   progress: bool = True, observer: Observer | None = None,
                   negative_prompt: str | list[str] | None = None):
        """Image variations, seed-compatible with diffusers' UnCLIPImageVariationPipeline: the images' CLIP
        embeddings (or `image_embeddings`, or `pixel_values`) decoded with fresh noise, then upsampled.
        negative_prompt: the decoder's unconditional guidance rows use that caption instead of the empty one.
        Returns UnCLIPOutput(images, image_embeddings). See `unclip.latent_space.variations`."""
        return latent_space.variations(
            self.cascade, image, num_images_per_prompt, decoder_num_inference_steps, super_res_num_inference_steps,
            generator, decoder_latents, super_res_latents, image_embeddings, decoder_guidance_scale, output_type,
            return_dict, pixel_values=pixel_values, sampler=sampler, eta=eta, callback=callback,
            progress=progress, observer=observer, negative_prompt=negative_prompt)

    # ------------------------------------------------------------------ editing (unclip.editing)
    @torch.inference_mode()
    def inpaint(self, image, mask, prompt: str | list[str] | None = None, *,
                image_embeddings: torch.Tensor | None = None, negative_prompt: str | list[str] | None = None,
                strength: float = 1.0, resample_jumps: int = 0, num_images_per_prompt: int = 1,
                prior_num_inference_steps: int = 25, decoder_num_inference_steps: int = 25,
                super_res_num_inference_steps: int | list[int] = 7, prior_guidance_scale: float | None = None,
                decoder_guidance_scale: float | None = None, generator=None, sampler: str | dict = "ddpm",
                eta: float | dict = 0.0, output_type: str = "pil", return_dict: bool = True,
                callback: Callable | None = None, progress: bool = True, observer: Observer | None = None):
        """Repaint the masked region of images with the cascade's own decoder (RePaint; see `unclip.editing`).

        image: one image or a list (PIL, arrays, tensors; read as its centred square at the output resolution).
        mask: white / 1 / True = repaint, black = keep; PIL (1, L, P, RGB, RGBA...), array or tensor (H, W), any
            size with the image's aspect ratio; one for all images or one per image. Resized to every stage.
        prompt: what to paint (through the prior); or `image_embeddings` (B, D); neither: the image's own CLIP
            embedding. strength in (0, 1]: how far into the decoder's schedule to start (1 = from pure noise
            in the masked region). resample_jumps: RePaint's resampling, J extra passes per decoder step.
        Every unmasked pixel of the output equals the source's exactly. Returns UnCLIPOutput(images,
        image_embeddings)."""
        r = self._edit_request("inpaint", image, mask, prompt, image_embeddings, negative_prompt, strength,
                               resample_jumps, locals())
        return editing.edit(self.cascade, r, call_observer(check_observer(observer), r.callback, r.progress))

    def outpaint(self, image, pad=(0, 0, 0, 0), prompt: str | list[str] | None = None, **kwargs):
        """Extend an image (or each of a list) by pad = (left, top, right, bottom) pixels: the canvas (edges
        repeated) and the mask of its new border are built here, then `inpaint(canvases, masks, prompt,
        **kwargs)` fills the border. A canvas that is not square is read, like any image, as its centred square."""
        canvases, masks = editing.outpaint_canvas(image, pad)
        return self.inpaint(canvases, masks, prompt, **kwargs)

    @torch.inference_mode()
    def img2img(self, image, prompt: str | list[str] | None = None, *, strength: float = 0.6,
                image_embeddings: torch.Tensor | None = None, negative_prompt: str | list[str] | None = None,
                num_images_per_prompt: int = 1, prior_num_inference_steps: int = 25,
                decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int | list[int] = 7,
                prior_guidance_scale: float | None = None, decoder_guidance_scale: float | None = None,
                generator=None, sampler: str | dict = "ddpm", eta: float | dict = 0.0, output_type: str = "pil",
                return_dict: bool = True, callback: Callable | None = None, progress: bool = True,
                observer: Observer | None = None):
        """SDEdit: the decoder, then each upsampler, starts from the image noised to `strength` (in (0, 1]) of
        its schedule, so low strengths keep its layout and colours and 1.0 is text-to-image. Conditioned by the prompt's prior
        embedding, or `image_embeddings`, or (neither) the image's own. Returns UnCLIPOutput(images,
        image_embeddings)."""
        r = self._edit_request("img2img", image, None, prompt, image_embeddings, negative_prompt, strength, 0,
                               locals())
        return editing.edit(self.cascade, r, call_observer(check_observer(observer), r.callback, r.progress))

    def _edit_request(self, mode, image, mask, prompt, image_embeddings, negative_prompt, strength,
                      resample_jumps, kw):
        return edit_request(
            self.cascade, mode=mode, image=image, mask=mask, prompt=prompt, image_embeddings=image_embeddings,
            negative_prompt=negative_prompt, strength=strength, resample_jumps=resample_jumps,
            num_images_per_prompt=kw["num_images_per_prompt"],
            prior_num_inference_steps=kw["prior_num_inference_steps"],
            decoder_num_inference_steps=kw["decoder_num_inference_steps"],
            super_res_num_inference_steps=kw["super_res_num_inference_steps"],
            prior_guidance_scale=kw["prior_guidance_scale"], decoder_guidance_scale=kw["decoder_guidance_scale"],
            generator=kw["generator"], sampler=kw["sampler"], eta=kw["eta"], output_type=kw["output_type"],
            return_dict=kw["return_dict"], callback=kw["callback"], progress=kw["progress"],
            call_default=self.cascade.call_default)

    def invert(self, image=None, num_inference_steps: int = 50, *, image_embeddings: torch.Tensor | None = None,
               decoder_image: torch.Tensor | None = None, decoder_guidance_scale: float = 1.0,
               callback: Callable | None = None, observer: Observer | None = None):
        """DDIM inversion of the decoder: the x_T from which DDIM (η = 0) decodes back to `image`, given its
        CLIP embedding z_i.

        image: one image (any form `encode_image` takes), or None with `image_embeddings` and `decoder_image`.
        num_inference_steps: inversion steps (more: closer reconstruction). image_embeddings: z_i instead of
        encoding `image`. decoder_image: the image already at the decoder's resolution in [-1, 1].
        decoder_guidance_scale: guidance during inversion (1 inverts best). callback, observer: as in `__call__`.

        Returns a `latent_space.Inversion` (latents x_T, image_embeddings z_i, image x0 in [-1, 1], steps,
        guidance). See `unclip.latent_space.invert`."""
        return latent_space.invert(self.cascade, image, num_inference_steps, image_embeddings=image_embeddings,
                                   decoder_image=decoder_image, decoder_guidance_scale=decoder_guidance_scale,
                                   callback=callback, observer=observer)

    def reconstruct(self, inversion, *, callback: Callable | None = None,
                    observer: Observer | None = None) -> torch.Tensor:
        """Decode an `Inversion` back with DDIM η = 0: the decoder-resolution images (B, C, S, S) in [-1, 1]
        (the decoder's own resolution, not clamped), ≈ `inversion.image`."""
        return latent_space.reconstruct(self.cascade, inversion, callback=callback, observer=observer)

    def interpolate(self, start, end, num: int = 5, *, noise: str = "fixed", generator=None,
                    decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int | list[int] = 7,
                    decoder_guidance_scale: float | None = None, prior_num_inference_steps: int = 25,
                    prior_guidance_scale: float | None = None, output_type: str = "pil", return_dict: bool = True,
                    callback: Callable | None = None, progress: bool = True, observer: Observer | None = None):
        """`num` images (ends included) along the slerp between two CLIP image embeddings.

        start, end: each an image, a prompt (embedded by the prior: needs one) or a (D,) embedding.
        num: images in the series (>= 2). noise: "fixed" (one decoder noise for all, the model's decoder
            guidance) or "inverted" (both images' DDIM-inverted x_T, slerped too; guidance 1, so the ends
            reconstruct the inputs; needs image ends). generator: the noise draws (CPU torch.Generator).
        decoder_/super_res_num_inference_steps, decoder_guidance_scale: the decoding (DDIM η = 0).
        prior_num_inference_steps, prior_guidance_scale: for prompt ends. output_type, return_dict, callback,
        progress, observer: as in `__call__`.

        Returns LatentSeriesOutput(images, image_embeddings, thetas, latents). See
        `unclip.latent_space.interpolate`."""
        return latent_space.interpolate(
            self.cascade, start, end, num, noise=noise, generator=generator,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
            prior_num_inference_steps=prior_num_inference_steps, prior_guidance_scale=prior_guidance_scale,
            output_type=output_type, return_dict=return_dict, callback=callback, progress=progress, observer=observer)

    def text_diff(self, image, from_caption: str, to_caption: str,
                  thetas: Sequence[float] = latent_space.DEFAULT_EDIT_THETAS, *, generator=None,
                  decoder_num_inference_steps: int = 50, super_res_num_inference_steps: int | list[int] = 7,
                  decoder_guidance_scale: float = 1.0, image_embeddings: torch.Tensor | None = None,
                  output_type: str = "pil", return_dict: bool = True, callback: Callable | None = None,
                  progress: bool = True, observer: Observer | None = None):
        """Edit an image along a caption difference, one image per θ: its embedding z_i rotated toward
        z_d = norm(z_t − z_t0), z_θ = |z_i|·slerp(ẑ_i, z_d, θ), each decoded from the image's inverted x_T.

        image: the image to edit (any form `encode_image` takes). from_caption: a caption of the image as it
        is (z_t0); to_caption: the caption to move toward (z_t). thetas: positions in [0, 1] (0 = the image
        itself). generator: the upsamplers' noise. decoder_num_inference_steps: inversion and decoding steps.
        decoder_guidance_scale: 1 (no guidance) edits best. image_embeddings: z_i instead of encoding `image`.
        super_res_num_inference_steps, output_type, return_dict, callback, progress, observer: as in `__call__`.

        Returns LatentSeriesOutput(images, image_embeddings, thetas, latents). See
        `unclip.latent_space.text_diff`."""
        return latent_space.text_diff(
            self.cascade, image, from_caption, to_caption, thetas, generator=generator,
            decoder_num_inference_steps=decoder_num_inference_steps,
            super_res_num_inference_steps=super_res_num_inference_steps, decoder_guidance_scale=decoder_guidance_scale,
            image_embeddings=image_embeddings, output_type=output_type, return_dict=return_dict, callback=callback,
            progress=progress, observer=observer)

    def __repr__(self) -> str:
        name = self.components.source or "components"
        return (f"Pipeline({name!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, stages={self.stage_names}, "
                f"image_size={self.image_size})")
