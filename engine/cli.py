"""The `unclip` command: `generate` images from a prompt, `info` about this installation."""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `unclip` and every subcommand (plugins included)."""
    from .cli_common import CommandParser, add_model_args
    p = CommandParser(prog="unclip", description="unCLIP (DALL-E 2 / Karlo) inference engine. Every command "
                      "uses the embedded toy model unless given --model or --preset; `unclip COMMAND --help` "
                      "shows its options and their defaults.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a text prompt",
                       description="Draw images of a text prompt: CLIP text encoder -> prior -> decoder -> "
                                   "upsamplers. Each PNG carries, as metadata, everything `--from-png` needs to "
                                   "draw it again.")
    g.add_argument("prompt", nargs="?", help="what to draw, e.g. \"a small red circle on the left\" (the toy "
                                             "model knows shapes-world captions); not with --from-png")
    g.add_argument("--from-png", metavar="FILE", help="draw an image written by `unclip generate` again, bit for "
                   "bit on the same machine: its prompt, model and every setting come from FILE's metadata "
                   "(only --out and --quiet may be given with it)")
    add_model_args(g)
    g.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt, drawn in one batch")
    g.add_argument("--seed", type=int, default=0, help="seed of the CPU torch.Generator (the same seed draws "
                                                       "the same images as diffusers' UnCLIPPipeline)")
    g.add_argument("--steps", type=int, nargs=3, metavar=("PRIOR", "DECODER", "SUPER_RES"), default=(25, 25, 7),
                   help="sampling steps of the prior, the decoder and the upsampler(s), each >= 1")
    g.add_argument("--guidance", type=float, nargs=2, metavar=("PRIOR", "DECODER"), default=None,
                   help="classifier-free guidance scales, each in [0, 100]; 1 and 1 turn guidance off "
                        "(default: the model's own: 4 2 for toy, 4 8 for Karlo)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: Karlo's strided DDPM; ddim: DDIM with --eta")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta, >= 0 (0 = deterministic)")
    g.add_argument("--prior-candidates", type=int, default=1,
                   help="prior embeddings drawn per image, keeping the one closest to the text (1..64; > 1 "
                        "draws extra noise, so seeds then differ from diffusers)")
    g.add_argument("--negative", default=None,
                   help="negative prompt: guidance steers away from it (replaces the empty caption)")
    g.add_argument("--rerank", type=int, default=1, metavar="K",
                   help="draw K images per image and keep the best by CLIP image-text score (1..64)")
    g.add_argument("--out", default="unclip.png", help="output PNG; with -n > 1: NAME-0.png, NAME-1.png, ...")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("info", help="versions, devices and available backends",
                   description="Print library versions, the devices torch sees and which backends run here "
                               "(and why the others do not).")
    for name in _PLUGINS:
        _plugin(name).add_parser(sub)
    return p


# Further subcommands live in their own modules, each with `add_parser(subparsers)` (which registers one or
# more commands) and `run(args) -> int` (called when `args.command` is one of its `COMMANDS`).
_PLUGINS: tuple[str, ...] = ("cli_export", "cli_bench", "cli_latent", "cli_tokenize", "cli_serve", "cli_edit")


def _plugin(name: str):
    import importlib
    return importlib.import_module(f"{__package__}.{name}")


# The options of `generate` that are not settings of the image: --from-png restores every other one.
_NOT_SETTINGS = ("command", "argv", "from_png", "out", "quiet")


def _from_png(args, parser_defaults: dict) -> None:
    """Fill `args` with the settings stored in args.from_png (a PNG `unclip generate` wrote)."""
    from . import __version__
    from .cli_common import read_png_metadata

    given = [k for k, v in vars(args).items()
             if k not in _NOT_SETTINGS and k in parser_defaults and v != parser_defaults[k]]
    if given:
        raise ValueError(f"--from-png takes every setting from the file; do not also give "
                         f"{', '.join(('--' + k.replace('_', '-')) if k != 'prompt' else 'a prompt' for k in given)}")
    meta = read_png_metadata(args.from_png)
    if meta.get("command") != "generate" or not isinstance(meta.get("settings"), dict):
        raise ValueError(f"--from-png {args.from_png}: not an image of `unclip generate` (its metadata has no "
                         "generate settings)")
    unknown = sorted(set(meta["settings"]) - set(parser_defaults))
    if unknown:
        raise ValueError(f"--from-png {args.from_png}: its settings {unknown} are unknown to this version "
                         f"({__version__}); it was made by unclip {meta.get('unclip_version')}")
    for key, value in meta["settings"].items():
        setattr(args, key, tuple(value) if key == "steps" else value)
    index = meta.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < int(args.num_images):
        raise ValueError(f"--from-png {args.from_png}: its metadata has no valid image index ({index!r})")
    args.reproduce = meta
    if meta.get("unclip_version") != __version__:
        print(f"unclip: note: {args.from_png} was made by unclip {meta.get('unclip_version')}, this is "
              f"{__version__}: the image may differ", file=sys.stderr)


def _generate(args, parser_defaults: dict) -> int:
    import torch

    from .cli_common import check_guidance, command_line, open_pipeline, output_paths, run_facts, save_png

    if args.from_png:
        _from_png(args, parser_defaults)
    elif args.prompt is None:
        raise ValueError("generate needs a prompt (or --from-png FILE)")
    check_guidance(args.guidance)
    reproduce = getattr(args, "reproduce", None)
    paths = output_paths(args.out, 1 if reproduce else args.num_images)  # before any work
    pipe, source = open_pipeline(args)
    if args.model:
        args.model = os.path.abspath(args.model)
    facts = run_facts(args, pipe, source)
    if reproduce and reproduce.get("model_sha256") != facts["model_sha256"]:
        print(f"unclip: note: the model's files differ from those {args.from_png} was made with (sha256 "
              f"{facts['model_sha256'][:12]}..., was {str(reproduce.get('model_sha256'))[:12]}...)", file=sys.stderr)
    args.guidance = list(args.guidance or [pipe.call_default("prior_guidance_scale"),
                                           pipe.call_default("decoder_guidance_scale")])
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, num_images_per_prompt=args.num_images, generator=generator,
                  prior_num_inference_steps=args.steps[0], decoder_num_inference_steps=args.steps[1],
                  super_res_num_inference_steps=args.steps[2], prior_guidance_scale=args.guidance[0],
                  decoder_guidance_scale=args.guidance[1], sampler=args.sampler, eta=args.eta,
                  prior_candidates=args.prior_candidates, progress=not args.quiet,
                  negative_prompt=args.negative, rerank=args.rerank).images
    # Everything needed to draw each image again (`--from-png`), the prompt once: the command line shows it
    # as {prompt}.
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                if k not in _NOT_SETTINGS and k in parser_defaults}
    meta = {"command": "generate", "command_line": command_line(args, prompt=args.prompt),
            **facts, "num_images": args.num_images, "settings": settings}
    if reproduce:
        index = reproduce["index"]
        save_png(images[index], paths[0], {**meta, "index": index, "from_png": os.path.abspath(args.from_png)})
        return 0
    for i, (image, path) in enumerate(zip(images, paths)):
        save_png(image, path, {**meta, "index": i})
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
    from .runner import availability
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = availability(device)
    lines["backends"] = [name for name, (ok, _) in status.items() if ok]
    for k, v in lines.items():
        print(f"{k}: {v}")
    for name, (ok, reason) in status.items():
        if not ok:
            print(f"  {name}: unavailable on {device}: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for the images' metadata
    try:
        if args.command == "generate":
            return _generate(args, vars(parser.parse_args(["generate"])))  # its defaults
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
