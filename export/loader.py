"""Build a `Components` whose networks run exported graphs, for the runners that execute ONNX graphs
(engine/runners/onnxruntime.py, engine/runners/tensorrt.py).

An export folder (with `manifest.json`) is loaded as is; a diffusers-layout folder, or torch `Components`,
is first exported to a temporary folder (slow for large models: export once with `unclip export` instead).
Which runtime executes the graphs is the runner's business: it hands `load_exported` a factory of executors.
"""
from __future__ import annotations

import logging
import os
import tempfile

import torch

from ..config import Config, ConfigError
from ..loading import CALL_DEFAULTS_ENTRY, Components, SchedulerConfig, Upsampler, model_classes, read_call_defaults
from .networks import GRAPH_CLASSES, GraphNetwork
from .onnx import CLIP_STATS_FILE, MANIFEST, export_onnx, read_manifest, resolve_dtype, verify_files

_log = logging.getLogger(__name__)


def _graph_runner(backend):
    """The runner class of `backend`, which must be one that executes exported graphs."""
    from ..runner import runner_class
    cls = runner_class(backend)
    if not hasattr(cls, "graph_executors"):
        raise ValueError(f"backend {cls.name!r} does not run exported ONNX graphs")
    return cls


def load_exported(root: str, *, backend: str = "onnxruntime", device="cpu", verify: bool | None = None,
                  **executor_options) -> Components:
    """Load an export folder written by `export_onnx` / `unclip export`, its graphs run by `backend`'s
    executors (`executor_options` pass through to the runner's `graph_executors`, e.g. onnxruntime's
    `providers` / `threads`, tensorrt's `cache_dir`). Every file is checked against the manifest's size and
    sha256 (`verify=False`, or UNCLIP_VERIFY_EXPORTS=0, skips the hashing; see `verify_files`)."""
    runner = _graph_runner(backend)
    root = os.path.abspath(os.fspath(root))
    device = torch.device(device)
    manifest = read_manifest(root)
    verify_files(root, manifest, hashes=verify)
    source = os.path.join(root, MANIFEST)
    classes = model_classes()
    nets = manifest["networks"]
    executor = runner.graph_executors(root, manifest, device=device, **executor_options)

    built = {}

    def network(name):
        if name not in built:
            net = nets.get(name)
            if net is None:
                raise ConfigError(f"{source}: networks has no '{name}' graph")
            kind = net["kind"]
            if kind not in GRAPH_CLASSES:
                raise ConfigError(f"{source}: networks.{name}.kind = {kind!r} is not supported")
            config = classes[kind][1].config_class.from_config(Config(net["config"], f"{source}: networks.{name}.config"))
            extra = {}
            if kind == "prior":
                from safetensors.torch import load_file
                stats = load_file(os.path.join(root, name, CLIP_STATS_FILE))
                extra = {"clip_mean": stats["clip_mean"], "clip_std": stats["clip_std"]}
            built[name] = GRAPH_CLASSES[kind](name, config, executor(name), backend=runner.name, device=device,
                                              **extra)
        return built[name]

    def scheduler(key, data):
        return SchedulerConfig.from_config(Config(data, f"{source}: {key}"))

    from ..tokenizer import CLIPTokenizer
    upsamplers = [Upsampler(u["name"], network(u["first"]), network(u["last"]),
                            scheduler(f"upsamplers.{u['name']}.scheduler", u["scheduler"]))
                  for u in manifest["upsamplers"]]
    if not upsamplers:
        raise ConfigError(f"{source}: upsamplers is empty (the cascade needs at least one)")
    has_prior = "prior" in nets
    return Components(
        tokenizer=CLIPTokenizer.from_folder(os.path.join(root, manifest["tokenizer"]["folder"])),
        text_encoder=network("text_encoder"),
        text_proj=network("text_proj"),
        decoder=network("decoder"),
        decoder_scheduler=scheduler("schedulers.decoder", manifest["schedulers"]["decoder"]),
        upsamplers=upsamplers,
        prior=network("prior") if has_prior else None,
        prior_scheduler=scheduler("schedulers.prior", manifest["schedulers"]["prior"]) if has_prior else None,
        image_encoder=network("image_encoder") if "image_encoder" in nets else None,
        image_processor_config=manifest.get("image_processor_config"),
        call_defaults=read_call_defaults(Config({CALL_DEFAULTS_ENTRY: manifest.get("call_defaults", {})},
                                                f"{source}: call_defaults")),
    )


def prepare_components(components: Components, backend: str, *, device="cpu", dtype=torch.float32,
                       **executor_options) -> Components:
    """Components for `backend`: graph-backed ones pass through (after checking they belong to `backend`);
    torch ones are exported to a temporary folder in `dtype` and loaded from there."""
    backend = _graph_runner(backend).name
    nets = components.networks()
    graph = {k: isinstance(v, GraphNetwork) for k, v in nets.items()}
    if all(graph.values()):
        wrong = sorted({v.backend for v in nets.values()} - {backend})
        if wrong:
            raise ValueError(f"these components run on backend {wrong[0]!r}, not {backend!r}; load the export "
                             f"folder again with backend={backend!r}")
        return components
    if any(graph.values()):
        raise ValueError("components mix torch modules and exported graphs; use one or the other")
    try:
        name, _ = resolve_dtype(dtype)
    except ValueError:
        raise ValueError(f"backend {backend!r} runs fp32 or fp16 graphs; got dtype {dtype}") from None
    _log.warning("exporting the cascade to ONNX for backend %r (export once with `unclip export` to skip this)",
                 backend)
    tmp = tempfile.TemporaryDirectory(prefix="unclip-export-")
    out = export_onnx(components, os.path.join(tmp.name, "export"), dtype=name)
    loaded = load_exported(out, backend=backend, device=device, **executor_options)
    loaded.export_dir = tmp  # the graphs' files live as long as the components (removed when collected)
    return loaded


def load_for_backend(path: str, backend: str, *, device="cpu", dtype=torch.float32) -> Components:
    """A graph runner's `load`: an export folder, or a diffusers folder exported now."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return load_exported(path, backend=backend, device=device)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        from ..loading import load_components
        return prepare_components(load_components(path, dtype=dtype), backend, device=device, dtype=dtype)
    read_manifest(path)  # raises the explanatory error
    raise AssertionError("unreachable")
