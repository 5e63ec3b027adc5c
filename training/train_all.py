"""Train the whole toy cascade and write it to engine/assets/toy (about 60-75 minutes on a 2-core CPU).

Stages and their dependencies:

    upsampler  (no dependency)        ─┐
    clip ─┬─ prior                     ├─ assemble -> fp16 diffusers-layout folder
          └─ decoder (+ text_proj)    ─┘

Independent stages run as parallel processes with one thread each (small networks use one core well,
and two threads per process waiting on each other are slow on a busy machine). Every stage is seeded
(`--seed` plus a per-stage offset), so on the same machine and software a rerun gives the same weights.
Per-stage logs go to WORK/<stage>.out and, with timings, to WORK/train.log.

    python training/train_all.py --work /tmp/toy-work [--out engine/assets/toy] [--seed 0] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common as C  # noqa: E402

SEED_OFFSETS = {"clip": 0, "prior": 100, "decoder": 200, "upsampler": 300}


def launch(stage: str, work: str, seed: int, recipe: dict) -> subprocess.Popen:
    args = [sys.executable, os.path.join(HERE, f"train_{stage}.py"), "--work", work,
            "--seed", str(seed + SEED_OFFSETS[stage])]
    for key, value in recipe[stage].items():
        args += [f"--{key}", str(value)]
    out = open(os.path.join(work, f"{stage}.out"), "w")
    env = {**os.environ, "TOY_THREADS": "1"}
    print(f"[train_all] starting {stage}: {' '.join(args[1:])}", flush=True)
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait(procs: dict, start: float) -> None:
    for stage, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"[train_all] stage {stage} failed (exit {proc.returncode}); see its .out file")
        print(f"[train_all] {stage} finished at {time.time() - start:.0f}s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for checkpoints and logs")
    p.add_argument("--out", default=C.ASSET_DIR, help="where the assembled cascade goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps per stage (checks the scripts run)")
    a = p.parse_args(argv)
    recipe = {k: dict(v) for k, v in C.RECIPE.items()}
    if a.quick:
        for r in recipe.values():
            r["steps"] = 3
    os.makedirs(a.work, exist_ok=True)
    start = time.time()
    upsampler = launch("upsampler", a.work, a.seed, recipe)
    wait({"clip": launch("clip", a.work, a.seed, recipe)}, start)
    wait({"prior": launch("prior", a.work, a.seed, recipe), "decoder": launch("decoder", a.work, a.seed, recipe),
          "upsampler": upsampler}, start)
    from assemble import assemble
    assemble(a.work, a.out, {"seed": a.seed, "stages": recipe, "seed_offsets": SEED_OFFSETS,
                             "wall_seconds": round(time.time() - start, 1)})
    print(f"[train_all] total {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
