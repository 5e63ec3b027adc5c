"""TensorRT engines built from the exported ONNX graphs, and the executor of backend "tensorrt".

STATUS: written against the documented TensorRT Python API (the 10.x named-tensor API, which 11.x keeps)
but NOT yet run - there was no TensorRT or NVIDIA GPU where it was written. Its tests skip with that reason.

Build, per graph (`ensure_engines`):
* The network is parsed from `model.onnx` (external data next to it) into a *strongly typed* network: the
  precision is the graph's own, so fp16 engines come from an fp16 export (`unclip export --dtype fp16`).
  TensorRT 11 removed the FP16 builder flag ("weak typing"); strong typing works on 10.x and 11.x alike,
  and keeps the float32 islands our export puts in on purpose (timestep embeddings, group-norm statistics).
* One optimisation profile over the batch axis: min 1, opt `opt_batch`, max `max_batch` (all other axes
  are static in our graphs).
* A timing cache shared by every build on the same TensorRT version and GPU, loaded before and saved after
  each build (a corrupt cache file is discarded, never trusted).
* An engine cache: `<name>-<key>.plan` plus a JSON sidecar, where the key hashes the graph's sha256 (from
  the manifest), the TensorRT version, the GPU name and compute capability, and the build flags (profile,
  typing, workspace). A plan whose sidecar or sha256 does not match is rebuilt, never loaded.

Run (`TrtExecutor`): inputs and outputs are torch CUDA tensors whose memory is bound to the engine
(`set_tensor_address`), enqueued on torch's current stream; one execution context per distinct set of input
shapes. Two levels of CUDA graphs:
* Per stage: the tensorrt runner (engine/runners/tensorrt.py) on CUDA captures each stage's whole sampling
  loop (engine enqueues, CFG, sampler arithmetic, noise) with the capture strategy of engine/graphs.py.
  The loop's eager warm-up run sets every context's shapes and enqueues it once, as TensorRT requires
  before a capture; inside the capture the executor enqueues straight into the capturing stream.
* Per call, outside such a capture (`use_cuda_graphs`, default on): the first call of a shape captures one
  `execute_async_v3` on a side stream (after a warm-up enqueue); later calls copy into the static inputs,
  replay, and clone the outputs.
A capture that fails falls back to eager enqueues (with a warning), never to a wrong answer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass

import torch

from ..files import atomic_write_bytes
from .onnx import ExportError, sha256_file

_log = logging.getLogger(__name__)
MIN_TENSORRT = (10, 0)
DEFAULT_OPT_BATCH = 2
DEFAULT_MAX_BATCH = 8


# ------------------------------------------------------------------------------------------- availability

def tensorrt_status(device="cuda") -> str | None:
    """None when TensorRT can build and run engines here, else a sentence saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed: `pip install tensorrt` (10.x or newer; it needs an NVIDIA GPU and "
                "driver)")
    version = tuple(int(x) for x in re.findall(r"\d+", trt.__version__)[:2])
    if version < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} is too old: this engine needs {'.'.join(map(str, MIN_TENSORRT))} or newer"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (TensorRT needs an NVIDIA GPU and a CUDA build of torch)"
    if torch.device(device).type != "cuda":
        return f"backend 'tensorrt' runs on a CUDA device; got device {device}"
    return None


def require_tensorrt(device="cuda"):
    """The `tensorrt` module, or RuntimeError saying what is missing."""
    reason = tensorrt_status(device)
    if reason is not None:
        raise RuntimeError(reason)
    import tensorrt as trt
    return trt


_LOGGER = None


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool}
    for name, torch_type in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    if dtype not in table:
        raise TypeError(f"TensorRT I/O type {dtype} has no torch equivalent")
    return table[dtype]


# ---------------------------------------------------------------------------------------------- building

@dataclass(frozen=True)
class BuildSettings:
    opt_batch: int = DEFAULT_OPT_BATCH
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_gib: float | None = None  # None: TensorRT's default (the device's memory)
    optimization_level: int | None = None  # None: TensorRT's default (3)

    def __post_init__(self):
        for name in ("opt_batch", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.opt_batch > self.max_batch:
            raise ValueError(f"opt_batch ({self.opt_batch}) must be <= max_batch ({self.max_batch})")
        if self.optimization_level is not None and self.optimization_level not in range(6):
            raise ValueError(f"optimization_level must be in 0..5; got {self.optimization_level!r}")

    def flags(self) -> dict:
        return {"strongly_typed": True, "profile_batch": [1, self.opt_batch, self.max_batch],
                "workspace_gib": self.workspace_gib, "optimization_level": self.optimization_level}


def engine_key(graph_sha256: str, *, tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int],
               flags: dict) -> str:
    """The engine-cache key: everything that makes a built plan valid or not."""
    record = {"graph_sha256": graph_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name,
              "compute_capability": list(compute_capability), "flags": flags}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    """A cache file written whole or not at all, with the umask's permissions (unclip.files)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, data)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _build_plan(trt, onnx_path: str, settings: BuildSettings, timing_cache_path: str) -> bytes:
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # accepted and implied on 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if settings.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * 2**30))
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape[0] != -1 or -1 in shape[1:]:
            raise ExportError(f"{onnx_path}: input {tensor.name!r} has shape {shape}; expected a dynamic batch "
                              "axis first and static axes after it")
        rest = shape[1:]
        profile.set_shape(tensor.name, (1, *rest), (settings.opt_batch, *rest), (settings.max_batch, *rest))
    config.add_optimization_profile(profile)

    cache = None
    if os.path.isfile(timing_cache_path):
        with open(timing_cache_path, "rb") as f:
            blob = f.read()
        try:
            cache = config.create_timing_cache(blob)
        except Exception:  # corrupt or from another build: start afresh
            cache = None
        if cache is None:
            _log.warning("discarding unreadable TensorRT timing cache %s", timing_cache_path)
    if cache is None:
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    _atomic_write(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def default_cache_dir(root: str) -> str:
    """UNCLIP_TRT_CACHE, else `<export>/tensorrt` when writable, else ~/.cache/unclip/tensorrt."""
    env = os.environ.get("UNCLIP_TRT_CACHE")
    if env:
        return env
    if os.access(root, os.W_OK):
        return os.path.join(root, "tensorrt")
    return os.path.join(os.path.expanduser("~"), ".cache", "unclip", "tensorrt")


def ensure_engines(root: str, manifest: dict, *, device="cuda", cache_dir: str | None = None,
                   settings: BuildSettings | None = None, rebuild: bool = False, names=None) -> dict[str, str]:
    """Build (or find in the cache) one engine per graph of an export; returns {graph name: plan path}."""
    trt = require_tensorrt(device)
    settings = settings or BuildSettings()
    device = torch.device(device)
    cache_dir = cache_dir or default_cache_dir(root)
    gpu = torch.cuda.get_device_name(device)
    cc = tuple(torch.cuda.get_device_capability(device))
    timing = os.path.join(cache_dir, f"timing-trt{trt.__version__}-{_slug(gpu)}-sm{cc[0]}{cc[1]}.cache")
    unsupported = manifest.get("tensorrt_op_check", {}).get("unsupported", {})
    plans = {}
    for name, net in manifest["networks"].items():
        if names is not None and name not in names:
            continue
        if unsupported.get(name):
            raise ExportError(f"{name}: the graph uses ops TensorRT's ONNX parser does not support: "
                              f"{unsupported[name]}")
        key = engine_key(net["graph_sha256"], tensorrt_version=trt.__version__, gpu_name=gpu,
                         compute_capability=cc, flags=settings.flags())
        plan_path = os.path.join(cache_dir, f"{name}-{key[:24]}.plan")
        meta_path = plan_path[:-len(".plan")] + ".json"
        if not rebuild and _cached_plan_ok(plan_path, meta_path, key):
            plans[name] = plan_path
            continue
        _log.warning("building TensorRT engine for %s (first use on this GPU/TensorRT; cached afterwards)", name)
        plan = _build_plan(trt, os.path.join(root, *net["graph"].split("/")), settings, timing)
        _atomic_write(plan_path, plan)
        meta = {"key": key, "graph": name, "graph_sha256": net["graph_sha256"], "tensorrt": trt.__version__,
                "gpu": gpu, "compute_capability": list(cc), "flags": settings.flags(),
                "plan_sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)}
        _atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
        plans[name] = plan_path
    return plans


def _cached_plan_ok(plan_path: str, meta_path: str, key: str) -> bool:
    """A cached plan is used only when its sidecar names this key and its bytes hash to the recorded sha256."""
    if not (os.path.isfile(plan_path) and os.path.isfile(meta_path)):
        return False
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("bytes") != os.path.getsize(plan_path):
        return False
    if sha256_file(plan_path) != meta.get("plan_sha256"):
        _log.warning("TensorRT engine %s does not match its recorded sha256; rebuilding", plan_path)
        return False
    return True


# ----------------------------------------------------------------------------------------------- running

@dataclass
class _Captured:
    context: object
    inputs: dict
    outputs: dict
    graph: object  # torch.cuda.CUDAGraph, or None when this shape runs eagerly


class TrtExecutor:
    """Runs one TensorRT engine on torch CUDA tensors (see the module docstring)."""

    def __init__(self, plan: bytes, device="cuda", *, name: str = "", use_cuda_graphs: bool = True):
        trt = require_tensorrt(device)
        self.trt = trt
        self.name = name
        self.device = torch.device(device)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError(f"{name}: TensorRT could not deserialize the engine (rebuild it)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names if is_input[n]}
        self.outputs = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names if not is_input[n]}
        self.max_batch = {n: tuple(self.engine.get_tensor_profile_shape(n, 0)[2])[0] for n in self.inputs}
        self.use_cuda_graphs = use_cuda_graphs and os.environ.get("UNCLIP_TRT_CUDA_GRAPHS", "1") != "0"
        self._lock = threading.Lock()  # contexts and captured buffers are per executor: one call at a time
        self._shapes: dict = {}  # input shapes -> _Captured

    def run(self, feeds: dict) -> dict:
        with self._lock, torch.cuda.device(self.device):
            staged = {n: feeds[n].detach().to(self.device, dt).contiguous() for n, dt in self.inputs.items()}
            for n, t in staged.items():
                if t.shape[0] > self.max_batch[n]:
                    raise ValueError(f"{self.name}: batch {t.shape[0]} exceeds the engine's profile maximum "
                                     f"{self.max_batch[n]}; rebuild the engines with a larger max_batch")
            key = tuple(tuple(staged[n].shape) for n in self.inputs)
            # Inside a capture of a whole stage loop (the pipeline's StageGraphs) the engine is enqueued into
            # the capturing stream directly, with a context that already ran this shape (the loop's eager
            # warm-up run happens first).
            capturing = torch.cuda.is_current_stream_capturing()
            entry = self._shapes.get(key)
            if entry is None:
                if capturing:
                    raise RuntimeError(f"{self.name}: input shapes {key} were not run before this CUDA-graph capture")
                entry = self._shapes[key] = self._prepare(staged)
            if capturing or entry.graph is None:
                return self._enqueue(entry, staged)
            for n, t in staged.items():
                entry.inputs[n].copy_(t)
            entry.graph.replay()
            return {n: t.clone() for n, t in entry.outputs.items()}

    def _bind(self, context, inputs: dict) -> dict:
        for n, t in inputs.items():
            if not context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"{self.name}: TensorRT rejected input {n!r} of shape {tuple(t.shape)}")
            context.set_tensor_address(n, t.data_ptr())
        outputs = {n: torch.empty(tuple(context.get_tensor_shape(n)), dtype=dt, device=self.device)
                   for n, dt in self.outputs.items()}
        for n, t in outputs.items():
            context.set_tensor_address(n, t.data_ptr())
        return outputs

    def _enqueue(self, entry: _Captured, staged: dict) -> dict:
        """Eager run: the engine reads the callers' tensors and writes fresh output tensors in place."""
        outputs = self._bind(entry.context, staged)
        if not entry.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return outputs

    def _prepare(self, staged: dict) -> _Captured:
        """A context for one set of input shapes, and (with use_cuda_graphs) the CUDA graph of one call."""
        context = self.engine.create_execution_context()
        if not self.use_cuda_graphs:
            return _Captured(context, {}, {}, None)  # its first (eager) enqueue happens right after
        inputs = {n: t.clone() for n, t in staged.items()}  # static buffers the graph reads
        outputs = self._bind(context, inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                # One enqueue after the shapes are set, before capture: TensorRT finishes shape-dependent
                # setup there, which must not happen inside the graph.
                if not context.execute_async_v3(side.cuda_stream):
                    raise RuntimeError(f"{self.name}: TensorRT execution failed")
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                if not context.execute_async_v3(side.cuda_stream):
                    raise RuntimeError(f"{self.name}: TensorRT execution failed during capture")
        except RuntimeError as e:
            _log.warning("%s: CUDA graph capture failed (%s); running this shape eagerly", self.name, e)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return _Captured(self.engine.create_execution_context(), {}, {}, None)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return _Captured(context, inputs, outputs, graph)


def engine_executors(root: str, manifest: dict, *, device="cuda", cache_dir: str | None = None,
                     opt_batch: int = DEFAULT_OPT_BATCH, max_batch: int = DEFAULT_MAX_BATCH,
                     workspace_gib: float | None = None, optimization_level: int | None = None,
                     use_cuda_graphs: bool = True, rebuild: bool = False) -> dict:
    """{graph name: TrtExecutor} for an export folder, building engines that are not cached yet."""
    settings = BuildSettings(opt_batch=opt_batch, max_batch=max_batch, workspace_gib=workspace_gib,
                             optimization_level=optimization_level)
    plans = ensure_engines(root, manifest, device=device, cache_dir=cache_dir, settings=settings, rebuild=rebuild)
    out = {}
    for name, path in plans.items():
        with open(path, "rb") as f:
            out[name] = TrtExecutor(f.read(), device, name=name, use_cuda_graphs=use_cuda_graphs)
    return out

