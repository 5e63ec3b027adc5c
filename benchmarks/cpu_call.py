"""Whole-call wall time on the CPU: our Pipeline vs diffusers' UnCLIPPipeline, same weights/steps/seed.

At small configs per-step overhead dominates, which is what a latency-sensitive user feels first. Runs
alternate (ours, theirs, ours, ...) in one process so drift hits both equally; prints the medians, their
ratio, and a JSON line. Usage: python benchmarks/cpu_call.py [--preset tiny] [--runs 15] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", help="tiny, or micro: tiny with 4x narrower U-Nets, so that "
                   "per-step framework overhead rather than convolution arithmetic dominates")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = steadier timings)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from helpers import diffusers_unclip_pipeline  # the tests' way of building the peer from our saved folder

    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "micro":
            from unclip.presets import build_components, preset_configs
            configs = preset_configs("tiny")
            configs["decoder"].update(block_out_channels=[8, 16], attention_head_dim=8, norm_num_groups=4,
                                      sample_size=8)
            configs["text_proj"].update(time_embed_dim=32)
            configs["super_res"][0].update(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16)
            unclip.Pipeline(build_components(configs, seed=0)).save_pretrained(tmp)
        else:
            unclip.Pipeline.from_preset(args.preset, seed=0).save_pretrained(tmp)
        ours = unclip.Pipeline.from_pretrained(tmp)
        theirs = diffusers_unclip_pipeline(tmp)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle on the left", prior_num_inference_steps=args.steps[0],
              decoder_num_inference_steps=args.steps[1], super_res_num_inference_steps=args.steps[2],
              output_type="np")

    def ours_call():
        return ours(generator=torch.Generator().manual_seed(0), progress=False, **kw).images

    def theirs_call():
        return theirs(generator=torch.Generator().manual_seed(0), **kw).images

    a, b = ours_call(), theirs_call()  # warm-up, and a parity check so we time the same work
    max_diff = float(abs(a - b).max())
    times = {"ours": [], "diffusers": []}
    for _ in range(args.runs):
        for name, fn in (("ours", ours_call), ("diffusers", theirs_call)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["ours"] / med["diffusers"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {"benchmark": "cpu_call", "preset": args.preset, "steps": list(args.steps), "runs": args.runs,
              "threads": args.threads, "median_s": med, "ratio_ours_over_diffusers": ratio,
              "max_abs_image_diff": max_diff, "torch": torch.__version__, "python": platform.python_version(),
              "cpu": platform.processor() or platform.machine(), "commit": commit,
              "date": time.strftime("%Y-%m-%d")}
    print(f"ours      median {med['ours'] * 1e3:8.1f} ms")
    print(f"diffusers median {med['diffusers'] * 1e3:8.1f} ms")
    print(f"ratio ours/diffusers = {ratio:.3f}  (goal <= 0.5)   max |Δ| image = {max_diff:.2e}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
