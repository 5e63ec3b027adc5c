"""Parity of the diffusion prior and the text projection with diffusers (the reference peer).

Reference models get non-trivial random weights, are written with diffusers' `save_pretrained`, and are read
back through our real loading path (`unclip.models.load_model`); our `save_model` output must in turn load
in diffusers and reproduce its outputs exactly.
"""
import json
import math

import pytest
import torch
from diffusers import PriorTransformer as RefPrior
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as RefTextProj
from helpers import THREAD_COUNTS, max_rel_err, torch_threads

from unclip.config import Config, ConfigError
from unclip.models import load_model, save_model
from unclip.models.prior import PriorConfig, PriorTransformer
from unclip.models.text_proj import TextProj, TextProjConfig

TOL = 1e-5

PRIOR_CONFIGS = {
    # Karlo's layout, shrunk.
    "small": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=7),
    # Odd model width (15: the sinusoid gets a zero pad), more heads/layers, and the dimension/norm/activation
    # switches other checkpoints use that we also support.
    "variant": dict(num_attention_heads=3, attention_head_dim=5, num_layers=3, embedding_dim=10, num_embeddings=9,
                    time_embed_dim=20, embedding_proj_dim=8, clip_embed_dim=6, norm_in_type="layer",
                    embedding_proj_norm_type="layer", time_embed_act_fn="gelu"),
}
TEXT_PROJ_CONFIGS = {
    "small": dict(clip_extra_context_tokens=4, clip_embeddings_dim=12, time_embed_dim=16, cross_attention_dim=10),
    "variant": dict(clip_extra_context_tokens=3, clip_embeddings_dim=8, time_embed_dim=6, cross_attention_dim=14),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with noise of a sensible scale (diffusers zero-inits several of them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name == "clip_std":
                p.copy_(0.5 + noise.abs())
            elif p.dim() == 2 and name.endswith("weight"):      # Linear: ~unit-variance activations
                p.copy_(noise / math.sqrt(p.shape[1]))
            elif "norm" in name and name.endswith("weight"):    # LayerNorm gain
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:                                               # embeddings, clip_mean, learned CFG vector
                p.copy_(0.5 * noise)
    return model.eval()


def text_mask(lengths, num_tokens):
    """Bool (B, num_tokens): the first `length` tokens of each row are real."""
    return torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]


def prior_inputs(cfg: dict, seed: int):
    """A CFG-shaped batch of 4: rows 0-1 are 'unconditional' (BOS+EOS only), rows 2-3 padded prompts."""
    gen = torch.Generator().manual_seed(seed)
    n, d = cfg["num_embeddings"], cfg["embedding_dim"]
    proj_dim = cfg.get("embedding_proj_dim") or d
    b = 4
    return dict(
        hidden_states=torch.randn(b, d, generator=gen),
        proj_embedding=torch.randn(b, proj_dim, generator=gen),
        encoder_hidden_states=torch.randn(b, n, d, generator=gen),
        attention_mask=text_mask([2, 2, n - 3, n], n),
    )


@pytest.fixture(scope="module", params=sorted(PRIOR_CONFIGS))
def prior_pair(request, tmp_path_factory):
    cfg = PRIOR_CONFIGS[request.param]
    torch.manual_seed(0)
    ref = randomize_(RefPrior(**cfg), seed=1)
    folder = str(tmp_path_factory.mktemp(f"prior-{request.param}"))
    ref.save_pretrained(folder)
    ours = load_model(folder, PriorTransformer)
    return request.param, cfg, ref, ours


def ref_prior(ref, inputs, timestep):
    with torch.no_grad():
        return ref(timestep=timestep, **inputs).predicted_image_embedding


@pytest.mark.parametrize("timestep_kind", ["int", "0-dim", "per-sample", "per-sample-float", "one-element"])
def test_prior_matches_reference(prior_pair, timestep_kind):
    name, cfg, ref, ours = prior_pair
    inputs = prior_inputs(cfg, seed=2)
    timestep = {
        "int": 999,
        "0-dim": torch.tensor(17),
        "per-sample": torch.tensor([0, 250, 0, 250]),        # CFG halves share timesteps
        "per-sample-float": torch.tensor([3.5, 640.25, 3.5, 640.25]),
        "one-element": torch.tensor([500]),
    }[timestep_kind]
    expected = ref_prior(ref, inputs, timestep)
    with torch.no_grad():
        actual = ours(timestep=timestep, **inputs)
    clip_dim = cfg.get("clip_embed_dim") or cfg["embedding_dim"]
    assert actual.shape == (4, clip_dim)
    assert expected.abs().max() > 0.1  # non-trivial output
    assert max_rel_err(actual, expected) <= TOL


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_prior_bit_identical_to_reference(prior_pair, threads):
    """fp32 CPU outputs equal diffusers' bit for bit at every thread count (the cascade's t = 999 steps
    amplify any one-ulp difference); padded prompts and the t = 999 of the first step included."""
    _, cfg, ref, ours = prior_pair
    inputs = prior_inputs(cfg, seed=6)
    timestep = torch.tensor([999, 999, 500, 3])
    with torch_threads(threads):
        expected = ref_prior(ref, inputs, timestep)
        with torch.no_grad():
            actual = ours(timestep=timestep, **inputs)
    assert torch.equal(actual, expected), (actual - expected).abs().max().item()


def test_prior_output_depends_on_mask_and_timestep(prior_pair):
    """Guards against a vacuous parity: the inputs the masks and timesteps carry must change the output."""
    _, cfg, _, ours = prior_pair
    inputs = prior_inputs(cfg, seed=3)
    with torch.no_grad():
        base = ours(timestep=10, **inputs)
        other_t = ours(timestep=900, **inputs)
        longer = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
        other_mask = ours(timestep=10, **longer)
    assert max_rel_err(other_t, base) > 1e-3
    assert max_rel_err(other_mask[:3], base[:3]) > 1e-3   # rows 0-2 were padded
    assert torch.equal(other_mask[3], base[3])             # row 3 was already all real


def test_prior_fully_padded_row_matches_reference(prior_pair):
    """A row with no real text token: padded positions are never read, so the output still equals diffusers."""
    _, cfg, ref, ours = prior_pair
    inputs = prior_inputs(cfg, seed=4)
    inputs["attention_mask"] = text_mask([0, 1, 2, 0], cfg["num_embeddings"])
    timestep = torch.tensor([5, 50, 500, 999])
    expected = ref_prior(ref, inputs, timestep)
    with torch.no_grad():
        actual = ours(timestep=timestep, **inputs)
    assert torch.isfinite(actual).all()
    assert max_rel_err(actual, expected) <= TOL


def test_prior_post_process_latents(prior_pair):
    _, cfg, ref, ours = prior_pair
    clip_dim = cfg.get("clip_embed_dim") or cfg["embedding_dim"]
    latents = torch.randn(3, clip_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.post_process_latents(latents)
        actual = ours.post_process_latents(latents)
    assert not torch.allclose(expected, latents, atol=1e-2)
    assert max_rel_err(actual, expected) <= TOL


def test_prior_round_trip_through_reference(prior_pair, tmp_path):
    name, cfg, ref, ours = prior_pair
    save_model(ours, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["_class_name"] == "PriorTransformer"
    reloaded = RefPrior.from_pretrained(str(tmp_path)).eval()
    for key, value in cfg.items():
        assert reloaded.config[key] == value, key
    inputs = prior_inputs(cfg, seed=6)
    timestep = torch.tensor([1, 2, 3, 4])
    assert torch.equal(ref_prior(reloaded, inputs, timestep), ref_prior(ref, inputs, timestep))


def test_prior_low_precision_runs(prior_pair, tmp_path):
    """bf16 weights and activations (the timestep sinusoid stays fp32) give a close answer."""
    _, cfg, ref, ours = prior_pair
    save_model(ours, str(tmp_path))
    low = load_model(str(tmp_path), PriorTransformer, dtype=torch.bfloat16)
    inputs = prior_inputs(cfg, seed=7)
    with torch.no_grad():
        expected = ours(timestep=torch.tensor(700), **inputs)
        actual = low(timestep=torch.tensor(700), **inputs)
    assert actual.dtype == torch.bfloat16
    assert max_rel_err(actual.float(), expected) < 5e-2


def test_prior_karlo_state_dict_matches_reference():
    """Full-size Karlo layout (on the meta device: no memory): identical tensor names and shapes."""
    with torch.device("meta"):
        ref = RefPrior()
        ours = PriorTransformer(PriorConfig.from_config(Config(dict(ref.config), "karlo/prior/config.json")))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(list(ours.buffers())) == 0   # the reference's causal mask buffer is non-persistent
    assert sum(math.prod(s) for s in our_shapes.values()) == 1_022_030_080


def test_prior_rejects_bad_inputs(prior_pair):
    _, cfg, _, ours = prior_pair
    inputs = prior_inputs(cfg, seed=8)
    with pytest.raises(ValueError, match="timestep"):
        ours(timestep=torch.tensor([1, 2, 3]), **inputs)           # neither (), (1,) nor (B,)
    with pytest.raises(ValueError, match="timestep"):
        ours(timestep=2.5, **inputs)                                # reference would silently truncate
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(timestep=1, **dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :-1]))
    with pytest.raises(ValueError, match="proj_embedding"):
        ours(timestep=1, **dict(inputs, proj_embedding=inputs["proj_embedding"][:2]))
    with pytest.raises(TypeError, match="attention_mask"):
        ours(timestep=1, **dict(inputs, attention_mask=inputs["attention_mask"].long()))


@pytest.mark.parametrize("key, value", [
    ("added_emb_type", None),
    ("encoder_hid_proj_type", None),
    ("additional_embeddings", 3),
    ("norm_in_type", "group"),
    ("time_embed_act_fn", "tanh"),
    ("attention_head_dim", 0),
    ("some_new_switch", True),
])
def test_prior_unsupported_config_names_key_and_file(tmp_path, key, value):
    data = {"_class_name": "PriorTransformer", **PRIOR_CONFIGS["small"], key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_model(str(tmp_path), PriorTransformer)
    assert key in str(info.value) and str(path) in str(info.value)


# --------------------------------------------------------------------------------------------- text projection

@pytest.fixture(scope="module", params=sorted(TEXT_PROJ_CONFIGS))
def text_proj_pair(request, tmp_path_factory):
    cfg = TEXT_PROJ_CONFIGS[request.param]
    ref = randomize_(RefTextProj(**cfg), seed=11)
    folder = str(tmp_path_factory.mktemp(f"text-proj-{request.param}"))
    ref.save_pretrained(folder)
    return cfg, ref, load_model(folder, TextProj)


def text_proj_inputs(cfg: dict, images: int, cfg_on: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, clip_dim = images * (2 if cfg_on else 1), cfg["clip_embeddings_dim"]
    return dict(image_embeddings=torch.randn(images, clip_dim, generator=gen),
                prompt_embeds=torch.randn(batch, clip_dim, generator=gen),
                text_encoder_hidden_states=torch.randn(batch, 7, clip_dim, generator=gen),
                do_classifier_free_guidance=cfg_on)


@pytest.mark.parametrize("cfg_on, images", [(True, 2), (False, 3)])
def test_text_proj_matches_reference(text_proj_pair, cfg_on, images):
    cfg, ref, ours = text_proj_pair
    inputs = text_proj_inputs(cfg, images, cfg_on, seed=12)
    with torch.no_grad():
        ref_tokens, ref_time = ref(**inputs)
        tokens, time = ours(**inputs)
    batch = images * (2 if cfg_on else 1)
    assert tokens.shape == (batch, cfg["clip_extra_context_tokens"] + 7, cfg["cross_attention_dim"])
    assert time.shape == (batch, cfg["time_embed_dim"])
    assert max_rel_err(tokens, ref_tokens) <= TOL
    assert max_rel_err(time, ref_time) <= TOL
    if cfg_on:  # the unconditional half really uses the learned vector (identical rows for equal prompts)
        extra = cfg["clip_extra_context_tokens"]
        assert torch.equal(tokens[0, :extra], tokens[1, :extra])
        assert not torch.allclose(tokens[0, :extra], tokens[images, :extra])


def test_text_proj_round_trip_through_reference(text_proj_pair, tmp_path):
    cfg, ref, ours = text_proj_pair
    save_model(ours, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["_class_name"] == "UnCLIPTextProjModel"
    reloaded = RefTextProj.from_pretrained(str(tmp_path)).eval()
    inputs = text_proj_inputs(cfg, 2, True, seed=13)
    with torch.no_grad():
        for a, b in zip(reloaded(**inputs), ref(**inputs)):
            assert torch.equal(a, b)


def test_text_proj_karlo_state_dict_matches_reference():
    karlo = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1536, cross_attention_dim=1536)
    with torch.device("meta"):
        ref = RefTextProj(**karlo)
        ours = TextProj(TextProjConfig.from_config(Config(karlo)))
    assert ({k: tuple(v.shape) for k, v in ours.state_dict().items()}
            == {k: tuple(v.shape) for k, v in ref.state_dict().items()})


def test_text_proj_rejects_bad_inputs(text_proj_pair):
    cfg, _, ours = text_proj_pair
    inputs = text_proj_inputs(cfg, 2, True, seed=14)
    with pytest.raises(ValueError, match="prompt_embeds"):
        ours(**dict(inputs, do_classifier_free_guidance=False))      # batch 4 vs 2 images
    with pytest.raises(TypeError, match="do_classifier_free_guidance"):
        ours(**dict(inputs, do_classifier_free_guidance=torch.tensor(True)))
    with pytest.raises(ValueError, match="text_encoder_hidden_states"):
        ours(**dict(inputs, text_encoder_hidden_states=inputs["text_encoder_hidden_states"][..., :-1]))


@pytest.mark.parametrize("change", ["missing cross_attention_dim", "unknown key"])
def test_text_proj_unsupported_config_names_key_and_file(tmp_path, change):
    data = {"_class_name": "UnCLIPTextProjModel", **TEXT_PROJ_CONFIGS["small"]}
    if change == "missing cross_attention_dim":
        key = "cross_attention_dim"
        del data[key]
    else:
        key = "clip_extra_context_tokens_norm"
        data[key] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_model(str(tmp_path), TextProj)
    assert key in str(info.value) and str(path) in str(info.value)
