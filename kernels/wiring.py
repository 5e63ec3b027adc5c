"""`use_kernels`: swap the Triton kernels into a model's `Attend` / `GroupNorm` swap points."""
from __future__ import annotations

import torch

from . import ops  # noqa: F401  (registers torch.ops.unclip.*)
from ._triton_support import require_triton
from .attention import attention
from .group_norm import group_norm


def _is_fake(t) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def _runs_triton_directly(t) -> bool:
    """Real CPU tensors (the interpreter's case) call Triton directly, since the op's CPU implementation is
    the reference; CUDA tensors, and anything being traced (torch.compile, torch.export, fake/meta
    tensors), go through the custom op."""
    return t.device.type == "cpu" and not _compiling() and not _is_fake(t)


def kernel_attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """The `Attend.impl` that `use_kernels` installs: Triton attention, through torch.ops.unclip.attention
    on CUDA so that torch.compile / torch.export see one op."""
    if _runs_triton_directly(q):
        return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return torch.ops.unclip.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def kernel_group_norm(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
    """The `GroupNorm.impl` that `use_kernels` installs (routing as in `kernel_attention`)."""
    if _runs_triton_directly(x):
        return group_norm(x, num_groups, weight, bias, eps, silu=silu, scale=scale, shift=shift)
    return torch.ops.unclip.group_norm(x, num_groups, weight, bias, eps, silu=silu, scale=scale, shift=shift)


def use_kernels(module):
    """Set `impl` of every `Attend` and `GroupNorm` in `module` (itself included) to the Triton kernels;
    returns `module`. Raises RuntimeError if Triton is not installed. The model then runs the kernels on
    CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1 (otherwise its first call raises).
    Weights and state-dict keys are untouched; the `torch` backend simply never calls this."""
    from ..models.layers import Attend, GroupNorm

    require_triton()
    for m in module.modules():
        if isinstance(m, Attend):
            m.impl = kernel_attention
        elif isinstance(m, GroupNorm):
            m.impl = kernel_group_norm
    return module
