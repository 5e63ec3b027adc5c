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


class ConfigError(ValueError):
    """A config file is missing, unreadable, or asks for something the engine does not implement."""


def read_json(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


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

    def get_int(self, key: str, default: Any = _MISSING, *, min_value: int | None = None) -> int:
        value = self.get(key, default, types=int)
        if min_value is not None and value is not None and value < min_value:
            raise self.error(key, f"= {value!r} must be >= {min_value}")
        return value

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
