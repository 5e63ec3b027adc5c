"""`unclip bench` on the CPU (tiny preset, torch backend): JSON fields, stage breakdown, Chrome trace, errors."""
import json

import pytest

from unclip.cli import main

ARGS = ["bench", "--preset", "tiny", "--steps", "2", "2", "2", "--quiet"]


def test_bench_writes_json_with_stages_and_a_chrome_trace(tmp_path):
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    assert main(ARGS + ["--steps", "1", "2", "1", "--batch", "1", "2", "--runs", "2", "--warmup", "0",
                        "--json", str(out), "--profile", str(trace)]) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == "unclip-bench/1" and report["kind"] == "bench"
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and "driver" in env and "git_commit" in env
    cfg = report["config"]
    assert cfg["steps"] == [1, 2, 1] and cfg["guidance"] == [4.0, 8.0] and cfg["backend"] == "torch"
    assert cfg["runs"] == 2 and cfg["cuda_graphs"] is False
    assert report["weights_bytes"] > 0
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        stages = r["stages_median_s"]
        assert list(stages) == ["text", "prior", "decoder", "super_res", "other"]
        assert all(v >= 0 for v in stages.values()) and stages["decoder"] > 0
        assert len(r["e2e_runs_s"]) == 2 and r["e2e_min_s"] <= r["e2e_median_s"]
        # the stages are disjoint parts of the call
        assert sum(stages.values()) == pytest.approx(r["e2e_median_s"], rel=0.35)
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["e2e_median_s"])
        assert r["peak_gpu_mem_bytes"] is None  # CPU
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"unclip/text", "unclip/prior", "unclip/decoder", "unclip/super_res"} <= names
    assert "decoder/step 1" in names  # eager loop: one range per step


def test_bench_prints_a_table_and_json_to_stdout(capsys):
    assert main(["bench", "--preset", "tiny", "--steps", "1", "1", "1", "--runs", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "unclip bench: preset tiny, cpu, fp32, backend torch" in table and "super_res s" in table
    assert main(ARGS + ["--steps", "1", "1", "1", "--runs", "1", "--warmup", "0", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["steps"] == [1, 1, 1] and len(report["results"]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch sizes must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--steps", "0", "1", "1"], "--steps must be >= 1"),
])
def test_bench_rejects_bad_arguments(extra, message, capsys):
    assert main(ARGS + extra) == 2
    assert message in capsys.readouterr().err
