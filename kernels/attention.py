"""Fused attention: a flash-attention-style Triton forward (and the one PyTorch reference, re-exported).

`attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None)` computes
softmax(q·kᵀ·scale + mask)·v for q (B, H, Lq, D) and k, v (B, H, Lk, D), exactly the contract of
`unclip.models.layers.attention_reference`, without ever holding the Lq×Lk score matrix in memory: each
program owns a block of query rows and streams the keys through an online softmax with fp32 statistics and
an fp32 accumulator.

Semantics shared by the kernel and `attention_reference` (defined in `unclip.models.layers`, where the
torch modules and the ONNX export form take it from; re-exported here for the kernel tests and reports):
- `causal`: query i sees keys j <= i (top-left aligned, also when Lq != Lk).
- `key_padding_mask`: bool (B, Lk), True = attend (a (1, Lk) mask broadcasts over the batch).
- `scale`: default 1/sqrt(D).
- A query row that sees no key at all (all its keys padded, or causal with every key up to its
  position padded, or Lk = 0) outputs zeros, not NaN.
- fp32 inputs use full-precision (IEEE) fp32 dots, never TF32; fp16/bf16 inputs multiply in their own
  dtype and accumulate in fp32. Inference only (no backward).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..models.layers import attention_reference  # noqa: F401  (re-exported: unclip.kernels.attention_reference)
from ._triton_support import LaunchTarget, check_runnable, get_kernel, launch_target

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _check(q, k, v, key_padding_mask, scale, out):
    """Validate at the public boundary; returns the mask as a (B, Lk)-shaped uint8 view or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, _, dim = q.shape
    if k.shape[:2] != (batch, heads) or v.shape[:2] != (batch, heads):
        raise ValueError(f"attention: q, k, v must share (B, H); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[3] != dim or v.shape[3] != dim:
        raise ValueError(f"attention: q, k, v must share the head dim D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v must have the same length Lk; got {k.shape[2]} and {v.shape[2]}")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D must be in 1..{MAX_HEAD_DIM}, got {dim}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite float or None, got {scale!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype \
                or out.device != q.device:
            raise ValueError(f"attention: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    keep = None
    if key_padding_mask is not None:
        len_k = k.shape[2]
        m = key_padding_mask
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[1] != len_k or m.shape[0] not in (1, batch):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"attention: key_padding_mask must be a bool tensor of shape (B, Lk) = "
                             f"({batch}, {len_k}) (True = attend), got {shape}")
        if m.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {m.device}, q on {q.device}")
        keep = (m if m.dtype == torch.bool else m != 0).view(torch.uint8)
    return keep


@dataclasses.dataclass(frozen=True)
class AttentionLaunchConfig:
    """Block sizes (constexprs BLOCK_M, BLOCK_N, BLOCK_D) and launch options of one attention launch."""
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def attention_launch_config(*, head_dim: int, dtype: torch.dtype, batch_heads: int, len_q: int, len_k: int,
                            target: LaunchTarget) -> AttentionLaunchConfig:
    """The launcher's configuration for these shapes on `target` (pure: the launcher and
    benchmarks/kernel_report.py both call it). A heuristic, not autotuned: autotuning would benchmark
    inside the first call (bad under CUDA-graph capture). Every choice it can make at the presets' shapes
    is compiled for sm_80 and sm_90 by benchmarks/kernel_report.py (tests/test_kernel_report.py) and checked
    free of register spills and within shared memory; none has been timed on a GPU yet
    (benchmarks/kernels.py --sweep times the alternatives). `target` is accepted for per-architecture
    choices, but none differs yet: on sm_80 the fp16/bf16 128x64 blocks take 147-183 registers (one 8-warp
    block per SM), and neither 4 warps (255 registers, spills) nor 2 stages (164-180) lowers that."""
    block_d = max(16, _next_pow2(head_dim))
    if dtype == torch.float32:
        block_m, block_n, warps, stages = (64 if block_d <= 128 else 32), 32, 8, 2
    elif block_d <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, (3 if block_d <= 64 else 2)
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2
    # Short sequences (the prior's and CLIP's 77-81 tokens): smaller query blocks give more programs.
    while block_m > 32 and batch_heads * -(-len_q // block_m) < target.parallel_slots:
        block_m //= 2
    if block_m < 128 and dtype != torch.float32 and block_d <= 128:
        warps = 4
    if len_k <= 32:
        block_n = 32
    return AttentionLaunchConfig(block_m, block_n, block_d, warps, stages)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
              out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Flash-attention forward in Triton (semantics in the module docstring).

    q/k/v may be any strided views (e.g. from a reshape/transpose); the output is a new contiguous
    (B, H, Lq, D) tensor, or `out` (any strides) if given. `block_m`, `block_n`, `num_warps`,
    `num_stages` override the tuning heuristic (powers of two; blocks >= 16). Runs on CUDA tensors, or on
    CPU tensors under TRITON_INTERPRET=1; otherwise raises RuntimeError saying what is missing.
    """
    keep = _check(q, k, v, key_padding_mask, scale, out)
    check_runnable("attention", q.device)
    batch, heads, len_q, dim = q.shape
    len_k = k.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    config = attention_launch_config(head_dim=dim, dtype=q.dtype, batch_heads=batch * heads, len_q=len_q,
                                     len_k=len_k, target=launch_target(q.device))
    bm, bn = block_m or config.block_m, block_n or config.block_n
    warps, stages = num_warps or config.num_warps, num_stages or config.num_stages
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"attention: {name} must be a power of two >= 16, got {value}")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if keep is None:
        keep_arg, keep_strides = q, (0, 0)  # never read (HAS_KEEP is False)
    else:
        keep_arg = keep
        keep_strides = (0 if keep.shape[0] == 1 else keep.stride(0), keep.stride(1))
    if batch * heads > 65535:  # grid axis 1 limit
        raise ValueError(f"attention: B·H must be <= 65535, got {batch * heads}")
    kernel = get_kernel("_attention_triton", "attention_forward_kernel", q.device)
    grid = (-(-len_q // bm), batch * heads)
    kernel[grid](
        q, k, v, out, keep_arg,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *keep_strides,
        heads, len_q, len_k, dim,
        scale * math.log2(math.e),
        CAUSAL=bool(causal), HAS_KEEP=keep is not None, EXACT_FP32=q.dtype == torch.float32,
        UPCAST_DOT=q.device.type == "cpu",  # the interpreter's bf16 dot is broken; see _attention_triton
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=config.block_d,
        num_warps=warps, num_stages=stages, enable_fp_fusion=True,
    )
    return out
