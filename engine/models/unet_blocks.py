"""Building blocks shared by the decoder U-Net and the super-resolution U-Nets.

Module and parameter names follow diffusers' `ResnetBlock2D`, `Attention`, `ResnetDownsampleBlock2D`,
`SimpleCrossAttnDownBlock2D` (and the up/mid counterparts) so that state dicts load unchanged; the code is
ours. Group norms go through `layers.GroupNorm` (with its fused scale-shift/SiLU arguments) and attention
through `layers.Attend`, the two swap points of the `fast` backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attend, GroupNorm

# Group norm of the attention layers and of the context tokens: diffusers builds these with its `Attention`
# defaults, not with the U-Net's `norm_eps`, and with 32 groups for the context norm.
ATTENTION_NORM_EPS = 1e-5
CONTEXT_NORM_GROUPS = 32


# --------------------------------------------------------------------------------------------- timesteps

def timesteps_for_batch(timestep, batch: int, device: torch.device, *, python_float_dtype: torch.dtype
                        ) -> torch.Tensor:
    """`timestep` (Python number, 0-dim tensor, (1,) or (batch,) tensor) as a (batch,) tensor on `device`.

    Tensors are only reshaped and broadcast, never read on the host, so a device-resident timestep keeps
    the call free of host syncs (the sampling loop is captured in a CUDA graph). `python_float_dtype` is
    the dtype a Python float becomes: diffusers' conditional U-Net keeps it fractional, its plain U-Net
    casts it to int64 (truncating); we reproduce both.
    """
    if isinstance(timestep, bool):
        raise TypeError("timestep: expected a number or a tensor, got bool")
    if isinstance(timestep, (int, float)):
        dtype = torch.int64 if isinstance(timestep, int) else python_float_dtype
        if dtype == torch.float64 and torch.device(device).type == "mps":  # no float64 there
            dtype = torch.float32
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif isinstance(timestep, torch.Tensor):
        if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep: expected a number, a 0-dim tensor or a ({batch},) tensor, "
                             f"got shape {tuple(timestep.shape)}")
        timestep = timestep.reshape(-1).to(device)
    else:
        raise TypeError(f"timestep: expected a number or a tensor, got {type(timestep).__name__}")
    return timestep.expand(batch)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                         max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32 [sin | cos] features (DDPM), frequencies max_period^(-i/(half-shift)).

    Computed in the same order of float32 operations as diffusers, so fp32 results agree bit for bit.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal features (diffusers' `TimestepEmbedding`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------------------------ resnet

class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, time conditioning, GroupNorm-SiLU-conv, plus a (1x1-projected) skip path.

    `resample="down"` / `"up"` makes this the block that changes resolution: right after the first
    norm+SiLU both the main path and the raw input are 2x2-average-pooled / nearest-upsampled, so the skip
    path carries the resampled input. Time conditioning is additive before `norm2` ("default") or a FiLM
    `norm2(h)·(1+scale)+shift` ("scale_shift").

    `forward(x, time_features)` takes the time embedding with the pre-projection activation already
    applied (the U-Net computes SiLU(emb) once for all its blocks instead of once per block).
    """

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, *, groups: int, eps: float,
                 scale_shift: bool, output_scale_factor: float = 1.0, resample: str | None = None):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ValueError(f"resample: expected None, 'down' or 'up', got {resample!r}")
        self.scale_shift = scale_shift
        self.output_scale_factor = output_scale_factor
        self.resample = resample
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_channels, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.norm1(x, silu=True))
        x = self._resample(x)
        h = self.conv1(h)
        t = self.time_emb_proj(time_features)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h, silu=True, scale=scale, shift=shift)
        else:
            h = self.norm2(h + t[:, :, None, None], silu=True)
        h = self.conv2(h)  # (dropout sits before conv2 in training; identity at inference)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


# --------------------------------------------------------------------------------------------- attention

def linear_like_diffusers(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a (B, L, C) x of any strides, computed with the same kernel calls as in diffusers.

    For a non-contiguous 3-D input PyTorch's matmul picks its kernel by whether the weight requires grad:
    diffusers' (trainable) weights make it copy x into contiguous (B·L, C) rows, run one mm and add the bias;
    our frozen weights would make it run a batched mm over the strided view instead. The two round
    differently, depending on the shape and on the thread count (MKL chooses its kernels and how it splits
    the work by both: e.g. 2x2 maps differ at any thread count, 8x8 maps at 1280 channels only with more
    than one thread), and Karlo's t = 999 steps amplify one-ulp differences into visible ones. So for such
    inputs this spells out diffusers' calls; a contiguous input takes F.linear's fused addmm, as there.
    """
    if x.dim() != 3 or x.is_contiguous():
        return layer(x)
    out = torch.mm(x.reshape(-1, x.shape[-1]), layer.weight.t()).view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias


class PixelAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    With `context_dim`, this is the decoder's "simple cross-attention" (diffusers' added-KV attention,
    `AttnAddedKVProcessor`): the keys/values are the context tokens projected by `add_k_proj`/`add_v_proj`,
    followed by the pixels' own keys/values, so each pixel attends jointly to the text and to the image.
    Queries and pixel keys/values come from the group-normed map; the residual is the raw input, and the
    added-KV variant never rescales its output. Without `context_dim` it is the plain mid-block attention of
    the super-resolution U-Net, whose `group_norm` is optional and whose output is divided by
    `rescale_output_factor`.
    """

    def __init__(self, channels: int, head_dim: int, *, norm_groups: int | None, norm_eps: float,
                 context_dim: int | None = None, context_norm: bool = False, rescale_output_factor: float = 1.0):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) must be a multiple of head_dim ({head_dim})")
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_groups, channels, eps=norm_eps) if norm_groups is not None else None
        self.norm_cross = (GroupNorm(CONTEXT_NORM_GROUPS, context_dim, eps=ATTENTION_NORM_EPS)
                           if context_norm else None)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        if context_dim is not None:
            self.add_k_proj = nn.Linear(context_dim, channels)
            self.add_v_proj = nn.Linear(context_dim, channels)
        else:
            self.add_k_proj = self.add_v_proj = None
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0: diffusers' key is to_out.0
        self.attend = Attend()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H·D) -> (B, H, L, D)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); context (B, L, context_dim) for the added-KV variant; context_mask bool (B, L),
        True = attend (pixels are always attended)."""
        batch, channels, height, width = x.shape
        # Normalise the (B, C, HW) view, as diffusers does: on the CPU, group-norm of a 4-D map rounds
        # differently, and the cascade's first super-resolution step (t = 999, x0 = x/sqrt(ā) with
        # ā ≈ 2e-9) amplifies even one-ulp differences into visible ones.
        h = x.flatten(2)
        h = self.group_norm(h) if self.group_norm is not None else h
        h = h.transpose(1, 2)  # (B, HW, C), usually a strided view: projected as diffusers does (see there)
        q, k, v = (self._heads(linear_like_diffusers(proj, h)) for proj in (self.to_q, self.to_k, self.to_v))
        key_padding_mask = None
        if self.add_k_proj is not None:
            if self.norm_cross is not None:
                context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
            # context first, then pixels (after norm_cross, context is a strided view too)
            k = torch.cat([self._heads(linear_like_diffusers(self.add_k_proj, context)), k], dim=2)
            v = torch.cat([self._heads(linear_like_diffusers(self.add_v_proj, context)), v], dim=2)
            if context_mask is not None:
                # diffusers adds (1 - mask)·(-10000) to the logits. A boolean mask gives the same result in
                # fp32 (and fp16/bf16): softmax subtracts the row maximum, which is at least the largest
                # unmasked logit (the pixel keys are never masked, so every row has one), and a masked
                # logit then sits ~10000 below it, where exp() underflows to exactly 0 (fp32 underflows
                # below e^-104). Only logit spreads beyond ~9900 could tell the two apart.
                key_padding_mask = torch.cat([context_mask, context_mask.new_ones(batch, height * width)], dim=1)
        out = self.attend(q, k, v, key_padding_mask=key_padding_mask, scale=self.head_dim ** -0.5)
        out = self.to_out[0](out.transpose(1, 2).reshape(batch, height * width, channels))
        out = out.transpose(1, 2).reshape(batch, channels, height, width) + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


# ---------------------------------------------------------------------------------------------- U-Net blocks

class DownBlock(nn.Module):
    """`num_layers` resnets (each followed by an attention layer when `attention` is given), then an
    optional downsampling resnet. Returns the output and the skip tensors the up path consumes."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, *, add_downsample: bool,
                 resnet: dict, attention: dict | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **resnet) for i in range(num_layers))
        if attention is not None:
            self.attentions = nn.ModuleList(PixelAttention(out_channels, **attention) for _ in range(num_layers))
        else:
            self.attentions = None
        self.downsamplers = (nn.ModuleList([ResnetBlock(out_channels, out_channels, resample="down", **resnet)])
                             if add_downsample else None)

    def forward(self, x, time_features, context=None, context_mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_features)
            if self.attentions is not None:
                x = self.attentions[i](x, context, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, time_features)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, then (attention, resnet) once; `attention=None` leaves the pair without its attention."""

    def __init__(self, channels: int, *, resnet: dict, attention: dict | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, **resnet) for _ in range(2))
        self.attentions = nn.ModuleList([PixelAttention(channels, **attention)]) if attention is not None else None

    def forward(self, x, time_features, context=None, context_mask=None):
        x = self.resnets[0](x, time_features)
        if self.attentions is not None:
            x = self.attentions[0](x, context, context_mask)
        return self.resnets[1](x, time_features)


class UpBlock(nn.Module):
    """`num_layers` resnets, each on [x, next skip tensor] concatenated along channels (with an attention
    layer after each when `attention` is given), then an optional upsampling resnet.

    Channel bookkeeping is diffusers': the first resnet sees `prev_channels` (the previous block's output),
    the last one's skip comes from the next-shallower down block (`skip_in_channels`)."""

    def __init__(self, skip_in_channels: int, prev_channels: int, out_channels: int, num_layers: int, *,
                 add_upsample: bool, resnet: dict, attention: dict | None = None):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_channels = skip_in_channels if i == num_layers - 1 else out_channels
            x_channels = prev_channels if i == 0 else out_channels
            resnets.append(ResnetBlock(x_channels + skip_channels, out_channels, **resnet))
        self.resnets = nn.ModuleList(resnets)
        if attention is not None:
            self.attentions = nn.ModuleList(PixelAttention(out_channels, **attention) for _ in range(num_layers))
        else:
            self.attentions = None
        self.upsamplers = (nn.ModuleList([ResnetBlock(out_channels, out_channels, resample="up", **resnet)])
                           if add_upsample else None)

    def forward(self, x, skips: list, time_features, context=None, context_mask=None):
        """Consumes `len(self.resnets)` tensors from the end of `skips` (in place)."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), time_features)
            if self.attentions is not None:
                x = self.attentions[i](x, context, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, time_features)
        return x
