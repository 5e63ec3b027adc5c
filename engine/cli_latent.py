"""`unclip vary`, `unclip interpolate`, `unclip edit`: the CLIP latent-space tools on the command line.

Every PNG carries its parameters as text metadata (key "unclip", JSON); a series (several images) also gets a
contact sheet, NAME-sheet.png, with the images side by side in order.
"""
from __future__ import annotations

import os

COMMANDS = ("vary", "interpolate", "edit")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _common(p, *, steps, guidance, out, guidance_help="decoder guidance scale, in [0, 100] (1 = no guidance)"):
    from .cli_common import add_model_args
    add_model_args(p, model_help="a diffusers-layout unCLIP folder with image_encoder/ (e.g. Karlo's "
                                 "image-variation release), or a folder written by `unclip export`")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU torch.Generator")
    p.add_argument("--steps", type=int, nargs=2, metavar=("DECODER", "SUPER_RES"), default=steps,
                   help="sampling steps of the decoder and the upsampler(s), each >= 1")
    p.add_argument("--guidance", type=float, default=guidance, help=guidance_help)
    p.add_argument("--out", default=out, help="output PNG; a series is written as NAME-0.png, NAME-1.png, ... "
                                              "plus NAME-sheet.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(sub) -> None:
    v = sub.add_parser("vary", help="variations of an image: its CLIP embedding decoded with new noise")
    v.add_argument("image", help="input image file")
    v.add_argument("-n", "--num-images", type=int, default=4, help="number of variations")
    v.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: Karlo's strided DDPM; ddim: DDIM with --eta")
    v.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    _common(v, steps=(25, 7), guidance=None, out="variation.png",
            guidance_help="decoder guidance scale, in [0, 100] (default: the model's own: 2 for toy, 8 for "
                          "Karlo)")

    i = sub.add_parser("interpolate", help="images along the slerp between two CLIP image embeddings")
    i.add_argument("start", help="an image file, or a prompt (embedded by the prior)")
    i.add_argument("end", help="an image file, or a prompt (embedded by the prior)")
    i.add_argument("--num", type=int, default=5, help="number of images, ends included")
    i.add_argument("--noise", choices=("fixed", "inverted"), default="fixed",
                   help="fixed: one decoder noise for all; inverted: slerp the images' DDIM-inverted noise too")
    i.add_argument("--prior-steps", type=int, default=25, help="prior steps for an end given as a prompt")
    i.add_argument("--prior-guidance", type=float, default=None,
                   help="prior guidance scale for a prompt end, in [0, 100] (default: the model's own, 4 for toy "
                        "and Karlo)")
    _common(i, steps=(25, 7), guidance=None, out="interpolation.png",
            guidance_help="decoder guidance scale, in [0, 100] (default: the model's own (2 for toy, 8 for "
                          "Karlo) with --noise fixed, 1 with --noise inverted)")

    e = sub.add_parser("edit", help="edit an image along a caption difference (a CLIP text diff)")
    e.add_argument("image", help="input image file")
    e.add_argument("--from", dest="from_caption", required=True, help="a caption of the image as it is")
    e.add_argument("--to", dest="to_caption", required=True, help="the caption it should move towards")
    e.add_argument("--thetas", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.375, 0.5],
                   help="positions along the edit, in [0, 1] (0 = the image itself)")
    _common(e, steps=(50, 7), guidance=1.0, out="edit.png",
            guidance_help="decoder guidance scale, in [0, 100]; 1 (no guidance) inverts and edits best")


def _endpoint(value: str, name: str):
    """An existing file is an image; a string that looks like an image file name but is missing is an error
    (a typo should not silently become a prompt); anything else is a prompt."""
    if os.path.isfile(value):
        from .cli_common import open_image
        return open_image(value, name), {"image": os.path.abspath(value)}
    if value.lower().endswith(IMAGE_EXTENSIONS):
        raise OSError(f"{name}: image file not found: {value}")
    return value, {"prompt": value}


def contact_sheet(images: list, columns: int | None = None, pad: int = 4, background=(255, 255, 255)):
    """The images (PIL, any sizes) in a grid, row by row, each cell the size of the largest image."""
    from PIL import Image
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    sheet = Image.new("RGB", (pad + columns * (cell_w + pad), pad + rows * (cell_h + pad)), background)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        sheet.paste(im.convert("RGB"), (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return sheet


def _write(images: list, paths: list[str], params: dict, extra: list[dict], *, sheet_first=None) -> None:
    """One PNG per image at `paths` (from cli_common.output_paths) and, when the last path is NAME-sheet.png,
    the contact sheet (optionally led by `sheet_first`, e.g. the input image)."""
    from .cli_common import save_png
    for k, (image, more, path) in enumerate(zip(images, extra, paths)):
        save_png(image, path, {**params, "index": k, **more})
    if len(paths) > len(images):
        tiles = list(images)
        if sheet_first is not None:
            size = images[0].size
            tiles = [sheet_first.convert("RGB").resize(size)] + tiles
        save_png(contact_sheet(tiles), paths[-1], {**params, "sheet": True})


def run(args) -> int:
    import torch

    from .cli_common import check_guidance, command_line, open_image, open_pipeline, output_paths, run_facts

    for name in ("guidance", "prior_guidance"):
        value = getattr(args, name, None)
        if value is not None:
            check_guidance([value])
    # Inputs and output paths first, before any model is loaded.
    count = {"vary": getattr(args, "num_images", 0), "interpolate": getattr(args, "num", 0),
             "edit": len(getattr(args, "thetas", ()))}[args.command]
    paths = output_paths(args.out, count, series=args.command != "vary", sheet=True)
    if args.command in ("vary", "edit"):
        image = open_image(args.image, "image")
    else:
        start, start_info = _endpoint(args.start, "start")
        end, end_info = _endpoint(args.end, "end")
    pipe, source = open_pipeline(args)
    generator = torch.Generator().manual_seed(args.seed)
    decoder_steps, sr_steps = args.steps
    common = {"command": args.command, "command_line": command_line(args), **run_facts(args, pipe, source),
              "seed": args.seed, "steps": list(args.steps)}

    if args.command == "vary":
        args.guidance = pipe.call_default("decoder_guidance_scale", args.guidance)
        out = pipe.variations(image, num_images_per_prompt=args.num_images, generator=generator,
                              decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=sr_steps,
                              decoder_guidance_scale=args.guidance, sampler=args.sampler, eta=args.eta,
                              progress=not args.quiet)
        params = {**common, "image": os.path.abspath(args.image), "num_images": args.num_images,
                  "guidance": args.guidance, "sampler": args.sampler, "eta": args.eta}
        _write(out.images, paths, params, [{}] * len(out.images), sheet_first=image)
        return 0

    if args.command == "interpolate":
        if args.guidance is None:  # the library's defaults, recorded as used
            args.guidance = pipe.call_default("decoder_guidance_scale") if args.noise == "fixed" else 1.0
        args.prior_guidance = pipe.call_default("prior_guidance_scale", args.prior_guidance)
        out = pipe.interpolate(start, end, args.num, noise=args.noise, generator=generator,
                               decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=sr_steps,
                               decoder_guidance_scale=args.guidance, prior_num_inference_steps=args.prior_steps,
                               prior_guidance_scale=args.prior_guidance, progress=not args.quiet)
        params = {**common, "start": start_info, "end": end_info, "num_images": args.num, "noise": args.noise,
                  "guidance": args.guidance, "prior_steps": args.prior_steps, "prior_guidance": args.prior_guidance}
        _write(out.images, paths, params, [{"theta": t} for t in out.thetas])
        return 0

    out = pipe.text_diff(image, args.from_caption, args.to_caption, args.thetas, generator=generator,
                         decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=sr_steps,
                         decoder_guidance_scale=args.guidance, progress=not args.quiet)
    params = {**common, "image": os.path.abspath(args.image), "from": args.from_caption, "to": args.to_caption,
              "num_images": len(args.thetas), "guidance": args.guidance}
    _write(out.images, paths, params, [{"theta": t} for t in out.thetas])
    return 0
