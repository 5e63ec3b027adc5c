"""End-to-end: our Pipeline vs diffusers' UnCLIPPipeline on the same saved random-weight cascades.

Same weights, same arguments, same CPU generator seed -> same images (fp32, max |Δ| <= 1e-4), which proves
the models, samplers, guidance, noise draw order and pre/post-processing all agree. The comparisons run at
1, 2 and the default number of intra-op threads (the same count on both sides): parity must not depend on it.
"""
import copy
import math

import numpy as np
import pytest
import torch

import unclip
from helpers import THREAD_COUNTS, diffusers_unclip_pipeline, torch_threads
from unclip.presets import build_components, preset_configs

TOL = 1e-4
STEPS = dict(prior_num_inference_steps=4, decoder_num_inference_steps=5, super_res_num_inference_steps=3)


def _second_config():
    """A second, differently shaped cascade: other widths, heads, block counts and layers per block."""
    c = copy.deepcopy(preset_configs("tiny"))
    c["text_encoder"].update(hidden_size=48, intermediate_size=96, num_attention_heads=3, projection_dim=48,
                             num_hidden_layers=1)
    c["prior"].update(num_attention_heads=3, attention_head_dim=16, num_layers=3, embedding_dim=48)
    c["text_proj"].update(clip_embeddings_dim=48, time_embed_dim=96, cross_attention_dim=40)
    c["decoder"].update(block_out_channels=[24, 32, 48], layers_per_block=2, cross_attention_dim=40,
                        attention_head_dim=8, norm_num_groups=8,
                        down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 2,
                        up_block_types=["SimpleCrossAttnUpBlock2D"] * 2 + ["ResnetUpsampleBlock2D"])
    c["super_res"][0].update(block_out_channels=[16, 32, 32], layers_per_block=2, norm_num_groups=8,
                             down_block_types=["ResnetDownsampleBlock2D"] * 3,
                             up_block_types=["ResnetUpsampleBlock2D"] * 3)
    return c


CONFIGS = {"tiny": lambda: preset_configs("tiny"), "second": _second_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ours = unclip.Pipeline(build_components(CONFIGS[request.param](), seed=1))
    ours.save_pretrained(str(path))
    theirs = diffusers_unclip_pipeline(str(path))
    # Load ours back from disk too: the comparison then also covers the loader.
    return unclip.Pipeline.from_pretrained(str(path)), theirs


def _both(pair, **kwargs):
    ours, theirs = pair
    a = ours(generator=torch.Generator().manual_seed(7), output_type="np", progress=False, **STEPS, **kwargs).images
    b = theirs(generator=torch.Generator().manual_seed(7), output_type="np", **STEPS, **kwargs).images
    return a, b


def _assert_same_images(a, b):
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOL, np.abs(a - b).max()
    # Not vacuous: images are neither saturated nor constant.
    inside = ((a > 0.01) & (a < 0.99)).mean()
    assert inside > 0.3, f"only {inside:.0%} of pixels are unsaturated"
    assert a.std() > 0.01


@pytest.mark.parametrize("kwargs", [
    dict(prompt="a red circle on a white background"),
    dict(prompt=["a horse", "", "An Astronaut, riding; a HORSE!!"]),
    dict(prompt="two dogs", num_images_per_prompt=2),
    dict(prompt="no guidance", prior_guidance_scale=1.0, decoder_guidance_scale=0.5),
    dict(prompt="guidance on one stage", prior_guidance_scale=0.5, decoder_guidance_scale=3.0),
], ids=["single", "list", "images_per_prompt", "guidance_off", "guidance_mixed"])
@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_matches_diffusers(pair, kwargs, threads):
    with torch_threads(threads):
        _assert_same_images(*_both(pair, **kwargs))


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_matches_diffusers_with_explicit_latents(pair, threads):
    ours, _ = pair
    g = torch.Generator().manual_seed(3)
    rows = 2
    dim = ours.components.prior.config.embedding_dim
    dec = ours.components.decoder.config
    sr = ours.components.upsamplers[0].first.config
    latents = dict(prior_latents=torch.randn(rows, dim, generator=g),
                   decoder_latents=torch.randn(rows, dec.in_channels, dec.sample_size, dec.sample_size, generator=g),
                   super_res_latents=torch.randn(rows, sr.in_channels // 2, sr.sample_size, sr.sample_size, generator=g))
    with torch_threads(threads):
        _assert_same_images(*_both(pair, prompt=["a cat", "a dog"], **latents))


def test_output_types_agree(pair):
    ours, _ = pair
    kw = dict(prompt="a tree", progress=False, **STEPS)
    np_img = ours(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    pt_img = ours(generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    pil = ours(generator=torch.Generator().manual_seed(0), output_type="pil", **kw).images
    assert pt_img.shape == (1, 3, *np_img.shape[1:3])
    np.testing.assert_array_equal(pt_img.permute(0, 2, 3, 1).numpy(), np_img)
    assert pil[0].size == (np_img.shape[2], np_img.shape[1])
    assert np.abs(np.asarray(pil[0]) / 255.0 - np_img[0]).max() <= 0.5 / 255 + 1e-6
