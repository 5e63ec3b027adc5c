"""Draw the README's editing pictures (docs/editing-*.png) with the shipped toy model, CPU fp32, fixed seeds.

    python docs/make_pictures.py [--out docs]

Each picture is a sheet of 128-px tiles (the 64×64 images, pixels doubled) with a 4-px white gap:
inpainting (source, mask, result), outpainting (the input, the filled result), a negative prompt ("a circle"
without, then with, negative_prompt="red"), img2img (source; strength 0.3 with its own embedding; 0.6 and 1.0
with "a purple triangle") and re-ranking (four draws, then the one CLIP scores best). The toy-grid picture
comes from `benchmarks/caption_match.py --grid`, the toy example from the README's first command.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import unclip
from unclip import files, shapes

TILE, GAP = 128, 4


def tile(image) -> np.ndarray:
    """(TILE, TILE·w/h, 3) uint8 from an (H, W, 3) image in [0, 1] or uint8, or an (H, W) bool mask
    (nearest-neighbour scaling)."""
    a = np.asarray(image)
    if a.ndim == 2:  # a mask: white = repaint
        a = np.repeat(a[..., None], 3, axis=2).astype(np.float32)
    if a.dtype != np.uint8:
        a = np.round(a * 255).astype(np.uint8)
    scale = TILE // a.shape[0]
    return a.repeat(scale, 0).repeat(scale, 1)


def sheet(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tiles in rows (a row may hold pairs that touch: pass them joined), GAP-px white gaps around each."""
    width = max(sum(t.shape[1] + GAP for t in row) + GAP for row in rows)
    out = np.full((len(rows) * (TILE + GAP) + GAP, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        x = GAP
        for t in row:
            y = GAP + r * (TILE + GAP)
            out[y:y + TILE, x:x + t.shape[1]] = t
            x += t.shape[1] + GAP
    return out


def inpainting(pipe) -> np.ndarray:
    scenes = shapes.sample_scenes(4, 11)
    sources = shapes.render(scenes)
    masks, prompts = [], []
    for s, (colour, shape) in zip(scenes, (("blue", "triangle"), ("yellow", "square"), ("red", "circle"),
                                           ("green", "triangle"))):
        masks.append(shapes.box_mask(s, dilate=3))  # as tests/test_editing.py masks its scenes
        prompts.append(shapes.caption({"colour": colour, "shape": shape, "size": s.size, "position": s.position},
                                      ("colour", "shape", "size", "position")))
    out = pipe.inpaint(list(sources), masks, prompts, generator=torch.Generator().manual_seed(0), output_type="np",
                       progress=False).images
    cells = [[tile(sources[i]), tile(masks[i]), tile(out[i])] for i in range(4)]
    return sheet([cells[0] + cells[1], cells[2] + cells[3]])


def outpainting(pipe) -> np.ndarray:
    scenes = shapes.sample_scenes(4, 21)
    sources = shapes.render(scenes)
    prompts = [shapes.caption(s, ("colour", "shape", "size", "background")) for s in scenes]
    out = pipe.outpaint(list(sources[:, :, :48]), pad=(16, 0, 0, 0), prompt=prompts,
                        generator=torch.Generator().manual_seed(0), output_type="np", progress=False).images
    row = []
    for src, result in zip(sources, out):
        given = np.full((64, 64, 3), 255, np.uint8)
        given[:, 16:] = src[:, :48]  # the input, drawn where it lands on the canvas
        row += [tile(given), tile(result)]
    return sheet([row])


def negative(pipe) -> np.ndarray:
    rows = []
    for neg in (None, "red"):
        out = pipe("a circle", num_images_per_prompt=8, negative_prompt=neg, generator=torch.Generator().manual_seed(0),
                   output_type="np", progress=False).images
        rows.append([tile(im) for im in out])
    return sheet(rows)


def img2img(pipe) -> np.ndarray:
    scenes = shapes.sample_scenes(4, 31)
    sources = list(shapes.render(scenes))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    own = pipe.img2img(sources, strength=0.3, generator=gen(), output_type="np", progress=False).images
    prompted = {s: pipe.img2img(sources, "a purple triangle", strength=s, generator=gen(), output_type="np",
                                progress=False).images for s in (0.6, 1.0)}
    cells = [[tile(sources[i]), tile(own[i]), tile(prompted[0.6][i]), tile(prompted[1.0][i])] for i in range(4)]
    return sheet([cells[0] + cells[1], cells[2] + cells[3]])


def reranking(pipe) -> np.ndarray:
    prompt, k = "a small green triangle at the top", 4
    draws = pipe(prompt, num_images_per_prompt=k, generator=torch.Generator().manual_seed(0), output_type="np",
                 progress=False).images
    best = pipe(prompt, rerank=k, generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    return sheet([[tile(im) for im in draws] + [tile(best.images[0])]])


PICTURES = {"inpaint": inpainting, "outpaint": outpainting, "negative": negative, "img2img": img2img,
            "rerank": reranking}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="folder for the PNGs")
    p.add_argument("--only", nargs="+", choices=sorted(PICTURES), help="draw only these")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the toy's networks are small: one thread is fastest and gives stable pixels
    pipe = unclip.Pipeline.from_preset("toy")
    from PIL import Image
    for name in a.only or PICTURES:
        path = os.path.join(a.out, f"editing-{name}.png")
        files.atomic_save_image(Image.fromarray(PICTURES[name](pipe)), path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
