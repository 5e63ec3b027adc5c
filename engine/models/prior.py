"""The unCLIP diffusion prior: a causal transformer that denoises a CLIP image embedding.

One forward pass reads a sequence of `num_embeddings + 4` tokens, in this order:

    [ text token states (77) | text embedding | timestep embedding | noisy image embedding | "prd" query ]

adds a learned positional embedding, runs pre-norm transformer blocks under a causal mask (text padding
masked out as keys), and projects the final state of the last ("prd") token to the predicted clean image
embedding (the Karlo prior predicts x0, in the normalised space that `post_process_latents` undoes).

State-dict keys equal those of diffusers' `PriorTransformer`, so published checkpoints load strictly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LIMITS, Config
from .layers import Attend

# Activations diffusers accepts for `time_embed_act_fn` (it lower-cases the name first).
_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}
_LAYER_NORM_EPS = 1e-5  # every LayerNorm of the reference model uses the PyTorch default
_FF_MULT = 4            # feed-forward hidden width = 4 × model width


@dataclass(frozen=True)
class PriorConfig:
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768
    num_embeddings: int = 77
    additional_embeddings: int = 4
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None
    embedding_proj_norm_type: str | None = None
    encoder_hid_proj_type: str = "linear"
    added_emb_type: str = "prd"
    time_embed_dim: int | None = None
    embedding_proj_dim: int | None = None
    clip_embed_dim: int | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sequence_length(self) -> int:
        return self.num_embeddings + self.additional_embeddings

    @classmethod
    def from_config(cls, cfg: Config) -> "PriorConfig":
        def optional_dim(key: str) -> int | None:
            value = cfg.get(key, None, types=(int, type(None)))
            if isinstance(value, bool) or (value is not None and value < 1):
                raise cfg.error(key, f"= {value!r} must be null or an integer >= 1")
            return value

        dropout = cfg.get("dropout", 0.0, types=(int, float))
        if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise cfg.error("dropout", f"= {dropout!r} must be in [0, 1)")
        act = cfg.get("time_embed_act_fn", "silu", types=str)
        if act.lower() not in _ACTIVATIONS:
            raise cfg.error("time_embed_act_fn", f"= {act!r} is not supported (supported: "
                                                 f"{', '.join(map(repr, _ACTIVATIONS))})")
        config = cls(
            num_attention_heads=cfg.get_int("num_attention_heads", 32, min_value=1),
            attention_head_dim=cfg.get_int("attention_head_dim", 64, min_value=1),
            num_layers=cfg.get_int("num_layers", 20, min_value=0),
            embedding_dim=cfg.get_int("embedding_dim", 768, min_value=1),
            num_embeddings=cfg.get_int("num_embeddings", 77, min_value=1),
            # The token layout (text embedding, timestep, noisy embedding, prd) is exactly 4 extra tokens;
            # other counts only make sense with the variant layouts below, which we do not implement.
            additional_embeddings=cfg.expect("additional_embeddings", 4),
            dropout=float(dropout),  # training-only; kept so the config round-trips
            time_embed_act_fn=act,
            norm_in_type=cfg.get("norm_in_type", None, choices=(None, "layer")),
            embedding_proj_norm_type=cfg.get("embedding_proj_norm_type", None, choices=(None, "layer")),
            # Without the text-state projection or the prd token the model is Shap-E's (3-D latents,
            # no text tokens, a different output slice): not this engine's forward contract.
            encoder_hid_proj_type=cfg.expect("encoder_hid_proj_type", "linear"),
            added_emb_type=cfg.expect("added_emb_type", "prd"),
            time_embed_dim=optional_dim("time_embed_dim"),
            embedding_proj_dim=optional_dim("embedding_proj_dim"),
            clip_embed_dim=optional_dim("clip_embed_dim"),
        )
        cfg.reject_unknown(asdict(config).keys())
        cfg.check_limits(config, {"num_attention_heads": "width", "attention_head_dim": "width",
                                  "num_layers": "layers", "embedding_dim": "width", "num_embeddings": "tokens",
                                  "time_embed_dim": "width", "embedding_proj_dim": "width",
                                  "clip_embed_dim": "width"})
        if config.num_attention_heads * config.attention_head_dim > LIMITS["width"]:
            raise cfg.error("num_attention_heads", f"× attention_head_dim = {config.num_attention_heads} × "
                                                   f"{config.attention_head_dim} exceeds this engine's bound "
                                                   f"{LIMITS['width']} on the attention width")
        return config

    def to_dict(self) -> dict:
        return {"_class_name": "PriorTransformer", **asdict(self)}


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32 features [cos(t·f_i) | sin(t·f_i)], f_i = max_period^(-i/(dim//2)).

    This is the cosine-first, zero-shift variant the prior was trained with (diffusers' `Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0)`); an odd `dim` gets one trailing zero. Always fp32:
    fp16 cannot represent t·f for t near 1000 precisely enough.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        features = F.pad(features, (0, 1))
    return features


class TimestepMLP(nn.Module):
    """Linear -> activation -> Linear on the sinusoidal features (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = _ACTIVATIONS[act.lower()]()
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (keys `to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 0 only: the reference's [1] is a dropout
        self.attend = Attend()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, H·D) -> (B, H, L, D)
            return t.view(b, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(x)), split_heads(self.to_v(x))
        out = self.attend(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        out = out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim)
        return self.to_out[0](out)


class GeluProjection(nn.Module):
    """Linear then exact (erf) GELU; key `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """GELU MLP; keys `net.0.proj` and `net.2` (slot 1 is the reference's weight-free dropout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.ModuleList([GeluProjection(dim, hidden), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class PriorBlock(nn.Module):
    """Pre-norm block: x += attn(norm1(x)); x += ff(norm3(x)). (`norm3`: the reference numbers its norms
    1-3 and this block has no cross-attention, hence no `norm2`.)"""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn1 = SelfAttention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.ff = FeedForward(dim, _FF_MULT * dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), key_padding_mask)
        return x + self.ff(self.norm3(x))


class PriorTransformer(nn.Module):
    config_class = PriorConfig
    weights_name = "diffusion_pytorch_model.safetensors"
    ignore_unexpected: tuple[str, ...] = ()

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        c = config
        inner = c.inner_dim
        embedding_proj_dim = c.embedding_proj_dim or c.embedding_dim
        clip_embed_dim = c.clip_embed_dim or c.embedding_dim

        self.time_embedding = TimestepMLP(inner, c.time_embed_dim or inner, inner, c.time_embed_act_fn)
        self.proj_in = nn.Linear(c.embedding_dim, inner)
        self.embedding_proj_norm = (nn.LayerNorm(embedding_proj_dim, eps=_LAYER_NORM_EPS)
                                    if c.embedding_proj_norm_type == "layer" else None)
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner)
        self.encoder_hidden_states_proj = nn.Linear(c.embedding_dim, inner)
        self.positional_embedding = nn.Parameter(torch.zeros(1, c.sequence_length, inner))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner))
        self.transformer_blocks = nn.ModuleList(
            PriorBlock(inner, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers))
        self.norm_in = nn.LayerNorm(inner, eps=_LAYER_NORM_EPS) if c.norm_in_type == "layer" else None
        self.norm_out = nn.LayerNorm(inner, eps=_LAYER_NORM_EPS)
        self.proj_to_clip_embeddings = nn.Linear(inner, clip_embed_dim)
        # Statistics of the CLIP image embeddings the prior was trained on (it works in normalised space).
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, clip_embed_dim))

    def _timesteps_for_batch(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        """A (batch,) tensor on `device` from a Python number, a 0-dim, (1,) or (batch,) tensor.
        Only shapes are inspected (never values), so a device tensor causes no host sync."""
        if isinstance(timestep, torch.Tensor):
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
                raise ValueError(f"timestep: expected a number or a tensor of shape (), (1,) or ({batch},), "
                                 f"got shape {tuple(timestep.shape)}")
            if timestep.is_complex() or timestep.dtype == torch.bool:
                raise TypeError(f"timestep: expected a real numeric tensor, got dtype {timestep.dtype}")
            t = timestep.to(device)
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            # The reference turns Python numbers into int64 (silently truncating 0.5 to 0); we accept only
            # whole numbers here, so both agree, and fractional timesteps must come as a tensor.
            if isinstance(timestep, float) and not timestep.is_integer():
                raise ValueError(f"timestep: a Python float must be a whole number (got {timestep}); "
                                 f"pass fractional timesteps as a tensor")
            t = torch.tensor([int(timestep)], dtype=torch.long, device=device)
        else:
            raise TypeError(f"timestep: expected an int, float or tensor, got {type(timestep).__name__}")
        return t.reshape(-1).expand(batch)

    def forward(self, hidden_states: torch.Tensor, timestep, proj_embedding: torch.Tensor,
                encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predict the (normalised) clean image embedding.

        hidden_states: (B, embedding_dim) noisy image embedding; timestep: number, 0-dim or (B,) tensor;
        proj_embedding: (B, embedding_proj_dim) CLIP text embedding; encoder_hidden_states:
        (B, num_embeddings, embedding_dim) CLIP text token states; attention_mask: bool (B, num_embeddings),
        True = real token. Returns (B, clip_embed_dim).
        """
        c = self.config
        self._check_inputs(hidden_states, proj_embedding, encoder_hidden_states, attention_mask)
        batch = hidden_states.shape[0]
        dtype = self.proj_in.weight.dtype

        t = self._timesteps_for_batch(timestep, batch, hidden_states.device)
        time_tokens = self.time_embedding(sinusoidal_timestep_embedding(t, c.inner_dim).to(dtype))

        text_embedding = proj_embedding.to(dtype)
        if self.embedding_proj_norm is not None:
            text_embedding = self.embedding_proj_norm(text_embedding)
        tokens = torch.cat([
            self.encoder_hidden_states_proj(encoder_hidden_states.to(dtype)),   # (B, num_embeddings, inner)
            self.embedding_proj(text_embedding)[:, None],                        # text embedding
            time_tokens[:, None],                                                # timestep
            self.proj_in(hidden_states.to(dtype))[:, None],                      # noisy image embedding
            self.prd_embedding.to(dtype).expand(batch, -1, -1),                  # output query
        ], dim=1)
        x = tokens + self.positional_embedding.to(dtype)

        # diffusers adds -10000 to the scores of padded text keys and of future keys (both where they
        # overlap), then softmaxes. In fp32, exp(-10000 + s - max) underflows to exactly 0 for any realistic
        # score gap, so each masked key gets weight 0, and the unmasked keys keep their usual softmax: the
        # same as a boolean mask, PROVIDED the row has at least one unmasked key. Every row whose output
        # matters has one: a real text token sees itself, and the 4 trailing tokens are never padding, so
        # the only rows that can be fully masked are padded text positions before the first real token
        # (none with the tokenizer's masks, whose start token at position 0 is always real) - and a padded
        # position is masked as a key for every query, so nothing ever reads its value. Such rows get
        # zeros, the attention rule of `layers.attention_reference`.
        key_padding_mask = torch.cat(
            [attention_mask.to(torch.bool), attention_mask.new_ones(batch, c.additional_embeddings, dtype=torch.bool)],
            dim=1)

        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, key_padding_mask)
        # Only the last (prd) token is read out. Normalising every token and then slicing, as diffusers does,
        # costs one LayerNorm over the sequence but hands the output projection the same strided (B, inner)
        # rows, so the BLAS call (and its rounding, at any thread count) is the same as there.
        return self.proj_to_clip_embeddings(self.norm_out(x)[:, -1])

    def post_process_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map a normalised prediction back to CLIP image-embedding space."""
        return latents * self.clip_std + self.clip_mean

    def _check_inputs(self, hidden_states, proj_embedding, encoder_hidden_states, attention_mask) -> None:
        c = self.config
        tensors = {"hidden_states": hidden_states, "proj_embedding": proj_embedding,
                   "encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
        batch = hidden_states.shape[0] if hidden_states.dim() == 2 else None
        expected = {
            "hidden_states": (batch, c.embedding_dim),
            "proj_embedding": (batch, c.embedding_proj_dim or c.embedding_dim),
            "encoder_hidden_states": (batch, c.num_embeddings, c.embedding_dim),
            "attention_mask": (batch, c.num_embeddings),
        }
        for name, shape in expected.items():
            if batch is None or tuple(tensors[name].shape) != shape:
                want = "(B, " + ", ".join(map(str, shape[1:])) + ")"
                raise ValueError(f"{name}: expected shape {want} with one batch size B for all inputs, "
                                 f"got {tuple(tensors[name].shape)}")
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask: expected a bool tensor (True = real token), got {attention_mask.dtype}")
