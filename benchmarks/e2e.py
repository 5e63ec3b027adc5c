"""End-to-end benchmark: our `fast` and `torch` backends against diffusers (eager and torch.compile).

    python benchmarks/e2e.py                                   # karlo, every system, batch 1 4 8, fp16, CUDA
    python benchmarks/e2e.py --preset dalle2 --systems torch fast --batches 1
    python benchmarks/e2e.py --systems diffusers_compile --batches 1 8 --out R.json   # adds to R.json
    python benchmarks/e2e.py --preset tiny --device cpu --dtype fp32 --systems torch diffusers \\
        --batches 1 --steps 2 2 2 --runs 2 --min-runs 1                             # CPU smoke test

Method (docs/architecture.md, "Performance method"). One set of random weights per preset (drawn once, seed --seed; the karlo preset is
saved in the diffusers layout and every system loads that folder), the same prompt, steps, guidance,
dtype and CPU-generator seed for every call of every system, on one machine in one invocation. Per
(system, batch): warm-up calls (compilation, CUDA-graph capture; the first call's time is recorded), then
up to --runs timed calls, each wall-clocked with the device synchronised before and after; the median is
reported. Our pipelines are timed per stage too (unclip.cli_bench.StageTimer); diffusers gets one extra,
untimed call with synchronising hooks on its networks for an approximate stage breakdown.

Systems: `diffusers` (UnCLIPPipeline, fp16, its default SDPA attention processors), `diffusers_compile`
(the same with `torch.compile(mode=--compile-mode)` on prior, decoder and both upsamplers), `torch` (our
reference backend), `fast` (Triton kernels + CUDA-graph-captured stage loops) and `fast_eager` (the Triton
kernels without graphs, to separate the two effects).

Time budget: --deadline (Unix time) or --budget-s. Items run in priority order (batch 1 first, then the
largest batch); each gets a share of the remaining time weighted by batch size, runs are cut to fit that
share (never below --min-runs), and an item that cannot start before the deadline is recorded as
skipped. The JSON is rewritten after every item, so a killed run still leaves everything measured so far.
An existing --out file is extended: results of the same (system, batch) are replaced.

Image agreement: every system's images at the benchmark seed are kept (workdir, float16 .npy) and the
PSNR of each pair is computed over all images of a batch (pixels in [0, 1]). `--reference-fp32` adds an
fp32 run of our torch backend (TF32 off) as the common reference.

Output: benchmarks/results/<date>-<device>-<commit>.json (schema "unclip-e2e/1"), plus <stem>.md (tables)
and, when matplotlib is installed, <stem>-stages.png and <stem>-speedup.png, and <stem>-images.png (one
image per system at batch 1, side by side).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = "unclip-e2e/1"
SYSTEMS = ("fast", "torch", "diffusers", "fast_eager", "diffusers_compile")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT = "a photograph of an astronaut riding a horse on the moon"

# The physical floor (docs/architecture.md, "Performance method") for Karlo at batch 1, 25/25/7 steps, CFG on, fp16: the prior streams its ~2 GB
# of weights 25 times (bandwidth-bound); the decoder (~30 TFLOP) and the upsampler (~59 TFLOP) are
# arithmetic-bound. Ceilings as measured on this workplace's machines (KINDS.md): H100 ~790 TFLOP/s bf16,
# ~3.0 TB/s copy; H200 same arithmetic, ~4.3 TB/s.
FLOOR_WORK = {"prior_bytes": 25 * 2.0e9, "decoder_flop": 30e12, "super_res_flop": 59e12}
CEILINGS = {"h100": (790e12, 3.0e12), "h200": (790e12, 4.3e12)}

_T0 = time.time()


def log(msg: str) -> None:
    print(f"[e2e {time.time() - _T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- results file


def device_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name or "")
    if m:
        return m.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")[:24] or "cpu"


def default_out(env: dict) -> Path:
    date = _dt.date.today().isoformat()
    dev = device_slug(env.get("device")) if env.get("device_type") == "cuda" else "cpu"
    commit = (env.get("git_commit") or "nogit")[:7] + ("-dirty" if env.get("git_dirty") else "")
    return RESULTS / f"{date}-{dev}-{commit}.json"


class ResultsFile:
    """The JSON document, rewritten atomically after every change."""

    def __init__(self, path: Path, env: dict, method: dict):
        self.path = path
        self.doc = {"schema": SCHEMA, "environment": env, "method": method, "presets": {}, "notes": []}
        if path.exists():
            try:
                old = json.loads(path.read_text())
                if old.get("schema") == SCHEMA:
                    self.doc["presets"] = old.get("presets", {})
                    self.doc["notes"] = old.get("notes", [])
                    self.doc["environment_history"] = old.get("environment_history", []) + [old.get("environment")]
            except (OSError, ValueError):
                pass

    def preset(self, name: str, info: dict) -> dict:
        p = self.doc["presets"].setdefault(name, {"results": []})
        p.update(info)
        return p

    def put(self, preset: str, record: dict) -> None:
        results = self.doc["presets"][preset]["results"]
        for i, r in enumerate(results):
            if r["system"] == record["system"] and r["batch"] == record["batch"]:
                results[i] = record
                break
        else:
            results.append(record)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------- weights


def _configs(preset: str) -> dict:
    from unclip.presets import preset_configs
    configs = preset_configs(preset)
    configs["image_encoder"] = None  # not part of text-to-image; built last, so other weights are unaffected
    configs["feature_extractor"] = None
    return configs


def build_components(preset: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights. On CUDA they are drawn by a CUDA generator on the device (seconds for billions of
    parameters, instead of minutes on the host) with the presets' own scale rules."""
    from unclip.presets import randomize_weights_
    from unclip.presets import build_components as build
    if device.type != "cuda":
        return build(_configs(preset), seed=seed, device=device, dtype=dtype)
    comps = build(_configs(preset), device="meta", dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    for net in {id(m): m for m in comps.networks().values()}.values():
        net.to_empty(device=device)
        with torch.device(device):  # randomize_weights_ draws with torch.randn(..., generator=gen) on the default device
            randomize_weights_(net, gen)
    return comps


def saved_weights(preset: str, workdir: Path, device: torch.device, dtype: torch.dtype, seed: int) -> Path:
    """The preset saved in the diffusers layout under workdir (reused when a previous phase wrote it)."""
    folder = workdir / f"{preset}-seed{seed}-{str(dtype).split('.')[-1]}"
    marker = folder / "_unclip_e2e.json"
    if marker.exists():
        log(f"reusing weights in {folder}")
        return folder
    log(f"building random {preset} weights ({dtype}) on {device} and saving to {folder}")
    comps = build_components(preset, device, dtype, seed)
    from unclip.loading import save_components
    save_components(comps, str(folder))
    marker.write_text(json.dumps({"preset": preset, "seed": seed, "dtype": str(dtype)}))
    del comps
    free_memory()
    return folder


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- systems


class System:
    """One way of running the cascade. `call(batch)` returns the images as float32 numpy (B, H, W, 3)."""

    name = "?"
    stage_source = None

    def call(self, batch: int) -> np.ndarray:
        raise NotImplementedError

    def weights_bytes(self) -> int:
        return 0

    def stages_of_last_call(self) -> dict | None:
        return None

    def hooked_stage_times(self, batch: int) -> dict | None:
        return None

    def close(self) -> None:
        pass


class Ours(System):
    def __init__(self, name: str, pipe, kwargs: dict, seed: int, prompt: str):
        from unclip.cli_bench import StageTimer
        self.name, self.pipe, self.kwargs, self.seed, self.prompt = name, pipe, kwargs, seed, prompt
        self.timer = StageTimer(pipe.device, nvtx=True)  # an Observer passed to every call
        self.stage_source = "StageTimer observer (device synchronised at stage boundaries)"

    def call(self, batch):
        self.timer.reset()
        out = self.pipe(self.prompt, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(self.seed),
                        output_type="np", progress=False, observer=self.timer, **self.kwargs)
        return out.images

    def weights_bytes(self):
        return self.pipe.cascade.weights_bytes()

    def stages_of_last_call(self):
        return dict(self.timer.stages)

    def graph_stats(self):
        return self.pipe.runner.describe().get("graph_stats")

    def close(self):
        self.pipe = None


class Diffusers(System):
    NETS = {"text": ("text_encoder",), "prior": ("prior",), "decoder": ("text_proj", "decoder"),
            "super_res": ("super_res_first", "super_res_last")}

    def __init__(self, name: str, folder: Path, device, dtype, kwargs: dict, seed: int, prompt: str,
                 compile_mode: str | None = None):
        from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        sub = lambda n: str(folder / n)  # noqa: E731
        kw = dict(torch_dtype=dtype)
        self.pipe = UnCLIPPipeline(
            prior=PriorTransformer.from_pretrained(sub("prior"), **kw),
            decoder=UNet2DConditionModel.from_pretrained(sub("decoder"), **kw),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(sub("text_encoder"), **kw),
            tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
            text_proj=UnCLIPTextProjModel.from_pretrained(sub("text_proj"), **kw),
            super_res_first=UNet2DModel.from_pretrained(sub("super_res_first"), **kw),
            super_res_last=UNet2DModel.from_pretrained(sub("super_res_last"), **kw),
            prior_scheduler=UnCLIPScheduler.from_pretrained(sub("prior_scheduler")),
            decoder_scheduler=UnCLIPScheduler.from_pretrained(sub("decoder_scheduler")),
            super_res_scheduler=UnCLIPScheduler.from_pretrained(sub("super_res_scheduler")),
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.name, self.kwargs, self.seed, self.prompt, self.device = name, kwargs, seed, prompt, device
        self.attention_processors = sorted({type(p).__name__ for net in (self.pipe.prior, self.pipe.decoder)
                                            for p in net.attn_processors.values()})
        if compile_mode:
            for net in ("prior", "decoder", "super_res_first", "super_res_last"):
                getattr(self.pipe, net).compile(mode=compile_mode)  # nn.Module.compile: in place, same module
        self.stage_source = "one extra call with synchronising forward hooks (approximate)"

    def call(self, batch):
        return self.pipe(self.prompt, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(self.seed),
                         output_type="np", **self.kwargs).images

    def weights_bytes(self):
        return sum(p.numel() * p.element_size() for n in ("prior", "decoder", "text_encoder", "text_proj",
                                                            "super_res_first", "super_res_last")
                   for p in getattr(self.pipe, n).parameters())

    def hooked_stage_times(self, batch):
        """Spans from the first network call of each stage to the end of its last one (device synchronised
        in every hook, which adds a little per call)."""
        from unclip.cli_bench import synchronize
        if self.name == "diffusers_compile":
            return None  # hooks inside compiled modules would be traced (and recompiled), not timed
        spans, handles = {}, []

        def pre(stage):
            def hook(module, args):
                synchronize(self.device)
                spans.setdefault(stage, [time.perf_counter(), None])
            return hook

        def post(stage):
            def hook(module, args, output):
                synchronize(self.device)
                spans[stage][1] = time.perf_counter()
            return hook
        for stage, nets in self.NETS.items():
            for n in nets:
                m = getattr(self.pipe, n)
                handles += [m.register_forward_pre_hook(pre(stage)), m.register_forward_hook(post(stage))]
        try:
            synchronize(self.device)
            start = time.perf_counter()
            self.call(batch)
            synchronize(self.device)
            total = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        stages = {s: (b - a) for s, (a, b) in spans.items() if b is not None}
        stages["other"] = max(0.0, total - sum(stages.values()))
        stages["total_hooked"] = total
        return stages

    def close(self):
        self.pipe = None


def our_system(name, source, device, dtype, kwargs, seed, prompt, preset=None, weight_seed=0):
    """`torch`, `fast` or `fast_eager` from a saved folder (karlo) or freshly built weights (dalle2)."""
    import unclip
    backend = "torch" if name == "torch" else "fast"
    options = {"cuda_graphs": False} if name == "fast_eager" else None
    if source is not None:
        pipe = unclip.Pipeline.from_pretrained(str(source), device=device, dtype=dtype, backend=backend,
                                               runner_options=options)
    else:
        pipe = unclip.Pipeline(build_components(preset, device, dtype, weight_seed), device=device, dtype=dtype,
                               backend=backend, runner_options=options)
    return Ours(name, pipe, kwargs, seed, prompt)


# --------------------------------------------------------------------------------------------- measuring


def peak_tracking(device):
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return None


def measure(system: System, batch: int, *, warmup: int, runs: int, min_runs: int, item_deadline: float,
            hard_deadline: float, device, workdir: Path, tag: str) -> dict:
    """Warm up, then time up to `runs` calls (cut to fit item_deadline, never below min_runs)."""
    from unclip.cli_bench import synchronize
    rec = {"system": system.name, "batch": batch, "status": "running"}
    base = peak_tracking(device)
    synchronize(device)
    start = time.perf_counter()
    images = system.call(batch)
    synchronize(device)
    rec["first_call_s"] = time.perf_counter() - start
    log(f"{system.name} batch {batch}: first call {rec['first_call_s']:.3f} s")
    for _ in range(warmup - 1):
        system.call(batch)
    times, stages = [], []
    while True:
        synchronize(device)
        t = time.perf_counter()
        images = system.call(batch)
        synchronize(device)
        times.append(time.perf_counter() - t)
        if system.stages_of_last_call() is not None:
            stages.append(system.stages_of_last_call())
        now = time.time()
        per = statistics.median(times)
        if len(times) >= runs:
            break
        if len(times) >= min_runs and (now + per > item_deadline or now + per > hard_deadline):
            break
    e2e = statistics.median(times)
    rec.update(status="ok", runs=len(times), warmup=warmup, e2e_median_s=e2e, e2e_runs_s=times, e2e_min_s=min(times),
               e2e_spread=(max(times) - min(times)) / e2e, images_per_s=batch / e2e,
               weights_bytes=system.weights_bytes())
    if stages:
        med = {n: statistics.median(s.get(n, 0.0) for s in stages) for n in stages[0]}
        med["other"] = max(0.0, e2e - sum(med.values()))
        rec.update(stages_median_s=med, stages_source=system.stage_source)
    if base is not None:
        rec["peak_extra_gpu_bytes"] = torch.cuda.max_memory_allocated(device) - base
        rec["peak_gpu_bytes_total"] = torch.cuda.max_memory_allocated(device)
    np.save(workdir / f"images-{tag}-{system.name}-b{batch}.npy", np.asarray(images, dtype=np.float16))
    # Saturated pixels (clipped to 0 or 1) make PSNR between implementations sensitive: report how many.
    rec["image_stats"] = {"mean": float(np.mean(images)), "std": float(np.std(images)),
                          "saturated_fraction": float(np.mean((images < 0.01) | (images > 0.99))),
                          "finite": bool(np.isfinite(images).all())}
    log(f"{system.name} batch {batch}: median {e2e:.4f} s over {len(times)} runs "
        f"(spread {rec['e2e_spread']:.1%}), {batch / e2e:.3f} img/s")
    if time.time() + 2 * e2e < hard_deadline:
        hooked = system.hooked_stage_times(batch)
        if hooked is not None:
            rec.update(stages_median_s=hooked, stages_source=system.stage_source)
    return rec


# --------------------------------------------------------------------------------------------- analysis


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


PSNR_PAIRS = [("fast", "torch", 35.0), ("fast", "diffusers", 30.0), ("torch", "diffusers", None),
              ("fast", "fast_eager", None), ("diffusers_compile", "diffusers", None), ("fast", "fp32_reference", None),
              ("torch", "fp32_reference", None), ("diffusers", "fp32_reference", None)]


def analyse(entry: dict, workdir: Path, tag: str, env: dict) -> None:
    ok = {(r["system"], r["batch"]): r for r in entry["results"] if r.get("status") == "ok"}
    batches = sorted({b for _, b in ok} | {b for b in entry.get("reference_batches", [])})
    rows = []
    for a, b, goal in PSNR_PAIRS:
        for batch in batches:
            fa, fb = (workdir / f"images-{tag}-{s}-b{batch}.npy" for s in (a, b))
            if fa.exists() and fb.exists():
                ia, ib = np.load(fa), np.load(fb)
                if ia.shape == ib.shape:
                    db = psnr(ia, ib)
                    identical = math.isinf(db)  # JSON has no infinity: identical images get psnr_db null
                    rows.append({"a": a, "b": b, "batch": batch, "psnr_db": None if identical else db,
                                 "identical": identical,
                                 "max_abs_diff": float(np.abs(ia.astype(np.float32) - ib).max()),
                                 "goal_db": goal, "met": None if goal is None else (identical or db >= goal)})
    entry["psnr"] = rows

    def e2e(system, batch):
        r = ok.get((system, batch))
        return None if r is None else r["e2e_median_s"]

    ratios = []

    def ratio(name, num, den, batch, goal=None, higher_is_better=True, note=None):
        if num is None or den is None:
            return
        value = num / den
        met = None if goal is None else (value >= goal if higher_is_better else value <= goal)
        ratios.append({"name": name, "batch": batch, "value": value, "goal": goal, "met": met, "note": note})

    for batch in sorted({b for _, b in ok}):
        is1 = batch == 1
        ratio("diffusers / fast (end-to-end speedup)", e2e("diffusers", batch), e2e("fast", batch), batch,
              4.0 if is1 else None)
        ratio("diffusers_compile / fast", e2e("diffusers_compile", batch), e2e("fast", batch), batch,
              1.5 if is1 else None)
        ratio("fast img/s / diffusers img/s", e2e("diffusers", batch), e2e("fast", batch), batch,
              2.5 if batch == 8 else None, note="equals the end-to-end speedup at a fixed batch")
        ratio("torch / fast (kernels + graphs vs our reference)", e2e("torch", batch), e2e("fast", batch), batch)
        ratio("fast_eager / fast (CUDA graphs alone)", e2e("fast_eager", batch), e2e("fast", batch), batch)
        ratio("torch / fast_eager (Triton kernels alone)", e2e("torch", batch), e2e("fast_eager", batch), batch)
        ratio("diffusers / torch (our reference vs diffusers)", e2e("diffusers", batch), e2e("torch", batch), batch)
        ratio("diffusers / diffusers_compile", e2e("diffusers", batch), e2e("diffusers_compile", batch), batch)
    entry["ratios"] = ratios

    if entry.get("preset") == "karlo" and entry.get("steps") == [25, 25, 7]:
        slug = device_slug(env.get("device", ""))
        ceil = CEILINGS.get(slug)
        floor = {"work": FLOOR_WORK, "design_h100_s": 0.13}
        if ceil is not None:
            flops, bw = ceil
            parts = {"prior": FLOOR_WORK["prior_bytes"] / bw, "decoder": FLOOR_WORK["decoder_flop"] / flops,
                     "super_res": FLOOR_WORK["super_res_flop"] / flops}
            floor.update(device=slug, ceilings={"flop_per_s": flops, "bytes_per_s": bw}, stages_s=parts,
                         total_s=sum(parts.values()))
            fast1 = ok.get(("fast", 1))
            if fast1:
                floor["fast_over_floor"] = fast1["e2e_median_s"] / floor["total_s"]
                floor["goal"] = "<= 2"
                floor["met"] = floor["fast_over_floor"] <= 2.0
                st = fast1.get("stages_median_s", {})
                floor["fast_stage_over_floor"] = {k: st[k] / v for k, v in parts.items() if k in st}
        entry["floor"] = floor


def render(doc: dict, out: Path) -> list[Path]:
    """<stem>.md with the tables; plots when matplotlib is installed. Returns the files written."""
    written = []
    env = doc["environment"]
    lines = [f"# unclip end-to-end benchmark: {env.get('device')} ({env.get('date')})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, diffusers "
             f"{env.get('diffusers')}, driver {env.get('driver')}, commit {(env.get('git_commit') or '?')[:10]}"
             f"{' (dirty)' if env.get('git_dirty') else ''}", ""]
    for name, entry in doc["presets"].items():
        lines += [f"## {name}: steps {entry.get('steps')}, guidance {entry.get('guidance')}, {entry.get('dtype')}", ""]
        lines += ["| system | batch | e2e median (s) | img/s | runs | first call (s) | stages (s) | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(entry["results"], key=lambda r: (r["batch"], SYSTEMS.index(r["system"])
                                                         if r["system"] in SYSTEMS else 99)):
            if r.get("status") != "ok":
                lines.append(f"| {r['system']} | {r['batch']} | | | | | | {r.get('status')} |")
                continue
            st = ", ".join(f"{k} {v:.3f}" for k, v in r.get("stages_median_s", {}).items() if k != "total_hooked")
            lines.append(f"| {r['system']} | {r['batch']} | {r['e2e_median_s']:.4f} | {r['images_per_s']:.3f} | "
                         f"{r['runs']} | {r['first_call_s']:.2f} | {st} | ok |")
        if entry.get("ratios"):
            lines += ["", "| ratio | batch | value | goal | met |", "|---|---|---|---|---|"]
            for q in entry["ratios"]:
                lines.append(f"| {q['name']} | {q['batch']} | {q['value']:.2f} | {q['goal'] or ''} | "
                             f"{'' if q['met'] is None else ('yes' if q['met'] else 'NO')} |")
        if entry.get("psnr"):
            lines += ["", "| PSNR | batch | dB | goal | met |", "|---|---|---|---|---|"]
            for q in entry["psnr"]:
                db = "identical" if q["identical"] else f"{q['psnr_db']:.2f}"
                lines.append(f"| {q['a']} vs {q['b']} | {q['batch']} | {db} | {q['goal_db'] or ''} | "
                             f"{'' if q['met'] is None else ('yes' if q['met'] else 'NO')} |")
        fl = entry.get("floor")
        if fl and "total_s" in fl:
            lines += ["", f"Physical floor ({fl['device']}): {fl['total_s']:.3f} s; fast at batch 1 is "
                      f"{fl.get('fast_over_floor', float('nan')):.2f}x the floor (goal <= 2)."]
        lines.append("")
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines))
    written.append(md)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    karlo = doc["presets"].get("karlo")
    if karlo:
        ok = [r for r in karlo["results"] if r.get("status") == "ok"]
        b1 = [r for r in ok if r["batch"] == 1 and r.get("stages_median_s")]
        if b1:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            stages = ["text", "prior", "decoder", "super_res", "other"]
            left = np.zeros(len(b1))
            for s in stages:
                vals = np.array([r["stages_median_s"].get(s, 0.0) for r in b1])
                ax.barh([r["system"] for r in b1], vals, left=left, label=s)
                left += vals
            ax.set_xlabel("seconds (batch 1)")
            ax.set_title("Karlo stage breakdown")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out.with_name(out.stem + "-stages.png")
            fig.savefig(path, dpi=110)
            written.append(path)
            plt.close(fig)
        base = {r["batch"]: r["e2e_median_s"] for r in ok if r["system"] == "diffusers"}
        if base:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for s in SYSTEMS:
                pts = sorted((r["batch"], base[r["batch"]] / r["e2e_median_s"]) for r in ok
                             if r["system"] == s and r["batch"] in base)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=s)
            ax.set_xlabel("batch")
            ax.set_ylabel("speedup vs diffusers eager")
            ax.set_title("Karlo end-to-end speedup")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out.with_name(out.stem + "-speedup.png")
            fig.savefig(path, dpi=110)
            written.append(path)
            plt.close(fig)
    return written


def image_strip(workdir: Path, tag: str, out: Path) -> Path | None:
    from PIL import Image
    tiles = []
    for s in ("fp32_reference", "torch", "fast", "fast_eager", "diffusers", "diffusers_compile"):
        f = workdir / f"images-{tag}-{s}-b1.npy"
        if f.exists():
            tiles.append((np.load(f)[0].astype(np.float32).clip(0, 1) * 255).round().astype(np.uint8))
    if not tiles:
        return None
    path = out.with_name(out.stem + "-images.png")
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path


# --------------------------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="karlo", choices=("tiny", "karlo", "dalle2"))
    p.add_argument("--systems", nargs="+", default=["fast", "torch", "diffusers", "fast_eager", "diffusers_compile"],
                   choices=SYSTEMS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 4], help="in priority order")
    p.add_argument("--steps", type=int, nargs=3, default=[25, 25, 7])
    p.add_argument("--guidance", type=float, nargs=2, default=[4.0, 8.0])
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=10, help="timed calls per item (median); fewer if time is short")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per item (diffusers_compile: at least 3)")
    p.add_argument("--seed", type=int, default=0, help="CPU generator seed of every call")
    p.add_argument("--weight-seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--reference-fp32", action="store_true", help="also run our torch backend in fp32 (TF32 off)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "unclip-e2e")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--deadline", type=float, default=None, help="Unix time by which to finish")
    p.add_argument("--budget-s", type=float, default=None, help="seconds from start by which to finish")
    p.add_argument("--render-only", action="store_true", help="re-render --out's tables and plots, time nothing")
    p.add_argument("--print-default-out", action="store_true", help="print the default results path and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if args.print_default_out or args.render_only:
        from unclip.cli_bench import environment
        out = args.out or default_out(environment(device if torch.cuda.is_available() else "cpu"))
        if args.print_default_out:
            print(out)
            return 0
        if not out.exists():
            print(f"benchmarks/e2e.py: {out} does not exist: nothing to render", file=sys.stderr)
            return 1
        doc = json.loads(out.read_text())
        written = [out] + render(doc, out)
        strip = image_strip(args.workdir, f"{args.preset}-s{args.seed}-{args.dtype}-{'-'.join(map(str, args.steps))}",
                            out)
        for w in written + ([strip] if strip else []):
            log(f"wrote {w}")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/e2e.py: no CUDA device; use --device cpu --preset tiny for a smoke test", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and device.type == "cuda":
        print("benchmarks/e2e.py: TRITON_INTERPRET is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    if any(s.startswith("fast") for s in args.systems) and device.type != "cuda":
        log("fast systems need CUDA: skipped on this device")
        args.systems = [s for s in args.systems if not s.startswith("fast")]
    if args.preset == "dalle2" and any(s.startswith("diffusers") for s in args.systems):
        log("diffusers' UnCLIPPipeline has one upsampler: the dalle2 cascade runs on our backends only")
        args.systems = [s for s in args.systems if not s.startswith("diffusers")]
    deadline = args.deadline or (time.time() + args.budget_s if args.budget_s else float("inf"))
    dtype = DTYPES[args.dtype]

    import unclip
    from unclip.cli_bench import environment
    env = environment(device)
    out = args.out or default_out(env)
    method = {"timer": "host perf_counter around each call, device synchronised before and after",
              "statistic": "median of the timed calls", "runs_target": args.runs, "min_runs": args.min_runs,
              "warmup": args.warmup, "generator": "torch.Generator() (CPU) seeded per call",
              "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    results = ResultsFile(out, env, method)
    tag = f"{args.preset}-s{args.seed}-{args.dtype}-{'-'.join(map(str, args.steps))}"
    kwargs = dict(prior_num_inference_steps=args.steps[0], decoder_num_inference_steps=args.steps[1],
                  super_res_num_inference_steps=args.steps[2], prior_guidance_scale=args.guidance[0],
                  decoder_guidance_scale=args.guidance[1])
    entry = results.preset(args.preset, {"preset": args.preset, "steps": list(args.steps),
                                         "guidance": list(args.guidance), "dtype": args.dtype, "seed": args.seed,
                                         "weight_seed": args.weight_seed, "prompt": args.prompt,
                                         "unclip": unclip.__version__})
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"{env.get('device')} | torch {env['torch']} | preset {args.preset} | systems {args.systems} | "
        f"batches {args.batches} | out {out}")

    folder = None
    if args.preset != "dalle2":
        folder = saved_weights(args.preset, args.workdir, device, dtype, args.weight_seed)
        entry["weights"] = {"folder": str(folder), "layout": "diffusers", "drawn_on": device.type}

    order = [(b, s) for b in args.batches for s in args.systems]
    weight = {b: max(1, b) for b in args.batches}
    warm = {s: (max(3, args.warmup) if s == "diffusers_compile" else args.warmup) for s in args.systems}
    cache: dict = {}

    def get_system(name):
        if name not in cache:
            # Systems stay loaded across batches (karlo fp16: ~9 GB of weights each; fast_eager shares fast's).
            free_memory()
            log(f"loading {name}")
            if name.startswith("diffusers"):
                cache[name] = Diffusers(name, folder, device, dtype, kwargs, args.seed, args.prompt,
                                        compile_mode=args.compile_mode if name == "diffusers_compile" else None)
                entry.setdefault("diffusers_attention_processors", cache[name].attention_processors)
            elif name == "fast_eager" and "fast" in cache:
                pipe = unclip.Pipeline(cache["fast"].pipe.components, device=device, dtype=dtype, backend="fast",
                                       runner_options={"cuda_graphs": False})
                cache[name] = Ours(name, pipe, kwargs, args.seed, args.prompt)
            else:
                cache[name] = our_system(name, folder, device, dtype, kwargs, args.seed, args.prompt,
                                         preset=args.preset, weight_seed=args.weight_seed)
        return cache[name]

    for idx, (batch, name) in enumerate(order):
        now = time.time()
        left = [weight[b] for b, _ in order[idx:]]
        item_deadline = now + (deadline - now) * weight[batch] / sum(left) if math.isfinite(deadline) else math.inf
        if now + 5 > deadline:
            results.put(args.preset, {"system": name, "batch": batch, "status": "skipped: out of time"})
            continue
        try:
            results.put(args.preset, {"system": name, "batch": batch, "status": "running (killed if this stays)",
                                      "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
            system = get_system(name)
            rec = measure(system, batch, warmup=warm[name], runs=args.runs, min_runs=args.min_runs,
                          item_deadline=item_deadline, hard_deadline=deadline, device=device, workdir=args.workdir,
                          tag=tag)
        except Exception as e:  # record and go on: one failing system must not lose the others' numbers
            log(f"{name} batch {batch} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            rec = {"system": name, "batch": batch, "status": f"error: {type(e).__name__}: {str(e)[:400]}"}
            if isinstance(e, torch.cuda.OutOfMemoryError) and name in cache:
                cache.pop(name).close()
                free_memory()
        stats = cache[name].graph_stats() if name in cache and isinstance(cache[name], Ours) else None
        if stats is not None:
            rec["graph_stats"] = stats
        results.put(args.preset, rec)
        analyse(entry, args.workdir, tag, env)
        results.save()

    for s in list(cache):
        cache.pop(s).close()
    free_memory()
    if args.reference_fp32 and time.time() + 30 < deadline:
        try:
            log("fp32 reference (our torch backend, TF32 off)")
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                ref = our_system("torch", folder, device, torch.float32, kwargs, args.seed, args.prompt,
                                 preset=args.preset, weight_seed=args.weight_seed)
                ref_batches = sorted({b for b in args.batches if b <= 4})
                for b in ref_batches:
                    if time.time() + 10 > deadline:
                        break
                    np.save(args.workdir / f"images-{tag}-fp32_reference-b{b}.npy",
                            np.asarray(ref.call(b), dtype=np.float16))
                    entry.setdefault("reference_batches", []).append(b)
                ref.close()
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            free_memory()
        except Exception as e:
            log(f"fp32 reference FAILED: {type(e).__name__}: {e}")
            entry["reference_error"] = f"{type(e).__name__}: {e}"
    analyse(entry, args.workdir, tag, env)
    results.save()
    written = [out] + render(results.doc, out)
    strip = image_strip(args.workdir, tag, out) if args.preset != "dalle2" else None
    if strip:
        written.append(strip)
    print()
    print(out.with_suffix(".md").read_text())
    for w in written:
        log(f"wrote {w}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
