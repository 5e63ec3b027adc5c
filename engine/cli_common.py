"""What every `unclip` command shares: the help style, the model arguments, the checks made before any work
(device, dtype, backend, output paths) and opening the pipeline, and the PNG metadata that reproduces an image.

`add_model_args(parser)` gives a command --model/--preset, --device, --dtype and --backend with one default
model (the embedded `toy` cascade) and one wording; `open_pipeline(args)` checks them up front with a one-line
error, recognises an `unclip export` folder (its manifest.json) and picks the backend that runs it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile

# The `format` of an `unclip export` folder's manifest.json -> the backends that run it (the first is chosen
# when --backend is not given). tests/test_cli.py checks these names against export/onnx.py and export/native.py.
EXPORT_BACKENDS = {"unclip-onnx": ("onnxruntime", "tensorrt"), "unclip-native": ("native",)}
EXPORT_NAMES = {"unclip-onnx": "an ONNX export", "unclip-native": "a native (AOTInductor) export"}
DTYPES = ("fp32", "fp16", "bf16")
MAX_GUIDANCE = 100.0  # the range model folders may recommend (unclip.loading's _unclip_call_defaults check)


# --------------------------------------------------------------------------------------------- help style

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no "(default: None)" or "(default: False)" (such options
    say in their help what happens without them), lists shown as typed ("25 25 7")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; subcommand parsers (`add_subparsers`) are of this class too,
    so every command, whichever module adds it, gets the same style."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_args(p, *, model_help: str = "a diffusers-layout unCLIP folder (e.g. Karlo v1 alpha), or a folder "
                                          "written by `unclip export`", runtime: bool = True) -> None:
    """--model / --preset (one of them; neither: the embedded toy model) and, with `runtime`, --device,
    --dtype and --backend."""
    from .presets import PRESETS
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR", help=model_help)
    src.add_argument("--preset", choices=PRESETS, default=None,
                     help="toy: the small cascade trained on the shapes world that ships with the package; "
                          "tiny, karlo, dalle2: random weights of those shapes (default: toy)")
    if runtime:
        add_runtime_args(p)


def add_runtime_args(p) -> None:
    from .runner import runner_names
    p.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:N, mps, ...; checked before "
                                                   "anything is loaded")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="weights and activations; fp16/bf16 are for GPUs (on a CPU they run slower than fp32)")
    p.add_argument("--backend", default=None, choices=runner_names(),
                   help="the runner of the networks; `unclip info` lists those available here (default: torch, "
                        "or the backend that runs an `unclip export` folder given as --model)")


# --------------------------------------------------------------------------------------------- checks

def check_device(name: str):
    """The torch.device for --device, or ValueError (one line) when torch does not know it or this machine
    does not have it."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name torch knows (cpu, cuda, cuda:N, mps, ...)") \
            from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {name}: {build} (torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return device
    module = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    available = getattr(module, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {name}: no {device.type} device is available to this torch "
                         f"({torch.__version__}); use --device cpu")
    return device


def check_guidance(values) -> None:
    if values is None:
        return
    for v in values:
        if not 0.0 <= v <= MAX_GUIDANCE:
            raise ValueError(f"--guidance must be in [0, {MAX_GUIDANCE:g}] (1 = no guidance); got {v:g}")


def export_format(folder: str) -> str | None:
    """The `format` of `folder`'s manifest.json when it is an `unclip export` folder without a model_index.json
    (a diffusers folder), else None."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.isfile(os.path.join(folder, "model_index.json")) or not os.path.isfile(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            fmt = json.load(f).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if fmt in EXPORT_BACKENDS else None


def choose_backend(args) -> str:
    """--backend as given, or the backend an export folder needs; ValueError when they disagree."""
    fmt = export_format(args.model) if getattr(args, "model", None) else None
    if fmt is None:
        return args.backend or "torch"
    runs = EXPORT_BACKENDS[fmt]
    if args.backend is None:
        return runs[0]
    if args.backend not in runs:
        raise ValueError(f"--model {args.model} is {EXPORT_NAMES[fmt]} (manifest.json of `unclip export`): run it "
                         f"with --backend {' or '.join(runs)}, not {args.backend}, or give the diffusers folder "
                         "it was exported from")
    return args.backend


def check_backend(backend: str, device) -> None:
    from .runner import runner_class
    ok, reason = runner_class(backend).available(device)
    if not ok:
        raise ValueError(f"--backend {backend} is not available on {device}: {reason}")


def check_output_file(path: str, flag: str) -> None:
    """An output file of any kind: not a folder, and creatable (its folder, created when the file is written,
    or the nearest folder above it that exists, takes new files). ValueError naming `flag` otherwise."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    try:  # the real test (permissions, read-only or special file systems): create and remove a file there
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unclip-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write files in {folder} ({e.strerror or e})") from None


def output_paths(out: str, count: int, *, series: bool = False, sheet: bool = False) -> list[str]:
    """The PNG paths a command writes for `count` images (`out` itself for one image that is not part of a
    series, else NAME-0.png ...; with `sheet`, NAME-sheet.png last), checked before any work: a .png name,
    not a folder, and a place where this process can create files."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. --out {os.path.join(out, 'image.png')}")
    stem, ext = os.path.splitext(out)
    if ext.lower() != ".png":
        raise ValueError(f"--out {out}: the name must end in .png (the images are PNGs with their settings as "
                         "metadata)")
    check_output_file(out, "--out")
    many = series or count > 1
    paths = [f"{stem}-{i}{ext}" for i in range(count)] if many else [out]
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"--out {out}: {path} would be written but is a folder")
    return paths + ([f"{stem}-sheet{ext}"] if sheet and many else [])


# --------------------------------------------------------------------------------------------- the pipeline

def open_pipeline(args, *, runner_options: dict | None = None, say=None):
    """The pipeline of --model / --preset with --device, --dtype, --backend, all checked first. Sets
    `args.preset` (when no --model) and `args.backend` to what is used. Returns (pipeline, source), source
    being {"model": absolute path} or {"preset": name}."""
    from .pipeline import Pipeline
    from .presets import default_preset

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    device = check_device(args.device)
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model}: folder not found")
    chosen = choose_backend(args)
    if args.backend is None and chosen != "torch":
        say(f"unclip: {args.model} is {EXPORT_NAMES[export_format(args.model)]}: using --backend {chosen}")
    args.backend = chosen
    check_backend(chosen, device)
    if args.dtype in ("fp16", "bf16") and device.type == "cpu":
        say(f"unclip: note: --dtype {args.dtype} on a CPU runs slower than fp32 (measured 2.6x for fp16: most CPU "
            "kernels have no half-precision fast path); it is for GPUs")
    options = dict(device=device, dtype=args.dtype, backend=chosen, runner_options=runner_options)
    if args.model:
        return Pipeline.from_pretrained(args.model, **options), {"model": os.path.abspath(args.model)}
    args.preset = args.preset or default_preset()
    return Pipeline.from_preset(args.preset, seed=0, **options), {"preset": args.preset}


def folder_digest(folder: str) -> str:
    """sha256 over every file of a model folder (relative path and content, in sorted order)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def weights_digest(pipe) -> str:
    """sha256 over every network's parameters and buffers (names, dtypes, shapes, values)."""
    import torch
    h = hashlib.sha256()
    for name, net in sorted(pipe.components.networks().items()):
        if not isinstance(net, torch.nn.Module):
            continue
        for key, t in net.state_dict().items():
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(pipe, source: dict) -> str:
    """What identifies the weights: the folder's files (--model, and the toy preset's folder) or, for a
    random-weight preset, the weights themselves."""
    from .presets import TOY_PATH
    if "model" in source:
        return folder_digest(source["model"])
    if source.get("preset") == "toy":
        return folder_digest(TOY_PATH)
    return weights_digest(pipe)


def command_line(args, *, prompt: str | None = None) -> str:
    """The command as typed (`args.argv`, set by `unclip.cli.main`), the prompt shown as {prompt} so that the
    metadata holds it once."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    return shlex.join(["unclip"] + ["{prompt}" if prompt is not None and a == prompt else a for a in argv])


def run_facts(args, pipe, source: dict) -> dict:
    """The settings every image's metadata records besides its command's own: version, model, runner."""
    from . import __version__
    return {"unclip_version": __version__, **source, "model_sha256": model_digest(pipe, source),
            "backend": args.backend, "device": str(pipe.device), "dtype": args.dtype}


def open_image(path: str, name: str):
    """The image file `path` read whole into memory (PIL); OSError naming the argument when it is missing."""
    from PIL import Image
    if not os.path.isfile(path):
        raise OSError(f"{name}: image file not found: {path}")
    with Image.open(path) as image:
        image.load()
        return image.copy()


def save_png(image, path: str, metadata: dict) -> None:
    """Write one PNG atomically with `metadata` as JSON text under the key "unclip", and print its path."""
    from PIL.PngImagePlugin import PngInfo

    from .files import atomic_save_image
    info = PngInfo()
    info.add_text("unclip", json.dumps(metadata, ensure_ascii=False), zip=True)
    atomic_save_image(image, path, pnginfo=info)  # never a partial PNG, never the old one lost
    print(path)


def read_png_metadata(path: str) -> dict:
    """The "unclip" metadata of a PNG this package wrote; ValueError naming the file otherwise."""
    from PIL import Image
    if not os.path.isfile(path):
        raise ValueError(f"--from-png {path}: file not found")
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except OSError as e:
        raise ValueError(f"--from-png {path}: not an image ({e})") from None
    if "unclip" not in text:
        raise ValueError(f"--from-png {path}: the image has no 'unclip' metadata (not written by unclip)")
    try:
        data = json.loads(text["unclip"])
    except ValueError:
        raise ValueError(f"--from-png {path}: its 'unclip' metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"--from-png {path}: its 'unclip' metadata is not a JSON object")
    return data
