"""The two operations the `fast` backend replaces with Triton kernels, as weight-free swap points.

Models call attention and group-norm(+scale-shift+SiLU) only through these modules, so a backend can
substitute a fused kernel by changing `impl` on each instance; the models themselves never import Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v for q (B, H, Lq, D), k/v (B, H, Lk, D).

    `causal`: query i sees keys j <= i (top-left aligned). `key_padding_mask`: bool (B, Lk), True = attend.
    """
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        mask = tri if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Attend(nn.Module):
    """Multi-head attention core (no weights). `impl` has the signature of `attention_reference`."""

    def __init__(self):
        super().__init__()
        self.impl = attention_reference

    def forward(self, q, k, v, *, causal=False, key_padding_mask=None, scale=None):
        return self.impl(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float, *, silu: bool = False, scale: torch.Tensor | None = None,
                         shift: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over x (B, C, *spatial), then optional `h·(1+scale)+shift` (scale/shift (B, C)), then optional SiLU."""
    h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        if scale.dim() == 2:  # (B, C) conditioning -> broadcast over space
            scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        h = h * (1 + scale) + shift
    return F.silu(h) if silu else h


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state-dict keys) that can also apply scale-shift and SiLU,
    the pattern of every U-Net resnet block, so the `fast` backend can fuse the three into one pass."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.impl = group_norm_reference

    def forward(self, x, *, silu: bool = False, scale=None, shift=None):
        if (scale is None) != (shift is None):
            raise ValueError("GroupNorm: scale and shift must be given together")
        return self.impl(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu, scale=scale, shift=shift)
