"""`torch.ops.unclip.attention` and `torch.ops.unclip.group_norm`: the kernels as PyTorch custom operators.

CPU: the PyTorch reference. CUDA: the Triton kernel. Fake/meta: shape, dtype and strides only, so
torch.compile, torch.export and AOT compilation trace each call as one opaque op instead of into Triton.
Registering imports no Triton; the CUDA implementations import it on first call. Inference only: no
autograd formula is registered.

    attention(Tensor q, Tensor k, Tensor v, *, bool causal=False, Tensor? key_padding_mask=None,
              float? scale=None) -> Tensor
    group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, *, bool silu=False,
               Tensor? scale=None, Tensor? shift=None) -> Tensor
"""
from __future__ import annotations

import torch

from .attention import attention as _attention_triton
from .attention import attention_reference
from .group_norm import _flat_strides
from .group_norm import group_norm as _group_norm_triton
from .group_norm import group_norm_reference

NAMESPACE = "unclip"
_SCHEMAS = {
    "attention": "attention(Tensor q, Tensor k, Tensor v, *, bool causal=False, Tensor? key_padding_mask=None, "
                 "float? scale=None) -> Tensor",
    "group_norm": "group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, *, "
                  "bool silu=False, Tensor? scale=None, Tensor? shift=None) -> Tensor",
}


def _group_norm_output(x: torch.Tensor) -> torch.Tensor:
    """The output every implementation returns: x's memory format (dense strides of x), else contiguous.
    The fake implementation must predict the real strides, so all three share this."""
    out = torch.empty_like(x)
    return out if _flat_strides(out) is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _attention_cpu(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    return attention_reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                               scale=scale).contiguous()


def _attention_cuda(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    return _attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


def _attention_fake(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    return q.new_empty(q.shape)


def _group_norm_cpu(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
    out = _group_norm_output(x)
    return out.copy_(group_norm_reference(x, num_groups, weight, bias, eps, silu=silu, scale=scale, shift=shift))


def _group_norm_cuda(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
    return _group_norm_triton(x, num_groups, weight, bias, eps, silu=silu, scale=scale, shift=shift,
                              out=_group_norm_output(x))


def _group_norm_fake(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
    return _group_norm_output(x)


def _op_exists(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_fake(qualname: str, fn, lib) -> None:
    if hasattr(torch.library, "register_fake"):  # torch >= 2.4
        torch.library.register_fake(qualname, fn, lib=lib)
    else:
        torch.library.impl_abstract(qualname, fn, lib=lib)


_LIB = None
if not _op_exists("attention"):  # re-importing this module (e.g. importlib.reload) must not redefine the ops
    _LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
    for _name, _cpu, _cuda, _fake in (("attention", _attention_cpu, _attention_cuda, _attention_fake),
                                      ("group_norm", _group_norm_cpu, _group_norm_cuda, _group_norm_fake)):
        _LIB.define(_SCHEMAS[_name])
        _LIB.impl(_name, _cpu, "CPU")
        _LIB.impl(_name, _cuda, "CUDA")
        _register_fake(f"{NAMESPACE}::{_name}", _fake, _LIB)
