"""Backend "torch": the reference. The caller's modules as they are, any device, fp32/fp16/bf16."""
from __future__ import annotations

from ..runner import Runner, check_module_dtypes, module_networks


class TorchRunner(Runner):
    """Plain PyTorch modules and the plain loop. With `graphs` (a `unclip.graphs.StageGraphs`), stage loops run
    through the capture strategy instead (on the CPU with capture off: how the tests prove the capturable
    formulation equals the plain loop)."""

    name = "torch"

    def __init__(self, *, device="cpu", dtype=None, graphs=None):
        import torch
        super().__init__(device=device, dtype=torch.float32 if dtype is None else dtype)
        self.graphs = graphs

    def prepare(self, components):
        check_module_dtypes(components, self.dtype)
        return module_networks(components)

    def run(self, stage, networks, observer=None):
        from ..graphs import run_captured
        return run_captured(self.graphs, stage, networks, observer)
