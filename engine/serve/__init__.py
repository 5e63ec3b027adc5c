"""Serving: `Engine` (in-process, batching stages across requests), an HTTP app (`unclip.serve.http`,
the `serve` extra) and a Ray Serve deployment (`unclip.serve.ray`, the `ray` extra) over the same engine."""
from .engine import Engine, EngineClosed, QueueFull, ServeOutput, supported_options

__all__ = ["Engine", "EngineClosed", "QueueFull", "ServeOutput", "supported_options"]
