"""Triton kernels (fused attention, fused group-norm) and their PyTorch references.

    attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None)           # kernels/attention.py
    group_norm(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None)  # kernels/group_norm.py
    use_kernels(module) -> module   # swap the kernels into every Attend / GroupNorm    # kernels/wiring.py
    torch.ops.unclip.attention / torch.ops.unclip.group_norm                          # kernels/ops.py

The Triton code itself is in _attention_triton.py and _group_norm_triton.py, imported lazily.

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

if "." in __name__:  # the normal case: imported as `unclip.kernels`
    from ._triton_support import LaunchTarget, interpreter_enabled, record_launches, triton_installed
    from .attention import attention, attention_reference
    from .group_norm import group_norm, group_norm_reference
    from .wiring import kernel_attention, kernel_group_norm, use_kernels
    from . import ops  # noqa: F401  (registers torch.ops.unclip.*)

    __all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference", "use_kernels",
               "kernel_attention", "kernel_group_norm", "triton_installed", "interpreter_enabled",
               "LaunchTarget", "record_launches"]
# Otherwise this folder was imported as a top-level package `kernels`, because the repository root is on
# sys.path (e.g. `python -m pytest` run from it) and transformers/diffusers probe for Hugging Face's own
# `kernels` package by importing it. Define nothing: the probe then sees a package without a version and
# concludes that HF `kernels` is not installed, and the relative imports above (which need the `unclip`
# parent) are never attempted.
