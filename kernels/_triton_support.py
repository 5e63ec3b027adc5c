"""Where the Triton kernels can run, and clear errors where they cannot.

Triton is imported only when a kernel is first requested, never when `unclip.kernels` is imported, so the
package works (with its PyTorch references and custom-op registrations) on machines without Triton or a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import os

import torch


def triton_installed() -> bool:
    """True if the `triton` package can be imported (it is not imported by this check)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True if TRITON_INTERPRET asks for Triton's CPU interpreter (slow; meant for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _missing_triton() -> RuntimeError:
    return RuntimeError(
        "unclip.kernels: the Triton kernels need the `triton` package, which is not installed "
        "(install the `fast` extra, e.g. `pip install 'triton>=3.0'`), or use the `torch` backend")


def require_triton() -> None:
    """Raise RuntimeError (saying what to install) if Triton is missing."""
    if not triton_installed():
        raise _missing_triton()


def load_triton_module(name: str):
    """Import one of the private `_*_triton` modules, with a clear error if Triton is missing."""
    require_triton()
    return importlib.import_module(f"{__package__}.{name}")


def get_kernel(module: str, name: str, device: torch.device):
    """The Triton kernel `name` of private module `module`, checked to suit tensors on `device`.
    Inside `record_launches`, a stand-in that records the launch instead of running it."""
    kernel = getattr(load_triton_module(module), name)
    recording = _RECORDING.get()
    if recording is not None:
        return _RecordingKernel(kernel, recording[1])
    if device.type == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(
            f"unclip.kernels: TRITON_INTERPRET=1 was set after the Triton kernels were first loaded as compiled "
            f"GPU kernels, so {name} cannot run on CPU tensors; set it before the first kernel call (e.g. at the "
            "top of the test module, before anything imports unclip.kernels' Triton code)")
    return kernel


def check_runnable(kernel: str, device: torch.device) -> None:
    """Raise RuntimeError saying what is missing if `kernel` cannot run on tensors on `device`."""
    require_triton()
    if device.type == "cuda":
        return
    if device.type == "meta" and _RECORDING.get() is not None:
        return
    if device.type == "cpu" and interpreter_enabled():
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"unclip.kernels.{kernel}: the Triton kernel runs on CUDA tensors; got CPU tensors. Move the "
            "inputs to a GPU, use the PyTorch reference (the `torch` backend, or torch.ops.unclip.* which "
            "dispatches CPU tensors to it), or set TRITON_INTERPRET=1 before the first kernel call to run "
            "the kernel in Triton's (slow) CPU interpreter")
    raise RuntimeError(f"unclip.kernels.{kernel}: unsupported device {device}; the Triton kernels run on CUDA")


@dataclasses.dataclass(frozen=True)
class LaunchTarget:
    """What the launchers' configuration choices depend on besides the shapes.

    `capability`: CUDA compute capability as major·10 + minor (80 = A100, 90 = H100/H200); 0 for Triton's
    CPU interpreter. `parallel_slots`: rough number of programs the device runs at once (used to size grids).
    """
    capability: int
    parallel_slots: int

    @classmethod
    def cuda(cls, capability: int, multiprocessors: int) -> "LaunchTarget":
        return cls(capability, 4 * multiprocessors)


# The CPU interpreter runs programs one after another, so there the fewest, largest programs are fastest.
INTERPRETER_TARGET = LaunchTarget(capability=0, parallel_slots=1)


@functools.lru_cache(maxsize=None)
def _cuda_target(device_index: int) -> LaunchTarget:
    props = torch.cuda.get_device_properties(device_index)
    return LaunchTarget.cuda(10 * props.major + props.minor, props.multi_processor_count)


def launch_target(device: torch.device) -> LaunchTarget:
    """The `LaunchTarget` of tensors on `device` (inside `record_launches`: the target being recorded for)."""
    recording = _RECORDING.get()
    if recording is not None:
        return recording[0]
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_TARGET


def parallel_slots(device: torch.device) -> int:
    """Rough number of programs the device runs at once (used to size grids)."""
    return launch_target(device).parallel_slots


# ------------------------------------------------------------------------------------ recording launches

@dataclasses.dataclass
class KernelLaunch:
    """One launch a launcher made inside `record_launches`: the Triton kernel (a `triton.JITFunction`), the
    grid, the positional arguments (tensors, ints, floats) and the keyword ones (constexprs and launch
    options such as num_warps, num_stages)."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _RecordingKernel:
    """Stands in for a kernel inside `record_launches`: `kernel[grid](*args, **kwargs)` appends a
    KernelLaunch instead of launching."""

    def __init__(self, kernel, sink: list):
        self._kernel, self._sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._sink.append(KernelLaunch(self._kernel, tuple(grid), args, dict(kwargs)))
        return launch


_RECORDING: contextvars.ContextVar = contextvars.ContextVar("unclip_kernels_recording", default=None)


@contextlib.contextmanager
def record_launches(target: LaunchTarget):
    """Run the public launchers (`attention`, `group_norm`) without running any kernel: inside this block
    they accept meta tensors, choose their configuration for `target`, and append each launch they would
    make to the yielded list. For compile-only checks without a GPU (benchmarks/kernel_report.py); needs
    Triton, and TRITON_INTERPRET unset when the kernels are first loaded (to record compilable kernels)."""
    require_triton()
    sink: list[KernelLaunch] = []
    token = _RECORDING.set((target, sink))
    try:
        yield sink
    finally:
        _RECORDING.reset(token)
