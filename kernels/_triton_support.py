"""Where the Triton kernels can run, and clear errors where they cannot.

Triton is imported only when a kernel is first requested, never when `unclip.kernels` is imported, so the
package works (with its PyTorch references and custom-op registrations) on machines without Triton or a GPU.
"""
from __future__ import annotations

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
    """The Triton kernel `name` of private module `module`, checked to suit tensors on `device`."""
    kernel = getattr(load_triton_module(module), name)
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
    if device.type == "cpu" and interpreter_enabled():
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"unclip.kernels.{kernel}: the Triton kernel runs on CUDA tensors; got CPU tensors. Move the "
            "inputs to a GPU, use the PyTorch reference (the `torch` backend, or torch.ops.unclip.* which "
            "dispatches CPU tensors to it), or set TRITON_INTERPRET=1 before the first kernel call to run "
            "the kernel in Triton's (slow) CPU interpreter")
    raise RuntimeError(f"unclip.kernels.{kernel}: unsupported device {device}; the Triton kernels run on CUDA")


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parallel_slots(device: torch.device) -> int:
    """Rough number of programs the device runs at once (used to size grids). The CPU interpreter runs
    programs one after another, so there the fewest, largest programs are fastest."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * multiprocessor_count(index)
    return 1
