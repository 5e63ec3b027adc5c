"""Export a cascade for the native runtime: one AOTInductor package per network, plus a manifest.

    unclip export --model DIR|--preset NAME --format native --out OUT [--device cpu] [--max-batch 8]

Layout of `OUT`:

    manifest.json                     format, target (torch version, CPU instruction set / GPU arch), configs,
                                      schedulers, the facts the C++ cascade needs, sha256 of every file
    tokenizer/                        the tokenizer files (the native runtime takes token ids; Python tokenizes)
    text_encoder/model.pt2            torch.export + torch._inductor.aoti_compile_and_package
    prior/model.pt2, prior/clip_stats.f32   (clip_mean then clip_std, raw little-endian float32, for C++)
    text_proj/model.pt2, decoder/model.pt2, super_res_first/model.pt2, super_res_last/model.pt2, ...

Every package takes the same flat tensor inputs as the ONNX graphs (export/onnx.py `graph_specs`: the
adapters, the export-friendly attention/group-norm forms, token ids int32, timesteps float32 (B,), bool
masks) with a dynamic batch axis 1..max_batch; guidance doubles a stage's batch and prior candidates
multiply it, so `max_batch` bounds prompts × images × candidates × 2.

A package holds machine code for one target: the CPU vector instruction set inductor picked (e.g. AVX-512)
or the GPU architecture, and one torch version's C shim. The manifest records both; the C++ loader refuses
a folder compiled for another torch or for instructions this CPU lacks, naming both values.

Writing is atomic (a staging sibling swapped into place at the end, see unclip.files): an interrupted or
failed export leaves `OUT` as it was.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from typing import Callable

import torch

from ..config import Config, ConfigError
from ..files import discard_dir, make_staging_dir, replace_dir
from ..weights import write_json
from .onnx import export_friendly, graph_specs, sha256_file
from .onnx import prepare_out as onnx_prepare_out

FORMAT = "unclip-native"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACKAGE_FILE = "model.pt2"
CLIP_STATS_FILE = "clip_stats.f32"
DTYPES = {"fp32": torch.float32}  # the C++ cascade samples in float32 (the Python backends' fp32 path)
DEFAULT_MAX_BATCH = 8
MAX_BATCH_LIMIT = 4096

_log = logging.getLogger(__name__)


class NativeExportError(RuntimeError):
    """The native export could not be completed (the output folder was left untouched)."""


# ------------------------------------------------------------------------------------------------ target

def _cpu_flags_of(isa) -> list[str]:
    """The /proc/cpuinfo flags the compiler flags of inductor's vector ISA need ("-mavx512vnni" ->
    "avx512_vnni", "-mamx-tile" -> "amx_tile")."""
    flags = []
    for word in str(getattr(isa, "_arch_flags", "") or "").split():
        if not word.startswith("-m") or word.startswith("-march") or "=" in word:
            continue
        name = word[2:].replace("-", "_")
        name = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
                "avx512vbmi": "avx512vbmi"}.get(name, name)
        if name not in flags:
            flags.append(name)
    return flags


def target_facts(device: torch.device) -> dict:
    """What the packages are compiled for: device, torch version, CPU vector ISA (+ the cpuinfo flags it
    needs) or CUDA architecture."""
    facts = {"device": device.type, "torch": torch.__version__, "cpu_isa": "", "cpu_flags": [], "cuda_arch": None}
    if device.type == "cpu":
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        isa = pick_vec_isa()
        facts["cpu_isa"] = str(isa) if isa else "none"
        facts["cpu_flags"] = _cpu_flags_of(isa) if isa else []
        facts["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    else:
        major, minor = torch.cuda.get_device_capability(device)
        facts["cuda_arch"] = f"sm_{major}{minor}"
    return facts


def check_target(manifest: dict, root: str) -> None:
    """ConfigError unless this torch and this machine can run the packages (both values named)."""
    target = manifest["target"]
    path = os.path.join(root, MANIFEST)
    if target["torch"] != torch.__version__:
        raise ConfigError(f"{path}: the packages were compiled for torch {target['torch']}, this is torch "
                          f"{torch.__version__} (export again with this torch)")
    if target["device"] == "cpu":
        have = _proc_cpu_flags()
        missing = [f for f in target["cpu_flags"] if have is not None and f not in have]
        if missing:
            raise ConfigError(f"{path}: the packages were compiled for the CPU instruction set "
                              f"{target['cpu_isa']!r}, which needs CPU flags {missing} that this CPU lacks "
                              "(export again on this machine)")


def _proc_cpu_flags() -> set | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------ export

def _file_entries(root: str, folder: str) -> dict:
    out = {}
    for dirpath, _, names in os.walk(os.path.join(root, folder)):
        for n in sorted(names):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            out[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    return out


def _shape_of(name: str, t: torch.Tensor) -> list:
    return ["batch"] + [int(s) for s in t.shape[1:]]


_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32",
                      torch.int64: "int64", torch.bool: "bool"}


def _compile(spec, path: str, max_batch: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    args = tuple(spec.inputs.values())
    with export_friendly(spec.module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
        program = torch.export.export(spec.adapter.eval(), args, dynamic_shapes=tuple({0: batch} for _ in args))
        torch._inductor.aoti_compile_and_package(program, package_path=path)


def check_max_batch(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 2 <= max_batch <= MAX_BATCH_LIMIT:
        raise ValueError(f"max_batch must be an int in 2..{MAX_BATCH_LIMIT}; got {max_batch!r}")
    return max_batch


def prepare_out(out, overwrite: bool) -> str:
    """`out` refused (before any work) if it holds something other than a native export (see onnx.prepare_out)."""
    return onnx_prepare_out(out, overwrite, kind="native")


def export_native(source, out, *, device="cpu", dtype="fp32", max_batch: int = DEFAULT_MAX_BATCH,
                  overwrite: bool = False, progress: Callable[[str], None] | None = None, bar: bool = True) -> str:
    """Compile every network of a cascade into an AOTInductor package under `out`; returns its absolute path.

    source: a diffusers-layout folder or torch `Components` (fp32). device: "cpu" (or "cuda" where CUDA
    torch is present). max_batch: the largest network batch the packages accept, 2..4096 (guidance
    doubles it). progress: called with a line per network; bar: a tqdm bar over the networks.
    Raises ConfigError (unsupported config, before anything is written), NativeExportError, OSError;
    on any failure `out` is left as it was. Compiling takes a while: ~2.5 min for the tiny preset on 2 cores.
    """
    from ..loading import Components
    if dtype not in DTYPES and dtype is not torch.float32:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} for the native runtime; got {dtype!r}")
    max_batch = check_max_batch(max_batch)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: this torch has no CUDA device (it is a CPU build or no GPU is visible)")
    out = prepare_out(out, overwrite)
    say = progress or (lambda line: _log.info(line))

    if isinstance(source, Components):
        components = source
    elif isinstance(source, (str, os.PathLike)):
        from ..loading import load_components
        components = load_components(os.fspath(source), device=device, dtype=torch.float32)
    else:
        raise TypeError(f"source must be a model folder or a Components; got {type(source).__name__}")
    if components.prior is None:
        raise ConfigError("the native runtime samples text-to-image cascades; this one has no prior")
    specs = [s for s in graph_specs(components, torch.float32) if s.kind != "image_encoder"]
    for spec in specs:
        p = next(spec.module.parameters())
        if p.dtype != torch.float32:
            raise ValueError(f"components.{spec.name} is {p.dtype}; the native export needs float32 components")
        if p.device.type != device.type:
            raise ValueError(f"components.{spec.name} is on {p.device}, the export targets {device}")

    tmp = make_staging_dir(out)
    try:
        networks = {}
        iterator = specs
        if bar:
            from tqdm.auto import tqdm
            iterator = tqdm(specs, desc="compiling (AOTInductor)", unit="network", leave=False)
        for spec in iterator:
            say(f"compiling {spec.name} ...")
            folder = os.path.join(tmp, spec.name)
            os.makedirs(folder, exist_ok=True)
            try:
                _compile(spec, os.path.join(folder, PACKAGE_FILE), max_batch)
            except (OSError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # the compiler's own failures: say which network
                raise NativeExportError(f"{spec.name}: AOTInductor compile failed: {type(e).__name__}: {e}") from e
            if spec.kind == "prior":
                stats = torch.cat([spec.module.clip_mean.detach().float().cpu().reshape(-1),
                                   spec.module.clip_std.detach().float().cpu().reshape(-1)])
                with open(os.path.join(folder, CLIP_STATS_FILE), "wb") as f:
                    f.write(stats.numpy().astype("<f4").tobytes())
            networks[spec.name] = {
                "kind": spec.kind,
                "config": spec.module.config.to_dict(),
                "package": f"{spec.name}/{PACKAGE_FILE}",
                "inputs": [{"name": k, "dtype": _TORCH_DTYPE_NAMES[v.dtype], "shape": _shape_of(k, v)}
                           for k, v in spec.inputs.items()],
                "outputs": list(spec.outputs),
                "files": _file_entries(tmp, spec.name),
            }
        tok = components.tokenizer
        tok.save(os.path.join(tmp, "tokenizer"))
        empty = tok([""])
        upsamplers = []
        for i, up in enumerate(components.upsamplers):
            prefix = "super_res" if i == 0 else f"super_res_{i + 1}"
            cfg = up.first.config
            upsamplers.append({"name": up.name, "first": f"{prefix}_first",
                               "last": f"{prefix}_last" if up.last is not up.first else f"{prefix}_first",
                               "scheduler": up.scheduler.to_dict(), "sample_size": _size(cfg.sample_size),
                               "channels": int(cfg.in_channels) // 2})
        tp = components.text_proj.config
        dec = components.decoder.config
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": "fp32",
            "compiler": "torch._inductor.aoti_compile_and_package",
            "target": target_facts(device),
            "max_batch": max_batch,
            "versions": _versions(),
            "tokenizer": {"folder": "tokenizer", "model_max_length": int(tok.model_max_length),
                          "empty_input_ids": [int(v) for v in empty.input_ids[0].tolist()],
                          "empty_attention_mask": [int(v) for v in empty.attention_mask[0].tolist()],
                          "files": _file_entries(tmp, "tokenizer")},
            "networks": networks,
            "cascade": {
                "prior_embedding_dim": int(components.prior.config.embedding_dim),
                "prior_scheduler": components.prior_scheduler.to_dict(),
                "decoder_scheduler": components.decoder_scheduler.to_dict(),
                "decoder_sample_size": _size(dec.sample_size),
                "decoder_in_channels": int(dec.in_channels),
                "clip_extra_context_tokens": int(tp.clip_extra_context_tokens),
                "clip_stats": f"prior/{CLIP_STATS_FILE}",
                "upsamplers": upsamplers,
            },
            "call_defaults": dict(components.call_defaults),
        }
        write_json(os.path.join(tmp, MANIFEST), manifest)
        replace_dir(tmp, out)
    except BaseException:
        discard_dir(tmp)
        raise
    say(f"wrote {out}")
    return out


def _size(size) -> int:
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _versions() -> dict:
    import platform

    from .. import __version__
    return {"unclip": __version__, "python": platform.python_version(), "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------- reading

def read_manifest(root) -> dict:
    """The validated manifest of a native export folder (ConfigError naming the file and key otherwise)."""
    root = os.fspath(root)
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ConfigError(f"{root}: folder not found")
    if not os.path.isfile(path):
        raise ConfigError(f"{root}: not a native export (no {MANIFEST}); create one with "
                          f"`unclip export --model DIR --format native --out {root}`")
    cfg = Config.from_file(path)
    cfg.expect("format", (FORMAT,))
    version = cfg.get("format_version", types=int)
    if version != FORMAT_VERSION:
        raise cfg.error("format_version", f"= {version} is not supported (this version reads {FORMAT_VERSION})")
    cfg.get("dtype", types=str, choices=tuple(DTYPES))
    cfg.get("max_batch", types=int)
    cfg.get("target", types=dict)
    networks = cfg.get("networks", types=dict)
    for required in ("text_encoder", "prior", "text_proj", "decoder"):
        if required not in networks:
            raise cfg.error("networks", f"has no '{required}' package")
    return cfg.data


def verify_files(root: str, manifest: dict, *, hashes: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256 when `hashes`); ConfigError names it."""
    entries = dict(manifest["tokenizer"]["files"])
    for net in manifest["networks"].values():
        entries.update(net["files"])
    for rel, meta in entries.items():
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing (listed in {MANIFEST}; the export is incomplete, export again)")
        size = os.path.getsize(path)
        if size != meta["bytes"]:
            raise ConfigError(f"{path} has {size} bytes, {MANIFEST} says {meta['bytes']} (corrupt or modified)")
        if hashes:
            got = sha256_file(path)
            if got != meta["sha256"]:
                raise ConfigError(f"{path}: sha256 {got} does not match {MANIFEST}'s {meta['sha256']} "
                                  "(corrupt or modified; export again)")


def load_components(root: str, cascade, *, device="cpu"):
    """`Components` whose networks call the native runtime's packages (`cascade`: an `unclip._native.Cascade`
    loaded from `root`), with the torch configs the cascade core reads."""
    from ..loading import CALL_DEFAULTS_ENTRY, Components, SchedulerConfig, Upsampler, read_call_defaults
    from ..models.clip import CLIPTextModelWithProjection
    from ..models.prior import PriorTransformer
    from ..models.text_proj import TextProj
    from ..models.unet import ConditionalUNet, SuperResUNet
    from ..tokenizer import CLIPTokenizer
    from .networks import GRAPH_CLASSES

    config_classes = {"text_encoder": CLIPTextModelWithProjection, "prior": PriorTransformer, "text_proj": TextProj,
                      "decoder": ConditionalUNet, "super_res": SuperResUNet}
    manifest = read_manifest(root)
    source = os.path.join(root, MANIFEST)
    nets = manifest["networks"]
    built = {}

    def network(name):
        if name not in built:
            net = nets[name]
            kind = net["kind"]
            config = config_classes[kind].config_class.from_config(Config(net["config"], f"{source}: networks.{name}.config"))
            extra = {}
            if kind == "prior":
                extra = {"clip_mean": cascade.clip_mean, "clip_std": cascade.clip_std}
            built[name] = GRAPH_CLASSES[kind](name, config, NativeExecutor(cascade, name, net), backend="native",
                                              device=device, **extra)
        return built[name]

    def scheduler(key, data):
        return SchedulerConfig.from_config(Config(data, f"{source}: {key}"))

    cascade_facts = manifest["cascade"]
    upsamplers = [Upsampler(u["name"], network(u["first"]), network(u["last"]),
                            scheduler(f"cascade.upsamplers.{u['name']}.scheduler", u["scheduler"]))
                  for u in cascade_facts["upsamplers"]]
    components = Components(
        tokenizer=CLIPTokenizer.from_folder(os.path.join(root, manifest["tokenizer"]["folder"])),
        text_encoder=network("text_encoder"), text_proj=network("text_proj"), decoder=network("decoder"),
        decoder_scheduler=scheduler("cascade.decoder_scheduler", cascade_facts["decoder_scheduler"]),
        upsamplers=upsamplers, prior=network("prior"),
        prior_scheduler=scheduler("cascade.prior_scheduler", cascade_facts["prior_scheduler"]),
        call_defaults=read_call_defaults(Config({CALL_DEFAULTS_ENTRY: manifest.get("call_defaults", {})},
                                                f"{source}: call_defaults")),
    )
    components.source = root
    return components


_DTYPES_BY_NAME = {v: k for k, v in _TORCH_DTYPE_NAMES.items()}


class NativeExecutor:
    """The executor interface of `unclip.export.networks` (inputs by name -> outputs by name) over one
    package of the native runtime."""

    def __init__(self, cascade, name: str, entry: dict):
        self.cascade, self.name = cascade, name
        self.inputs = {i["name"]: _DTYPES_BY_NAME[i["dtype"]] for i in entry["inputs"]}
        self.outputs = list(entry["outputs"])

    def run(self, feeds: dict) -> dict:
        args = [feeds[n].to(dtype=d).contiguous() for n, d in self.inputs.items()]
        return dict(zip(self.outputs, self.cascade.call(self.name, args)))


# ------------------------------------------------------------------------------------------------ caching

def cache_root() -> str:
    """Where exports of diffusers folders are cached: $UNCLIP_CACHE/native, else ~/.cache/unclip/native."""
    base = os.environ.get("UNCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unclip")
    return os.path.join(base, "native")


def cache_key(model_dir: str, device) -> str:
    """sha256 over the folder's files (paths and content hashes), the torch version and the target ISA."""
    h = hashlib.sha256()
    root = os.path.abspath(os.fspath(model_dir))
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            full = os.path.join(dirpath, n)
            h.update(f"{os.path.relpath(full, root)}\0{sha256_file(full)}\n".encode())
    facts = target_facts(torch.device(device))
    h.update(json.dumps({k: facts[k] for k in ("device", "torch", "cpu_isa", "cuda_arch")}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def cached_export(model_dir: str, *, device="cpu", max_batch: int = DEFAULT_MAX_BATCH,
                  progress: Callable[[str], None] | None = None) -> str:
    """The native export of a diffusers folder, compiled once into the cache and reused afterwards."""
    key = cache_key(model_dir, device)
    out = os.path.join(cache_root(), f"{key}-b{max_batch}")
    if os.path.isfile(os.path.join(out, MANIFEST)):
        return out
    say = progress or (lambda line: _log.warning(line))
    say(f"compiling {model_dir} for the native runtime into {out} (once; reused next time)")
    return export_native(model_dir, out, device=device, max_batch=max_batch, progress=progress)

