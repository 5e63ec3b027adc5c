"""Whole-call wall time on the CPU: backend "onnxruntime" (our exported graphs, ONNX Runtime's CPU provider)
vs backend "torch", same weights, steps, seed and thread count, one process.

The cascade is saved in the diffusers layout, exported with `unclip.export.export_onnx`, and loaded twice
(`Pipeline.from_pretrained(model)` and `Pipeline.from_pretrained(export, backend="onnxruntime")`), so the
sampling code is the same and only the networks' runtime differs. Calls alternate (onnxruntime, torch, ...)
so drift hits both equally; also times each network alone at the batch the pipeline uses. Prints medians,
ratios and a JSON line. Usage: python benchmarks/onnx_cpu.py [--preset tiny] [--runs 11] [--json OUT]
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


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--runs", type=int, default=11)
    p.add_argument("--steps", type=int, nargs=3, default=(25, 25, 7))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes (1 = steadier)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime

    import unclip
    from unclip.export.loader import load_exported
    from unclip.export.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        model, out = os.path.join(tmp, "model"), os.path.join(tmp, "onnx")
        unclip.Pipeline.from_preset(args.preset, seed=0).save_pretrained(model)
        t0 = time.perf_counter()
        export_onnx(model, out)
        export_s = time.perf_counter() - t0
        ref = unclip.Pipeline.from_pretrained(model)
        ort = unclip.Pipeline(load_exported(out, threads=args.threads), backend="onnxruntime")
        # Sessions hold the weights in memory: the folder may go now.

    kw = dict(prompt="a red circle on the left", prior_num_inference_steps=args.steps[0],
              decoder_num_inference_steps=args.steps[1], super_res_num_inference_steps=args.steps[2],
              output_type="np", progress=False)

    def call(pipe):
        return pipe(generator=torch.Generator().manual_seed(0), **kw).images

    a, b = call(ort), call(ref)  # warm-up, and a parity check so we time the same work
    max_diff = float(np.abs(a - b).max())
    times = {"onnxruntime": [], "torch": []}
    for _ in range(args.runs):
        for name, pipe in (("onnxruntime", ort), ("torch", ref)):
            t0 = time.perf_counter()
            call(pipe)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # Each network alone, at the batch a one-image call gives it (guidance doubles prior/decoder batches).
    rc, oc = ref.components, ort.components
    text = rc.text_encoder(rc.tokenizer(["a red circle", ""]).input_ids)
    d = rc.decoder.config
    ctx_len = rc.text_proj.config.clip_extra_context_tokens + text[1].shape[1]
    up = rc.upsamplers[0].first.config
    nets = {
        "text_encoder": (lambda c: c.text_encoder, (rc.tokenizer(["a red circle", ""]).input_ids,)),
        "prior": (lambda c: c.prior, (torch.randn(2, rc.prior.config.embedding_dim), torch.tensor(500), text[0],
                                      text[1], torch.ones(2, text[1].shape[1], dtype=torch.bool))),
        "decoder": (lambda c: c.decoder, (torch.randn(2, d.in_channels, d.sample_size, d.sample_size),
                                          torch.tensor(500), torch.randn(2, ctx_len, d.cross_attention_dim),
                                          torch.randn(2, d.time_embed_dim), torch.ones(2, ctx_len, dtype=torch.bool))),
        "super_res": (lambda c: c.upsamplers[0].first, (torch.randn(1, up.in_channels, up.sample_size, up.sample_size),
                                                        torch.tensor(500))),
    }
    per_net = {}
    with torch.inference_mode():
        for name, (pick, inputs) in nets.items():
            for c in (oc, rc):
                pick(c)(*inputs)  # warm-up
            per_net[name] = {"onnxruntime_ms": 1e3 * _median_time(lambda: pick(oc)(*inputs), 5 * args.runs),
                             "torch_ms": 1e3 * _median_time(lambda: pick(rc)(*inputs), 5 * args.runs)}
            per_net[name]["ratio"] = per_net[name]["onnxruntime_ms"] / per_net[name]["torch_ms"]

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {"benchmark": "onnx_cpu", "preset": args.preset, "steps": list(args.steps), "runs": args.runs,
              "threads": args.threads, "median_s": med, "ratio_onnxruntime_over_torch": med["onnxruntime"] / med["torch"],
              "per_network": per_net, "max_abs_image_diff": max_diff, "export_s": export_s,
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "commit": commit, "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"{args.preset}, {args.steps} steps, {args.threads} thread(s): onnxruntime {1e3 * med['onnxruntime']:.0f} ms, "
          f"torch {1e3 * med['torch']:.0f} ms, ratio {result['ratio_onnxruntime_over_torch']:.2f} "
          f"(max |image diff| {max_diff:.1e})")
    for name, r in per_net.items():
        print(f"  {name:<13} onnxruntime {r['onnxruntime_ms']:7.2f} ms  torch {r['torch_ms']:7.2f} ms  "
              f"ratio {r['ratio']:.2f}")
    print(json.dumps(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
