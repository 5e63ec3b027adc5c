"""Backend "onnxruntime": every network as an exported ONNX graph run by ONNX Runtime (CPU execution provider,
or CUDA's with I/O binding on a CUDA device); the sampling loop is the shared Python loop."""
from __future__ import annotations

import os

from ..runner import Networks, Runner


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, *, device="cpu", dtype=None, providers: list[str] | None = None, threads: int | None = None):
        import torch
        super().__init__(device=device, dtype=torch.float32 if dtype is None else dtype)
        self.options = {k: v for k, v in (("providers", providers), ("threads", threads)) if v is not None}

    @classmethod
    def available(cls, device="cpu"):
        try:
            import onnxruntime
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime, or unclip-engine[onnx])"
        import torch
        device = torch.device(device)
        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return False, "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        if device.type not in ("cpu", "cuda"):
            return False, f"it runs on cpu or cuda devices; got {device}"
        return True, ""

    @classmethod
    def graph_executors(cls, root, manifest, *, device, providers=None, threads=None):
        """name -> executor for an export folder (one InferenceSession per graph)."""
        from ..export.onnxruntime import OrtExecutor
        nets = manifest["networks"]

        def executor(name):
            return OrtExecutor(os.path.join(root, *nets[name]["graph"].split("/")), device, providers=providers,
                               threads=threads)
        return executor

    @classmethod
    def load(cls, path, *, device="cpu", dtype=None):
        from ..export.loader import load_for_backend
        return load_for_backend(str(path), cls.name, device=device, dtype=dtype)

    def prepare(self, components):
        from ..export.loader import prepare_components
        graphs = prepare_components(components, self.name, device=self.device, dtype=self.dtype, **self.options)
        return graph_networks(graphs)


def graph_networks(graphs) -> Networks:
    """Networks of graph-backed components (they keep an exported temporary folder alive, if any)."""
    calls = dict(graphs.networks())
    if graphs.prior is not None:
        calls["prior.post_process"] = graphs.prior.post_process_latents
    return Networks(calls, owner=graphs)
