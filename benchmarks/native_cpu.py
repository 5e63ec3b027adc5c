"""Whole-call wall time on the CPU, one thread: backend "native" (the C++ loop over AOTInductor packages) vs
backend "torch" vs backend "onnxruntime" vs diffusers' UnCLIPPipeline, same weights, steps and seed, calls
interleaved in one process (native, torch, onnxruntime, diffusers, native, ...) so drift hits all equally.

Also: the FLOP floor, i.e. the call's arithmetic (counted with torch.utils.flop_counter over one torch call)
divided by this core's measured fp32 matmul rate (a 1024² sgemm, same thread count), and each backend's
time as a multiple of it. Prints medians with spread (min..max) and writes a JSON result.

    python benchmarks/native_cpu.py [--preset toy] [--batch 1 4] [--runs 7] [--json benchmarks/results/native_cpu.json]

The native and ONNX exports are compiled once into a temporary folder (the native one takes minutes).
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

import numpy as np
import torch


def matmul_rate(threads: int, n: int = 1024, runs: int = 20) -> float:
    """This core's fp32 matmul rate (FLOP/s): the arithmetic ceiling the networks' convolutions approach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)


def count_flops(pipe, call) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        call(pipe)
    return float(counter.get_total_flops())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--native", help="reuse this native export of the model (else compiled now, minutes)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import unclip
    from unclip.export.native import export_native

    from unclip.presets import TOY_PATH
    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "toy":
            model = TOY_PATH  # the shipped folder itself (fp16 weights, loaded in fp32 by every backend)
        else:
            model = os.path.join(tmp, "model")
            unclip.Pipeline.from_preset(args.preset, seed=0).save_pretrained(model)
        compile_s = None
        if args.native:
            native_dir = args.native
        else:
            t0 = time.perf_counter()
            native_dir = export_native(model, os.path.join(tmp, "native"), max_batch=max(8, 2 * max(args.batch)))
            compile_s = time.perf_counter() - t0
        pipes = {"native": unclip.Pipeline.from_pretrained(native_dir, backend="native"),
                 "torch": unclip.Pipeline.from_pretrained(model)}
        if not args.no_onnx:
            from unclip.export.onnx import export_onnx
            onnx_dir = export_onnx(model, os.path.join(tmp, "onnx"))
            pipes["onnxruntime"] = unclip.Pipeline.from_pretrained(onnx_dir, backend="onnxruntime",
                                                                   runner_options={"threads": args.threads})
        if not args.no_diffusers:
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
            from helpers import diffusers_unclip_pipeline  # the tests' way of building the peer from a folder
            pipes["diffusers"] = diffusers_unclip_pipeline(model)
            pipes["diffusers"].set_progress_bar_config(disable=True)

        prompts = ["a large red circle on the left", "a small blue square", "two green triangles",
                   "a yellow star on a black background"]
        results = {}
        for batch in args.batch:
            kw = dict(prompt=prompts[:batch] if batch <= len(prompts) else (prompts * batch)[:batch],
                      prior_num_inference_steps=args.steps[0], decoder_num_inference_steps=args.steps[1],
                      super_res_num_inference_steps=args.steps[2], output_type="np")

            def call(pipe):
                extra = {} if not isinstance(pipe, unclip.Pipeline) else {"progress": False}
                if not isinstance(pipe, unclip.Pipeline):  # diffusers takes the toy's guidance explicitly
                    extra.update(prior_guidance_scale=pipes["torch"].call_default("prior_guidance_scale"),
                                 decoder_guidance_scale=pipes["torch"].call_default("decoder_guidance_scale"))
                with torch.inference_mode():
                    return pipe(generator=torch.Generator().manual_seed(0), **kw, **extra).images

            ref = call(pipes["torch"])
            diffs = {name: float(np.abs(np.asarray(call(pipe)) - ref).max()) for name, pipe in pipes.items()}
            times = {name: [] for name in pipes}
            for _ in range(args.runs):
                for name, pipe in pipes.items():
                    t0 = time.perf_counter()
                    call(pipe)
                    times[name].append(time.perf_counter() - t0)
            flops = count_flops(pipes["torch"], call)
            rate = matmul_rate(args.threads)
            floor_s = flops / rate
            med = {k: statistics.median(v) for k, v in times.items()}
            results[f"batch{batch}"] = {
                "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
                "max_s": {k: max(v) for k, v in times.items()},
                "ratio_over_torch": {k: v / med["torch"] for k, v in med.items()},
                "times_floor": {k: v / floor_s for k, v in med.items()},
                "max_abs_image_diff_vs_torch": diffs, "flop": flops, "matmul_flop_per_s": rate, "floor_s": floor_s}
            r = results[f"batch{batch}"]
            print(f"batch {batch}: floor {floor_s:.2f} s ({flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s)")
            for name in pipes:
                print(f"  {name:<12} {med[name]:7.2f} s  [{r['min_s'][name]:.2f}..{r['max_s'][name]:.2f}]  "
                      f"×torch {r['ratio_over_torch'][name]:.2f}  ×floor {r['times_floor'][name]:.1f}  "
                      f"max|Δ| {diffs[name]:.1e}")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "unknown"
    b1 = results.get("batch1", {}).get("ratio_over_torch", {})
    goal = {"goal": "native <= 0.55x torch at batch 1 (at least onnxruntime's level)",
            "native_over_torch": b1.get("native"), "onnxruntime_over_torch": b1.get("onnxruntime"),
            "met": b1.get("native") is not None and b1["native"] <= 0.55
            and (b1.get("onnxruntime") is None or b1["native"] <= b1["onnxruntime"])}
    out = {"benchmark": "native_cpu", "preset": args.preset, "steps": list(args.steps), "runs": args.runs,
           "threads": args.threads, "compile_s": compile_s, "results": results, "goal": goal,
           "torch": torch.__version__, "python": platform.python_version(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "commit": commit,
           "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(json.dumps(goal))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
