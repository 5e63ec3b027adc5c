"""`unclip bench`: time the cascade per stage and end to end over batch sizes.

    unclip bench --preset karlo --device cuda --dtype fp16 --backend fast --batch 1 4 8 --json out.json
    unclip bench --preset tiny --steps 2 2 2 --runs 3               # runs on a CPU too (torch backend)
    unclip bench ... --profile trace.json                           # + one profiled call, Chrome trace format

Method (docs/architecture.md, "Performance method"): warm-up calls first (compilation, CUDA-graph capture, allocator growth), then `--runs`
timed calls per batch size with the same prompt, steps and seed; the median is reported. On CUDA the device
is synchronised around every timed region, so host wall-clock times are device times. Stages are timed by
an `unclip.Observer` (`StageTimer`) passed to each call: "text", then each sampling stage; what the call
spends elsewhere (text_proj, upscaling, output conversion) is "other". NVTX ranges (CUDA only) mark each
call and each stage; with --profile, eager loops also get a range per step (a captured loop replays as one
graph, so its steps have none: `--no-graphs` shows them). Torch runs with `--threads` intra-op threads
(default 1, the setting services pin; printed in the output).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .observers import Observer

COMMANDS = ("bench",)
SCHEMA = "unclip-bench/1"


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="time the cascade: per-stage and end-to-end medians, images/s, peak memory",
                       description=__doc__.split("\n\n")[0])
    from .cli_common import add_model_args
    add_model_args(b)
    b.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call, one run series each")
    b.add_argument("--steps", type=int, nargs=3, metavar=("PRIOR", "DECODER", "SUPER_RES"), default=(25, 25, 7),
                   help="sampling steps of the prior, the decoder and the upsampler(s), each >= 1")
    b.add_argument("--guidance", type=float, nargs=2, metavar=("PRIOR", "DECODER"), default=None,
                   help="guidance scales, each in [0, 100] (default: the model's own: 4 2 for toy, 4 8 for Karlo)")
    b.add_argument("--threads", type=int, default=1, help="torch intra-op threads (services pin this)")
    b.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                   help="ddpm: Karlo's strided DDPM; ddim: DDIM (eta 0)")
    b.add_argument("--runs", type=int, default=10, help="timed calls per batch size (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size before timing")
    b.add_argument("--seed", type=int, default=0, help="seed of every timed call")
    b.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="the prompt of every call")
    b.add_argument("--no-graphs", action="store_true",
                   help="backend fast/tensorrt: keep the kernels/engines, skip CUDA-graph capture")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON ('-' for stdout)")
    b.add_argument("--profile", metavar="TRACE", help="profile one extra call per first batch size into a Chrome "
                   "trace (open in chrome://tracing or ui.perfetto.dev)")
    b.add_argument("--quiet", action="store_true", help="no progress lines on stderr (the table still prints)")


# --------------------------------------------------------------------------------------------- environment


def _run_text(cmd, cwd=None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    """Where the numbers come from: device, driver, library versions, the source commit (when in a git tree)."""
    import torch

    from . import __version__
    device = torch.device(device)
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "unclip": __version__, "host_cpus": os.cpu_count(), "device_type": device.type}
    from importlib import metadata
    for dist in ("triton", "diffusers", "transformers"):  # versions only: nothing here imports them
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   driver=_run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    else:
        env.update(device=platform.processor() or platform.machine(), driver=None)
    # The source commit: from git (this package's tree, else the working directory), else from
    # UNCLIP_GIT_COMMIT / UNCLIP_GIT_DIRTY (set by benchmarks/gpu_suite.sh where the copy has no .git).
    env["git_commit"] = env["git_dirty"] = None
    for root in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()):
        commit = _run_text(["git", "rev-parse", "HEAD"], cwd=root)
        if commit:
            env["git_commit"] = commit
            env["git_dirty"] = bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root))
            break
    if env["git_commit"] is None and os.environ.get("UNCLIP_GIT_COMMIT"):
        env["git_commit"] = os.environ["UNCLIP_GIT_COMMIT"]
        env["git_dirty"] = os.environ.get("UNCLIP_GIT_DIRTY", "") not in ("", "0", "false")
    return env


# --------------------------------------------------------------------------------------------- timing


def synchronize(device) -> None:
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Ranges:
    """NVTX (CUDA) and profiler ranges around stages and steps; no-ops where unavailable."""

    def __init__(self, nvtx: bool):
        import torch
        self.nvtx = nvtx and torch.cuda.is_available()
        self.torch = torch

    @contextlib.contextmanager
    def __call__(self, name: str):
        torch = self.torch
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            if self.nvtx:
                torch.cuda.nvtx.range_pop()


class StageTimer(Observer):
    """An `unclip.Observer` that times each stage of a call (device synchronised at stage boundaries).

    `timer.stages` holds {stage: seconds} of the calls since the last `reset()`; with `step_ranges`, every
    step of an eager loop also gets a profiler/NVTX range ending at that step."""

    def __init__(self, device, *, nvtx: bool = True, step_ranges: bool = False):
        self.device = device
        self.ranges = _Ranges(nvtx)
        self.step_ranges = step_ranges
        self.stages: dict[str, float] = {}
        self._open: dict = {}

    def reset(self) -> None:
        self.stages = {}

    def on_stage_start(self, name, stage):
        synchronize(self.device)
        ctx = self.ranges(f"unclip/{name}")
        ctx.__enter__()
        self._open[name] = (time.perf_counter(), ctx)

    def on_step(self, stage, i, t, latents):
        if self.step_ranges:  # a zero-length marker named after the step, in the stage's range
            with self.ranges(f"{stage.name}/step {i}"):
                pass

    def on_stage_end(self, name, stage, latents):
        synchronize(self.device)
        start, ctx = self._open.pop(name)
        ctx.__exit__(None, None, None)
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def call_kwargs(args_or_dict) -> dict:
    """Pipeline keywords for one timed call, from parsed CLI args (steps, guidance, sampler)."""
    a = args_or_dict
    return dict(prior_num_inference_steps=a.steps[0], decoder_num_inference_steps=a.steps[1],
                super_res_num_inference_steps=a.steps[2], prior_guidance_scale=a.guidance[0],
                decoder_guidance_scale=a.guidance[1], sampler=a.sampler)


def bench_batch(pipe, batch: int, *, runs: int, warmup: int, seed: int, prompt: str, kwargs: dict,
                nvtx: bool = True, log=None) -> dict:
    """Warm up, then time `runs` calls of `batch` images; medians per stage and end to end."""
    import torch
    device = pipe.device
    cuda = device.type == "cuda"
    timer = StageTimer(device, nvtx=nvtx)

    def one_call():
        timer.reset()
        synchronize(device)
        start = time.perf_counter()
        with timer.ranges(f"unclip/call batch={batch}"):
            pipe(prompt, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(seed),
                 output_type="pt", progress=False, observer=timer, **kwargs)
            synchronize(device)
        return time.perf_counter() - start, dict(timer.stages)

    for _ in range(warmup):
        one_call()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    totals, stages = [], []
    for r in range(runs):
        total, per_stage = one_call()
        totals.append(total)
        stages.append(per_stage)
        if log is not None:
            log(f"  batch {batch}: run {r + 1}/{runs} {total:.4f} s")
    names = list(stages[0])
    med = {n: statistics.median(s.get(n, 0.0) for s in stages) for n in names}
    e2e = statistics.median(totals)
    med["other"] = max(0.0, e2e - sum(med.values()))
    return {"batch": batch, "runs": runs, "warmup": warmup, "e2e_median_s": e2e, "e2e_runs_s": totals,
            "e2e_min_s": min(totals), "stages_median_s": med, "images_per_s": batch / e2e,
            "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def profile_call(pipe, batch: int, path: str, *, seed: int, prompt: str, kwargs: dict) -> None:
    """One call under torch.profiler, with stage and step ranges, written as a Chrome trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    timer = StageTimer(pipe.device, nvtx=True, step_ranges=True)
    with profile(activities=activities) as prof:
        pipe(prompt, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(seed), output_type="pt",
             progress=False, observer=timer, **kwargs)
        synchronize(pipe.device)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prof.export_chrome_trace(path)


# --------------------------------------------------------------------------------------------- command


def _check(args) -> None:
    for name in ("runs", "warmup", "threads"):
        low = 0 if name == "warmup" else 1
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}; got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1; got {args.batch}")
    if any(s < 1 for s in args.steps):
        raise ValueError(f"--steps must be >= 1 each; got {list(args.steps)}")


def _table(report: dict) -> str:
    c = report["config"]
    head = (f"unclip bench: {c['source']}, {c['device']}, {c['dtype']}, backend {c['backend']}"
            f"{' (no graphs)' if c['no_graphs'] else ''}, {c['threads']} thread(s), "
            f"steps {'/'.join(map(str, c['steps']))}, "
            f"guidance {'/'.join(f'{g:g}' for g in c['guidance'])}, median of {c['runs']} runs")
    stages = []
    for r in report["results"]:
        stages += [s for s in r["stages_median_s"] if s not in stages]
    cols = ["batch", "e2e s", "img/s"] + [f"{s} s" for s in stages] + ["peak GiB"]
    lines = [head, "  ".join(f"{h:>10s}" for h in cols)]
    for r in report["results"]:
        mem = r["peak_gpu_mem_bytes"]
        cells = [str(r["batch"]), f"{r['e2e_median_s']:.4f}", f"{r['images_per_s']:.3f}"]
        cells += [f"{r['stages_median_s'].get(s, 0.0):.4f}" for s in stages]
        cells.append("-" if mem is None else f"{mem / 2**30:.2f}")
        lines.append("  ".join(f"{x:>10s}" for x in cells))
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from .cli_common import check_guidance, check_output_file, open_pipeline
    _check(args)
    check_guidance(args.guidance)
    for flag, path in (("--json", args.json), ("--profile", args.profile)):
        if path and path != "-":
            check_output_file(path, flag)
    torch.set_num_threads(args.threads)
    options = {"cuda_graphs": False} if args.no_graphs else None
    if args.no_graphs and args.backend not in ("fast", "tensorrt"):
        raise ValueError(f"--no-graphs applies to backends fast and tensorrt; got --backend {args.backend}")
    pipe, where = open_pipeline(args, runner_options=options)
    source = where["model"] if "model" in where else f"preset {where['preset']}"
    args.guidance = list(args.guidance or [pipe.call_default("prior_guidance_scale"),
                                           pipe.call_default("decoder_guidance_scale")])
    kwargs = call_kwargs(args)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = [bench_batch(pipe, b, runs=args.runs, warmup=args.warmup, seed=args.seed, prompt=args.prompt,
                           kwargs=kwargs, log=log) for b in args.batch]
    runner = pipe.runner.describe()
    report = {
        "schema": SCHEMA, "kind": "bench", "environment": environment(pipe.device),
        "config": {"source": source, "device": str(pipe.device), "dtype": args.dtype, "backend": args.backend,
                   "no_graphs": bool(args.no_graphs), "cuda_graphs": bool(runner.get("cuda_graphs", False)),
                   "threads": args.threads,
                   "steps": list(args.steps), "guidance": list(args.guidance), "sampler": args.sampler,
                   "runs": args.runs, "warmup": args.warmup, "seed": args.seed, "prompt": args.prompt,
                   "timer": "host perf_counter, device synchronised around each call and stage" +
                            (" (CUDA)" if pipe.device.type == "cuda" else "")},
        "weights_bytes": pipe.cascade.weights_bytes(),
        "results": results,
    }
    if args.profile:
        profile_call(pipe, args.batch[0], args.profile, seed=args.seed, prompt=args.prompt, kwargs=kwargs)
        report["profile_trace"] = os.path.abspath(args.profile)
    if "graph_stats" in pipe.runner.describe():
        report["graph_stats"] = pipe.runner.describe()["graph_stats"]
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
    elif args.json:
        from .files import atomic_write_text
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, text + "\n")
    if args.json != "-":
        print(_table(report))
        if args.profile:
            print(f"profile trace: {args.profile}")
    return 0
