"""ONNX Runtime executor for exported graphs (backend "onnxruntime").

CPU execution provider by default. On a CUDA device the CUDA (or TensorRT) execution provider is used
when the installed onnxruntime has it, with inputs and outputs bound in place to torch CUDA tensors
(I/O binding, no host round trip). Set `UNCLIP_ORT_PROVIDERS` (comma-separated provider names) or pass
`providers=` to `unclip.export.load_exported` to choose explicitly.
"""
from __future__ import annotations

import os

import numpy as np
import torch

_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int32)": torch.int32, "tensor(int64)": torch.int64, "tensor(bool)": torch.bool,
}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int32: np.int32,
          torch.int64: np.int64, torch.bool: np.bool_}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime, or "
                          "onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def default_providers(device: torch.device) -> list[str]:
    ort = _ort()
    env = os.environ.get("UNCLIP_ORT_PROVIDERS")
    if env:
        return [p.strip() for p in env.split(",") if p.strip()]
    available = ort.get_available_providers()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device {device} needs onnxruntime's CUDAExecutionProvider (pip install "
                               f"onnxruntime-gpu); this onnxruntime has {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device must be cpu or cuda for backend 'onnxruntime'; got {device}")


class OrtExecutor:
    """Runs one ONNX graph with an `onnxruntime.InferenceSession` on torch tensors."""

    def __init__(self, path: str, device="cpu", *, providers: list[str] | None = None, threads: int | None = None):
        ort = _ort()
        self.path = path
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        # Between two graph calls the sampler's torch ops run; ORT's default spin-waiting threads would keep
        # the cores busy and slow those down (several-fold on a 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, sess_options=options,
                                            providers=providers or default_providers(self.device))
        self.providers = self.session.get_providers()
        self.inputs = {i.name: self._dtype(i) for i in self.session.get_inputs()}
        self.outputs = {o.name: self._dtype(o) for o in self.session.get_outputs()}
        self._output_shapes = {o.name: o.shape for o in self.session.get_outputs()}
        # session.run is thread-safe, and a binding is made per call, so one executor serves many threads.
        self._bind = self.device.type == "cuda" and self.providers[0] != "CPUExecutionProvider"

    @staticmethod
    def _dtype(arg) -> torch.dtype:
        if arg.type not in _TYPES:
            raise TypeError(f"graph input/output {arg.name!r} has unsupported type {arg.type}")
        return _TYPES[arg.type]

    def run(self, feeds: dict) -> dict:
        if self._bind:
            return self._run_bound(feeds)
        arrays = {n: feeds[n].detach().to("cpu", dt).contiguous().numpy() for n, dt in self.inputs.items()}
        results = self.session.run(list(self.outputs), arrays)
        return {n: torch.from_numpy(r).to(self.device) for n, r in zip(self.outputs, results)}

    def _run_bound(self, feeds: dict) -> dict:
        """CUDA path: graph inputs and outputs are the torch tensors' own device memory."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        keep = []
        batch = None
        for n, dt in self.inputs.items():
            t = feeds[n].detach().to(self.device, dt).contiguous()
            keep.append(t)
            batch = t.shape[0] if batch is None else batch
            binding.bind_input(n, "cuda", index, _NUMPY[dt], tuple(t.shape), t.data_ptr())
        outputs = {}
        for n, dt in self.outputs.items():
            shape = [batch if not isinstance(d, int) else d for d in self._output_shapes[n]]
            outputs[n] = torch.empty(shape, dtype=dt, device=self.device)
            binding.bind_output(n, "cuda", index, _NUMPY[dt], tuple(shape), outputs[n].data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are complete
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs
