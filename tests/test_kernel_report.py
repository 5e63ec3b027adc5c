"""benchmarks/kernel_report.py on the CPU: the Triton kernels, at the configurations the launchers choose for
the presets' shapes, compile for sm_80 and sm_90 without register spills and within shared memory.

No GPU is needed: Triton's NVIDIA backend compiles for a target given by name, and the wheel's ptxas reports
registers and spills. Compilation runs in spawned processes without TRITON_INTERPRET (which this suite sets
for the kernels' own tests). The CI set is every specialization the presets' networks launch (--scope calls)
at the suite's batches 1, 4 and 8, all dtypes, both targets; the committed report
(benchmarks/results/*-kernel_report-cpu-compile.json) also covers the mask / SiLU / scale-shift /
channels-last variants at batches up to 16 (python benchmarks/kernel_report.py --check).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report as R  # noqa: E402

_MISSING = R.nvidia_backend_available()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}: cannot compile for a GPU target")

KERNELS = {"attention_forward_kernel", "group_norm_whole_group_kernel", "group_norm_partial_stats_kernel",
           "group_norm_finalize_kernel", "group_norm_apply_kernel"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--scope", "calls",
                        "--batches", "1", "4", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_variant_compiles_for_both_targets_without_spills(rows):
    failing = [f"{r['target']} {r['kernel']} {r['variant']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    assert not failing, "\n".join(failing)
    assert all(r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows)
    for r in rows:
        assert 0 <= r["shared_bytes"] <= R.LIMITS[r["target"]].shared_per_block
        assert 0 < r["registers"] <= 255 and 0 < r["occupancy"] <= 1


def test_report_covers_every_kernel_target_and_dtype(rows):
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in KERNELS for t in R.LIMITS}
    att = [r for r in rows if r["kernel"] == "attention_forward_kernel"]
    assert {r["variant"].split()[0] for r in att} == {"fp16", "bf16", "fp32"}
    assert any("causal" in r["variant"] and "has_keep" in r["variant"] for r in att)  # prior
    assert any("causal" not in r["variant"] and "has_keep" in r["variant"] for r in att)  # decoder
    assert {"karlo/decoder", "dalle2/decoder", "toy/decoder", "karlo/prior", "dalle2/super_res_2"} <= \
        {u for r in rows for u in r["used_by"]}
    # (kernel, variant, target) identifies a row; the variant names the launch configuration
    assert len({(r["kernel"], r["variant"], r["target"]) for r in rows}) == len(rows)
    for r in att:
        c = r["constexprs"]
        assert f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_D']}" in r["variant"] and f"w{r['num_warps']}" in r["variant"]


def test_a_deliberately_oversized_block_fails_the_check():
    """What the main test would report: fp16 attention with 256-row query blocks on 4 warps (128 threads)
    keeps a 256x64 fp32 accumulator and a 256x64 fp32 score tile, 256 values a thread before anything
    else, against the 255-register limit, so ptxas must spill inside the key loop."""
    import unclip.kernels as K

    q = torch.empty(1, 1, 256, 64, dtype=torch.float16, device="meta")
    with K.record_launches(K.LaunchTarget.cuda(90, 132)) as launches:
        K.attention(q, q, q, block_m=256, block_n=64, num_warps=4)
    spec = R.spec_of(launches[0], "sm_90")
    [row] = R.build_rows({spec: {"used_by": {"test"}, "examples": []}}, R.compile_specs([spec], jobs=1, progress=False))
    assert row["ok"], row["error"]
    assert row["spill_stores"] > R.PARKED_SPILL_MAX_BYTES and row["local_in_loops"] > 0, row
    assert any(p.startswith("spills") for p in row["problems"]), row


def test_occupancy_follows_the_documented_limits():
    sm80, sm90 = R.LIMITS["sm_80"], R.LIMITS["sm_90"]
    # 128 registers x 32 lanes = 4096 per warp: 16 warps fit the 64K register file -> 4 blocks of 4 warps
    assert R.occupancy(sm80, 128, 0, 4) == dict(occupancy=0.25, blocks_per_sm=4, limited_by="registers")
    # 254 registers round up to 256 per thread: 8 warps x 8192 = the whole register file -> 1 block
    assert R.occupancy(sm90, 254, 24576, 8)["blocks_per_sm"] == 1
    # 100 KB of shared memory (+1 KB reserved per block): 1 block in A100's 164 KB, 2 in H100's 228 KB
    assert R.occupancy(sm80, 32, 100 * 1024, 4)["blocks_per_sm"] == 1
    assert R.occupancy(sm90, 32, 100 * 1024, 4) == dict(occupancy=0.125, blocks_per_sm=2, limited_by="shared")
    # threads: 24 registers (768 a warp: 85 warps' worth), 16 warps = 512 threads -> 4 blocks fill 2048 threads
    assert R.occupancy(sm90, 24, 0, 16) == dict(occupancy=1.0, blocks_per_sm=4, limited_by="threads")


def test_check_flags_shared_memory_over_the_target_limit():
    row = dict(kernel="k", target="sm_80", ok=True, error=None, spill_stores=0, spill_loads=0,
               shared_bytes=R.LIMITS["sm_80"].shared_per_block + 1, occupancy=0.125)
    assert any("shared memory" in p for p in R.problems(row))
    assert R.problems(dict(row, target="sm_90")) == []  # H100 allows 227 KB per block


def test_specialization_matches_tritons_jit():
    """The report compiles what Triton's JIT would: the same (type, attribute) per argument."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.empty(64, dtype=torch.float16)
    for value in (1, 16, 17, 0, 2 ** 33, 3.5, base, base[8:], base[3:]):
        ours = R._specialize(value)
        kind, attr = native(BaseBackend, value, False, True, True)[:2]
        assert (ours[0], ours[1] or "") == (kind, attr if kind != "fp32" else ""), value
