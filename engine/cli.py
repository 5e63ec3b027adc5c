"""The `unclip` command: `generate` images from a prompt, `info` about this installation."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unclip", description="unCLIP (DALL-E 2 / Karlo) inference engine")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a text prompt")
    g.add_argument("prompt")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers-layout unCLIP folder (e.g. Karlo v1 alpha)")
    src.add_argument("--preset", default=None,
                     help="toy (the default: a small cascade trained on the shapes world) | "
                          "random weights: tiny | karlo | dalle2")
    g.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, nargs=3, metavar=("PRIOR", "DECODER", "SUPER_RES"), default=(25, 25, 7))
    g.add_argument("--guidance", type=float, nargs=2, metavar=("PRIOR", "DECODER"), default=None,
                   help="guidance scales (default: the model's own; 4 8 for Karlo)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g.add_argument("--prior-candidates", type=int, default=1)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    g.add_argument("--backend", default="torch")
    g.add_argument("--out", default="unclip.png", help="output PNG; with -n > 1, NAME-0.png, NAME-1.png, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("info", help="versions, devices and available backends")
    for name in _PLUGINS:
        _plugin(name).add_parser(sub)
    return p


# Further subcommands live in their own modules, each with `add_parser(subparsers)` (which registers one or
# more commands) and `run(args) -> int` (called when `args.command` is one of its `COMMANDS`).
_PLUGINS: tuple[str, ...] = ("cli_export", "cli_bench", "cli_latent")


def _plugin(name: str):
    import importlib
    return importlib.import_module(f"{__package__}.{name}")


def _generate(args) -> int:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from .pipeline import Pipeline

    if args.model:
        pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
        source = {"model": os.path.abspath(args.model)}
    else:
        from .presets import default_preset
        preset = args.preset or default_preset()
        pipe = Pipeline.from_preset(preset, seed=0, device=args.device, dtype=args.dtype, backend=args.backend)
        source = {"preset": preset}
    guidance = args.guidance or [pipe.call_default("prior_guidance_scale"), pipe.call_default("decoder_guidance_scale")]
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, num_images_per_prompt=args.num_images, generator=generator,
                  prior_num_inference_steps=args.steps[0], decoder_num_inference_steps=args.steps[1],
                  super_res_num_inference_steps=args.steps[2], prior_guidance_scale=guidance[0],
                  decoder_guidance_scale=guidance[1], sampler=args.sampler, eta=args.eta,
                  prior_candidates=args.prior_candidates, progress=not args.quiet).images
    params = {"prompt": args.prompt, **source, "seed": args.seed, "steps": list(args.steps),
              "guidance": list(guidance), "sampler": args.sampler, "eta": args.eta,
              "prior_candidates": args.prior_candidates, "dtype": args.dtype, "backend": args.backend}
    stem, ext = os.path.splitext(args.out)
    ext = ext or ".png"
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else f"{stem}-{i}{ext}"
        info = PngInfo()
        info.add_text("unclip", json.dumps({**params, "index": i}))
        info.add_text("prompt", args.prompt)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path, pnginfo=info)
        print(path)
    return 0


def _info() -> int:
    import platform

    import torch

    from . import __version__
    lines = {"unclip": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        lines["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for mod in ("triton", "onnxruntime", "tensorrt"):
        try:
            lines[mod] = __import__(mod).__version__
        except Exception:
            lines[mod] = "not installed"
    usable = {"torch": True, "fast": torch.cuda.is_available() and lines["triton"] != "not installed",
              "onnxruntime": lines["onnxruntime"] != "not installed",
              "tensorrt": torch.cuda.is_available() and lines["tensorrt"] != "not installed"}
    lines["backends"] = [name for name, ok in usable.items() if ok]
    for k, v in lines.items():
        print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "info":
            return _info()
        for name in _PLUGINS:
            plugin = _plugin(name)
            if args.command in plugin.COMMANDS:
                return plugin.run(args)
        raise AssertionError(args.command)
    except (ValueError, TypeError, NotImplementedError, OSError) as e:
        print(f"unclip: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
