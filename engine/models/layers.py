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
    """softmax(q·kᵀ·scale + mask)·v for q (B, H, Lq, D), k/v (B, H, Lk, D): the one attention reference.

    The torch modules, the Triton kernel (`unclip.kernels.attention`, whose tests and custom-op CPU path use
    this function) and the ONNX export form (`unclip.export.onnx.attention_for_export`) all follow it.

    - `causal`: query i sees keys j <= i (top-left aligned, also when Lq != Lk).
    - `key_padding_mask`: bool (B, Lk) or (1, Lk), True = attend.
    - `scale`: default 1/sqrt(D).
    - A query row that sees no key at all (all its keys padded, causal with every key up to its position
      padded, or Lk = 0) outputs zeros, not NaN and not an average of the values.

    The cascades never produce such a row: CLIP's text tower is causal without padding (each row sees
    key 0); the prior's text mask always keeps the start token at position 0 and its 4 trailing tokens
    are never padded; the decoder's pixels are keys that are never masked (and its 4 image tokens always
    visible); the super-resolution and image-tower attentions have no mask. The rule matters for direct
    calls and for masks a caller builds.

    Every other row is exactly PyTorch's scaled_dot_product_attention, as diffusers and transformers call
    it (bit-identical on the CPU at any thread count): causal without a padding mask runs SDPA's own causal
    path (`is_causal`, as transformers' CLIP text tower does); a padding mask is passed as a boolean mask;
    the zero rule is a `where` on "row sees any key", which leaves the other rows untouched.
    """
    len_q, len_k = q.shape[-2], k.shape[-2]
    if len_k == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if key_padding_mask is None:  # every row sees key 0 (causal or not): no empty row
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    visible = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        visible = visible & torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    # Recent CPU SDPA already returns zeros for rows that see nothing, other versions and backends NaN: pin.
    return torch.where(visible.any(dim=-1, keepdim=True), out, 0.0)


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
