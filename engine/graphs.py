"""CUDA-graph capture and replay of one stage's whole sampling loop (the `fast` backend on CUDA).

A stage's loop (every step: CFG concat, network call(s), guidance combine, sampler step, noise injection,
the super-resolution first/last network switch) is recorded once per configuration and replayed. Launch
and Python overhead per step disappear; the arithmetic is the same kernels the eager loop runs.

How a stage becomes capturable: a `Stage` (engine/stages.py) is a value holding its latents, pre-drawn
noise and conditioning tensors, and `unclip.runner.denoiser(stage, networks, conditioning=..., guidance=...)`
builds its denoise function around *given* tensors. So:

* The first call of a configuration allocates static buffers (initial latents, every step's pre-drawn
  noise, the conditioning, the guidance scale as a device tensor), builds denoise around them, runs the
  loop once eagerly on a side stream (warm-up: Triton compilation, cuBLAS handles; its result is this
  call's answer), then captures the same loop into a `torch.cuda.CUDAGraph`.
* Later calls copy their inputs into the static buffers, replay, and return a copy of the static output.
  Noise is drawn by the caller before the loop in the seed-compatible order, so graph and eager runs of
  the same seed give the same images.

Cache key: stage name and kind, the networks it calls (names and identities), guidance on/off, learned
variance channels, latent shape/dtype/device, model dtype, sampler plan (identity, sampler, steps, eta), which steps
draw noise, conditioning shapes/dtypes, an inpainting stage's known-region tensors (mask, known images per step,
jump noise and coefficients: static buffers like the noise), and the guidance scale only when the model dtype
cannot hold it exactly (a scale like 4, 8 or 7.5 is exact in fp16, so one graph serves every such scale; 3.3 is
not and gets its own graph, so a replay never differs from the eager loop by even one rounding of the scale). Entries live in a bounded
LRU cache; each has its own lock, so concurrent calls of one configuration serialise and different
configurations run independently. Captures are serialised process-wide.

Failure policy: a capture that fails (an op that syncs with the host, an unsupported kernel, ...) emits
one RuntimeWarning and the configuration runs eagerly from then on; a replay that raises does the same.
Never a wrong answer: the first call's result always comes from the eager warm-up, and a replaced
parameter tensor (a new storage rather than an in-place update) is detected and triggers a re-capture.

`StageGraphs(device, capture=False)` runs the exact same static-buffer loop eagerly: on the CPU it is how
the tests prove that the capturable formulation equals the plain loop bit for bit.

Any runner on CUDA can use this strategy: `run_captured(graphs, stage, networks, observer)` (the `fast` and
`tensorrt` runners do).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from collections import OrderedDict
from typing import Sequence

import torch

from .runner import denoiser, run_loop

DEFAULT_MAX_GRAPHS = 16
ENV_DISABLE = "UNCLIP_CUDA_GRAPHS"  # "0" turns capture off for the `fast` backend (kernels still swap in)

_CAPTURE_LOCK = threading.Lock()  # one capture at a time per process


def _scale_is_exact(scale: float, dtype: torch.dtype) -> bool:
    """True if a 0-dim `dtype` tensor holding `scale` multiplies exactly like the Python float does (kernels
    apply a Python scalar as fp32; a half-precision tensor operand is first rounded to its own dtype)."""
    as_fp32 = torch.tensor(scale, dtype=torch.float32)
    return bool(torch.tensor(scale, dtype=dtype).float() == as_fp32)


def _tensor_sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


def graph_key(stage, networks) -> tuple:
    """The cache key of one stage configuration (see the module docstring). Pure: testable without CUDA."""
    cond = tuple(sorted((k, _tensor_sig(v)) for k, v in stage.conditioning.items()))
    if stage.guidance is None:
        scale = None
    elif _scale_is_exact(stage.guidance, stage.model_dtype):
        scale = "device-tensor"
    else:
        scale = ("baked", float(stage.guidance))
    noise_sig = tuple(None if n is None else _tensor_sig(n) for n in stage.noise)
    plan = stage.plan
    plan_sig = (id(plan), plan.sampler, plan.num_steps, tuple(plan.timestep_values), getattr(plan, "eta", 0.0))
    nets = tuple((n, id(networks[n])) for n in stage.networks)
    known = getattr(stage, "known_region", None)  # inpainting: its tensors are static buffers too
    known_sig = None if known is None else tuple(sorted((k, _tensor_sig(v)) for k, v in known.tensors().items()))
    return (stage.name, stage.kind, nets, stage.learned_variance_channels, _tensor_sig(stage.latents),
            stage.model_dtype, plan_sig, noise_sig, cond, known_sig, scale)


def _storage_signature(modules: Sequence[torch.nn.Module]) -> tuple:
    """Data pointers of every parameter and buffer: a graph reads them by address, so a replaced tensor
    (not an in-place update, which a replay sees) must invalidate the graph."""
    seen, sig = set(), []
    for m in modules:
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, torch.nn.Module):  # other executors (e.g. TensorRT engines) hold no torch parameters
            sig.extend(t.data_ptr() for t in itertools.chain(m.parameters(), m.buffers()))
    return tuple(sig)


class _Entry:
    """One configuration: static buffers, the denoise built around them, and (when captured) the graph."""

    def __init__(self, key: tuple):
        self.key = key
        self.lock = threading.Lock()
        self.ready = False          # static buffers exist (and, when capturing, the graph too)
        self.failed = False         # capture or replay failed: this configuration runs eagerly
        self.graph = None
        self.stream = None
        self.stage = None
        self.denoise = None
        self.x = None
        self.noise: list = []
        self.cond: dict = {}
        self.known = None           # a KnownRegion over static buffers (inpainting stages)
        self.scale = None
        self.out = None
        self.signature: tuple = ()

    def release(self) -> None:
        self.graph = self.out = self.x = self.denoise = self.scale = self.stage = None
        self.noise, self.cond, self.known = [], {}, None
        self.ready = False


class StageGraphs:
    """Bounded LRU cache of captured stage loops for one pipeline.

    run(name, plan, x, noise, stage, model_dtype) returns the stage's final latents (fp32, like the eager
    loop), or None when the caller must run the loop eagerly (a failed configuration). `capture=False`
    runs the same static-buffer loop eagerly instead of capturing (any device).
    """

    def __init__(self, device, *, max_graphs: int = DEFAULT_MAX_GRAPHS, capture: bool = True):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1; got {max_graphs!r}")
        device = torch.device(device)
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA-graph capture needs a CUDA device, got {device}; use capture=False to run the "
                             "capturable loop eagerly")
        self.device = device
        self.max_graphs = max_graphs
        self.capture = capture
        self._lock = threading.Lock()
        self._entries: OrderedDict = OrderedDict()
        self.stats = {"captures": 0, "replays": 0, "evictions": 0, "failures": 0, "recaptures": 0}

    # ------------------------------------------------------------------ cache
    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        """Drop every graph (e.g. after replacing a network); the next call of each configuration re-captures."""
        with self._lock:
            self._entries.clear()

    def _entry(self, key: tuple) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            entry = self._entries[key] = _Entry(key)
            while len(self._entries) > self.max_graphs:
                # A thread still replaying an evicted entry holds its own reference; memory goes with the last one.
                self._entries.popitem(last=False)
                self.stats["evictions"] += 1  # under self._lock
            return entry

    # ------------------------------------------------------------------ run
    def run(self, stage, networks) -> torch.Tensor | None:
        """The stage's final latents, or None when the caller must run the loop eagerly."""
        if not torch.is_inference_mode_enabled():
            return None  # static buffers are inference tensors; outside inference mode run eagerly
        key = graph_key(stage, networks)
        modules = [networks[n] for n in stage.networks]
        entry = self._entry(key)
        with entry.lock:
            if entry.failed:
                return None
            if entry.ready and entry.signature != _storage_signature(modules):
                entry.release()
                self._count("recaptures")
            if not entry.ready:
                return self._first_call(entry, stage, networks, modules)
            try:
                return self._replay(entry, stage)
            except Exception as e:  # never a wrong answer: give up on this configuration, run eagerly
                self._fail(entry, stage.name, "replay", e)
                return None

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def _stream_ctx(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _first_call(self, entry: _Entry, stage, networks, modules) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        caller = torch.cuda.current_stream(self.device) if cuda else None
        entry.stream = torch.cuda.Stream(self.device) if cuda else None
        if cuda:
            entry.stream.wait_stream(caller)
        with self._stream_ctx(entry.stream):
            entry.stage = stage
            entry.x = stage.latents.clone(memory_format=torch.preserve_format)
            entry.noise = [None if n is None else n.clone(memory_format=torch.preserve_format) for n in stage.noise]
            entry.cond = {k: v.clone(memory_format=torch.preserve_format) for k, v in stage.conditioning.items()}
            if getattr(stage, "known_region", None) is not None:
                region = stage.known_region
                entry.known = region.replace_tensors({k: v.clone(memory_format=torch.preserve_format)
                                                      for k, v in region.tensors().items()})
            # The scale as a device tensor (one graph for every scale) when that is exact for the model dtype;
            # otherwise the Python float itself, baked into the graph like in the eager loop (and in the key).
            if stage.guidance is not None and entry.key[-1] == "device-tensor":
                entry.scale = torch.tensor(float(stage.guidance), dtype=torch.float32, device=stage.latents.device)
            else:
                entry.scale = None
            entry.denoise = denoiser(stage, networks, conditioning=entry.cond, guidance=entry.scale)
            # Warm-up, and this call's answer: the loop exactly as it will be captured, run eagerly.
            result = self._loop(entry)
        entry.signature = _storage_signature(modules)
        if self.capture:
            try:
                entry.graph, entry.out = self._capture(entry)
                self._count("captures")
            except Exception as e:
                self._fail(entry, stage.name, "capture", e)
        entry.ready = not entry.failed
        if cuda:
            caller.wait_stream(entry.stream)
            result.record_stream(caller)
        return result

    def _capture(self, entry: _Entry):
        """Record the static-buffer loop into a CUDA graph; returns (graph, static output)."""
        with _CAPTURE_LOCK:
            graph = torch.cuda.CUDAGraph()
            # "thread_local": other threads may keep launching eager work while this thread captures.
            with torch.cuda.graph(graph, stream=entry.stream, capture_error_mode="thread_local"):
                out = self._loop(entry)
        return graph, out

    @staticmethod
    def _loop(entry: _Entry) -> torch.Tensor:
        """The static-buffer loop (what is captured)."""
        return run_loop(entry.stage, entry.denoise, latents=entry.x, noise=entry.noise, known_region=entry.known)

    def _load(self, entry: _Entry, stage) -> None:
        entry.x.copy_(stage.latents)
        for buf, n in zip(entry.noise, stage.noise):
            if buf is not None:
                buf.copy_(n)
        for k, buf in entry.cond.items():
            buf.copy_(stage.conditioning[k])
        if entry.known is not None:
            given = stage.known_region.tensors()
            for k, buf in entry.known.tensors().items():
                buf.copy_(given[k])
        if entry.scale is not None:
            entry.scale.fill_(float(stage.guidance))

    def _replay(self, entry: _Entry, stage) -> torch.Tensor:
        cuda = entry.stream is not None
        if cuda:
            caller = torch.cuda.current_stream(self.device)
            # All use of this entry's buffers is ordered on its own stream, whatever stream each caller uses.
            entry.stream.wait_stream(caller)
        with self._stream_ctx(entry.stream):
            self._load(entry, stage)
            if entry.graph is None:  # capture=False: the same static-buffer loop, eagerly
                out = self._loop(entry)
            else:
                entry.graph.replay()
                out = entry.out.clone()  # the next replay overwrites the static output
        if cuda:
            caller.wait_stream(entry.stream)
            out.record_stream(caller)
        self._count("replays")
        return out

    def _fail(self, entry: _Entry, name: str, what: str, error: Exception) -> None:
        warnings.warn(f"unclip fast backend: CUDA-graph {what} of stage '{name}' failed "
                      f"({type(error).__name__}: {error}); this configuration runs eagerly from now on",
                      RuntimeWarning, stacklevel=4)
        entry.failed = True
        entry.release()
        self._count("failures")


def run_captured(graphs: StageGraphs | None, stage, networks, observer=None) -> torch.Tensor:
    """The capture strategy of a runner: the stage through `graphs` (replayed when captured), or the plain
    loop when there are no graphs, an observer wants every step, or the configuration runs eagerly."""
    if graphs is not None and not (observer is not None and observer.wants_steps):
        out = graphs.run(stage, networks)
        if out is not None:
            return out
    return run_loop(stage, denoiser(stage, networks), observer)
