"""Backend "native" on the trained toy cascade: caption match within 2 points of torch on 80 prompts (the
repo's judge, unclip.shapes), and the `unclip-native` program's PNG equal to the Python native backend's.

The toy folder is compiled once for this module through `Pipeline.from_pretrained(TOY_PATH, backend="native")`
(into a temporary cache, or $UNCLIP_TEST_CACHE when set: local iteration), packages taking batches up to 8,
so prompts go in batches of 4 (× 2 for guidance); torch is judged on the same batches.
"""
import os
import subprocess

import numpy as np
import pytest
import torch

import unclip
import unclip.cli
from unclip import shapes
from unclip.presets import TOY_PATH, toy_installed
from unclip.runner import runner_class

ok, why = runner_class("native").available("cpu")
pytestmark = [pytest.mark.skipif(not ok, reason=f"native runtime not built: {why}"),
              pytest.mark.skipif(not toy_installed(), reason="this checkout has no toy weights (engine/assets/toy)"),
              pytest.mark.usefixtures("one_thread")]

SUBSET = 80
BATCH = 4


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    path = os.environ.get("UNCLIP_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    before = os.environ.get("UNCLIP_CACHE")
    os.environ["UNCLIP_CACHE"] = path
    try:
        yield unclip.Pipeline.from_pretrained(TOY_PATH, backend="native")
    finally:
        if before is None:
            os.environ.pop("UNCLIP_CACHE", None)
        else:
            os.environ["UNCLIP_CACHE"] = before


@pytest.fixture(scope="module")
def toy_export(native):
    return native.cascade.networks.cascade.root


def test_caption_match_within_two_points_of_torch(native):
    prompts = shapes.benchmark_prompts(SUBSET, 0)
    ref = shapes.caption_match(unclip.Pipeline.from_preset("toy"), prompts, seed=0, batch_size=BATCH)
    got = shapes.caption_match(native, prompts, seed=0, batch_size=BATCH)
    for attr, acc in ref["accuracy"].items():
        assert abs(got["accuracy"][attr] - acc) <= 0.02, (attr, got["accuracy"], ref["accuracy"])
    diff = np.abs(got["images"].astype(int) - ref["images"].astype(int))
    assert np.percentile(diff, 99) <= 1, (diff.max(), np.percentile(diff, 99))


def test_program_png_equals_python_native_for_a_toy_caption(native, toy_export, tmp_path):
    from test_native import native_program
    caption = "a large red circle on the left on a white background"
    ids, png = tmp_path / "ids.json", tmp_path / "toy.png"
    assert unclip.cli.main(["tokenize", caption, "--model", toy_export, "--out", str(ids)]) == 0
    run = subprocess.run([native_program(), toy_export, "--ids", str(ids), "--seed", "0", "--out", str(png),
                          "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    got = np.asarray(Image.open(png).convert("RGB"))
    want = np.asarray(native(caption, generator=torch.Generator().manual_seed(0), progress=False).images[0])
    assert got.shape == want.shape
    assert np.array_equal(got, want), np.abs(got.astype(int) - want.astype(int)).max()
    judged = shapes.judge_batch(got[None])[0]
    assert judged.colour == "red"
