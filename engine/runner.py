"""Backends are runners: the interface every backend implements, the registry that lists them, and the one
sampling loop they share.

A `Stage` (engine/stages.py) holds everything one stage of the cascade needs. A runner turns a cascade's
`Components` into `Networks` (callables by name) once, in `prepare`, and then runs stages with them:

    runner = runner_class("torch")(device="cpu", dtype=torch.float32)
    networks = runner.prepare(components)          # never mutates the caller's modules
    latents = runner.run(stage, networks, observer)

Python runners run `run_loop(stage, denoiser(stage, networks), observer)`; a runner may replace the loop
(a CUDA graph of it, a native loop) as long as the answer is the same. See docs/architecture.md.
"""
from __future__ import annotations

import importlib
from typing import Callable, ClassVar, Mapping

import torch

from . import samplers
from .observers import Observer

# name -> "module:Class". Adding a backend = one module in engine/runners/ + one line here.
RUNNERS: dict[str, str] = {
    "torch": "unclip.runners.torch:TorchRunner",
    "fast": "unclip.runners.fast:FastRunner",
    "onnxruntime": "unclip.runners.onnxruntime:OnnxRuntimeRunner",
    "tensorrt": "unclip.runners.tensorrt:TensorRTRunner",
    "native": "unclip.runners.native:NativeRunner",
}


class Networks(Mapping):
    """The prepared networks of a cascade: name -> callable (see docs/architecture.md for the signatures).

    `modules` lists the torch modules behind them (for parameter checks and weight sizes; empty for runtimes
    that hold their own weights); `owner` is anything the callables need kept alive (e.g. a temporary export)."""

    def __init__(self, calls: dict[str, Callable], *, modules: tuple = (), owner=None):
        self._calls = dict(calls)
        self.modules = tuple(modules)
        self.owner = owner

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._calls[name]
        except KeyError:
            raise KeyError(f"this cascade has no network {name!r}; it has {sorted(self._calls)}") from None

    def __iter__(self):
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)


def module_networks(components) -> Networks:
    """`Networks` whose callables are the components' own torch modules (what the torch runner uses)."""
    calls = dict(components.networks())
    if components.prior is not None:
        calls["prior.post_process"] = components.prior.post_process_latents
    unique = {id(m): m for m in components.networks().values() if isinstance(m, torch.nn.Module)}
    return Networks(calls, modules=tuple(unique.values()))


class Runner:
    """One backend. Subclasses set `name` and implement `prepare` (and may override `available`, `load`, `run`)."""

    name: ClassVar[str] = ""

    def __init__(self, *, device="cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def available(cls, device="cpu") -> tuple[bool, str]:
        """(True, "") when this runner can run on `device` here, else (False, the reason)."""
        return True, ""

    @classmethod
    def load(cls, path: str, *, device="cpu", dtype: torch.dtype = torch.float32):
        """The `Components` of a model folder for this runner (default: a diffusers-layout folder)."""
        from .loading import load_components
        return load_components(str(path), device=device, dtype=dtype)

    def prepare(self, components) -> Networks:
        raise NotImplementedError

    def run(self, stage, networks: Networks, observer: Observer | None = None) -> torch.Tensor:
        """The stage's final latents (float32)."""
        return run_loop(stage, denoiser(stage, networks), observer)

    def describe(self) -> dict:
        """What a report should say about this runner (options, caches)."""
        return {"backend": self.name}


def require_available(cls: type[Runner], device) -> None:
    ok, reason = cls.available(device)
    if not ok:
        raise ValueError(f"backend {cls.name!r} is not available here: {reason}")


def check_module_dtypes(components, dtype: torch.dtype) -> None:
    """Torch networks must already hold `dtype` weights (they are never converted behind the caller's back)."""
    for name, net in components.networks().items():
        if isinstance(net, torch.nn.Module):
            p = next(iter(net.parameters()), None)
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                raise ValueError(f"dtype {dtype} was asked for, but network {name!r} holds {p.dtype} weights; "
                                 f"build or load the components in {dtype}")


# --------------------------------------------------------------------------------------------- registry

def register_runner(name: str, target: str | type[Runner]) -> None:
    """Add a backend under `name`: a Runner subclass, or its "module:Class" import string."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"runner name must be an identifier; got {name!r}")
    RUNNERS[name] = target


def runner_names() -> list[str]:
    return list(RUNNERS)


def runner_class(name) -> type[Runner]:
    """The Runner class registered as `name` (a Runner subclass passes through)."""
    if isinstance(name, type) and issubclass(name, Runner):
        return name
    if name not in RUNNERS:
        raise ValueError(f"backend must be one of {', '.join(RUNNERS)}; got {name!r}")
    target = RUNNERS[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def availability(device="cpu") -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} on `device`: what `unclip info` prints."""
    out = {}
    for name in RUNNERS:
        try:
            out[name] = runner_class(name).available(device)
        except Exception as e:  # a broken optional dependency must not break the listing
            out[name] = (False, f"{type(e).__name__}: {e}")
    return out


# --------------------------------------------------------------------------------------------- the loop

def denoiser(stage, networks: Networks, *, conditioning: dict | None = None, guidance=None) -> Callable:
    """denoise(x, t, i) -> model output (float32) for one step of `stage`: the network call(s) of its kind,
    with classifier-free guidance batched as [uncond; cond].

    `conditioning` / `guidance` replace the stage's own (a captured loop passes its static buffers and the
    scale as a device tensor); everything else is read from the stage."""
    cond = stage.conditioning if conditioning is None else conditioning
    scale = stage.guidance if guidance is None else guidance
    guided = stage.guidance is not None
    dtype = stage.model_dtype
    learned = stage.learned_variance_channels
    last_step = stage.plan.num_steps - 1

    if stage.kind == "prior":
        net = networks[stage.networks[0]]

        def call(x, t, i):
            return net(x, t, cond["text_embeds"], cond["text_hidden"], cond["text_mask"])
    elif stage.kind == "decoder":
        net = networks[stage.networks[0]]

        def call(x, t, i):
            return net(x, t, cond["context"], cond["time_embed"], cond["mask"])
    elif stage.kind == "super_res":
        first, last = networks[stage.networks[0]], networks[stage.networks[-1]]

        def call(x, t, i):
            net = last if i == last_step else first  # static per step: capturable
            return net(torch.cat([x, cond["upscaled"]], dim=1), t)
    else:
        raise ValueError(f"stage kind must be prior, decoder or super_res; got {stage.kind!r}")

    def denoise(x, t, i):
        x = x.to(dtype)
        if not guided:
            return call(x, t, i).float()
        uncond, cond_out = call(torch.cat([x, x]), t, i).chunk(2)
        if learned is None:
            return (uncond + scale * (cond_out - uncond)).float()
        eps = uncond[:, :learned] + scale * (cond_out[:, :learned] - uncond[:, :learned])
        return torch.cat([eps, cond_out[:, learned:]], dim=1).float()
    return denoise


def run_loop(stage, denoise: Callable, observer: Observer | None = None, *, latents: torch.Tensor | None = None,
             noise=None, known_region=None) -> torch.Tensor:
    """The one sampling loop: for every step, the model output, then the sampler step with that step's noise;
    for an inpainting stage (`stage.known_region`) the known region pasted back, and the re-noising of a
    resampling jump (see `unclip.stages.KnownRegion`). `latents` / `noise` / `known_region` replace the
    stage's own (static buffers of a captured loop)."""
    plan = stage.plan
    x = stage.latents if latents is None else latents
    noise = stage.noise if noise is None else noise
    known = stage.known_region if known_region is None else known_region
    for i in range(plan.num_steps):
        t = plan.timesteps[i]
        x = samplers.step(plan, i, x, denoise(x, t, i), noise[i])
        if known is not None:  # static per stage and step: capturable
            x = torch.where(known.mask, x, known.known[i])
            if known.jump_noise[i] is not None:
                x = known.jump_scale[i] * x + known.jump_std[i] * known.jump_noise[i]
        if observer is not None:
            observer.on_step(stage, i, t, x)
    return x
