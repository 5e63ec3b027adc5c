"""Caption match of the toy cascade: generate one image per prompt with fixed seeds, judge each image by pixel
analysis (unclip.shapes.judge), and report, per attribute the prompt names, how often the image has it.

Also reports diversity (attributes a caption leaves free should vary across seeds) and, when the pipeline
has an image tower, variations (colour and shape kept). tests/test_toy.py checks text diffs and interpolation.

    python benchmarks/caption_match.py                       # toy preset, 240 prompts, default steps
    python benchmarks/caption_match.py --backend torch onnxruntime          # each later backend vs the first
    python benchmarks/caption_match.py --n 48 --backend torch fast --device cuda --dtype fp16 --json out.json
    python benchmarks/caption_match.py --rerank 4 --no-extras        # keep the best of 4 by CLIP score
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import unclip
from unclip import shapes


def diversity(pipe, call, prompt: str = "a red circle", n: int = 16, seed: int = 1234) -> dict:
    """Judge `n` images of one caption (one generator): distinct values of each attribute it leaves free."""
    out = pipe(prompt, num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type="np",
               progress=False, **call)
    judged = shapes.judge_batch(np.round(out.images * 255).astype(np.uint8))
    named = shapes.parse_caption(prompt)
    result = {"prompt": prompt, "images": n}
    for attr in shapes.ATTRIBUTES:
        values = [getattr(j, attr) for j in judged]
        if attr in named:
            result[f"{attr}_match"] = sum(v == named[attr] for v in values) / n
        else:
            result[f"{attr}_distinct"] = sorted({str(v) for v in values})
    return result


def variations_check(pipe, decoder_steps: int, sr_steps: int, n: int = 48, seed: int = 99) -> dict | None:
    if not hasattr(pipe, "variations") or pipe.components.image_encoder is None:
        return None
    scenes = shapes.sample_scenes(n, seed)
    images = [shapes.render(s) for s in scenes]
    out = pipe.variations(images, generator=torch.Generator().manual_seed(seed), output_type="np", progress=False,
                          decoder_num_inference_steps=decoder_steps, super_res_num_inference_steps=sr_steps)
    judged = shapes.judge_batch(np.round(out.images * 255).astype(np.uint8))
    return {a: float(np.mean([getattr(j, a) == getattr(s, a) for s, j in zip(scenes, judged)]))
            for a in shapes.ATTRIBUTES}


def measure(a, backend: str):
    """One backend's caption match over the benchmark prompts: (pipeline, report, uint8 images)."""
    if a.model:
        pipe = unclip.Pipeline.from_pretrained(a.model, device=a.device, dtype=a.dtype, backend=backend)
    else:
        pipe = unclip.Pipeline.from_preset(a.preset, device=a.device, dtype=a.dtype, backend=backend)
    guidance = a.guidance or [pipe.call_default("prior_guidance_scale"), pipe.call_default("decoder_guidance_scale")]
    call = dict(prior_num_inference_steps=a.steps[0], decoder_num_inference_steps=a.steps[1],
                super_res_num_inference_steps=a.steps[2], prior_guidance_scale=guidance[0],
                decoder_guidance_scale=guidance[1])
    if a.rerank > 1:
        call["rerank"] = a.rerank
    prompts = shapes.benchmark_prompts(a.n, a.seed)
    start = time.perf_counter()
    result = shapes.caption_match(pipe, prompts, seed=a.seed, batch_size=a.batch, **call)
    seconds = time.perf_counter() - start
    report = {"model": a.model or f"preset:{a.preset}", "backend": backend, "device": a.device, "dtype": a.dtype,
              "prompts": a.n, "seed": a.seed, "batch": a.batch, "steps": list(a.steps), "guidance": list(guidance),
              "accuracy": result["accuracy"], "counts": result["counts"], "seconds": round(seconds, 1),
              "found": float(np.mean([j.found for j in result["judgements"]]))}
    report["rerank"] = a.rerank
    print(f"caption match over {a.n} prompts ({report['model']}, {backend}, {a.device}, {a.dtype}, "
          f"steps {tuple(a.steps)}, guidance {tuple(guidance)}, rerank {a.rerank}): {seconds:.0f}s")
    for attr, acc in result["accuracy"].items():
        print(f"  {attr:<10} {100 * acc:5.1f} %  ({result['counts'][attr]} prompts)")
    report["call"] = call
    return pipe, report, result["images"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers-layout folder (default: the toy preset)")
    src.add_argument("--preset", default="toy")
    p.add_argument("--n", type=int, default=240, help="number of prompts (shapes.benchmark_prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7), metavar=("PRIOR", "DECODER", "SUPER_RES"))
    p.add_argument("--guidance", type=float, nargs=2, default=None, metavar=("PRIOR", "DECODER"),
                   help="default: the model's own guidance scales")
    p.add_argument("--backend", nargs="+", default=["torch"],
                   help="one or more backends; each later one is compared with the first, in points")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--rerank", type=int, default=1, metavar="K",
                   help="draw K images per prompt and keep the best by CLIP image-text score (rerank=K)")
    p.add_argument("--no-extras", action="store_true", help="skip the diversity and variations checks")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--grid", help="save the first 64 images as one PNG here")
    a = p.parse_args(argv)

    reports = {}
    for backend in a.backend:
        pipe, report, images = measure(a, backend)
        reports[backend] = report
        if backend == a.backend[0] and not a.no_extras:
            call = report["call"]
            report["diversity"] = diversity(pipe, call)
            print(f"diversity: {report['diversity']}")
            report["variations"] = variations_check(pipe, a.steps[1], a.steps[2])
            if report["variations"] is not None:
                print(f"variations keep: {report['variations']}")
        if backend == a.backend[0] and a.grid:
            from PIL import Image
            ims = images[:64]
            rows = [np.concatenate(list(ims[r:r + 8]), 1) for r in range(0, len(ims) - len(ims) % 8, 8)]
            Image.fromarray(np.concatenate(rows, 0)).save(a.grid)
        del pipe
    first = a.backend[0]
    for backend in a.backend[1:]:  # the bar: every backend within 2 points of the first (torch)
        delta = {attr: round(100 * (acc - reports[first]["accuracy"][attr]), 1)
                 for attr, acc in reports[backend]["accuracy"].items()}
        reports[backend]["points_vs_" + first] = delta
        print(f"{backend} vs {first}, points: {delta}  (max |Δ| {max(abs(v) for v in delta.values())})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=2)  # {backend: report}
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
