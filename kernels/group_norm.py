"""Fused group-norm: the PyTorch reference and Triton kernels.

`group_norm(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None)` returns
SiLU?( (GroupNorm(x)·weight + bias)·(1 + scale) + shift ) for x (B, C, *spatial), scale/shift (B, C),
exactly the contract of `unclip.models.layers.group_norm_reference`, with statistics in fp32 and the
variance computed without the E[x²] − E[x]² cancellation (see _group_norm_triton).

Memory passes. A group that fits in one program's registers (Cg·S up to about 8K elements: the decoder's
16×16 and 8×8 levels) is read once and written once by one kernel. Larger groups (the super-resolution
U-Nets' 256×256 maps) cannot be held on chip, so the math needs two reads: per-channel partial statistics
over spatial chunks (read 1), a tiny merge per group, then normalise + affine + scale-shift + SiLU fused in
one sweep (read 2 + the single write); the second read follows the first in reverse order, so part of it
may come from L2 (unmeasured). The unfused PyTorch chain makes 2 reads + 1 write for the norm, then one
more read + write per elementwise op (two for the scale-shift, one for SiLU).

NCHW-contiguous and channels-last inputs (any strides whose spatial dims flatten to one stride) are read
in place, and the output has the input's memory format (torch.empty_like).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..models.layers import group_norm_reference
from ._triton_support import LaunchTarget, check_runnable, get_kernel, launch_target

__all__ = ["group_norm", "group_norm_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WHOLE_GROUP_MAX = 8192  # padded Cg·S a single program keeps in registers
TILE_ELEMENTS = 4096  # elements per loop step of the split path
MAX_CHUNKS = 256  # partial-statistics chunks per (batch, channel); the merge loads them in one block


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _flat_strides(t: torch.Tensor):
    """(stride_b, stride_c, stride_s) if the spatial dims of t flatten to one index with a single stride
    (true for contiguous NCHW and channels-last tensors); None otherwise."""
    stride_s = None
    expected = None
    for size, stride in reversed(list(zip(t.shape[2:], t.stride()[2:]))):
        if size == 1:
            continue
        if stride_s is None:
            stride_s = stride
        elif stride != expected:
            return None
        expected = stride * size
    return t.stride(0), t.stride(1), (1 if stride_s is None else stride_s)


def _as_batch_channel(name: str, t, batch: int, channels: int, device):
    """scale/shift as a (B, C) view; (B, C, 1, ..., 1) is accepted too."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"group_norm: {name} must be a tensor of shape (B, C), got {type(t).__name__}")
    if t.dim() < 2 or tuple(t.shape[:2]) != (batch, channels) or any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"group_norm: {name} must have shape (B, C) = ({batch}, {channels}), "
                         f"got {tuple(t.shape)}")
    if t.device != device or not t.is_floating_point():
        raise ValueError(f"group_norm: {name} must be a floating tensor on {device}, got {t.dtype} on {t.device}")
    return t.reshape(batch, channels)


def _check(x, num_groups, weight, bias, eps, scale, shift, out):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"group_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"group_norm: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"group_norm: x must be float32, float16 or bfloat16, got {x.dtype}")
    batch, channels = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm: num_groups must be a positive int dividing C = {channels}, got {num_groups!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"group_norm: eps must be a finite float >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (channels,) or t.device != x.device):
            raise ValueError(f"group_norm: {name} must be None or a ({channels},) tensor on {x.device}")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm: scale and shift must be given together")
    if scale is not None:
        scale = _as_batch_channel("scale", scale, batch, channels, x.device)
        shift = _as_batch_channel("shift", shift, batch, channels, x.device)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
                            or out.device != x.device or _flat_strides(out) is None):
        raise ValueError(f"group_norm: out must be a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device} "
                         "whose spatial dims flatten to one stride (e.g. NCHW-contiguous or channels-last)")
    return scale, shift


def _split_tiles(stride_c_is_unit: bool, channels: int, spatial: int):
    """(BLOCK_C, BLOCK_S) for the split path, long along the unit-stride axis so loads coalesce."""
    if stride_c_is_unit:  # channels-last: a tile spans many channels of a few positions
        # the widest block (<= 128) that divides C, so no block is half padding (C = 320 -> 64)
        block_c = next((bc for bc in (128, 64, 32) if channels % bc == 0), min(_next_pow2(channels), 128))
        block_s = max(2, min(_next_pow2(spatial), TILE_ELEMENTS // block_c))
    else:  # NCHW: a tile spans long runs of contiguous positions of a few channels
        block_s = max(2, min(_next_pow2(spatial), 1024))
        block_c = max(2, min(_next_pow2(channels), TILE_ELEMENTS // block_s))
    return block_c, block_s


@dataclasses.dataclass(frozen=True)
class GroupNormLaunchConfig:
    """How `group_norm` launches for one shape. path "whole_group": one kernel, tile (block_c, block_s)
    holding a whole group. path "split": partial statistics and apply kernels on (block_c, block_s) tiles
    over spatial chunks of chunk_len (num_chunks per channel), and the finalize kernel on
    (finalize_block_c, finalize_block_k) tiles with finalize_num_warps."""
    path: str
    block_c: int
    block_s: int
    num_warps: int
    chunk_len: int | None = None
    num_chunks: int | None = None
    finalize_block_c: int | None = None
    finalize_block_k: int | None = None
    finalize_num_warps: int | None = None


def group_norm_launch_config(*, batch: int, channels: int, num_groups: int, spatial: int, channels_last: bool,
                             target: LaunchTarget, path: str = "auto", block_c: int | None = None,
                             block_s: int | None = None, chunk_len: int | None = None,
                             num_warps: int | None = None) -> GroupNormLaunchConfig:
    """The launcher's configuration for x of (batch, channels, spatial) on `target` (pure: the launcher and
    benchmarks/kernel_report.py both call it). `channels_last`: the channel stride is 1 and the spatial one
    is not. The keyword knobs are `group_norm`'s overrides (validated here, ValueError naming them)."""
    per_group = channels // num_groups
    whole_c, whole_s = max(2, _next_pow2(per_group)), max(2, _next_pow2(spatial))
    if path == "whole_group" and whole_c * whole_s > 8 * WHOLE_GROUP_MAX:
        raise ValueError(f"group_norm: path='whole_group' holds a group in registers; {per_group}x{spatial} "
                         f"is too large (padded size must be <= {8 * WHOLE_GROUP_MAX})")
    if path == "whole_group" or (path == "auto" and whole_c * whole_s <= WHOLE_GROUP_MAX):
        # About 16 elements a thread, at least 4 warps: 8 warps for a whole 8K-element group held 32 values a
        # thread in 100-120 registers (sm_80/sm_90, benchmarks/kernel_report.py); 16 warps hold 16 in 32-63.
        # The grid is only B·G programs, so the warps of one program are what hides memory latency.
        elements = whole_c * whole_s
        return GroupNormLaunchConfig("whole_group", whole_c, whole_s,
                                     num_warps or (4 if elements <= 2048 else 8 if elements <= 4096 else 16))

    bc, bs = _split_tiles(channels_last, channels, spatial)
    bc, bs = block_c or bc, block_s or bs
    for name, value in (("block_c", bc), ("block_s", bs)):
        if value < 2 or value & (value - 1):
            raise ValueError(f"group_norm: {name} must be a power of two >= 2, got {value}")
    num_c_blocks = -(-channels // bc)
    if chunk_len is None:
        # enough programs to fill the GPU, each looping over whole tiles
        wanted = max(1, -(-2 * target.parallel_slots // (batch * num_c_blocks)))
        chunk_len = -(-spatial // wanted)
        chunk_len = max(-(-spatial // MAX_CHUNKS), chunk_len)
        chunk_len = -(-chunk_len // bs) * bs
    elif chunk_len < 1 or chunk_len % bs:
        raise ValueError(f"group_norm: chunk_len must be a positive multiple of block_s = {bs}, got {chunk_len}")
    num_chunks = -(-spatial // chunk_len)
    if num_chunks > MAX_CHUNKS:
        raise ValueError(f"group_norm: chunk_len {chunk_len} gives {num_chunks} chunks; at most {MAX_CHUNKS}")
    block_k = max(2, _next_pow2(num_chunks))
    return GroupNormLaunchConfig("split", bc, bs, num_warps or 8, chunk_len, num_chunks,
                                 finalize_block_c=max(2, min(_next_pow2(per_group), 2048 // block_k)),
                                 finalize_block_k=block_k, finalize_num_warps=4)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, *, silu: bool = False, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None, out: torch.Tensor | None = None, path: str = "auto",
               block_c: int | None = None, block_s: int | None = None, chunk_len: int | None = None,
               num_warps: int | None = None) -> torch.Tensor:
    """Fused GroupNorm (+ scale-shift) (+ SiLU) in Triton; semantics of `group_norm_reference`.

    Returns a new tensor in x's memory format, or writes `out`. Tuning/testing knobs: `path`
    ("auto" | "whole_group" | "split"), `block_c`, `block_s` (powers of two), `chunk_len` (a multiple of
    block_s), `num_warps`. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    scale, shift = _check(x, num_groups, weight, bias, eps, scale, shift, out)
    check_runnable("group_norm", x.device)
    if path not in ("auto", "whole_group", "split"):
        raise ValueError(f"group_norm: path must be 'auto', 'whole_group' or 'split', got {path!r}")
    if _flat_strides(x) is None:
        x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
        if _flat_strides(out) is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    batch, channels = x.shape[:2]
    spatial = x.numel() // (batch * channels)
    per_group = channels // num_groups
    xs, ys = _flat_strides(x), _flat_strides(out)
    has_ss = scale is not None
    ss_args = (scale if has_ss else x, shift if has_ss else x)
    ss_strides = (*scale.stride(), *shift.stride()) if has_ss else (0, 0, 0, 0)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE_SHIFT=has_ss, SILU=bool(silu))
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x

    config = group_norm_launch_config(batch=batch, channels=channels, num_groups=num_groups, spatial=spatial,
                                      channels_last=xs[1] == 1 and xs[2] != 1, target=launch_target(x.device),
                                      path=path, block_c=block_c, block_s=block_s, chunk_len=chunk_len,
                                      num_warps=num_warps)
    bc, bs, warps = config.block_c, config.block_s, config.num_warps
    if config.path == "whole_group":
        kernel = get_kernel("_group_norm_triton", "group_norm_whole_group_kernel", x.device)
        kernel[(batch * num_groups,)](
            x, out, w_arg, b_arg, *ss_args, *xs, *ys, *ss_strides,
            num_groups, per_group, spatial, float(per_group * spatial), float(eps),
            **flags, BLOCK_C=bc, BLOCK_S=bs, num_warps=warps, enable_fp_fusion=True)
        return out

    num_c_blocks, num_chunks, chunk_len = -(-channels // bc), config.num_chunks, config.chunk_len
    part_mean = torch.empty(batch * channels * num_chunks, dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    mean = torch.empty(batch * num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    grid = (batch * num_c_blocks * num_chunks,)
    get_kernel("_group_norm_triton", "group_norm_partial_stats_kernel", x.device)[grid](
        x, part_mean, part_m2, *xs, channels, spatial, num_c_blocks, num_chunks, chunk_len,
        BLOCK_C=bc, BLOCK_S=bs, num_warps=warps, enable_fp_fusion=True)
    get_kernel("_group_norm_triton", "group_norm_finalize_kernel", x.device)[(batch * num_groups,)](
        part_mean, part_m2, mean, rstd, num_groups, per_group, spatial, num_chunks, chunk_len,
        float(per_group * spatial), float(eps),
        BLOCK_C=config.finalize_block_c, BLOCK_K=config.finalize_block_k, num_warps=config.finalize_num_warps,
        enable_fp_fusion=True)
    get_kernel("_group_norm_triton", "group_norm_apply_kernel", x.device)[grid](
        x, out, w_arg, b_arg, *ss_args, mean, rstd, *xs, *ys, *ss_strides,
        channels, spatial, num_groups, per_group, num_c_blocks, num_chunks, chunk_len,
        **flags, BLOCK_C=bc, BLOCK_S=bs, num_warps=warps, enable_fp_fusion=True)
    return out
