"""Reading `config.json` files with errors that name the key and the file.

Every model class builds from a `Config`: a read-only view of one JSON object plus the path it came from,
so that a value we do not support is reported as "<file>: key 'x' = 3 is not supported (...)" instead of a
shape error deep inside a forward pass.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

_MISSING = object()

# Upper bounds on config sizes, checked before anything is allocated: each far above any published unCLIP
# model (Karlo: widths <= 1536, 24 layers, 256 px; DALL-E 2's paper sizes: widths <= 2560, 1024 px), so that
# only a corrupt or wrong config hits them, with an error naming the key instead of a memory blow-up.
LIMITS = {
    "width": 1 << 14,         # channels, hidden sizes, embedding and attention widths
    "mlp_width": 1 << 16,     # intermediate (MLP) sizes
    "layers": 256,            # transformer layers, resnets per block
    "blocks": 8,              # U-Net resolution levels
    "sample_size": 4096,      # U-Net / image resolution in pixels
    "io_channels": 64,        # image-like input and output channels
    "tokens": 1 << 16,        # sequence lengths and position tables
    "vocab": 1 << 21,         # token embedding rows
}


class ConfigError(ValueError):
    """A config file is missing, unreadable, or asks for something the engine does not implement."""


# The largest JSON file we parse (a CLIP tokenizer.json is ~4 MB; configs are a few kB): a bound before
# reading, so that a wrong path (a weights file) gives an error rather than a memory spike.
MAX_JSON_BYTES = 256 * 2**20


def parse_json(text: bytes | str, source: str):
    """Strict JSON: every way a file can be wrong raises ConfigError naming `source` (invalid UTF-8,
    syntax errors, NaN/Infinity or a number too large for a float, integers of thousands of digits, nesting
    deeper than the interpreter's recursion limit)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not valid UTF-8 (byte {e.start}: {e.reason})") from None

    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    def finite_float(literal):
        value = float(literal)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"the number {literal[:40]} does not fit in a float")
        return value

    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite_float)
    except RecursionError:
        raise ConfigError(f"{source}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError, our hooks, and int() on a number of > 4300 digits
        raise ConfigError(f"{source}: not valid JSON ({str(e)[:200]})") from None


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in file `path`; ConfigError naming the file for anything else (see `parse_json`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a JSON config (limit {MAX_JSON_BYTES})")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    data = parse_json(raw, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


class Config:
    """A config dict and where it came from. Keys starting with '_' are bookkeeping and never checked."""

    def __init__(self, data: dict, source: str = "<config>"):
        self.data = dict(data)
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        return cls(read_json(path), os.fspath(path))

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: config key '{key}' {message}")

    def get(self, key: str, default: Any = _MISSING, *, types: type | tuple = None,
            choices: Iterable | None = None) -> Any:
        """The value of `key` (or `default`), checked against `types` and `choices`."""
        if key in self.data:
            value = self.data[key]
        elif default is _MISSING:
            raise self.error(key, "is required but missing")
        else:
            return default
        if types is not None and not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise self.error(key, f"= {value!r} has type {type(value).__name__}, expected {names}")
        if isinstance(value, bool) and types in (int, float):
            raise self.error(key, f"= {value!r} is a bool, expected {types.__name__}")
        if choices is not None:
            choices = list(choices)
            if value not in choices:
                raise self.error(key, f"= {value!r} is not supported (supported: {', '.join(map(repr, choices))})")
        return value

    def get_int(self, key: str, default: Any = _MISSING, *, min_value: int | None = None,
                max_value: int | None = None) -> int:
        """An integer in [min_value, max_value]: bounds keep a config from asking for absurd allocations."""
        value = self.get(key, default, types=int)
        if min_value is not None and value is not None and value < min_value:
            raise self.error(key, f"= {value!r} must be >= {min_value}")
        if max_value is not None and value is not None and value > max_value:
            raise self.error(key, f"= {_short(value)} must be <= {max_value}")
        return value

    def check_limits(self, config, limits: dict[str, str]) -> None:
        """Each attribute of `config` named in `limits` (an int, a tuple of ints, or None) must be at most
        `LIMITS[limits[name]]`; ConfigError naming the key otherwise."""
        for key, kind in limits.items():
            value = getattr(config, key)
            values = value if isinstance(value, (list, tuple)) else (value,)
            for v in values:
                if isinstance(v, int) and v > LIMITS[kind]:
                    raise self.error(key, f"= {_short(value)} exceeds {LIMITS[kind]}, this engine's bound for "
                                          "it (far beyond any real model: a corrupt or wrong config?)")

    def get_list(self, key: str, default: Any = _MISSING, *, item_types: type | tuple = (int, str)) -> list:
        value = self.get(key, default, types=(list, tuple))
        for item in value:
            if not isinstance(item, item_types) or isinstance(item, bool):
                raise self.error(key, f"= {value!r} holds {item!r}, of an unexpected type")
        return list(value)

    def expect(self, key: str, supported: Any | tuple, default: Any = _MISSING) -> Any:
        """`key` may be absent (then `default`, which must itself be supported) or hold a supported value.

        Use for architecture switches we implement only one way, e.g. `expect("upcast_attention", (False,))`.
        """
        supported = supported if isinstance(supported, tuple) else (supported,)
        value = self.data.get(key, supported[0] if default is _MISSING else default)
        # bool/int/float compare equal across types (True == 1): compare types too.
        if not any(value == s and type(value) is type(s) for s in supported) and not (
            isinstance(value, list) and list(value) in [list(s) for s in supported if isinstance(s, (list, tuple))]
        ):
            raise self.error(key, f"= {value!r} is not supported (supported: {', '.join(map(repr, supported))})")
        return value

    def reject_unknown(self, known: Iterable[str], ignored: Iterable[str] = ()) -> None:
        """Fail on keys that are neither understood nor known to be irrelevant to inference."""
        allowed = set(known) | set(ignored)
        unknown = sorted(k for k in self.data if not k.startswith("_") and k not in allowed)
        if unknown:
            raise ConfigError(
                f"{self.source}: config key(s) {', '.join(map(repr, unknown))} not understood by this engine")

    def sub(self, key: str) -> "Config":
        """A nested object (e.g. CLIP's `text_config`) as a Config with a path-like source."""
        value = self.get(key, types=dict)
        return Config(value, f"{self.source}#{key}")
