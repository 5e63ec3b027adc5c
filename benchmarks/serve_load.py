"""Load test of `unclip serve`: N concurrent clients against the HTTP server on 127.0.0.1, versus the same
requests sent one at a time to a plain `Pipeline`.

    python benchmarks/serve_load.py [--clients 1 4 8 16] [--requests 8] [--steps 25 25 7] [--threads 1]

The server runs as its own process (`python -m unclip serve`, loopback only). For every client count, the
sequential baseline (the same request mix, one `Pipeline.__call__` at a time, in this process, with the
server idle) runs right before the concurrent level, so each ratio compares two measurements taken minutes
apart on the same (shared) machine. Each client sends its requests back to back (a closed loop): with c
clients and R requests per level the run is bounded (R = max(--requests, 2c)) and stops by itself.
Reports throughput (images/s), p50/p95/p99 latency, the stage batch sizes the server ran (read back from
its /metrics), and the goal at 8 clients: throughput ≥ 1.5× sequential, p99 ≤ 5× one request alone.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

PROMPTS = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow star",
           "a big purple circle on the right", "an orange square", "a green star and a red circle",
           "a blue triangle at the top"]


def request_mix(count: int, steps) -> list[dict]:
    """The fixed mix: prompts in turn, seed = index, the same steps (so that they can batch)."""
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": list(steps), "n": 1} for i in range(count)]


def post(port: int, body: dict) -> float:
    """Seconds for one generation over HTTP (raises on anything but 200)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {raw[:300]!r}")
        if len(json.loads(raw)["data"]) != body["n"]:
            raise RuntimeError("wrong number of images")
    finally:
        conn.close()
    return time.perf_counter() - start


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def batch_counts(port: int) -> dict:
    """{stage: {batch size: count}} so far, from the server's Prometheus histogram (exact up to 16)."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict = {}
    for family in text_string_to_metric_families(get(port, "/metrics")[1].decode()):
        if family.name != "unclip_batch_size":
            continue
        cumulative: dict = {}
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf":
                cumulative.setdefault(s.labels["stage"], []).append((float(s.labels["le"]), s.value))
        for stage, buckets in cumulative.items():
            buckets.sort()
            prev, counts = 0.0, {}
            for le, total in buckets:
                if total - prev > 0:
                    counts[int(le)] = int(total - prev)
                prev = total
            out[stage] = counts
    return out


def diff_counts(after: dict, before: dict) -> dict:
    return {stage: {size: n - before.get(stage, {}).get(size, 0) for size, n in sizes.items()
                    if n - before.get(stage, {}).get(size, 0) > 0} for stage, sizes in after.items()}


def percentiles(values) -> dict:
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def run_level(port: int, clients: int, bodies: list[dict]) -> dict:
    """`clients` threads sending `bodies` (shared, in order) back to back; latencies and wall time."""
    lock = threading.Lock()
    queue = list(bodies)
    latencies, errors = [], []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop(0)
            try:
                dt = post(port, body)
                with lock:
                    latencies.append(dt)
            except Exception as e:  # noqa: BLE001 - reported, never hidden
                with lock:
                    errors.append(repr(e))

    before = batch_counts(port)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    images = sum(b["n"] for b in bodies) - len(errors)
    return {"clients": clients, "requests": len(bodies), "errors": errors, "wall_s": wall,
            "throughput_images_per_s": images / wall, "latency_s": percentiles(latencies),
            "batch_sizes": diff_counts(batch_counts(port), before)}


def run_sequential(pipe, bodies: list[dict]) -> dict:
    """The same requests one at a time on a plain Pipeline (in this process)."""
    import torch
    latencies = []
    start = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        s = b["steps"]
        pipe(b["prompt"], num_images_per_prompt=b["n"], generator=torch.Generator().manual_seed(b["seed"]),
             prior_num_inference_steps=s[0], decoder_num_inference_steps=s[1], super_res_num_inference_steps=s[2],
             progress=False)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"requests": len(bodies), "wall_s": wall, "throughput_images_per_s": sum(b["n"] for b in bodies) / wall,
            "latency_s": percentiles(latencies)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int):
    cmd = [sys.executable, "-m", "unclip", "serve", "--preset", args.preset, "--port", str(port),
           "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-queue", "256",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {' '.join(cmd)}")
        try:
            if get(port, "/health")[0] == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("the server did not become healthy within 300 s")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = result["levels"]
    clients = [lv["clients"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for q in ("p50", "p95", "p99"):
        ax1.plot(clients, [lv["latency_s"][q] for lv in levels], marker="o", label=f"server {q}")
    single = result["single_request_latency_s"]
    ax1.axhline(single, color="gray", linestyle="--", label="one request alone (Pipeline)")
    ax1.axhline(5 * single, color="red", linestyle=":", label="goal at 8 clients: p99 ≤ 5× alone")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("latency (s)")
    ax1.set_xticks(clients)
    ax1.legend(fontsize=8)
    ax2.plot(clients, [lv["throughput_images_per_s"] for lv in levels], marker="o", label="server (batched stages)")
    ax2.plot(clients, [lv["sequential"]["throughput_images_per_s"] for lv in levels], marker="s", linestyle="--",
             label="Pipeline, one at a time")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("images / s")
    ax2.set_xticks(clients)
    ax2.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"unclip serve, {s['preset']} model, {'/'.join(map(str, s['steps']))} steps, CPU "
                 f"({s['torch_threads']} torch thread(s), {os.cpu_count()} shared cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 per client)")
    p.add_argument("--steps", type=int, nargs=3, default=[25, 25, 7])
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and Pipeline alike")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "2026-12-01-serve_load-toy-cpu.json"))
    p.add_argument("--plot", default=None, help="PNG (default: the JSON path with .png)")
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1:
        raise SystemExit("--clients and --requests must be >= 1")

    import torch
    torch.set_num_threads(args.threads)
    from unclip import Pipeline
    pipe = Pipeline.from_preset(args.preset)
    port = free_port()
    load_before = os.getloadavg()
    server = start_server(args, port)
    levels = []
    try:
        warm = request_mix(2, args.steps)  # first calls pay one-time costs, on both sides
        run_sequential(pipe, warm[:1])
        run_level(port, 2, warm)
        for c in args.clients:
            bodies = request_mix(max(args.requests, 2 * c), args.steps)
            seq = run_sequential(pipe, bodies[:args.requests])
            level = run_level(port, c, bodies)
            level["sequential"] = seq
            level["throughput_ratio"] = level["throughput_images_per_s"] / seq["throughput_images_per_s"]
            levels.append(level)
            print(f"clients {c:3d}: {level['throughput_images_per_s']:.3f} img/s "
                  f"({level['throughput_ratio']:.2f}x sequential {seq['throughput_images_per_s']:.3f}), latency "
                  f"p50 {level['latency_s']['p50']:.2f} p95 {level['latency_s']['p95']:.2f} "
                  f"p99 {level['latency_s']['p99']:.2f} s, batches {level['batch_sizes']}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    single = statistics.median(lv["sequential"]["latency_s"]["p50"] for lv in levels)
    at8 = next((lv for lv in levels if lv["clients"] == 8), None)
    goal = None
    if at8 is not None:
        goal = {"throughput_ratio": at8["throughput_ratio"], "p99_over_single": at8["latency_s"]["p99"] / single,
                "throughput_goal": 1.5, "p99_goal": 5.0}
        goal["met"] = goal["throughput_ratio"] >= 1.5 and goal["p99_over_single"] <= 5.0
    result = {
        "benchmark": "serve_load", "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "note": "2 CPU cores shared with other agents' jobs: absolute times are noisy; each level's "
                            "ratio is against the sequential run just before it"},
        "settings": {"preset": args.preset, "steps": args.steps, "torch_threads": args.threads,
                     "max_batch": args.max_batch, "requests_per_level": "max(requests, 2 x clients)",
                     "requests": args.requests, "mix": "prompts in turn, seed = index, n = 1, same steps",
                     "server": "python -m unclip serve (own process, 127.0.0.1)",
                     "sequential": "Pipeline.__call__ one request at a time, same process as the clients"},
        "single_request_latency_s": single, "levels": levels, "goal_at_8_clients": goal}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(json.dumps(goal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
