"""Backend "tensorrt": TensorRT engines built from the exported ONNX graphs (fp16, cached), each stage's loop
captured in a CUDA graph (engine/graphs.py). Written against the documented API; not yet run on a GPU."""
from __future__ import annotations

import os

import torch

from ..runner import Runner
from .onnxruntime import graph_networks


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, *, device="cuda", dtype=torch.float16, cuda_graphs: bool | None = None, **engine_options):
        super().__init__(device=device, dtype=dtype)
        from ..graphs import ENV_DISABLE, StageGraphs
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and os.environ.get(ENV_DISABLE, "1").strip() != "0"
        self.graphs = StageGraphs(self.device) if cuda_graphs else None
        self.engine_options = engine_options

    @classmethod
    def available(cls, device="cuda"):
        from ..export.tensorrt import tensorrt_status
        reason = tensorrt_status(device)
        return (True, "") if reason is None else (False, reason)

    @classmethod
    def graph_executors(cls, root, manifest, *, device, **options):
        from ..export.tensorrt import engine_executors
        return engine_executors(root, manifest, device=device, **options).__getitem__

    @classmethod
    def load(cls, path, *, device="cuda", dtype=torch.float16):
        from ..export.loader import load_for_backend
        return load_for_backend(str(path), cls.name, device=device, dtype=dtype)

    def prepare(self, components):
        from ..export.loader import prepare_components
        return graph_networks(prepare_components(components, self.name, device=self.device, dtype=self.dtype,
                                                 **self.engine_options))

    def run(self, stage, networks, observer=None):
        from ..graphs import run_captured
        return run_captured(self.graphs, stage, networks, observer)
