"""`unclip inpaint`, `unclip outpaint`, `unclip img2img`: editing images with the cascade's own decoder.

Every PNG carries its parameters as text metadata (key "unclip", JSON), like `unclip generate`.
"""
from __future__ import annotations

import os

COMMANDS = ("inpaint", "outpaint", "img2img")


def _common(p, *, strength: float, out: str) -> None:
    from .cli_common import add_model_args
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty caption in guidance)")
    p.add_argument("--strength", type=float, default=strength,
                   help="in (0, 1]: how far into the decoder's schedule to start (1 = from pure noise)")
    add_model_args(p)
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per input")
    p.add_argument("--seed", type=int, default=0, help="seed of the CPU generator every random draw comes from")
    p.add_argument("--steps", type=int, nargs=3, metavar=("PRIOR", "DECODER", "SUPER_RES"), default=(25, 25, 7),
                   help="sampling steps of the prior, the decoder and each upsampler")
    p.add_argument("--guidance", type=float, nargs=2, metavar=("PRIOR", "DECODER"), default=None,
                   help="guidance scales (default: the model's own; 4 8 for Karlo)")
    p.add_argument("--out", default=out, help="output PNG; with -n > 1, NAME-0.png, NAME-1.png, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(sub) -> None:
    i = sub.add_parser("inpaint", help="repaint the white region of a mask (RePaint with the model's decoder)")
    i.add_argument("image", help="input image file")
    i.add_argument("mask", help="mask image file: white = repaint, black = keep (any size, same aspect ratio)")
    i.add_argument("prompt", nargs="?", default=None, help="what to paint (default: the image's own embedding)")
    i.add_argument("--jumps", type=int, default=0, help="RePaint resampling jumps per decoder step")
    _common(i, strength=1.0, out="inpaint.png")

    o = sub.add_parser("outpaint", help="extend an image beyond its borders")
    o.add_argument("image", help="input image file")
    o.add_argument("prompt", nargs="?", default=None, help="what the whole picture shows")
    o.add_argument("--pad", type=int, nargs=4, required=True, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                   help="pixels to add on each side")
    o.add_argument("--jumps", type=int, default=0, help="RePaint resampling jumps per decoder step")
    _common(o, strength=1.0, out="outpaint.png")

    g = sub.add_parser("img2img", help="redraw an image from part-way through the decoder's schedule (SDEdit)")
    g.add_argument("image", help="input image file")
    g.add_argument("prompt", nargs="?", default=None, help="what to draw (default: the image's own embedding)")
    _common(g, strength=0.6, out="img2img.png")


def run(args) -> int:
    import torch

    from .cli_common import check_guidance, open_image, open_pipeline, output_paths, save_png

    check_guidance(args.guidance)
    paths = output_paths(args.out, args.num_images)  # before any work
    image = open_image(args.image, "image")
    mask = open_image(args.mask, "mask") if args.command == "inpaint" else None
    pipe, source = open_pipeline(args)
    guidance = args.guidance or [pipe.call_default("prior_guidance_scale"), pipe.call_default("decoder_guidance_scale")]
    call = dict(negative_prompt=args.negative, strength=args.strength, num_images_per_prompt=args.num_images,
                generator=torch.Generator().manual_seed(args.seed), prior_num_inference_steps=args.steps[0],
                decoder_num_inference_steps=args.steps[1], super_res_num_inference_steps=args.steps[2],
                prior_guidance_scale=guidance[0], decoder_guidance_scale=guidance[1], progress=not args.quiet)
    params = {"command": args.command, "image": os.path.abspath(args.image), "prompt": args.prompt,
              "negative_prompt": args.negative, "strength": args.strength, **source, "seed": args.seed,
              "steps": list(args.steps), "guidance": list(guidance), "dtype": args.dtype, "backend": args.backend}
    if args.command == "inpaint":
        images = pipe.inpaint(image, mask, args.prompt, resample_jumps=args.jumps, **call).images
        params.update(mask=os.path.abspath(args.mask), resample_jumps=args.jumps)
    elif args.command == "outpaint":
        images = pipe.outpaint(image, pad=tuple(args.pad), prompt=args.prompt, resample_jumps=args.jumps,
                               **call).images
        params.update(pad=list(args.pad), resample_jumps=args.jumps)
    else:
        images = pipe.img2img(image, args.prompt, **call).images
    for k, (im, path) in enumerate(zip(images, paths)):
        save_png(im, path, {**params, "index": k})
    return 0
