"""Triton kernels (fused attention, fused group-norm) and their PyTorch references.

    attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None)           # kernels/attention.py
    group_norm(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None)  # kernels/group_norm.py
    use_kernels(module) -> module   # swap the kernels into every Attend / GroupNorm of a model
    torch.ops.unclip.attention / torch.ops.unclip.group_norm                          # kernels/ops.py

Importing this package needs neither Triton nor a GPU: Triton is imported when a kernel first runs, and
a kernel that cannot run says what is missing (Triton not installed, or CPU tensors without
TRITON_INTERPRET=1). Set TRITON_INTERPRET=1 before the first kernel call to run the kernels in Triton's
CPU interpreter (how the tests check them); the choice is fixed at that first call.

No layer-norm kernel, deliberately. Layer norm appears only in the prior (width 2048) and the CLIP towers
(width 768), at 77-81 tokens. PyTorch's layer_norm is already one kernel making one read and one write,
so a standalone Triton layer norm could cut neither the traffic nor the launch count. The traffic is
small anyway: at batch 2 (CFG) one prior layer norm moves about 1.3 MB, its ~41 layer norms per step
about 53 MB, against the ~2 GB of weights each prior step streams (the prior at batch 1-2 is
weight-bandwidth bound), i.e. ~2.6 % of a step's bytes; CLIP runs once per prompt. What remains is
per-launch latency, which a Triton kernel shares and the `fast` backend's CUDA graphs reduce. Removing the
layer norms' own pass would need fusing them into the neighbouring matmuls (torch.compile's job), not a
standalone kernel. The U-Nets, where the activation traffic is, use group norm, which is fused here.
"""
from __future__ import annotations

import torch

from ._triton_support import interpreter_enabled, require_triton, triton_installed
from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference
from . import ops  # noqa: F401  (registers torch.ops.unclip.*)

__all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference", "use_kernels",
           "kernel_attention", "kernel_group_norm", "triton_installed", "interpreter_enabled"]


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
