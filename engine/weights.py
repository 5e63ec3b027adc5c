"""Loading and saving model weights in the diffusers/transformers on-disk layout.

Safetensors first (single file or sharded with an `*.index.json`); a legacy `.bin` only through
`torch.load(weights_only=True)`, which refuses to unpickle code. Every mismatch between a file and the
module it is loaded into is listed in one error, so a user sees the whole problem at once.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import torch
from torch import nn

from .config import ConfigError, read_json
from .files import atomic_write_json, atomic_write_with

# Base names used by diffusers ("diffusion_pytorch_model") and transformers ("model", "pytorch_model").
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


class WeightsError(ValueError):
    """Weight files are missing, unreadable, or do not match the model they are loaded into."""


def find_weight_files(folder: str) -> list[str]:
    """The weight file(s) of one model folder, preferring safetensors; sharded checkpoints resolve via
    their index. Raises WeightsError naming the folder when nothing usable is there."""
    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: model folder not found")
    for ext in (".safetensors", ".bin"):
        for stem in WEIGHT_STEMS:
            single = os.path.join(folder, stem + ext)
            if os.path.isfile(single):
                return [single]
            index = single + ".index.json"
            if os.path.isfile(index):
                return _shards_from_index(index)
    present = sorted(os.listdir(folder))
    raise WeightsError(
        f"{folder}: no weights found (looked for {', '.join(s + '.safetensors' for s in WEIGHT_STEMS)}, "
        f"their sharded '.index.json' forms, and '.bin' equivalents); folder holds: {present}")


def _shards_from_index(index_path: str) -> list[str]:
    try:
        index = read_json(index_path)
    except ConfigError as e:
        raise WeightsError(f"unreadable shard index: {e}") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: key 'weight_map' = {_brief(weight_map)} must be a non-empty object "
                           "mapping tensor names to shard file names")
    folder = os.path.dirname(index_path)
    shards = []
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise WeightsError(f"{index_path}: weight_map[{tensor!r}] = {_brief(name)} must be a shard file name")
    for name in dict.fromkeys(weight_map.values()):  # unique, in order
        if os.path.basename(name) != name or name in (".", ".."):
            raise WeightsError(f"{index_path}: shard name {name!r} must be a plain file name")
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise WeightsError(f"{index_path}: shard {name!r} is missing")
        shards.append(path)
    return shards


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class StateDict(dict):
    """Tensors by name, plus `origin`: the file each tensor was read from (for errors naming the file)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.origin: dict[str, str] = {}


def read_state_dict(folder: str, device: str | torch.device = "cpu") -> StateDict:
    """All tensors of one model folder, as stored (dtype unchanged), with the file of each in `.origin`."""
    state = StateDict()
    for path in find_weight_files(folder):
        part = _read_file(path, device)
        overlap = state.keys() & part.keys()
        if overlap:
            raise WeightsError(f"{path}: tensors also present in another shard: {sorted(overlap)[:5]}")
        state.update(part)
        state.origin.update(dict.fromkeys(part, path))
    return state


def _read_file(path: str, device) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device=str(device))
        # weights_only=True: tensors and plain containers only, never arbitrary pickled code.
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # corrupt/truncated files raise many different types
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a flat mapping of tensor names to tensors")
    return obj


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str, *,
              dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              ignore_unexpected: Iterable[str] = ()) -> nn.Module:
    """Load `state` into `module` strictly, listing every missing, unexpected and mis-shaped tensor.

    `ignore_unexpected` holds regexes for stored tensors that carry no information we use (e.g. the
    `position_ids` buffer older transformers versions saved). Floating tensors are cast to `dtype`; a stored
    tensor of another kind than the module's (an integer or bool tensor where a float is expected, or the
    reverse) is an error naming the tensor and its file. The module may live on the meta device: tensors are
    then assigned, not copied.
    """
    origin = getattr(state, "origin", {})
    patterns = [re.compile(p) for p in ignore_unexpected]
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in patterns)}
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source}: weights do not match the {type(module).__name__} built from its config"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise WeightsError("\n".join(lines))
    wrong_kind: dict[str, list[str]] = {}
    for k in sorted(expected.keys() & state.keys()):
        if _kind(state[k].dtype) != _kind(expected[k].dtype):
            wrong_kind.setdefault(origin.get(k, source), []).append(
                f"{k} is {_name(state[k].dtype)}, the model's is {_name(expected[k].dtype)}")
    if wrong_kind:
        count = sum(map(len, wrong_kind.values()))
        parts = [f"{path}: " + ", ".join(items[:5]) + (f" ... and {len(items) - 5} more" if len(items) > 5 else "")
                 for path, items in wrong_kind.items()]
        raise WeightsError(f"{source}: {count} tensor(s) of the wrong dtype: " + "; ".join(parts))

    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    on_meta = any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers())
    module.load_state_dict({k: convert(v) for k, v in state.items()}, strict=True, assign=on_meta)
    return module


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def save_state_dict(module: nn.Module, folder: str, filename: str = "diffusion_pytorch_model.safetensors",
                    dtype: torch.dtype | None = None) -> str:
    """Write `module`'s tensors as one safetensors file, atomically (unclip.files)."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in module.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    path = os.path.join(folder, filename)
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return path


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically, in the indented, key-sorted form diffusers uses."""
    atomic_write_json(path, data)
