"""Time the Triton kernels against PyTorch at the Karlo shapes; write JSON into benchmarks/results/.

    python benchmarks/kernels.py                 # fp16, every shape, default kernel configs
    python benchmarks/kernels.py --sweep         # also time alternative block sizes / warps per shape
    python benchmarks/kernels.py --only attention --dtype bf16 --iters 50

Peers. Attention: F.scaled_dot_product_attention pinned to each SDPA backend (flash, memory-efficient,
cuDNN, math; a backend that rejects a shape or mask is listed as unsupported), and the `torch` backend's
own call (unclip.models.layers.attention_reference, where PyTorch picks the backend). Group-norm: the
unfused PyTorch chain (F.group_norm, then ·(1+scale)+shift, then F.silu), and a plain tensor copy of the
same size as the bandwidth yardstick.

Method (docs/architecture.md, "Performance method"). Each case is timed on the GPU timeline with CUDA events around CUDA-graph replays of
`--reps` back-to-back calls (so Python launch overhead, which the `fast` backend's CUDA graphs also remove,
is not counted), median over `--iters` replays after warm-up. Consecutive calls rotate over enough input
copies (>= 2x the L2 size) that each call reads its inputs from DRAM, not from a previous call's L2.
Correctness is checked at every shape before timing (max relative error vs. the fp32 reference).
Throughput: attention in TFLOP/s counting 4·D FLOPs per visible (query, key) pair; group-norm in GB/s
counting the minimum traffic, one read and one write of the activation.

Karlo shapes (docs/architecture.md): decoder self+context attention at 64/32/16/8 resolution (heads 5/10/15/20 of
dim 64, keys = 81 context tokens + the pixels, batch 2 for CFG, with and without the text padding mask);
prior 81-token causal attention (32 heads, batch 2, causal + padding mask); CLIP text 77-token causal (12
heads, batch 2). Group-norm (32 groups, SiLU, with and without scale-shift, NCHW and channels-last): the
super-resolution U-Net at batch 1 from 256x256x320 down the pyramid (128x128x640, 64x64x960, 32x32x1280),
and the decoder at batch 2 (64x64x320 ... 8x8x1280).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONTEXT_TOKENS = 81  # 77 text tokens + 4 extra tokens from text_proj


# --------------------------------------------------------------------------------------------- shapes

def attention_cases():
    cases = []
    for res, heads in ((64, 5), (32, 10), (16, 15), (8, 20)):
        for masked in (False, True):
            cases.append(dict(name=f"decoder {res}x{res} self+context" + (" +mask" if masked else ""),
                              batch=2, heads=heads, len_q=res * res, len_k=res * res + CONTEXT_TOKENS, dim=64,
                              causal=False, mask="context" if masked else None))
    cases.append(dict(name="prior 81 causal +mask", batch=2, heads=32, len_q=81, len_k=81, dim=64, causal=True,
                      mask="tail"))
    cases.append(dict(name="prior 81 causal", batch=2, heads=32, len_q=81, len_k=81, dim=64, causal=True, mask=None))
    cases.append(dict(name="clip text 77 causal", batch=2, heads=12, len_q=77, len_k=77, dim=64, causal=True,
                      mask=None))
    return cases


def group_norm_cases():
    cases = []
    for res, ch in ((256, 320), (128, 640), (64, 960), (32, 1280)):
        cases.append(dict(name=f"SR {res}x{res}x{ch}", batch=1, channels=ch, res=res))
    for res, ch in ((64, 320), (32, 640), (16, 960), (8, 1280)):
        cases.append(dict(name=f"decoder {res}x{res}x{ch}", batch=2, channels=ch, res=res))
    out = []
    for c in cases:
        for channels_last in (False, True):
            for scale_shift in (False, True):
                out.append(dict(c, channels_last=channels_last, scale_shift=scale_shift, groups=32))
    return out


# --------------------------------------------------------------------------------------------- timing

def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copies_for(bytes_per_call: int) -> int:
    """Enough input copies that a round of calls overflows L2 twice (capped for memory)."""
    return max(1, min(64, math.ceil(2 * l2_bytes() / max(1, bytes_per_call))))


def time_graph(fn_for_copy, num_copies: int, reps: int, iters: int, warmup: int = 3) -> float:
    """Median microseconds per call: CUDA-graph replays of `reps` calls rotating over the input copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(warmup):  # compile / autotune / allocator warm-up outside capture
            fn_for_copy(i % num_copies)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn_for_copy(i % num_copies)
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    del graph
    return statistics.median(times)


def try_time(fn_for_copy, num_copies, args):
    """(microseconds, None) or (None, reason) if the callable fails (e.g. an SDPA backend rejects a shape)."""
    try:
        fn_for_copy(0)
        torch.cuda.synchronize()
        return time_graph(fn_for_copy, num_copies, args.reps, args.iters), None
    except Exception as e:  # noqa: BLE001 - report any backend refusal as "unsupported"
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# --------------------------------------------------------------------------------------------- attention

def make_attention_inputs(case, dtype, gen, copies):
    """q/k/v laid out as the models produce them: (B, L, H·D) projections viewed as (B, H, L, D)."""
    b, h, lq, lk, d = case["batch"], case["heads"], case["len_q"], case["len_k"], case["dim"]
    sets = []
    for _ in range(copies):
        q = torch.randn(b, lq, h * d, device="cuda", dtype=dtype, generator=gen).view(b, lq, h, d).transpose(1, 2)
        kv = torch.randn(b, lk, 2, h * d, device="cuda", dtype=dtype, generator=gen)
        k = kv[:, :, 0].view(b, lk, h, d).transpose(1, 2)
        v = kv[:, :, 1].view(b, lk, h, d).transpose(1, 2)
        sets.append((q, k, v))
    keep = None
    if case["mask"] == "context":  # text padding inside the 81 context tokens (keys: context first, then pixels)
        keep = torch.ones(b, lk, dtype=torch.bool, device="cuda")
        keep[:, 4 + 20:CONTEXT_TOKENS] = False  # 4 extra tokens + a 20-token prompt; the rest is padding
    elif case["mask"] == "tail":
        keep = torch.ones(b, lk, dtype=torch.bool, device="cuda")
        keep[:, 24:77] = False
    return sets, keep


def visible_pairs(case, keep) -> int:
    lq, lk = case["len_q"], case["len_k"]
    vis = torch.ones(lq, lk, dtype=torch.bool)
    if case["causal"]:
        vis = vis.tril()
    per_batch = [int((vis & keep[i].cpu()[None, :]).sum()) if keep is not None else int(vis.sum())
                 for i in range(case["batch"])]
    return sum(per_batch) * case["heads"]


def bench_attention(case, dtype, args, K):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from unclip.models.layers import attention_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    bytes_per_call = 4 * case["batch"] * case["heads"] * case["dim"] * (case["len_q"] + case["len_k"]) * \
        torch.finfo(dtype).bits // 8
    copies = copies_for(bytes_per_call)
    sets, keep = make_attention_inputs(case, dtype, gen, copies)
    causal = case["causal"]
    outs = [torch.empty(q.shape, dtype=dtype, device="cuda") for q, _, _ in sets]

    # correctness at this shape against fp32 math
    q, k, v = sets[0]
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=keep)
    ours = K.attention(q, k, v, causal=causal, key_padding_mask=keep)
    err = ((ours.float() - ref).abs().max() / ref.abs().max()).item()

    flops = 4 * case["dim"] * visible_pairs(case, keep)
    sdpa_mask = None if keep is None else keep[:, None, None, :]
    if causal and keep is not None:
        sdpa_mask = keep[:, None, None, :] & torch.ones(case["len_q"], case["len_k"], dtype=torch.bool,
                                                           device="cuda").tril()
    row = dict(case, dtype=str(dtype).replace("torch.", ""), max_rel_err_vs_fp32=err, flops=flops, timings_us={},
               unsupported={})

    def ours_fn(i, **cfg):
        q, k, v = sets[i]
        K.attention(q, k, v, causal=causal, key_padding_mask=keep, out=outs[i], **cfg)

    row["timings_us"]["triton"], why = try_time(ours_fn, copies, args)
    if why:
        row["unsupported"]["triton"] = why

    def torch_ref_fn(i):
        q, k, v = sets[i]
        attention_reference(q, k, v, causal=causal, key_padding_mask=keep)

    row["timings_us"]["torch_backend"], why = try_time(torch_ref_fn, copies, args)
    if why:
        row["unsupported"]["torch_backend"] = why

    backends = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_math": "MATH"}
    for label, attr in backends.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            row["unsupported"][label] = "not in this PyTorch"
            continue

        def sdpa_fn(i, backend=backend):
            q, k, v = sets[i]
            with sdpa_kernel([backend]):
                if sdpa_mask is None:
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                else:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)

        t, why = try_time(sdpa_fn, copies, args)
        row["timings_us"][label] = t
        if why:
            row["unsupported"][label] = why

    if args.sweep:
        row["sweep"] = []
        for bm in (32, 64, 128):
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        t, why = try_time(lambda i: ours_fn(i, block_m=bm, block_n=bn, num_warps=warps,
                                                            num_stages=stages), copies, args)
                        row["sweep"].append(dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                                                 us=t, error=why))
    peers = [k for k in row["timings_us"] if k.startswith("sdpa") or k == "torch_backend"]
    return summarize(row, "triton", peers=peers, work=flops, unit="TFLOP/s", scale=1e-12)


# --------------------------------------------------------------------------------------------- group norm

def bench_group_norm(case, dtype, args, K):
    from unclip.models.layers import group_norm_reference

    b, c, r = case["batch"], case["channels"], case["res"]
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    nbytes = b * c * r * r * torch.finfo(dtype).bits // 8
    copies = copies_for(2 * nbytes)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(b, c, r, r, device="cuda", dtype=dtype, generator=gen).contiguous(memory_format=fmt)
          for _ in range(copies)]
    outs = [torch.empty_like(x) for x in xs]
    weight = torch.randn(c, device="cuda", dtype=dtype, generator=gen) * 0.2 + 1
    bias = torch.randn(c, device="cuda", dtype=dtype, generator=gen) * 0.2
    scale = shift = None
    if case["scale_shift"]:
        scale = torch.randn(b, c, device="cuda", dtype=dtype, generator=gen) * 0.2
        shift = torch.randn(b, c, device="cuda", dtype=dtype, generator=gen) * 0.2
    groups = case["groups"]

    ref = group_norm_reference(xs[0].float(), groups, weight.float(), bias.float(), 1e-5, silu=True,
                               scale=None if scale is None else scale.float(),
                               shift=None if shift is None else shift.float())
    ours = K.group_norm(xs[0], groups, weight, bias, 1e-5, silu=True, scale=scale, shift=shift)
    err = ((ours.float() - ref).abs().max() / ref.abs().max()).item()
    assert ours.is_contiguous(memory_format=fmt)
    row = dict(case, dtype=str(dtype).replace("torch.", ""), max_rel_err_vs_fp32=err, bytes=2 * nbytes,
               timings_us={}, unsupported={})

    def ours_fn(i, **cfg):
        K.group_norm(xs[i], groups, weight, bias, 1e-5, silu=True, scale=scale, shift=shift, out=outs[i], **cfg)

    def unfused_fn(i):
        group_norm_reference(xs[i], groups, weight, bias, 1e-5, silu=True, scale=scale, shift=shift)

    def copy_fn(i):
        outs[i].copy_(xs[i])

    for label, fn in (("triton", ours_fn), ("torch_unfused", unfused_fn), ("copy", copy_fn)):
        row["timings_us"][label], why = try_time(fn, copies, args)
        if why:
            row["unsupported"][label] = why

    if args.sweep:
        row["sweep"] = []
        configs = [dict(path="split", block_c=bc, block_s=bs, num_warps=w)
                   for bc, bs in ((2, 1024), (4, 1024), (8, 512), (16, 256), (32, 128), (64, 64), (128, 32))
                   for w in (4, 8)]
        if r * r * max(2, c // groups) <= 65536:
            configs += [dict(path="whole_group", num_warps=w) for w in (4, 8, 16)]
        for cfg in configs:
            t, why = try_time(lambda i: ours_fn(i, **cfg), copies, args)
            row["sweep"].append(dict(cfg, us=t, error=why))
    return summarize(row, "triton", peers=["torch_unfused", "copy"], work=2 * nbytes, unit="GB/s", scale=1e-9)


# --------------------------------------------------------------------------------------------- report

def summarize(row, ours, peers, work, unit, scale):
    t = row["timings_us"]
    row["throughput_unit"] = unit
    row["throughput"] = {k: (work / (v * 1e-6) * scale if v else None) for k, v in t.items()}
    row["speedup_vs"] = {p: (t[p] / t[ours] if t.get(p) and t.get(ours) else None) for p in peers}
    sdpa = [t[p] for p in peers if p.startswith("sdpa") and t.get(p)]
    if sdpa:
        row["best_sdpa_us"] = min(sdpa)
        row["speedup_vs_best_sdpa"] = min(sdpa) / t[ours] if t.get(ours) else None
    return row


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def print_attention(rows):
    print(f"\n{'attention':38s} {'err':>8s} {'triton us':>10s} {'TFLOP/s':>8s} {'best sdpa':>10s} "
          f"{'x best':>7s}  per-backend us (flash / efficient / cudnn / math / torch_backend)")
    for r in rows:
        t = r["timings_us"]
        print(f"{r['name']:38s} {r['max_rel_err_vs_fp32']:8.1e} {fmt(t.get('triton')):>10s} "
              f"{fmt(r['throughput'].get('triton')):>8s} {fmt(r.get('best_sdpa_us')):>10s} "
              f"{fmt(r.get('speedup_vs_best_sdpa'), '.2f'):>7s}  "
              + " / ".join(fmt(t.get(k)) for k in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math",
                                                    "torch_backend")))


def print_group_norm(rows):
    print(f"\n{'group_norm + SiLU':44s} {'err':>8s} {'triton us':>10s} {'GB/s':>7s} {'unfused us':>10s} "
          f"{'x unfused':>9s} {'copy us':>8s} {'% copy bw':>9s}")
    for r in rows:
        t = r["timings_us"]
        name = f"{r['name']} {'NHWC' if r['channels_last'] else 'NCHW'}{' +scale-shift' if r['scale_shift'] else ''}"
        pct = (100 * t["copy"] / t["triton"]) if t.get("copy") and t.get("triton") else None
        r["fraction_of_copy_bandwidth"] = None if pct is None else pct / 100
        print(f"{name:44s} {r['max_rel_err_vs_fp32']:8.1e} {fmt(t.get('triton')):>10s} "
              f"{fmt(r['throughput'].get('triton'), '.0f'):>7s} {fmt(t.get('torch_unfused')):>10s} "
              f"{fmt(r['speedup_vs'].get('torch_unfused'), '.2f'):>9s} {fmt(t.get('copy')):>8s} {fmt(pct, '.0f'):>9s}")


def environment():
    import triton

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(
        device=props.name, capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1), l2_bytes=l2_bytes(),
        driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        cuda=torch.version.cuda, torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=run(["git", "rev-parse", "HEAD"]),
        git_dirty=bool(run(["git", "status", "--porcelain"])),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--only", choices=["attention", "group_norm"], default=None)
    p.add_argument("--iters", type=int, default=20, help="timed graph replays per case (median reported; >= 10)")
    p.add_argument("--reps", type=int, default=10, help="calls captured per graph replay")
    p.add_argument("--sweep", action="store_true", help="also time alternative kernel configurations")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/kernels-*.json)")
    args = p.parse_args(argv)
    if args.iters < 10:
        p.error("--iters must be >= 10")

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device is available, so there is nothing to time; exiting. "
              "(The kernels' correctness tests run on the CPU: python -m pytest tests/test_kernels.py)")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("benchmarks/kernels.py: TRITON_INTERPRET is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    try:
        import unclip.kernels as K
    except ImportError as e:
        print(f"benchmarks/kernels.py: cannot import unclip.kernels ({e}); install the project first "
              "(pip install -e '.[fast]')", file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    env = environment()
    print(f"{env['device']} (sm_{env['capability'].replace('.', '')}), torch {env['torch']}, "
          f"triton {env['triton']}, {args.dtype}, commit {env['git_commit']}")
    report = dict(environment=env, dtype=args.dtype, method=dict(iters=args.iters, reps=args.reps,
                                                                  timing="CUDA graph replay, CUDA events, median"),
                  attention=[], group_norm=[])
    if args.only in (None, "attention"):
        for case in attention_cases():
            report["attention"].append(bench_attention(case, dtype, args, K))
        print_attention(report["attention"])
    if args.only in (None, "group_norm"):
        for case in group_norm_cases():
            report["group_norm"].append(bench_group_norm(case, dtype, args, K))
        print_group_norm(report["group_norm"])

    att = [r["speedup_vs_best_sdpa"] for r in report["attention"] if r.get("speedup_vs_best_sdpa")]
    gn = [r for r in report["group_norm"] if r["speedup_vs"].get("torch_unfused")]
    report["goals"] = dict(
        attention_min_ratio_vs_best_sdpa=min(att) if att else None,  # goal >= 0.9
        group_norm_min_speedup_vs_unfused=min((r["speedup_vs"]["torch_unfused"] for r in gn), default=None),  # >= 1.5
        group_norm_min_fraction_of_copy_bandwidth=min((r["fraction_of_copy_bandwidth"] for r in gn
                                                       if r.get("fraction_of_copy_bandwidth")), default=None),  # >= 0.8
    )
    print("\ngoals:", json.dumps(report["goals"], indent=None))
    out = args.out
    if out is None:
        slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
        out = RESULTS / f"kernels-{_dt.datetime.now():%Y%m%d-%H%M%S}-{slug}-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
