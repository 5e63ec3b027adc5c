"""Backend "native": every stage's whole sampling loop runs in C++ (cpp/, the `unclip._native` module) over
AOTInductor packages written by `unclip export --format native`.

The Python core still tokenizes, encodes text, draws the noise and builds each Stage; `run` hands the
stage (plan coefficients, latents, noise, conditioning, guidance) to the C++ loop in one call, which calls
the packages and does the sampler arithmetic of engine/samplers.py in the same float32 order, so the images
equal backend "torch"'s at the same seed. The C++ library can also run the entire cascade on its own
(`unclip._native.Cascade.generate`, the `unclip-native` program), drawing the same noise with libtorch's
CPU generator.

    pipe = unclip.Pipeline.from_pretrained("karlo-native", backend="native")    # an export folder
    pipe = unclip.Pipeline.from_pretrained("path/to/karlo", backend="native")   # compiled once into the cache

A diffusers folder is compiled into the cache ($UNCLIP_CACHE/native, else ~/.cache/unclip/native) keyed by
the sha256 of its files, the torch version and the CPU instruction set; torch components (presets) are
compiled into a temporary folder for the pipeline's lifetime.
"""
from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile

import torch

from ..runner import Networks, Runner

_log = logging.getLogger(__name__)

ENV_MODULE_DIR = "UNCLIP_NATIVE_PATH"  # dev builds: a folder holding _native*.so (e.g. build/native/cpp)
_MODULE = None
_MODULE_ERROR = None


def _candidates() -> list[str]:
    dirs = []
    if os.environ.get(ENV_MODULE_DIR):
        dirs.append(os.environ[ENV_MODULE_DIR])
    # A source checkout built with `cmake -S . -B build/native` (the package dir is the repo's engine/).
    repo = os.path.dirname(os.path.dirname(os.path.realpath(os.path.dirname(__file__))))
    dirs.append(os.path.join(repo, "build", "native", "cpp"))
    return dirs


def native_module():
    """The compiled `unclip._native` module (installed next to the package by `pip install`, or a dev build
    found through $UNCLIP_NATIVE_PATH / build/native/cpp); ImportError saying why when there is none."""
    global _MODULE, _MODULE_ERROR
    if _MODULE is not None:
        return _MODULE
    try:
        from .. import _native  # noqa: F401  (installed build)
        _MODULE = _native
        return _MODULE
    except ImportError as e:
        _MODULE_ERROR = e
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for folder in _candidates():
        for suffix in suffixes:
            path = os.path.join(folder, "_native" + suffix)
            if os.path.isfile(path):
                spec = importlib.util.spec_from_file_location(f"{__package__.rpartition('.')[0]}._native", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[spec.name] = module
                _MODULE = module
                return module
    raise ImportError("the native runtime is not built: the package was installed without a C++ toolchain or "
                      "without torch's CMake config (see the README's 'Native runtime' section)"
                      + (f"; import said: {_MODULE_ERROR}" if _MODULE_ERROR else ""))


def plan_dict(plan) -> dict:
    """A samplers plan (DDPMPlan / DDIMPlan) as the C++ side's plan: host facts + coefficient tensors."""
    coef = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, torch.Tensor) and f.name != "timesteps":
            coef[f.name] = value.detach().to("cpu", torch.float32).contiguous()
    return {"sampler": plan.sampler, "timesteps": list(plan.timestep_values),
            "prev_timesteps": list(plan.prev_timestep_values), "draws_noise": list(plan.draws_noise),
            "prediction_type": plan.prediction_type, "variance_type": getattr(plan, "variance_type", ""),
            "clip_range": plan.clip_range, "eta": float(getattr(plan, "eta", 0.0)),
            "use_clipped_model_output": bool(getattr(plan, "use_clipped_model_output", True)), "coef": coef}


def load_export(root: str, *, device="cpu", verify_hashes: bool = True):
    """Components over a native export folder (checked: manifest, target, file sizes and hashes)."""
    from ..export.native import check_target, load_components, read_manifest, verify_files
    root = os.path.abspath(os.fspath(root))
    manifest = read_manifest(root)
    check_target(manifest, root)
    verify_files(root, manifest, hashes=verify_hashes)
    module = native_module()
    try:
        cascade = module.Cascade(root, verify_hashes=False)  # hashed just above
    except module.NativeError as e:
        from ..config import ConfigError
        raise ConfigError(str(e)) from None
    return load_components(root, cascade, device=device)


class NativeRunner(Runner):
    name = "native"

    def __init__(self, *, device="cpu", dtype=None, max_batch: int | None = None, verify_hashes: bool = True):
        super().__init__(device=device, dtype=torch.float32 if dtype is None else dtype)
        if self.dtype != torch.float32:
            raise ValueError(f"backend 'native' runs float32 packages; got dtype {self.dtype}")
        from ..export.native import DEFAULT_MAX_BATCH, check_max_batch
        self.max_batch = check_max_batch(DEFAULT_MAX_BATCH if max_batch is None else max_batch)
        self.verify_hashes = verify_hashes
        self._exports = []  # temporary export folders of torch components, alive as long as the runner

    @classmethod
    def available(cls, device="cpu"):
        device = torch.device(device)
        if device.type != "cpu":
            return False, (f"this build runs CPU packages only (got {device}); CUDA needs a CUDA libtorch build "
                           "with the CUDA-graph loop, not compiled here")
        try:
            native_module()
        except ImportError as e:
            return False, str(e)
        return True, ""

    @classmethod
    def load(cls, path, *, device="cpu", dtype=None):
        from ..export.native import MANIFEST, cached_export
        path = os.fspath(path)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            path = cached_export(path, device=device)
        elif not os.path.isfile(os.path.join(path, MANIFEST)):
            from ..export.native import read_manifest
            read_manifest(path)  # raises the explanatory ConfigError
        return load_export(path, device=device)

    def _native_components(self, components):
        from ..export.networks import GraphNetwork
        nets = components.networks()
        native = {k: isinstance(v, GraphNetwork) and v.backend == "native" for k, v in nets.items()}
        if all(native.values()):
            return components
        if any(isinstance(v, GraphNetwork) for v in nets.values()):
            raise ValueError("these components run on another backend's graphs; load the model folder again with "
                             "backend='native'")
        from ..export.native import export_native
        _log.warning("compiling the cascade for the native runtime (slow; export once with "
                     "`unclip export --format native` to skip this)")
        tmp = tempfile.TemporaryDirectory(prefix="unclip-native-")
        out = export_native(components, os.path.join(tmp.name, "export"), device=self.device, max_batch=self.max_batch)
        self._exports.append(tmp)
        return load_export(out, device=self.device, verify_hashes=False)

    def prepare(self, components) -> Networks:
        graphs = self._native_components(components)
        calls = dict(graphs.networks())
        calls["prior.post_process"] = graphs.prior.post_process_latents
        networks = Networks(calls)
        networks.owner = graphs
        networks.cascade = graphs.decoder.executor.cascade
        return networks

    def run(self, stage, networks, observer=None):
        from ..samplers import DDIMPlan, DDPMPlan
        cascade = getattr(networks, "cascade", None)
        if cascade is None or not isinstance(stage.plan, (DDPMPlan, DDIMPlan)) or stage.has_known_region:
            # e.g. DDIM inversion, inpainting's known region: the Python loop over the same packages
            return super().run(stage, networks, observer)
        rows = stage.latents.shape[0] * (2 if stage.guidance is not None else 1)
        if rows > cascade.max_batch:
            raise ValueError(f"stage {stage.name!r} needs network batches of {rows} rows"
                             f"{' (guidance doubles the batch)' if stage.guidance is not None else ''}, above the "
                             f"compiled maximum {cascade.max_batch} of {cascade.root}; export with a larger "
                             "--max-batch (or pass runner_options={'max_batch': N} when compiling torch components)")
        def on_step(name, i, t, x):
            observer.on_step(stage, i, stage.plan.timesteps[i], x)
        callback = on_step if observer is not None and observer.wants_steps else None
        conditioning = {k: v.contiguous() for k, v in stage.conditioning.items()}
        for key in ("text_mask", "mask"):
            if key in conditioning:
                conditioning[key] = conditioning[key].bool()
        module = native_module()
        try:
            return cascade.run_stage(stage.name, stage.kind, [networks[n].name for n in stage.networks],
                                     plan_dict(stage.plan), stage.latents.float().contiguous(),
                                     [None if n is None else n.float().contiguous() for n in stage.noise],
                                     conditioning, stage.guidance, stage.learned_variance_channels, callback)
        except module.NativeError as e:
            raise ValueError(str(e)) from None

    def describe(self) -> dict:
        return {"backend": self.name, "max_batch": self.max_batch}
