"""The cascade's two U-Nets, state-dict compatible with diffusers.

`ConditionalUNet` is the subset of diffusers' `UNet2DConditionModel` that unCLIP's decoder uses: resnet
blocks that resample themselves, "simple cross-attention" blocks (pixels attend to the context tokens and to
each other in one softmax), an additive class embedding (the CLIP time embedding from text_proj) and
scale-shift time conditioning. `SuperResUNet` is the subset of `UNet2DModel` the super-resolution stages
use: the same resnet blocks, no text, optionally one self-attention layer in the mid block.

Every key diffusers writes into these classes' config.json is either read, pinned to the one value we
implement (`Config.expect`), or listed as not affecting inference; anything else raises `ConfigError`
naming the key and the file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LIMITS, Config
from .layers import GroupNorm
from .unet_blocks import (ATTENTION_NORM_EPS, CONTEXT_NORM_GROUPS, DownBlock, MidBlock, TimestepMLP, UpBlock,
                          sinusoidal_embedding, timesteps_for_batch)

RESNET_DOWN, CROSS_ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
RESNET_UP, CROSS_ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"
CROSS_ATTN_MID, PLAIN_MID = "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D"
TIME_SCALE_SHIFTS = ("default", "scale_shift")
DIFFUSERS_VERSION_WRITTEN = "0.42.1"


# ------------------------------------------------------------------------------------------- config helpers

def _check_class_name(cfg: Config, expected: str) -> None:
    name = cfg.data.get("_class_name", expected)
    if name != expected:
        raise cfg.error("_class_name", f"= {name!r}: this folder holds a {name}, expected a {expected}")


def _number(cfg: Config, key: str, default, *, positive: bool = False, min_value: float | None = None):
    value = cfg.get(key, default, types=(int, float))
    if isinstance(value, bool):
        raise cfg.error(key, f"= {value!r} is a bool, expected a number")
    if positive and not value > 0:
        raise cfg.error(key, f"= {value!r} must be > 0")
    if min_value is not None and value < min_value:
        raise cfg.error(key, f"= {value!r} must be >= {min_value}")
    return value


def _positive_ints(cfg: Config, key: str, default) -> tuple[int, ...]:
    values = cfg.get_list(key, default, item_types=int)
    if not values or any(v < 1 for v in values):
        raise cfg.error(key, f"= {values!r} must be a non-empty list of positive integers")
    return tuple(values)


def _int_or_per_block(cfg: Config, key: str, default, n_blocks: int) -> tuple[int, ...]:
    """An int meaning "the same for every block", or a list with one positive int per block."""
    value = cfg.get(key, default, types=(int, list, tuple))
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * n_blocks
    else:
        values = tuple(cfg.get_list(key, default, item_types=int))
        if len(values) != n_blocks:
            raise cfg.error(key, f"= {list(values)!r} must have one entry per block ({n_blocks})")
    if any(v < 1 for v in values):
        raise cfg.error(key, f"= {value!r} must hold positive integers")
    return values


def _block_types(cfg: Config, key: str, default, allowed: tuple[str, ...], n_blocks: int) -> tuple[str, ...]:
    values = cfg.get_list(key, default, item_types=str)
    for v in values:
        if v not in allowed:
            raise cfg.error(key, f"holds {v!r}, which is not supported (supported: {', '.join(allowed)})")
    if len(values) != n_blocks:
        raise cfg.error(key, f"has {len(values)} entries but block_out_channels has {n_blocks}")
    return tuple(values)


def _positive_int_or_none(cfg: Config, key: str, default: int | None = None) -> int | None:
    value = cfg.get(key, default, types=(int, type(None)))
    if value is not None and (isinstance(value, bool) or value < 1):
        raise cfg.error(key, f"= {value!r} must be a positive integer or null")
    return value


def _sample_size(cfg: Config, default=None):
    value = cfg.get("sample_size", default, types=(int, list, tuple, type(None)))
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise cfg.error("sample_size", f"= {value!r} must be a positive integer, [height, width] or null")
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise cfg.error("sample_size", f"= {value!r} must be a positive integer, [height, width] or null")
        value = tuple(value)
    return value


def _check_groups(cfg: Config, key: str, groups: int, channels: tuple[int, ...]) -> None:
    for c in channels:
        if c % groups:
            raise cfg.error(key, f"= {groups} does not divide the channel count {c} (block_out_channels)")


def _odd_kernel(cfg: Config, key: str) -> int:
    k = cfg.get_int(key, 3, min_value=1)
    if k % 2 == 0:
        raise cfg.error(key, f"= {k} must be odd (an even kernel would change the resolution)")
    return k


def _compact(values: tuple[int, ...]):
    """Write a per-block list as one int when every block has the same value (as configs usually do)."""
    return values[0] if len(set(values)) == 1 else list(values)


def _check_resolution(sample: torch.Tensor, n_blocks: int, in_channels: int) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample: expected a tensor, got {type(sample).__name__}")
    if sample.dim() != 4 or sample.shape[1] != in_channels:
        raise ValueError(f"sample: expected shape (B, {in_channels}, H, W), got {tuple(sample.shape)}")
    factor = 2 ** (n_blocks - 1)
    if sample.shape[2] % factor or sample.shape[3] % factor:
        raise ValueError(f"sample: height and width must be multiples of {factor} (one halving per block "
                         f"but the last), got {tuple(sample.shape[2:])}")


# ----------------------------------------------------------------------------------------- shared skeleton

def _resnet_settings(config, **extra) -> dict:
    """The ResnetBlock keyword arguments every block of a U-Net shares, plus `extra` ones."""
    return dict(time_channels=config.time_embed_dim, groups=config.norm_num_groups, eps=config.norm_eps,
                scale_shift=config.resnet_time_scale_shift == "scale_shift", **extra)


def _down_block_channels(channels: tuple[int, ...], i: int) -> tuple[int, int]:
    """(in, out) channels of down block i."""
    return channels[max(i - 1, 0)], channels[i]


def _up_block_channels(channels: tuple[int, ...], i: int) -> tuple[int, int, int]:
    """(skip_in, prev, out) channels of up block i, in `UpBlock`'s argument order (diffusers' bookkeeping)."""
    rev = channels[::-1]
    return rev[min(i + 1, len(rev) - 1)], rev[max(i - 1, 0)], rev[i]


class _UNet(nn.Module):
    """What both U-Nets share: `conv_in` and the timestep MLP in front, a GroupNorm-SiLU-conv head behind,
    and the down / mid / up traversal between them. Subclasses build the blocks and check their inputs."""

    weights_name = "diffusion_pytorch_model.safetensors"
    ignore_unexpected: tuple[str, ...] = ()

    def __init__(self, config, conv_in_kernel: int):
        """Builds the front (conv_in, the timestep MLP). Subclasses then build their blocks and end with
        `_build_output`, so modules are created (and randomly initialised) front to back."""
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepMLP(channels[0], config.time_embed_dim)

    def _build_output(self, conv_kernel: int) -> None:
        config = self.config
        channels = config.block_out_channels
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, conv_kernel, padding=(conv_kernel - 1) // 2)

    def _embed_timestep(self, timestep, sample: torch.Tensor, python_float_dtype: torch.dtype) -> torch.Tensor:
        """The timestep MLP's output (B, time_embed_dim); `python_float_dtype` as in `timesteps_for_batch`."""
        config = self.config
        dtype = self.time_embedding.linear_1.weight.dtype
        t = timesteps_for_batch(timestep, sample.shape[0], sample.device, python_float_dtype=python_float_dtype)
        t_features = sinusoidal_embedding(t, config.block_out_channels[0], flip_sin_to_cos=config.flip_sin_to_cos,
                                          freq_shift=config.freq_shift).to(dtype)
        return self.time_embedding(t_features)

    def _run_blocks(self, sample: torch.Tensor, time_features: torch.Tensor, context: torch.Tensor | None = None,
                    context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """conv_in, the down blocks (collecting skips), the mid block, the up blocks (consuming them), the head."""
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_features, context, context_mask)
            skips.extend(block_skips)
        if self.mid_block is not None:
            x = self.mid_block(x, time_features, context, context_mask)
        for block in self.up_blocks:
            x = block(x, skips, time_features, context, context_mask)
        return self.conv_out(self.conv_norm_out(x, silu=True))


# ------------------------------------------------------------------------------------------ conditional U-Net

@dataclass(frozen=True)
class ConditionalUNetConfig:
    """The decoder U-Net (diffusers' `UNet2DConditionModel` with unCLIP's block types)."""
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]  # per down block; up block i has reversed(layers)[i] + 1 resnets
    attention_head_dim: tuple[int, ...]  # head *size* per block index (diffusers does not reverse it for up)
    cross_attention_dim: int
    cross_attention_norm: str | None = None  # None | "group_norm" (context tokens, 32 groups)
    class_embed_type: str | None = None  # None | "identity" (class_labels added to the time embedding)
    resnet_time_scale_shift: str = "default"  # "default" (additive) | "scale_shift" (FiLM)
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    center_input_sample: bool = False
    act_fn: str = "silu"
    sample_size: int | tuple[int, int] | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # Keys that only configure parts of UNet2DConditionModel we do not build (transformer cross-attention
    # blocks, conv down/upsamplers, added embeddings we pin to None) or training (dropout).
    IGNORED = ("dropout", "downsample_padding", "transformer_layers_per_block",
               "reverse_transformer_layers_per_block", "dual_cross_attention", "use_linear_projection",
               "upcast_attention", "addition_time_embed_dim", "addition_embed_type_num_heads",
               "projection_class_embeddings_input_dim")
    # Switches we implement one way: key -> the supported value(s), first = default written by to_dict.
    PINNED = {"time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
              "time_cond_proj_dim": None, "num_attention_heads": None, "encoder_hid_dim": None,
              "encoder_hid_dim_type": None, "addition_embed_type": None, "num_class_embeds": None,
              "class_embeddings_concat": False, "attention_type": "default",
              "mid_block_only_cross_attention": (None, False)}

    @classmethod
    def from_config(cls, cfg: Config) -> "ConditionalUNetConfig":
        _check_class_name(cfg, "UNet2DConditionModel")
        for key, supported in cls.PINNED.items():
            cfg.expect(key, supported if isinstance(supported, tuple) else (supported,))
        only_cross = cfg.get("only_cross_attention", False, types=(bool, list, tuple))
        if only_cross is True or (isinstance(only_cross, (list, tuple)) and any(v is not False for v in only_cross)):
            raise cfg.error("only_cross_attention", f"= {only_cross!r} is not supported (supported: False)")
        act_fn = cfg.get("act_fn", "silu", types=str, choices=("silu", "swish"))

        channels = _positive_ints(cfg, "block_out_channels", (320, 640, 1280, 1280))
        n = len(channels)
        down = _block_types(cfg, "down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            (RESNET_DOWN, CROSS_ATTN_DOWN), n)
        up = _block_types(cfg, "up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                          (RESNET_UP, CROSS_ATTN_UP), n)
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn", types=(str, type(None)),
                      choices=(CROSS_ATTN_MID, None))
        layers = _int_or_per_block(cfg, "layers_per_block", 2, n)
        head_dims = _int_or_per_block(cfg, "attention_head_dim", 8, n)
        cross_dim = cfg.get_int("cross_attention_dim", 1280, min_value=1)
        cross_norm = cfg.get("cross_attention_norm", None, types=(str, type(None)), choices=(None, "group_norm"))
        if cross_norm == "group_norm" and cross_dim % CONTEXT_NORM_GROUPS:
            raise cfg.error("cross_attention_norm", f"= 'group_norm' needs cross_attention_dim ({cross_dim}) to be "
                                                    f"a multiple of {CONTEXT_NORM_GROUPS}")
        groups = cfg.get_int("norm_num_groups", 32, min_value=1)
        _check_groups(cfg, "norm_num_groups", groups, channels)
        # Which (channels, head size) pairs meet in an attention layer; each must split into whole heads.
        attention_sites = [(channels[i], head_dims[i]) for i in range(n) if down[i] == CROSS_ATTN_DOWN]
        attention_sites += [(channels[::-1][i], head_dims[i]) for i in range(n) if up[i] == CROSS_ATTN_UP]
        attention_sites += [(channels[-1], head_dims[-1])] if mid is not None else []
        for c, d in attention_sites:
            if c % d:
                raise cfg.error("attention_head_dim", f"= {d} does not divide the channel count {c} of an "
                                                      "attention layer")
        time_dim = _positive_int_or_none(cfg, "time_embedding_dim")

        config = cls(
            in_channels=cfg.get_int("in_channels", 4, min_value=1),
            out_channels=cfg.get_int("out_channels", 4, min_value=1),
            block_out_channels=channels, down_block_types=down, up_block_types=up, mid_block_type=mid,
            layers_per_block=layers, attention_head_dim=head_dims, cross_attention_dim=cross_dim,
            cross_attention_norm=cross_norm,
            class_embed_type=cfg.get("class_embed_type", None, types=(str, type(None)), choices=(None, "identity")),
            resnet_time_scale_shift=cfg.get("resnet_time_scale_shift", "default", types=str,
                                            choices=TIME_SCALE_SHIFTS),
            resnet_skip_time_act=cfg.get("resnet_skip_time_act", False, types=bool),
            resnet_out_scale_factor=_number(cfg, "resnet_out_scale_factor", 1.0, positive=True),
            mid_block_scale_factor=_number(cfg, "mid_block_scale_factor", 1, positive=True),
            norm_num_groups=groups,
            norm_eps=_number(cfg, "norm_eps", 1e-5, positive=True),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True, types=bool),
            freq_shift=_number(cfg, "freq_shift", 0),
            time_embedding_dim=time_dim,
            conv_in_kernel=_odd_kernel(cfg, "conv_in_kernel"),
            conv_out_kernel=_odd_kernel(cfg, "conv_out_kernel"),
            center_input_sample=cfg.get("center_input_sample", False, types=bool),
            act_fn=act_fn,
            sample_size=_sample_size(cfg),
        )
        known = set(cls.__dataclass_fields__) | set(cls.PINNED) | {"only_cross_attention"}
        cfg.reject_unknown(known, cls.IGNORED)
        cfg.check_limits(config, {"sample_size": "sample_size", "in_channels": "io_channels",
                                  "out_channels": "io_channels", "block_out_channels": "width",
                                  "layers_per_block": "layers", "attention_head_dim": "width",
                                  "cross_attention_dim": "width", "time_embedding_dim": "width"})
        if n > LIMITS["blocks"]:
            raise cfg.error("block_out_channels", f"has {n} blocks, more than this engine's bound {LIMITS['blocks']}")
        return config

    def to_dict(self) -> dict:
        out = {
            "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample, "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift, "down_block_types": list(self.down_block_types),
            "mid_block_type": self.mid_block_type, "up_block_types": list(self.up_block_types),
            "only_cross_attention": False, "block_out_channels": list(self.block_out_channels),
            "layers_per_block": _compact(self.layers_per_block), "downsample_padding": 1,
            "mid_block_scale_factor": self.mid_block_scale_factor, "dropout": 0.0, "act_fn": self.act_fn,
            "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim, "transformer_layers_per_block": 1,
            "reverse_transformer_layers_per_block": None,
            "attention_head_dim": _compact(self.attention_head_dim), "dual_cross_attention": False,
            "use_linear_projection": False, "class_embed_type": self.class_embed_type,
            "addition_time_embed_dim": None, "upcast_attention": False,
            "resnet_time_scale_shift": self.resnet_time_scale_shift,
            "resnet_skip_time_act": self.resnet_skip_time_act,
            "resnet_out_scale_factor": self.resnet_out_scale_factor,
            "time_embedding_dim": self.time_embedding_dim, "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel, "projection_class_embeddings_input_dim": None,
            "cross_attention_norm": self.cross_attention_norm, "addition_embed_type_num_heads": 64,
        }
        for key, supported in self.PINNED.items():
            out[key] = supported[0] if isinstance(supported, tuple) else supported
        return out


class ConditionalUNet(_UNet):
    """unCLIP's decoder: ε (and variance) prediction on a 64×64 image, attending to the text-proj context."""

    config_class = ConditionalUNetConfig

    def __init__(self, config: ConditionalUNetConfig):
        super().__init__(config, conv_in_kernel=config.conv_in_kernel)
        channels = config.block_out_channels
        n = len(channels)
        resnet = _resnet_settings(config, output_scale_factor=config.resnet_out_scale_factor)

        def attention(i: int) -> dict:
            return dict(head_dim=config.attention_head_dim[i], norm_groups=config.norm_num_groups,
                        norm_eps=ATTENTION_NORM_EPS, context_dim=config.cross_attention_dim,
                        context_norm=config.cross_attention_norm == "group_norm")

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock(
                *_down_block_channels(channels, i), config.layers_per_block[i], add_downsample=i < n - 1,
                resnet=resnet, attention=attention(i) if kind == CROSS_ATTN_DOWN else None))

        self.mid_block = None
        if config.mid_block_type is not None:
            mid_resnet = {**resnet, "output_scale_factor": config.mid_block_scale_factor}
            self.mid_block = MidBlock(channels[-1], resnet=mid_resnet, attention=attention(n - 1))

        rev_layers = config.layers_per_block[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(config.up_block_types):
            self.up_blocks.append(UpBlock(
                *_up_block_channels(channels, i), rev_layers[i] + 1, add_upsample=i < n - 1, resnet=resnet,
                attention=attention(i) if kind == CROSS_ATTN_UP else None))  # head size not reversed (diffusers)

        self._build_output(config.conv_out_kernel)

    @property
    def has_attention(self) -> bool:
        return self.mid_block is not None or any(b.attentions is not None for b in [*self.down_blocks, *self.up_blocks])

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, in_channels, H, W); timestep: number, 0-dim or (B,) tensor; encoder_hidden_states
        (B, L, cross_attention_dim); class_labels (B, time_embed_dim) added to the time embedding;
        attention_mask bool (B, L), True = attend. Returns (B, out_channels, H, W)."""
        config = self.config
        self._check_inputs(sample, encoder_hidden_states, class_labels, attention_mask)
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embed_timestep(timestep, sample, python_float_dtype=torch.float64)
        if config.class_embed_type == "identity":
            emb = emb + class_labels.to(emb.dtype)
        # Every resnet applies SiLU to the embedding before its projection (unless resnet_skip_time_act): once here.
        time_features = emb if config.resnet_skip_time_act else F.silu(emb)
        return self._run_blocks(sample, time_features, encoder_hidden_states, attention_mask)

    def _check_inputs(self, sample, encoder_hidden_states, class_labels, attention_mask) -> None:
        config = self.config
        _check_resolution(sample, len(config.block_out_channels), config.in_channels)
        batch = sample.shape[0]
        if self.has_attention:
            if not isinstance(encoder_hidden_states, torch.Tensor):
                raise TypeError("encoder_hidden_states: expected a tensor (B, L, "
                                f"{config.cross_attention_dim}), got {type(encoder_hidden_states).__name__}")
            if (encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != batch
                    or encoder_hidden_states.shape[2] != config.cross_attention_dim):
                raise ValueError(f"encoder_hidden_states: expected shape ({batch}, L, {config.cross_attention_dim}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
        if config.class_embed_type == "identity":
            if not isinstance(class_labels, torch.Tensor):
                raise TypeError(f"class_labels: required (class_embed_type 'identity'): a ({batch}, "
                                f"{config.time_embed_dim}) tensor, got {type(class_labels).__name__}")
            if tuple(class_labels.shape) != (batch, config.time_embed_dim):
                raise ValueError(f"class_labels: expected shape ({batch}, {config.time_embed_dim}), "
                                 f"got {tuple(class_labels.shape)}")
        elif class_labels is not None:
            raise ValueError("class_labels: this U-Net has no class embedding (class_embed_type null); pass None")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
                raise TypeError("attention_mask: expected a bool tensor (True = attend)")
            if encoder_hidden_states is None or tuple(attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
                want = tuple(encoder_hidden_states.shape[:2]) if encoder_hidden_states is not None else "(B, L)"
                raise ValueError(f"attention_mask: expected shape {want}, got {tuple(attention_mask.shape)}")


# --------------------------------------------------------------------------------------- super-resolution U-Net

@dataclass(frozen=True)
class SuperResUNetConfig:
    """A super-resolution U-Net (diffusers' `UNet2DModel` with self-resampling resnet blocks)."""
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int  # per down block; every up block has one more
    mid_block_type: str | None = PLAIN_MID  # None: no mid block
    add_attention: bool = True  # one self-attention layer between the two mid-block resnets
    attention_head_dim: int | None = 8  # head size of that layer (None: a single head)
    attn_norm_num_groups: int | None = None
    resnet_time_scale_shift: str = "default"
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    time_embedding_dim: int | None = None
    center_input_sample: bool = False
    act_fn: str = "silu"
    sample_size: int | tuple[int, int] | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def mid_attention_groups(self) -> int | None:
        """Groups of the mid attention's norm; diffusers gives it none under scale-shift conditioning unless
        `attn_norm_num_groups` says otherwise."""
        if self.attn_norm_num_groups is not None:
            return self.attn_norm_num_groups
        return self.norm_num_groups if self.resnet_time_scale_shift == "default" else None

    # Keys for parts of UNet2DModel we do not build (conv/attention down- and upsamplers, learned timestep
    # tables) or for training (dropout).
    IGNORED = ("dropout", "downsample_padding", "downsample_type", "upsample_type", "num_train_timesteps")
    PINNED = {"time_embedding_type": "positional", "class_embed_type": None, "num_class_embeds": None}

    @classmethod
    def from_config(cls, cfg: Config) -> "SuperResUNetConfig":
        _check_class_name(cfg, "UNet2DModel")
        for key, supported in cls.PINNED.items():
            cfg.expect(key, (supported,))
        act_fn = cfg.get("act_fn", "silu", types=str, choices=("silu", "swish"))
        channels = _positive_ints(cfg, "block_out_channels", (224, 448, 672, 896))
        n = len(channels)
        _block_types(cfg, "down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3, (RESNET_DOWN,), n)
        _block_types(cfg, "up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), (RESNET_UP,), n)
        mid = cfg.get("mid_block_type", PLAIN_MID, types=(str, type(None)), choices=(PLAIN_MID, None))
        groups = cfg.get_int("norm_num_groups", 32, min_value=1)
        _check_groups(cfg, "norm_num_groups", groups, channels)
        add_attention = cfg.get("add_attention", True, types=bool)
        head_dim = _positive_int_or_none(cfg, "attention_head_dim", 8)
        attn_groups = _positive_int_or_none(cfg, "attn_norm_num_groups")
        if mid is not None and add_attention:
            if head_dim is not None and channels[-1] % head_dim:
                raise cfg.error("attention_head_dim", f"= {head_dim} does not divide the mid-block channel "
                                                      f"count {channels[-1]}")
            if attn_groups is not None and channels[-1] % attn_groups:
                raise cfg.error("attn_norm_num_groups", f"= {attn_groups} does not divide the mid-block channel "
                                                        f"count {channels[-1]}")
        time_dim = _positive_int_or_none(cfg, "time_embedding_dim")

        config = cls(
            in_channels=cfg.get_int("in_channels", 3, min_value=1),
            out_channels=cfg.get_int("out_channels", 3, min_value=1),
            block_out_channels=channels,
            layers_per_block=cfg.get_int("layers_per_block", 2, min_value=1),
            mid_block_type=mid, add_attention=add_attention, attention_head_dim=head_dim,
            attn_norm_num_groups=attn_groups,
            resnet_time_scale_shift=cfg.get("resnet_time_scale_shift", "default", types=str,
                                            choices=TIME_SCALE_SHIFTS),
            mid_block_scale_factor=_number(cfg, "mid_block_scale_factor", 1, positive=True),
            norm_num_groups=groups,
            norm_eps=_number(cfg, "norm_eps", 1e-5, positive=True),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True, types=bool),
            freq_shift=_number(cfg, "freq_shift", 0),
            time_embedding_dim=time_dim,
            center_input_sample=cfg.get("center_input_sample", False, types=bool),
            act_fn=act_fn,
            sample_size=_sample_size(cfg),
        )
        known = set(cls.__dataclass_fields__) | set(cls.PINNED) | {"down_block_types", "up_block_types"}
        cfg.reject_unknown(known, cls.IGNORED)
        cfg.check_limits(config, {"sample_size": "sample_size", "in_channels": "io_channels",
                                  "out_channels": "io_channels", "block_out_channels": "width",
                                  "layers_per_block": "layers", "attention_head_dim": "width",
                                  "time_embedding_dim": "width"})
        if n > LIMITS["blocks"]:
            raise cfg.error("block_out_channels", f"has {n} blocks, more than this engine's bound {LIMITS['blocks']}")
        return config

    def to_dict(self) -> dict:
        n = len(self.block_out_channels)
        return {
            "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "center_input_sample": self.center_input_sample, "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim, "freq_shift": self.freq_shift,
            "flip_sin_to_cos": self.flip_sin_to_cos, "down_block_types": [RESNET_DOWN] * n,
            "mid_block_type": self.mid_block_type, "up_block_types": [RESNET_UP] * n,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": self.mid_block_scale_factor, "downsample_padding": 1,
            "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": self.act_fn,
            "attention_head_dim": self.attention_head_dim, "norm_num_groups": self.norm_num_groups,
            "attn_norm_num_groups": self.attn_norm_num_groups, "norm_eps": self.norm_eps,
            "resnet_time_scale_shift": self.resnet_time_scale_shift, "add_attention": self.add_attention,
            "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
        }


class SuperResUNet(_UNet):
    """unCLIP's upsampler: ε prediction on [noisy high-res image, upsampled low-res image] (6 channels)."""

    config_class = SuperResUNetConfig

    def __init__(self, config: SuperResUNetConfig):
        super().__init__(config, conv_in_kernel=3)
        channels = config.block_out_channels
        n = len(channels)
        resnet = _resnet_settings(config)

        self.down_blocks = nn.ModuleList(
            DownBlock(*_down_block_channels(channels, i), config.layers_per_block, add_downsample=i < n - 1,
                      resnet=resnet) for i in range(n))

        self.mid_block = None
        if config.mid_block_type is not None:
            attention = None
            if config.add_attention:
                attention = dict(head_dim=config.attention_head_dim or channels[-1],
                                 norm_groups=config.mid_attention_groups, norm_eps=config.norm_eps,
                                 rescale_output_factor=config.mid_block_scale_factor)
            self.mid_block = MidBlock(channels[-1], attention=attention,
                                      resnet={**resnet, "output_scale_factor": config.mid_block_scale_factor})

        self.up_blocks = nn.ModuleList(
            UpBlock(*_up_block_channels(channels, i), config.layers_per_block + 1, add_upsample=i < n - 1,
                    resnet=resnet) for i in range(n))
        self._build_output(3)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """sample (B, in_channels, H, W); timestep: number, 0-dim or (B,) tensor. Returns (B, out_channels, H, W).

        A Python float timestep is truncated to an integer, as diffusers' UNet2DModel does; pass a tensor to
        keep a fractional one."""
        config = self.config
        _check_resolution(sample, len(config.block_out_channels), config.in_channels)
        if config.center_input_sample:
            sample = 2 * sample - 1.0
        # The resnets' pre-projection SiLU, once.
        time_features = F.silu(self._embed_timestep(timestep, sample, python_float_dtype=torch.int64))
        return self._run_blocks(sample, time_features)
