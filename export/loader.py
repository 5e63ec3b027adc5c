"""Build a `Components` whose networks run exported graphs (backends "onnxruntime" and "tensorrt").

`Pipeline.from_pretrained(OUT, backend=...)` lands here: an export folder (with `manifest.json`) is loaded
as is; a diffusers-layout folder, or torch `Components` given to `Pipeline(...)`, is first exported to a
temporary folder (slow for large models: export once with `unclip export` instead).
"""
from __future__ import annotations

import logging
import os
import tempfile

import torch

from ..config import Config, ConfigError
from ..loading import CALL_DEFAULTS_ENTRY, Components, SchedulerConfig, Upsampler, _model_classes, read_call_defaults
from .networks import BACKEND_NAMES, GRAPH_CLASSES, GraphNetwork, networks_of
from .onnx import CLIP_STATS_FILE, MANIFEST, export_onnx, read_manifest, resolve_dtype, verify_files

_log = logging.getLogger(__name__)


def _check_backend(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {backend!r}")


def load_exported(root: str, *, backend: str = "onnxruntime", device="cpu", providers: list[str] | None = None,
                  threads: int | None = None, verify_hashes: bool = False, tensorrt_options: dict | None = None
                  ) -> Components:
    """Load an export folder written by `export_onnx` / `unclip export`.

    backend "onnxruntime": one InferenceSession per graph (`providers`, `threads` pass through).
    backend "tensorrt": one engine per graph, built on first use and cached (see `unclip.export.tensorrt`;
    `tensorrt_options` pass through to `engine_executors`). Files are checked against the manifest's sizes
    (and sha256 with `verify_hashes`)."""
    _check_backend(backend)
    root = os.path.abspath(os.fspath(root))
    device = torch.device(device)
    manifest = read_manifest(root)
    verify_files(root, manifest, hashes=verify_hashes)
    source = os.path.join(root, MANIFEST)
    classes = _model_classes()
    nets = manifest["networks"]

    if backend == "onnxruntime":
        from .onnxruntime import OrtExecutor

        def executor(name):
            return OrtExecutor(os.path.join(root, *nets[name]["graph"].split("/")), device, providers=providers,
                               threads=threads)
    else:
        from .tensorrt import engine_executors
        executors = engine_executors(root, manifest, device=device, **(tensorrt_options or {}))

        def executor(name):
            return executors[name]

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
            built[name] = GRAPH_CLASSES[kind](name, config, executor(name), backend=backend, device=device, **extra)
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


def prepare_components(components: Components, backend: str, *, device="cpu", dtype=torch.float32) -> Components:
    """Components for `backend`: graph-backed ones pass through (after checking they belong to `backend`);
    torch ones are exported to a temporary folder in `dtype` and loaded from there."""
    _check_backend(backend)
    nets = networks_of(components)
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
    loaded = load_exported(out, backend=backend, device=device)
    loaded._export_dir = tmp  # the graphs' files live as long as the components (removed when collected)
    return loaded


def load_for_backend(path: str, backend: str, *, device="cpu", dtype=torch.float32) -> Components:
    """`Pipeline.from_pretrained` for graph backends: an export folder, or a diffusers folder exported now."""
    _check_backend(backend)
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return load_exported(path, backend=backend, device=device)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        from ..loading import load_components
        return prepare_components(load_components(path, dtype=dtype), backend, device=device, dtype=dtype)
    read_manifest(path)  # raises the explanatory error
    raise AssertionError("unreachable")
