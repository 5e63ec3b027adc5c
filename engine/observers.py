"""Observers: hooks a call's stages report to (timing, progress bars, per-step callbacks, a server's events).

The cascade reports every stage (and the "text" / "image_encoder" phases, with stage None) to one Observer;
runners report every step of an eagerly run loop. A runner that replays a captured loop (CUDA graphs)
reports no steps, unless an observer sets `wants_steps`: then it runs the loop eagerly.
"""
from __future__ import annotations

from typing import Callable


class Observer:
    """Every hook is optional; the base class does nothing."""

    wants_steps: bool = False  # True: every step must be reported (forces a captured loop to run eagerly)

    def on_stage_start(self, name: str, stage) -> None:
        pass

    def on_step(self, stage, i: int, t, latents) -> None:
        pass

    def on_stage_end(self, name: str, stage, latents) -> None:
        pass


class Observers(Observer):
    """Several observers as one, called in order."""

    def __init__(self, observers):
        self.observers = [o for o in observers if o is not None]
        self.wants_steps = any(o.wants_steps for o in self.observers)

    def on_stage_start(self, name, stage):
        for o in self.observers:
            o.on_stage_start(name, stage)

    def on_step(self, stage, i, t, latents):
        for o in self.observers:
            o.on_step(stage, i, t, latents)

    def on_stage_end(self, name, stage, latents):
        for o in self.observers:
            o.on_stage_end(name, stage, latents)


class CallbackObserver(Observer):
    """`callback(stage_name, step_index, timestep, latents)` after every step (the diffusers-style callback)."""

    wants_steps = True

    def __init__(self, callback: Callable):
        self.callback = callback

    def on_step(self, stage, i, t, latents):
        self.callback(stage.name, i, t, latents)


class ProgressObserver(Observer):
    """A tqdm bar per sampling stage (filled at the end when a captured loop reports no steps)."""

    def __init__(self):
        self.bar = None

    def on_stage_start(self, name, stage):
        if stage is not None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=stage.plan.num_steps, desc=name, leave=False)

    def on_step(self, stage, i, t, latents):
        if self.bar is not None:
            self.bar.update(1)

    def on_stage_end(self, name, stage, latents):
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def check_observer(value) -> Observer | None:
    if value is not None and not isinstance(value, Observer):
        raise TypeError(f"observer must be a unclip.Observer (or None); got {type(value).__name__}")
    return value


def call_observer(observer: Observer | None, callback: Callable | None, progress: bool) -> Observer:
    """The one observer of a call: the caller's, plus the callback and the progress bars when asked for."""
    parts = [observer, CallbackObserver(callback) if callback is not None else None,
             ProgressObserver() if progress else None]
    parts = [p for p in parts if p is not None]
    return parts[0] if len(parts) == 1 else Observers(parts)
