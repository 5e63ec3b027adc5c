"""The `unclip` command line as a newcomer meets it: help texts and defaults, checks made before any work
(device, dtype, backend, output paths, guidance range), export folders, short warnings, and PNG metadata that
`generate --from-png` reproduces bit for bit. Tiny preset, 1-2 steps, in-process (`unclip.cli.main`)."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import unclip
from unclip.cli import build_parser, main
from unclip.cli_common import EXPORT_BACKENDS
from unclip.runner import runner_names

TINY = ["--preset", "tiny", "--steps", "1", "1", "1", "--quiet"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help_blocks(text: str) -> dict[str, str]:
    """{option string or positional name: its help text, whitespace collapsed} from argparse's help output."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)(?:  +(\S.*))?$", line)
        if m and not line.startswith("   "):
            current = m.group(1)
            blocks[current] = m.group(2) or ""
        elif current is not None and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command builds a pipeline: its checks must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was built before the arguments were checked")
    monkeypatch.setattr(unclip.Pipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(unclip.Pipeline, "from_preset", classmethod(refuse))


def _meta(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["unclip"])


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# --------------------------------------------------------------------------------------------- help

def test_every_command_documents_every_option_and_shows_its_default():
    commands = _commands()
    assert {"generate", "info", "export", "bench", "vary", "interpolate", "edit"} <= set(commands)
    for name, parser in commands.items():
        blocks = _help_blocks(parser.format_help())
        for action in parser._actions:
            if action.dest == "help":
                continue
            key = next((k for k in blocks if k.split(",")[0].split(" ")[0] in (action.option_strings or
                                                                                 [action.dest])), None)
            assert key is not None, (name, action.dest, sorted(blocks))
            text = blocks[key]
            assert action.help and text, f"unclip {name}: {action.dest} has no help text"
            default = action.default
            if default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool):
                shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
                assert f"(default: {shown})" in text or "default" in text, (name, action.dest, text)


def test_generate_help_describes_the_prompt_and_lists_backends_and_presets(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    blocks = _help_blocks(out)
    assert "what to draw" in blocks["prompt"]
    assert "{" + ",".join(runner_names()) + "}" in out
    assert "(default: toy)" in blocks["--preset {tiny,karlo,dalle2,toy}"]
    assert "(default: 0)" in blocks["--seed SEED"] and "(default: 25 25 7)" in blocks["--steps PRIOR DECODER SUPER_RES"]
    assert "(default: cpu)" in blocks["--device DEVICE"] and "default: torch" in blocks[
        "--backend {" + ",".join(runner_names()) + "}"]
    assert "[0, 100]" in blocks["--guidance PRIOR DECODER"]


def test_export_help_offers_the_toy_model(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "toy" in _help_blocks(capsys.readouterr().out)["--preset PRESET"]


def test_bench_defaults_to_the_toy_model_and_its_guidance_and_prints_its_table_when_quiet(capsys):
    assert main(["bench", "--steps", "1", "1", "1", "--runs", "1", "--warmup", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "unclip bench: preset toy" in captured.out and "guidance 4/2" in captured.out
    assert "e2e s" in captured.out and captured.err == ""


# --------------------------------------------------------------------------------------------- checks first

def test_an_unknown_or_absent_device_is_a_one_line_error_before_any_work(no_model_loading, tmp_path, capsys):
    assert main(["generate", "x", "--device", "tpu7", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'tpu7' is not a device name torch knows" in err
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["generate", "x", "--device", missing, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--device {missing}:" in err and "Traceback" not in err
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert main(["vary", str(tmp_path / "in.png"), "--device", "tpu7", "--out", str(tmp_path / "v.png"),
                 "--quiet"]) == 2  # every command checks the same way
    assert "--device 'tpu7'" in capsys.readouterr().err


def test_an_unavailable_backend_and_a_bad_guidance_are_refused_before_any_work(no_model_loading, capsys,
                                                                             monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        assert main(["generate", "x", "--backend", "fast", "--quiet"]) == 2
        assert "--backend fast is not available on cpu" in capsys.readouterr().err
    assert main(["generate", "x", "--guidance", "4", "200", "--quiet"]) == 2
    assert "--guidance must be in [0, 100]" in capsys.readouterr().err
    assert main(["generate", "x", "--guidance", "-1", "2", "--quiet"]) == 2


@pytest.mark.parametrize("out, message", [
    ("/proc/x.png", "--out /proc/x.png: cannot write files in /proc"),
    ("{tmp}", "--out {tmp} is a folder; give a file name"),
    ("{tmp}/x.jpg", "the name must end in .png"),
    ("{tmp}/file.txt/x.png", "is a file, not a folder"),
], ids=["proc", "folder", "not-png", "under-a-file"])
def test_the_output_path_is_checked_before_any_work(out, message, tmp_path, no_model_loading, capsys):
    (tmp_path / "file.txt").write_text("a file")
    out, message = out.format(tmp=tmp_path), message.format(tmp=tmp_path)
    if out.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    assert main(["generate", "x", "--out", out, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert main(["vary", str(tmp_path / "in.png"), "--out", out, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    if not out.endswith(".jpg"):
        assert main(["bench", "--json", out.replace(".png", ".json"), "--quiet"]) == 2
        assert "--json" in capsys.readouterr().err


def test_a_missing_output_folder_is_created(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "a.png"
    assert main(["generate", "a red circle", *TINY, "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_fp16_on_a_cpu_gets_a_note(tmp_path, capsys):
    assert main(["generate", "a red circle", *TINY, "--dtype", "fp16", "--out", str(tmp_path / "h.png")]) == 0
    assert "note: --dtype fp16 on a CPU runs slower than fp32" in capsys.readouterr().err
    assert main(["generate", "a red circle", *TINY, "--out", str(tmp_path / "f.png")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_errors_and_info_from_a_fresh_process():
    bad = subprocess.run([sys.executable, "-m", "unclip", "generate", "x", "--preset", "tiny", "--steps", "0", "2",
                          "2", "--quiet"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "prior_num_inference_steps must be in 1..1000" in bad.stderr
    assert "Traceback" not in bad.stderr
    info = subprocess.run([sys.executable, "-m", "unclip", "info"], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and "torch:" in info.stdout and "backends:" in info.stdout


# --------------------------------------------------------------------------------------------- export folders

def test_export_formats_are_the_exporters_own():
    from unclip.export.native import FORMAT as NATIVE
    from unclip.export.onnx import FORMAT as ONNX
    assert set(EXPORT_BACKENDS) == {ONNX, NATIVE}
    assert all(b in runner_names() for runs in EXPORT_BACKENDS.values() for b in runs)


def test_an_export_folder_with_the_wrong_backend_says_which_backend_runs_it(tmp_path, no_model_loading, capsys):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "unclip-onnx"}))
    assert main(["generate", "x", "--model", str(folder), "--backend", "torch", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX export (manifest.json of `unclip export`): run it with --backend onnxruntime or tensorrt" in err


def test_generate_recognises_an_onnx_export_and_runs_it_with_onnxruntime(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    folder = str(tmp_path / "tiny-onnx")
    assert main(["export", "--preset", "tiny", "--format", "onnx", "--out", folder, "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx.png"
    assert main(["generate", "a red circle", "--model", folder, "--steps", "1", "1", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert "is an ONNX export: using --backend onnxruntime" in capsys.readouterr().err
    meta = _meta(out)
    assert meta["backend"] == "onnxruntime" and meta["model"] == os.path.abspath(folder)


# --------------------------------------------------------------------------------------------- warnings

def test_a_very_long_prompt_warns_briefly_and_the_png_holds_it_once(tmp_path):
    words = [f"word{i}" for i in range(10_000)]
    prompt = " ".join(words)
    out = tmp_path / "long.png"
    with pytest.warns(UserWarning) as caught:
        assert main(["generate", prompt, *TINY, "--out", str(out)]) == 0
    messages = [str(w.message) for w in caught if "longer than" in str(w.message)]
    assert messages and all(len(m) < 400 for m in messages), [len(m) for m in messages]
    assert "tokens were dropped" in messages[0] and "word9999" not in messages[0]
    with Image.open(out) as image:
        stored = "".join(image.text.values())
    assert stored.count("word9999") == 1 and _meta(out)["settings"]["prompt"] == prompt


# --------------------------------------------------------------------------------------------- reproducible PNGs

@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    out = folder / "pair.png"
    assert main(["generate", "a small red circle", "--preset", "tiny", "-n", "2", "--seed", "3", "--steps", "2", "3",
                 "2", "--sampler", "ddim", "--eta", "0.5", "--guidance", "3", "5", "--out", str(out),
                 "--quiet"]) == 0
    return [folder / "pair-0.png", folder / "pair-1.png"]


def test_png_metadata_records_everything_that_made_the_image(two_images):
    meta = [_meta(p) for p in two_images]
    m = meta[1]
    assert m["command"] == "generate" and m["unclip_version"] == unclip.__version__
    assert m["command_line"].startswith("unclip generate '{prompt}' --preset tiny -n 2 --seed 3")
    assert m["num_images"] == 2 and [x["index"] for x in meta] == [0, 1]
    assert m["preset"] == "tiny" and re.fullmatch(r"[0-9a-f]{64}", m["model_sha256"])
    assert (m["backend"], m["device"], m["dtype"]) == ("torch", "cpu", "fp32")
    s = m["settings"]
    assert s["prompt"] == "a small red circle" and s["seed"] == 3 and s["num_images"] == 2
    assert s["steps"] == [2, 3, 2] and s["guidance"] == [3.0, 5.0] and s["sampler"] == "ddim" and s["eta"] == 0.5
    assert s["prior_candidates"] == 1
    with Image.open(two_images[1]) as image:
        assert list(image.text) == ["unclip"]  # stored once, the prompt included


def test_from_png_draws_each_of_two_images_again_bit_for_bit(two_images, tmp_path, capsys):
    originals = [_pixels(p) for p in two_images]
    assert not np.array_equal(originals[0], originals[1])  # two different images, so the index matters
    for k, path in enumerate(two_images):
        again = tmp_path / f"again-{k}.png"
        assert main(["generate", "--from-png", str(path), "--out", str(again), "--quiet"]) == 0
        assert np.array_equal(_pixels(again), originals[k]), k
        meta = _meta(again)
        assert meta["index"] == k and meta["from_png"] == str(path)
        assert meta["settings"] == _meta(path)["settings"]
    assert "differ" not in capsys.readouterr().err


def test_from_png_refuses_other_settings_and_foreign_files(two_images, tmp_path, capsys):
    assert main(["generate", "--from-png", str(two_images[0]), "--seed", "4", "--quiet"]) == 2
    assert "do not also give --seed" in capsys.readouterr().err
    assert main(["generate", "a prompt", "--from-png", str(two_images[0]), "--quiet"]) == 2
    assert "do not also give a prompt" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["generate", "--from-png", str(tmp_path / "plain.png"), "--quiet"]) == 2
    assert "has no 'unclip' metadata" in capsys.readouterr().err
    assert main(["generate", "--quiet"]) == 2
    assert "generate needs a prompt (or --from-png FILE)" in capsys.readouterr().err
