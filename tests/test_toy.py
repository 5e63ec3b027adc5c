"""The embedded `toy` cascade (engine/assets/toy, trained by training/ on the shapes world).

What it must do (issue 8): load as a preset in the engine's diffusers layout (fp16, <= 30 MB); draw what the
caption says at the default steps (judged by pixel analysis: colour >= 90 %, shape >= 80 %, position >= 80 %
on a fixed subset of the benchmark prompts; benchmarks/caption_match.py runs the full >= 200), and every
other backend within 2 points of torch; vary what the caption leaves free; keep colour and shape in
variations, move along text directions, and invert. Also checks that the short-sequence forwards used in
training equal the engine's forwards.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import unclip
from helpers import diffusers_unclip_pipeline, max_rel_err
from unclip import shapes
from unclip.presets import TOY_PATH, build_preset, preset_configs, toy_installed

# The module tests the shipped weights; a checkout without them (training/ writes them) says so.
pytestmark = [pytest.mark.skipif(not toy_installed(), reason="this checkout has no toy weights (engine/assets/toy)"),
              pytest.mark.usefixtures("one_thread")]  # small networks (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = 80  # prompts generated in the caption-match test (the benchmark runs 240)


@pytest.fixture(scope="module")
def pipe():
    return unclip.Pipeline.from_preset("toy")


def _uint8(images):
    return np.round(np.asarray(images) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the folder

def test_toy_folder_is_a_small_fp16_diffusers_layout():
    index = json.load(open(os.path.join(TOY_PATH, "model_index.json")))
    assert index["_class_name"] == "UnCLIPPipeline"
    for key in ("tokenizer", "text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last",
                "prior_scheduler", "decoder_scheduler", "super_res_scheduler", "image_encoder", "feature_extractor"):
        assert key in index, key
    total, tensors = 0, 0
    for folder, _, files in os.walk(TOY_PATH):
        for f in files:
            path = os.path.join(folder, f)
            total += os.path.getsize(path)
            if f.endswith(".safetensors"):
                with safe_open(path, "pt") as st:
                    for k in st.keys():
                        assert st.get_slice(k).get_dtype() == "F16", (path, k)
                        tensors += 1
    assert tensors > 100 and total <= 30 * 2 ** 20, (tensors, total)


def test_toy_preset_loads_the_trained_weights():
    c = build_preset("toy")
    assert c.prior is not None and c.image_encoder is not None and len(c.upsamplers) == 1
    assert c.decoder.config.sample_size == 32 and c.upsamplers[0].first.config.sample_size == 64
    # Trained, not random: the prior's normalisation statistics are data statistics, not the init values.
    assert not torch.allclose(c.prior.clip_std, torch.ones_like(c.prior.clip_std))
    assert "toy" in unclip.presets.PRESETS
    with pytest.raises(ValueError, match="trained weights"):
        preset_configs("toy")


def test_diffusers_runs_the_toy_folder_with_the_same_seeds(pipe):
    # The shipped folder is a genuine diffusers unCLIP cascade: diffusers' UnCLIPPipeline, built from its
    # components, draws the same images from the same seed (fp16 weights, computed in fp32 on both sides).
    theirs = diffusers_unclip_pipeline(TOY_PATH)
    # diffusers knows nothing of the folder's recommended guidance (`_unclip_call_defaults`): pass it.
    steps = dict(prior_num_inference_steps=5, decoder_num_inference_steps=5, super_res_num_inference_steps=3,
                 prior_guidance_scale=pipe.call_default("prior_guidance_scale"),
                 decoder_guidance_scale=pipe.call_default("decoder_guidance_scale"))
    prompt = ["a small green triangle at the top", "a large purple square"]
    a = pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="np", progress=False, **steps).images
    b = theirs(prompt, generator=torch.Generator().manual_seed(3), output_type="np", **steps).images
    assert np.abs(a - b).max() <= 2e-3


# ------------------------------------------------------------------------------- training forwards are exact

def _training_common():
    spec = importlib.util.spec_from_file_location("toy_training_common", os.path.join(REPO, "training", "common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_sequence_training_forwards_equal_the_engine_forwards():
    C = _training_common()
    c = build_preset("toy")
    torch.manual_seed(0)
    prompts = ["a small red circle on the left on a white background", "a blue shape", ""]
    full = c.tokenizer(prompts)
    length = int(full.attention_mask.sum(1).max())
    with torch.no_grad():
        emb77, hid77 = c.text_encoder(full.input_ids)
        emb, hid = c.text_encoder(full.input_ids[:, :length])
        mask = full.attention_mask[:, :length]
        assert max_rel_err(emb, emb77) <= 1e-5
        assert max_rel_err(hid[mask], hid77[:, :length][mask]) <= 1e-5

        dim = c.prior.config.embedding_dim
        x_t, t = torch.randn(3, dim), torch.tensor([999, 500, 3])
        expected = c.prior(x_t, t, emb77, hid77, full.attention_mask)
        assert max_rel_err(C.prior_forward(c.prior, x_t, t, emb, hid, mask), expected) <= 1e-5

        z = torch.randn(3, dim)
        ctx77, time77 = c.text_proj(z, emb77, hid77, False)
        ctx, time_embed = c.text_proj(z, emb, hid, False)
        extra = ctx.shape[1] - length
        sample = torch.randn(3, 3, 32, 32)
        out77 = c.decoder(sample, t, ctx77, time77, torch.nn.functional.pad(full.attention_mask, (extra, 0), value=True))
        out = c.decoder(sample, t, ctx, time_embed, torch.nn.functional.pad(mask, (extra, 0), value=True))
        assert max_rel_err(out, out77) <= 1e-5


# ------------------------------------------------------------------------------------------- what it draws

@pytest.fixture(scope="module")
def torch_match(pipe):
    return shapes.caption_match(pipe, shapes.benchmark_prompts(SUBSET, 0), seed=0, batch_size=SUBSET)


def test_caption_match_at_default_steps(torch_match):
    acc = torch_match["accuracy"]
    assert acc["colour"] >= 0.9 and acc["shape"] >= 0.8 and acc["position"] >= 0.8, acc


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("fast", marks=pytest.mark.gpu),
                                     pytest.param("tensorrt", marks=pytest.mark.gpu)])
def test_every_backend_draws_within_two_points_of_torch(backend, torch_match):
    if backend == "onnxruntime":
        for module in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(module, reason=f"backend onnxruntime needs {module}")
        device, dtype = "cpu", torch.float32
    else:
        # The fast backend's kernels are checked on the CPU by tests/test_kernels.py (Triton's interpreter, and
        # a whole tiny pipeline); 80 toy prompts through the interpreter would take hours.
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip(f"backend {backend!r} runs on CUDA (with TRITON_INTERPRET unset)")
        if backend == "tensorrt":
            pytest.importorskip("tensorrt", reason="backend tensorrt needs the tensorrt package")
        device, dtype = "cuda", torch.float16
    other = unclip.Pipeline.from_preset("toy", backend=backend, device=device, dtype=dtype)
    result = shapes.caption_match(other, shapes.benchmark_prompts(SUBSET, 0), seed=0, batch_size=SUBSET)
    for attr, acc in torch_match["accuracy"].items():
        assert abs(result["accuracy"][attr] - acc) <= 0.02, (attr, result["accuracy"], torch_match["accuracy"])
    if device == "cpu":
        # The toy stages predict x0, so no step is ill-conditioned (no t = 999 ε division): the images agree.
        diff = np.abs(result["images"].astype(int) - torch_match["images"].astype(int))
        assert np.percentile(diff, 99) <= 2, (diff.max(), np.percentile(diff, 99))


def test_attributes_left_free_vary_across_seeds(pipe):
    out = pipe("a red circle", num_images_per_prompt=16, generator=torch.Generator().manual_seed(5),
               output_type="np", progress=False)
    judged = shapes.judge_batch(_uint8(out.images))
    assert sum(j.colour == "red" for j in judged) >= 15
    # Small circles are ~7 px across at the decoder's 32×32, the hardest shape to draw there (the toy before
    # 2026-12-02 drew 14/16 here): the named shape must dominate.
    assert sum(j.shape == "circle" for j in judged) >= 12
    for attr in ("size", "position", "background"):
        assert len({getattr(j, attr) for j in judged}) >= 2, (attr, [getattr(j, attr) for j in judged])


def test_cli_generate_defaults_to_toy(tmp_path):
    from PIL import Image
    from unclip.cli import main
    out = tmp_path / "square.png"
    assert main(["generate", "a large blue square in the center on a white background", "--out", str(out),
                 "--quiet"]) == 0
    image = Image.open(out)
    assert json.loads(image.text["unclip"])["preset"] == "toy"
    assert image.size == (64, 64)
    assert shapes.judge(image).colour == "blue"


# ------------------------------------------------------------------------------------------- image features

def test_inversion_reconstructs_images_of_the_trained_decoder(pipe):
    # DDIM inversion of a real (x0-predicting) decoder: mean |Δ| ≈ 0.009 at 50 steps on images in [-1, 1]
    # (measured; edges carry the largest errors, ≈ 0.3).
    scenes = shapes.sample_scenes(4, 11)
    inv = pipe.invert([shapes.render(s) for s in scenes], 50)
    error = (pipe.reconstruct(inv) - inv.image).abs()
    assert error.mean() < 0.03 and error.max() < 0.6, (error.mean(), error.max())


def test_variations_keep_colour_and_shape(pipe):
    scenes = shapes.sample_scenes(16, 42)
    out = pipe.variations([shapes.render(s) for s in scenes], generator=torch.Generator().manual_seed(0),
                          output_type="np", progress=False)
    judged = shapes.judge_batch(_uint8(out.images))
    for attr in ("colour", "shape"):
        acc = np.mean([getattr(j, attr) == getattr(s, attr) for s, j in zip(scenes, judged)])
        assert acc >= 0.8, (attr, acc)


def test_text_diff_red_to_blue_changes_colour_keeps_shape(pipe):
    scene = shapes.sample_scenes(1, 3, colour="red", shape="square", size="large", position="center",
                                 background="white")[0]
    out = pipe.text_diff(shapes.render(scene), "a red square", "a blue square", thetas=(0.0, 0.5),
                         generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    first, last = shapes.judge_batch(_uint8(out.images))
    assert first.colour == "red" and last.colour == "blue", (first, last)
    assert last.shape == "square", last


def test_interpolation_moves_from_one_end_to_the_other(pipe):
    red, blue = (shapes.render(shapes.sample_scenes(1, 8, colour=c, shape="circle", size="large",
                                                    position="center", background="white")[0])
                 for c in ("red", "blue"))
    out = pipe.interpolate(red, blue, num=7, generator=torch.Generator().manual_seed(0), output_type="np",
                           progress=False)
    judged = shapes.judge_batch(_uint8(out.images))
    colours = [j.colour for j in judged]
    assert all(j.found and j.shape == "circle" for j in judged), judged
    # The toy's six colours are categories: the frames switch from red to blue once, somewhere inside the path
    # (measured: after the third of seven frames), never back, and nothing else appears.
    switch = colours.index("blue")
    assert 1 < switch < len(colours) - 1 and colours == ["red"] * switch + ["blue"] * (len(colours) - switch), colours
