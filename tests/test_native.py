"""Backend "native": the cascade loop in C++ (cpp/, `unclip._native`) over AOTInductor packages.

One package set is compiled per test session (the tiny preset saved as a diffusers folder, exported into
the cache through `Pipeline.from_pretrained(folder, backend="native")`, ~2.5 min on 2 cores); every test
here reuses it. Parity tolerance: max |Δ| ≤ 1e-3 on CPU fp32 images in [0, 1] (the issue's bar; measured
differences are ~1e-6, from AOTInductor's fused kernels rounding differently from eager PyTorch).
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import unclip
import unclip.cli
from unclip.config import ConfigError
from unclip.runner import runner_class
from unclip.runners import native as native_runner

ok, why = runner_class("native").available("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"native runtime not built: {why}")

TOL = 1e-3
STEPS = dict(prior_num_inference_steps=5, decoder_num_inference_steps=5, super_res_num_inference_steps=3)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    unclip.Pipeline.from_preset("tiny").save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # $UNCLIP_TEST_CACHE: a cache folder kept between sessions (local iteration; CI compiles afresh).
    path = os.environ.get("UNCLIP_TEST_CACHE") or tmp_path_factory.mktemp("cache")
    before = os.environ.get("UNCLIP_CACHE")
    os.environ["UNCLIP_CACHE"] = str(path)
    yield str(path)
    if before is None:
        os.environ.pop("UNCLIP_CACHE", None)
    else:
        os.environ["UNCLIP_CACHE"] = before


@pytest.fixture(scope="module")
def native(tiny_folder, cache):
    """The native pipeline over the tiny folder (compiled into the cache: the one compile of this module)."""
    torch.set_num_threads(1)
    return unclip.Pipeline.from_pretrained(tiny_folder, backend="native")


@pytest.fixture(scope="module")
def export_dir(native, cache):
    root = native.cascade.networks.cascade.root  # the cache entry the folder was compiled into
    assert os.path.dirname(root) == os.path.join(cache, "native")
    return root


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return unclip.Pipeline.from_pretrained(tiny_folder, backend="torch")


def images(pipe, prompt="a red circle", seed=0, **kw):
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False,
               **{**STEPS, **kw})
    return out.images


def test_native_equals_torch_on_the_saved_folder(native, reference):
    a, b = images(native), images(reference)
    assert a.shape == b.shape and a.shape[0] == 1
    assert float(b.std()) > 0.01  # a real image, not a constant
    assert float((a - b).abs().max()) <= TOL


def test_native_equals_torch_on_the_tiny_preset(native):
    preset = unclip.Pipeline.from_preset("tiny")  # the same weights the folder holds
    kw = dict(prior_candidates=2,  # 2 prompts × 2 candidates × 2 (guidance) = the compiled maximum, 8 sampler={"decoder": "ddim"}, eta={"decoder": 0.5},
              prior_guidance_scale=3.0, decoder_guidance_scale=5.0)
    a, b = images(native, ["a blue square", "a green triangle"], seed=7, **kw), images(preset, ["a blue square",
                                                                                                 "a green triangle"],
                                                                                        seed=7, **kw)
    assert a.shape[0] == 2
    assert float((a - b).abs().max()) <= TOL
    # Unguided (no [uncond; cond] rows): the other layout of every stage.
    a, b = images(native, seed=3, prior_guidance_scale=1.0, decoder_guidance_scale=1.0), \
        images(preset, seed=3, prior_guidance_scale=1.0, decoder_guidance_scale=1.0)
    assert float((a - b).abs().max()) <= TOL


def test_the_cpp_cascade_draws_the_python_noise(native, reference):
    """`Cascade.generate` (the C++ program's path: ids in, noise from libtorch's CPU generator) equals the
    Python cascade at the same seed: same draws in the same order, same stage arithmetic."""
    cascade = native.cascade.networks.cascade  # the runner's unclip._native.Cascade
    tok = reference.cascade.components.tokenizer(["a red circle", "two small squares"])
    settings = {"prior": {"steps": 5}, "decoder": {"steps": 5}, "super_res": [{"steps": 3}],
                "prior_guidance": 4.0, "decoder_guidance": 8.0, "prior_candidates": 2}
    got = cascade.generate(tok.input_ids, tok.attention_mask, settings, 11)
    want = images(reference, ["a red circle", "two small squares"], seed=11, prior_candidates=2,
                  prior_guidance_scale=4.0, decoder_guidance_scale=8.0)
    assert float((got - want).abs().max()) <= TOL


def test_callback_sees_every_step_of_the_native_loop(native):
    seen = []
    images(native, callback=lambda stage, i, t, x: seen.append((stage, i, tuple(x.shape))))
    for stage, steps in (("prior", 5), ("decoder", 5), ("super_res", 3)):
        assert [i for s, i, _ in seen if s == stage] == list(range(steps)), seen


def test_cpp_plans_equal_python_plans():
    from unclip import samplers
    module = native_runner.native_module()
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
                "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0}
    for sampler, eta, steps in (("ddpm", 0.0, 25), ("ddim", 0.3, 7)):
        cpp = module.make_plan(schedule, steps, sampler, eta)
        py = native_runner.plan_dict(samplers.make_plan(samplers.ScheduleConfig(**schedule), steps, sampler=sampler,
                                                        eta=eta))
        assert cpp["timesteps"] == py["timesteps"] and cpp["draws_noise"] == py["draws_noise"]
        assert set(cpp["coef"]) == set(py["coef"])
        for name in py["coef"]:
            assert torch.equal(cpp["coef"][name], py["coef"][name]), name


def test_cache_is_reused(native, tiny_folder, cache, monkeypatch):
    import unclip.export.native as exporter

    def no_compile(*a, **k):
        raise AssertionError("the cached export should have been reused")
    monkeypatch.setattr(exporter, "export_native", no_compile)
    entries = sorted(os.listdir(os.path.join(cache, "native")))
    again = unclip.Pipeline.from_pretrained(tiny_folder, backend="native")
    assert sorted(os.listdir(os.path.join(cache, "native"))) == entries
    assert again.cascade.networks.cascade.root == native.cascade.networks.cascade.root
    assert float((images(again, seed=2) - images(native, seed=2)).abs().max()) == 0.0


def test_export_folder_loads_and_lists_every_file(export_dir):
    from unclip.export.native import read_manifest
    manifest = read_manifest(export_dir)
    assert manifest["target"]["torch"] == torch.__version__
    assert manifest["target"]["cpu_isa"]
    listed = set(manifest["tokenizer"]["files"])
    for net in manifest["networks"].values():
        listed |= set(net["files"])
    on_disk = {os.path.relpath(os.path.join(d, n), export_dir).replace(os.sep, "/")
               for d, _, names in os.walk(export_dir) for n in names} - {"manifest.json"}
    assert listed == on_disk
    pipe = unclip.Pipeline.from_pretrained(export_dir, backend="native")
    assert pipe.backend == "native"


def test_program_png_equals_the_python_native_image(native, export_dir, tmp_path):
    """`unclip-native` (no Python in its process) writes the same PNG the Python native backend gives."""
    program = native_program()
    ids = tmp_path / "ids.json"
    assert unclip.cli.main(["tokenize", "a red circle", "--model", export_dir, "--out", str(ids)]) == 0
    assert json.loads(ids.read_text())["input_ids"][0] == \
        native.cascade.components.tokenizer(["a red circle"]).input_ids[0].tolist()
    png = tmp_path / "img.png"
    run = subprocess.run([program, export_dir, "--ids", str(ids), "--seed", "5", "--out", str(png), "--threads", "1",
                          "--prior-steps", "5", "--decoder-steps", "5", "--super-res-steps", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    got = np.asarray(Image.open(png).convert("RGB"))
    want = np.asarray(native("a red circle", generator=torch.Generator().manual_seed(5), progress=False,
                             **STEPS).images[0])
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # one 8-bit level: float rounding at .5 edges
    assert (got == want).mean() > 0.99


def test_batch_above_the_compiled_maximum_is_a_clear_error(native):
    with pytest.raises(ValueError, match="maximum 8|range 1..8"):
        native(["a red circle"] * 5, progress=False, **STEPS)  # 5 rows × 2 (guidance) = 10 > 8


def test_modified_file_and_other_torch_are_refused(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["torch"] = "2.0.0+cpu"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"2\.0\.0\+cpu.*" + torch.__version__.replace("+", r"\+")):
        unclip.Pipeline.from_pretrained(str(copy), backend="native")
    manifest["target"]["torch"] = torch.__version__
    (copy / "manifest.json").write_text(json.dumps(manifest))
    stats = copy / "prior" / "clip_stats.f32"
    data = bytearray(stats.read_bytes())
    data[0] ^= 1
    stats.write_bytes(bytes(data))  # same size: only the sha256 can tell
    with pytest.raises(ConfigError, match="clip_stats.f32.*sha256"):
        unclip.Pipeline.from_pretrained(str(copy), backend="native")
    # The C++ loader checks on its own too (the program and services do not go through Python).
    module = native_runner.native_module()
    with pytest.raises(module.NativeError, match="clip_stats.f32.*sha256"):
        module.Cascade(str(copy))
    stats.unlink()
    with pytest.raises(module.NativeError, match="clip_stats.f32.*missing"):
        module.Cascade(str(copy), verify_hashes=False)


def test_unavailable_reports_why(monkeypatch):
    def missing():
        raise ImportError("the native runtime is not built: because")
    monkeypatch.setattr(native_runner, "native_module", missing)
    ok, reason = native_runner.NativeRunner.available("cpu")
    assert not ok and "not built" in reason
    ok, reason = native_runner.NativeRunner.available("cuda")
    assert not ok and "CPU packages only" in reason


def test_export_cli_refuses_bad_arguments_before_work(tmp_path):
    not_export = tmp_path / "notes"
    not_export.mkdir()
    (not_export / "keep.txt").write_text("mine")
    assert unclip.cli.main(["export", "--preset", "tiny", "--format", "native", "--out", str(not_export)]) == 2
    assert (not_export / "keep.txt").read_text() == "mine"
    assert unclip.cli.main(["export", "--preset", "tiny", "--format", "native", "--dtype", "fp16",
                            "--out", str(tmp_path / "x")]) == 2
    assert unclip.cli.main(["export", "--preset", "tiny", "--format", "native", "--max-batch", "1",
                            "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def native_program() -> str:
    found = shutil.which("unclip-native")
    if found:
        return found
    for folder in native_runner._candidates():
        path = os.path.join(folder, "unclip-native")
        if os.path.isfile(path):
            return path
    pytest.fail("the unclip-native program was not built (libpng missing?)")
