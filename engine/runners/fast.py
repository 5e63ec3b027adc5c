"""Backend "fast": the same modules with the Triton kernels at their attention and group-norm swap points,
and (on CUDA) each stage's whole loop captured in a CUDA graph and replayed (engine/graphs.py).

`prepare` never mutates the caller's modules: the kernels go into copies of the module objects that share
the caller's parameter and buffer tensors (no weight is copied), so a `torch` pipeline built from the same
components keeps running plain PyTorch. In-place weight updates reach both; a replaced Parameter object on
the caller's module does not reach the copies (prepare again).
"""
from __future__ import annotations

import copy
import itertools
import os

import torch

from ..runner import Networks, Runner, check_module_dtypes


def _triton_status() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton, or unclip-engine[fast])"
    return None


class FastRunner(Runner):
    name = "fast"

    def __init__(self, *, device="cpu", dtype=torch.float32, cuda_graphs: bool | None = None,
                 max_graphs: int | None = None):
        super().__init__(device=device, dtype=dtype)
        from ..graphs import DEFAULT_MAX_GRAPHS, ENV_DISABLE, StageGraphs
        if cuda_graphs is None:  # default: on for CUDA, unless UNCLIP_CUDA_GRAPHS=0
            cuda_graphs = self.device.type == "cuda" and os.environ.get(ENV_DISABLE, "1").strip() != "0"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device; got {self.device}")
        self.graphs = StageGraphs(self.device, max_graphs=max_graphs or DEFAULT_MAX_GRAPHS) if cuda_graphs else None

    @classmethod
    def available(cls, device="cpu"):
        missing = _triton_status()
        if missing:
            return False, missing
        device = torch.device(device)
        if device.type == "cuda":
            return (True, "") if torch.cuda.is_available() else (False, "no CUDA device is visible to torch")
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, (f"it runs Triton kernels: it needs a CUDA device (got {device}), or TRITON_INTERPRET=1 to "
                       "run them in Triton's CPU interpreter (slow; for tests); use backend 'torch' here")

    def prepare(self, components):
        from ..kernels import use_kernels
        check_module_dtypes(components, self.dtype)
        nets = components.networks()
        tensors = itertools.chain.from_iterable(
            itertools.chain(m.parameters(), m.buffers()) for m in nets.values() if isinstance(m, torch.nn.Module))
        memo = {id(t): t for t in tensors}  # shared by every copy: weights stay the caller's, shared modules stay shared
        copies = {name: use_kernels(copy.deepcopy(m, memo)) for name, m in nets.items()}
        if components.prior is not None:
            copies["prior.post_process"] = copies["prior"].post_process_latents
        unique = {id(m): m for name, m in copies.items() if isinstance(m, torch.nn.Module)}
        return Networks(copies, modules=tuple(unique.values()))

    def run(self, stage, networks, observer=None):
        from ..graphs import run_captured
        return run_captured(self.graphs, stage, networks, observer)

    def describe(self):
        return {"backend": self.name, "cuda_graphs": self.graphs is not None,
                **({"graph_stats": dict(self.graphs.stats)} if self.graphs is not None else {})}
