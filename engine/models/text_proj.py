"""unCLIP's bridge from CLIP embeddings to the decoder's conditioning (DALL-E 2, section 2.1).

The decoder is conditioned on the CLIP image embedding in two ways: projected and added to its timestep
embedding, and projected into a few extra context tokens placed in front of the (projected, normalised) text
token states it cross-attends to. The text embedding is added to the time embedding as well. For
classifier-free guidance the image embedding of the unconditional half is a learned vector.

State-dict keys equal those of diffusers' `UnCLIPTextProjModel`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import Config


@dataclass(frozen=True)
class TextProjConfig:
    time_embed_dim: int
    cross_attention_dim: int
    clip_extra_context_tokens: int = 4
    clip_embeddings_dim: int = 768

    @classmethod
    def from_config(cls, cfg: Config) -> "TextProjConfig":
        config = cls(
            time_embed_dim=cfg.get_int("time_embed_dim", min_value=1),
            cross_attention_dim=cfg.get_int("cross_attention_dim", min_value=1),
            clip_extra_context_tokens=cfg.get_int("clip_extra_context_tokens", 4, min_value=1),
            clip_embeddings_dim=cfg.get_int("clip_embeddings_dim", 768, min_value=1),
        )
        cfg.reject_unknown(asdict(config).keys())
        cfg.check_limits(config, {"time_embed_dim": "width", "cross_attention_dim": "width",
                                  "clip_extra_context_tokens": "tokens", "clip_embeddings_dim": "width"})
        return config

    def to_dict(self) -> dict:
        return {"_class_name": "UnCLIPTextProjModel", **asdict(self)}


class TextProj(nn.Module):
    config_class = TextProjConfig
    weights_name = "diffusion_pytorch_model.safetensors"
    ignore_unexpected: tuple[str, ...] = ()

    def __init__(self, config: TextProjConfig):
        super().__init__()
        self.config = config
        clip_dim, time_dim, cross_dim = config.clip_embeddings_dim, config.time_embed_dim, config.cross_attention_dim
        # Stands in for the image embedding of the unconditional half of a CFG batch.
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_dim))
        self.embedding_proj = nn.Linear(clip_dim, time_dim)  # text embedding -> time embedding
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_dim, time_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(clip_dim, config.clip_extra_context_tokens * cross_dim)
        self.encoder_hidden_states_proj = nn.Linear(clip_dim, cross_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_dim)

    def forward(self, image_embeddings: torch.Tensor, prompt_embeds: torch.Tensor,
                text_encoder_hidden_states: torch.Tensor, do_classifier_free_guidance: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder conditioning from CLIP embeddings.

        image_embeddings: (N, clip_dim); prompt_embeds: (B, clip_dim); text_encoder_hidden_states:
        (B, L, clip_dim). With `do_classifier_free_guidance`, B = 2N: the first N rows are the
        unconditional half and get the learned embedding instead of an image embedding; otherwise B = N.
        Returns (encoder_hidden_states (B, extra_tokens + L, cross_dim), additive time embedding
        (B, time_embed_dim)).
        """
        if not isinstance(do_classifier_free_guidance, bool):
            raise TypeError("do_classifier_free_guidance: expected a Python bool, got "
                            f"{type(do_classifier_free_guidance).__name__}")
        self._check_inputs(image_embeddings, prompt_embeds, text_encoder_hidden_states, do_classifier_free_guidance)
        dtype = self.embedding_proj.weight.dtype
        image_embeddings = image_embeddings.to(dtype)
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings.to(dtype).expand(image_embeddings.shape[0], -1)
            image_embeddings = torch.cat([uncond, image_embeddings], dim=0)
        batch = image_embeddings.shape[0]

        additive_time_embedding = (self.clip_image_embeddings_project_to_time_embeddings(image_embeddings)
                                   + self.embedding_proj(prompt_embeds.to(dtype)))

        # The projection's n·C outputs are laid out channel-major: token k, channel c sits at c·n + k.
        n = self.config.clip_extra_context_tokens
        extra_tokens = self.clip_extra_context_tokens_proj(image_embeddings).view(batch, -1, n).transpose(1, 2)
        text_tokens = self.text_encoder_hidden_states_norm(
            self.encoder_hidden_states_proj(text_encoder_hidden_states.to(dtype)))
        return torch.cat([extra_tokens, text_tokens], dim=1), additive_time_embedding

    def _check_inputs(self, image_embeddings, prompt_embeds, text_encoder_hidden_states, cfg_on: bool) -> None:
        clip_dim = self.config.clip_embeddings_dim
        for name, value, ndim in (("image_embeddings", image_embeddings, 2), ("prompt_embeds", prompt_embeds, 2),
                                  ("text_encoder_hidden_states", text_encoder_hidden_states, 3)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
            if value.dim() != ndim or value.shape[-1] != clip_dim:
                want = "(N, " if ndim == 2 else "(B, L, "
                raise ValueError(f"{name}: expected shape {want}{clip_dim}), got {tuple(value.shape)}")
        batch = image_embeddings.shape[0] * (2 if cfg_on else 1)
        for name, value in (("prompt_embeds", prompt_embeds), ("text_encoder_hidden_states", text_encoder_hidden_states)):
            if value.shape[0] != batch:
                rule = "2 × image_embeddings batch (classifier-free guidance)" if cfg_on else "image_embeddings batch"
                raise ValueError(f"{name}: batch size {value.shape[0]} must equal the {rule} = {batch}")
