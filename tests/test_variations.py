"""Image variations vs diffusers' UnCLIPImageVariationPipeline on the same saved random-weight cascade.

The cascade is saved like Karlo's image-variation release (image_encoder/, feature_extractor/ with the
legacy openai-style preprocessor_config.json, no prior) and loaded back with `Pipeline.from_pretrained`, so
the loader is covered too. Same weights, arguments and CPU generator seed -> same images (fp32, max |Δ| 1e-4),
at 1, 2 and the default number of intra-op threads (the same count on both sides).
"""
import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import unclip
from helpers import THREAD_COUNTS, diffusers_unclip_pipeline, max_rel_err, torch_threads
from unclip.presets import build_components, build_preset, preset_configs

TOL = 1e-4
STEPS = dict(decoder_num_inference_steps=4, super_res_num_inference_steps=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (tests/conftest.py)


def _variation_configs():
    """The tiny cascade without a prior, its feature extractor in Karlo's (openai's) legacy format."""
    c = copy.deepcopy(preset_configs("tiny"))
    c["prior"] = None
    c["feature_extractor"] = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                              "feature_extractor_type": "CLIPFeatureExtractor",
                              "image_mean": [0.48145466, 0.4578275, 0.40821073],
                              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("variations") / "karlo-image-variations")
    unclip.Pipeline(build_components(_variation_configs(), seed=2)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(folder):
    return unclip.Pipeline.from_pretrained(folder), diffusers_unclip_pipeline(folder, variations=True)


def _image(seed, h, w, mode="RGB"):
    pixels = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


IMAGES = [_image(0, 40, 52), _image(1, 70, 33, "RGBA"), _image(2, 32, 32, "L")]


def _assert_same_images(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOL, np.abs(a - b).max()
    inside = ((a > 0.01) & (a < 0.99)).mean()  # not vacuous: neither saturated nor constant
    assert inside > 0.3, f"only {inside:.0%} of pixels are unsaturated"
    assert a.std() > 0.01


def test_loads_an_image_variation_folder(folder, pair):
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert index["_class_name"] == "UnCLIPImageVariationPipeline"
    assert "prior" not in index and "image_encoder" in index and "feature_extractor" in index
    ours, _ = pair
    assert ours.components.prior is None and ours.components.image_encoder is not None
    assert ours.stage_names == ["decoder", "super_res"]
    assert ours.components.image_processor_config["feature_extractor_type"] == "CLIPFeatureExtractor"
    with pytest.raises(ValueError, match=r"no prior .* pipe.variations"):
        ours("a prompt")


def test_encode_image_matches_transformers(pair):
    ours, theirs = pair
    pixel_values = theirs.feature_extractor(images=IMAGES, return_tensors="pt").pixel_values
    expected = theirs.image_encoder(pixel_values).image_embeds
    got = ours.encode_image(IMAGES)
    assert got.shape == expected.shape == (3, 32)
    assert max_rel_err(got, expected) <= 1e-5
    assert max_rel_err(ours.encode_image(pixel_values=pixel_values), expected) <= 1e-5
    assert (got[0] - got[1]).abs().max() > 1e-2  # different images, different embeddings


@pytest.mark.parametrize("kwargs", [
    dict(image=IMAGES[0]),
    dict(image=IMAGES[:2], num_images_per_prompt=2),
    dict(image=IMAGES, decoder_guidance_scale=1.0),
    dict(image=IMAGES[1], num_images_per_prompt=3, decoder_guidance_scale=3.0),
], ids=["single", "batch_and_images_per_prompt", "guidance_off", "images_per_prompt"])
@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_matches_diffusers(pair, kwargs, threads):
    ours, theirs = pair
    with torch_threads(threads):
        a = ours.variations(generator=torch.Generator().manual_seed(7), output_type="np", progress=False, **STEPS,
                            **kwargs).images
        b = theirs(generator=torch.Generator().manual_seed(7), output_type="np", **STEPS, **kwargs).images
    _assert_same_images(a, b)


def test_matches_diffusers_with_embeddings_pixel_values_and_latents(pair):
    ours, theirs = pair
    embeds = ours.encode_image(IMAGES[:2])
    common = dict(output_type="np", **STEPS)
    a = ours.variations(image_embeddings=embeds, generator=torch.Generator().manual_seed(3), progress=False,
                        **common).images
    b = theirs(image_embeddings=embeds, generator=torch.Generator().manual_seed(3), **common).images
    _assert_same_images(a, b)

    # diffusers reads a tensor `image` as CLIP pixel values; ours takes those as pixel_values=.
    pixel_values = theirs.feature_extractor(images=IMAGES[2], return_tensors="pt").pixel_values
    g = torch.Generator().manual_seed(4)
    dec = ours.components.decoder.config
    sr = ours.components.upsamplers[0].first.config
    latents = dict(decoder_latents=torch.randn(2, 3, dec.sample_size, dec.sample_size, generator=g),
                   super_res_latents=torch.randn(2, 3, sr.sample_size, sr.sample_size, generator=g))
    a = ours.variations(pixel_values=pixel_values, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
                        progress=False, **latents, **common).images
    b = theirs(pixel_values, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5), **latents,
               **common).images
    _assert_same_images(a, b)


def test_outputs_and_return_types(pair):
    ours, _ = pair
    kw = dict(progress=False, **STEPS)
    out = ours.variations(IMAGES[0], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
                          output_type="pt", **kw)
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.equal(out.image_embeddings[0], out.image_embeddings[1])
    assert (out.images[0] - out.images[1]).abs().max() > 1e-2  # same embedding, different noise
    pil = ours.variations(IMAGES[0], generator=torch.Generator().manual_seed(0), return_dict=False, **kw)[0]
    assert isinstance(pil, list) and pil[0].size == (32, 32)
    # A different input image changes the result (the embedding is really used).
    other = ours.variations(IMAGES[2], generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    assert (other[0] - out.images[0]).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(), ValueError, "exactly one of image, image_embeddings and pixel_values"),
    (dict(image=IMAGES[0], image_embeddings=torch.zeros(1, 32)), ValueError, "exactly one of"),
    (dict(image=[]), ValueError, "image is empty"),
    (dict(image=np.zeros((8, 8, 3), np.float16) * np.nan), ValueError, "image contains NaN"),
    (dict(image=np.zeros((4, 4, 3), bool)), TypeError, "image must hold real numbers"),
    (dict(image=np.zeros((2, 2, 3, 8, 8))), ValueError, "image must be an image of 2 dims"),
    (dict(image="cat.png"), TypeError, "image must be a PIL.Image"),
    (dict(image_embeddings=torch.zeros(1, 31)), ValueError, r"image_embeddings must have shape \(batch, 32\)"),
    (dict(image_embeddings=torch.full((1, 32), float("nan"))), ValueError, "image_embeddings contains NaN"),
    (dict(pixel_values=torch.zeros(1, 3, 16, 16)), ValueError, r"pixel_values must have shape \(B, 3, 32, 32\); got \(1, 3, 16, 16\)"),
    (dict(image=IMAGES[0], num_images_per_prompt=0), ValueError, "num_images_per_prompt must be in"),
    (dict(image=IMAGES[0], decoder_guidance_scale=float("inf")), ValueError, "decoder_guidance_scale must be finite"),
    (dict(image=IMAGES[0], output_type="jpg"), ValueError, "output_type must be one of"),
    (dict(image=IMAGES[0], sampler={"prior": "ddim"}), ValueError, r"sampler: unknown stage"),
], ids=lambda v: None)
def test_bad_arguments_raise_clear_errors(pair, kwargs, error, pattern):
    ours, _ = pair
    with pytest.raises(error, match=pattern):
        ours.variations(progress=False, **kwargs)


def test_presets_have_image_encoders():
    tiny = build_preset("tiny")
    assert tiny.image_encoder.config.projection_dim == tiny.text_encoder.config.projection_dim
    pipe = unclip.Pipeline(tiny)
    images = pipe.variations(IMAGES[0], generator=torch.Generator().manual_seed(0), output_type="np",
                             progress=False, **STEPS).images
    assert images.shape == (1, 32, 32, 3) and images.std() > 0.01
    for name in ("karlo", "dalle2"):
        c = build_preset(name, device="meta")
        vision = c.image_encoder.config
        # CLIP ViT-L/14 (docs/architecture.md): 24 layers × 1024 wide, 16 heads, 224² in 14² patches, projected to 768.
        assert (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.image_size,
                vision.patch_size, vision.projection_dim) == (24, 1024, 16, 224, 14, 768)
        assert vision.projection_dim == c.text_encoder.config.projection_dim == c.text_proj.config.clip_embeddings_dim
        params = sum(p.numel() for p in c.image_encoder.parameters())
        assert abs(params / 1e6 - 304) < 3, params  # 303M tower + 0.8M projection
        assert c.image_processor_config["size"] == 224 and c.image_processor_config["crop_size"] == 224


def test_no_image_encoder_is_a_clear_error(pair):
    pipe = unclip.Pipeline(dataclasses.replace(pair[0].components, image_encoder=None))
    with pytest.raises(ValueError, match="no image encoder"):
        pipe.variations(IMAGES[0], progress=False)
    # ... but given embeddings, the decoder alone is enough.
    out = pipe.variations(image_embeddings=torch.randn(1, 32), output_type="pt", progress=False, **STEPS)
    assert out.images.shape == (1, 3, 32, 32)
