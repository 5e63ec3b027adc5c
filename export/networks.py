"""Graph-backed stand-ins for the cascade's torch networks.

Each class here is called exactly like the torch module it replaces (same arguments, same return values,
same `.config` dataclass), so the cascade core, the one sampling loop and the samplers run unchanged - and
therefore stay seed-compatible - whichever runtime executes the graphs. They are not torch modules and do
not pretend to be: the weights live in the runtime. The runtime is an *executor*:

    executor.inputs: dict[name, torch.dtype]   the graph's declared inputs and their dtypes
    executor.run(feeds: dict[name, Tensor]) -> dict[name, Tensor]   outputs on the pipeline's device

(`unclip.export.onnxruntime.OrtExecutor`, `unclip.export.tensorrt.TrtExecutor`). Executors cast each feed
to the declared dtype, so a float32 pipeline can drive float16 graphs.
"""
from __future__ import annotations

import torch

def _check_tensor(name: str, value, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(value.shape)}")
    return value


def timesteps_for_graph(timestep, batch: int, device, *, python_float: str = "keep") -> torch.Tensor:
    """A float32 (batch,) tensor from a Python number, a 0-dim, (1,) or (batch,) tensor, converted the way
    the torch module would read it: python_float "keep" (conditional U-Net), "truncate" (plain U-Net casts
    Python floats to int64) or "whole" (the prior accepts only whole Python floats)."""
    if isinstance(timestep, bool):
        raise TypeError("timestep: expected a number or a tensor, got bool")
    if isinstance(timestep, (int, float)):
        if isinstance(timestep, float):
            if python_float == "truncate":
                timestep = int(timestep)
            elif python_float == "whole" and not timestep.is_integer():
                raise ValueError(f"timestep: a Python float must be a whole number (got {timestep}); "
                                 "pass fractional timesteps as a tensor")
        t = torch.tensor([float(timestep)], dtype=torch.float32, device=device)
    elif isinstance(timestep, torch.Tensor):
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep: expected a number, a 0-dim tensor or a ({batch},) tensor, "
                             f"got shape {tuple(timestep.shape)}")
        if timestep.is_complex() or timestep.dtype == torch.bool:
            raise TypeError(f"timestep: expected a real numeric tensor, got dtype {timestep.dtype}")
        t = timestep.reshape(-1).to(device=device, dtype=torch.float32)
    else:
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")
    return t.expand(batch).contiguous()


class GraphNetwork:
    """Base class: a named graph, the torch config it was exported from, and the executor that runs it."""

    kind = ""

    def __init__(self, name: str, config, executor, *, backend: str, device="cpu"):
        self.name = name
        self.config = config
        self.executor = executor
        self.backend = backend
        self.device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        """The graph's floating-point precision (timesteps are always float32)."""
        floats = [d for n, d in self.executor.inputs.items() if d.is_floating_point and n != "timestep"]
        return floats[0] if floats else torch.float32

    def _run(self, feeds: dict) -> dict:
        missing = [n for n in self.executor.inputs if feeds.get(n) is None]
        if missing:
            raise ValueError(f"{self.name}: the graph needs input(s) {missing}")
        return self.executor.run({n: feeds[n] for n in self.executor.inputs})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend={self.backend!r}, dtype={self.dtype})"


class TextEncoderGraph(GraphNetwork):
    kind = "text_encoder"

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """input_ids (B, L) ints -> (text_embeds (B, projection_dim), last_hidden_state (B, L, hidden))."""
        _check_tensor("input_ids", input_ids, 2)
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if attention_mask is not None:
            raise NotImplementedError("the exported text encoder takes no attention_mask (unCLIP never passes "
                                      "one; CLIP's causal mask already hides the padding after end-of-text)")
        out = self._run({"input_ids": input_ids.to(torch.int32)})
        return out["text_embeds"], out["last_hidden_state"]


class ImageEncoderGraph(GraphNetwork):
    kind = "image_encoder"

    def __call__(self, pixel_values: torch.Tensor):
        """pixel_values (B, C, S, S), CLIP-normalised -> (image_embeds, last_hidden_state)."""
        _check_tensor("pixel_values", pixel_values, 4)
        out = self._run({"pixel_values": pixel_values})
        return out["image_embeds"], out["last_hidden_state"]


class PriorGraph(GraphNetwork):
    kind = "prior"

    def __init__(self, *args, clip_mean: torch.Tensor, clip_std: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_mean = clip_mean.to(self.device)
        self.clip_std = clip_std.to(self.device)

    def __call__(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        _check_tensor("hidden_states", hidden_states, 2)
        _check_tensor("attention_mask", attention_mask, 2)
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask: expected a bool tensor (True = real token), got {attention_mask.dtype}")
        batch = hidden_states.shape[0]
        out = self._run({
            "hidden_states": hidden_states,
            "timestep": timesteps_for_graph(timestep, batch, self.device, python_float="whole"),
            "proj_embedding": _check_tensor("proj_embedding", proj_embedding, 2),
            "encoder_hidden_states": _check_tensor("encoder_hidden_states", encoder_hidden_states, 3),
            "attention_mask": attention_mask,
        })
        return out["predicted_image_embedding"]

    def post_process_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map a normalised prediction back to CLIP image-embedding space (as the torch prior does)."""
        return latents * self.clip_std + self.clip_mean


class TextProjGraph(GraphNetwork):
    kind = "text_proj"

    def __call__(self, image_embeddings, prompt_embeds, text_encoder_hidden_states, do_classifier_free_guidance):
        if not isinstance(do_classifier_free_guidance, bool):
            raise TypeError("do_classifier_free_guidance: expected a Python bool, got "
                            f"{type(do_classifier_free_guidance).__name__}")
        _check_tensor("image_embeddings", image_embeddings, 2)
        _check_tensor("prompt_embeds", prompt_embeds, 2)
        _check_tensor("text_encoder_hidden_states", text_encoder_hidden_states, 3)
        rows = image_embeddings.shape[0]
        uncond = torch.zeros(rows, dtype=torch.bool, device=image_embeddings.device)
        if do_classifier_free_guidance:
            # The graph puts the learned unconditional embedding in the rows flagged here.
            image_embeddings = torch.cat([torch.zeros_like(image_embeddings), image_embeddings])
            uncond = torch.cat([~uncond, uncond])
        batch = image_embeddings.shape[0]
        for name, value in (("prompt_embeds", prompt_embeds), ("text_encoder_hidden_states", text_encoder_hidden_states)):
            if value.shape[0] != batch:
                rule = "2 × image_embeddings batch (classifier-free guidance)" if do_classifier_free_guidance \
                    else "image_embeddings batch"
                raise ValueError(f"{name}: batch size {value.shape[0]} must equal the {rule} = {batch}")
        out = self._run({"image_embeddings": image_embeddings, "is_uncond": uncond, "prompt_embeds": prompt_embeds,
                         "text_encoder_hidden_states": text_encoder_hidden_states})
        return out["encoder_hidden_states"], out["additive_time_embedding"]


class DecoderGraph(GraphNetwork):
    kind = "decoder"

    def __call__(self, sample, timestep, encoder_hidden_states=None, class_labels=None, attention_mask=None):
        _check_tensor("sample", sample, 4)
        batch = sample.shape[0]
        if attention_mask is None and encoder_hidden_states is not None:
            attention_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool, device=sample.device)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask: expected a bool tensor (True = attend)")
        out = self._run({
            "sample": sample,
            "timestep": timesteps_for_graph(timestep, batch, self.device, python_float="keep"),
            "encoder_hidden_states": encoder_hidden_states,
            "class_labels": class_labels,
            "attention_mask": attention_mask,
        })
        return out["out_sample"]


class SuperResGraph(GraphNetwork):
    kind = "super_res"

    def __call__(self, sample, timestep):
        _check_tensor("sample", sample, 4)
        out = self._run({"sample": sample,
                         "timestep": timesteps_for_graph(timestep, sample.shape[0], self.device, python_float="truncate")})
        return out["out_sample"]


GRAPH_CLASSES = {cls.kind: cls for cls in (TextEncoderGraph, ImageEncoderGraph, PriorGraph, TextProjGraph,
                                             DecoderGraph, SuperResGraph)}

