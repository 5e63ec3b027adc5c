"""The decoder and super-resolution U-Nets against diffusers' UNet2DConditionModel / UNet2DModel.

Each reference model gets non-trivial random weights, is saved with `save_pretrained`, loaded through
`unclip.models.load_model` (the real loading path) and compared in fp32 on random inputs; our model is then
saved with `save_model` and loaded back by diffusers' `from_pretrained`, which must rebuild the same
architecture (same config, same tensors, same outputs).
"""
import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from helpers import THREAD_COUNTS, max_rel_err, torch_threads

from unclip.config import Config, ConfigError
from unclip.models import load_model, save_model
from unclip.models.unet import ConditionalUNet, ConditionalUNetConfig, SuperResUNet, SuperResUNetConfig

TOL = 1e-5

# Small configs covering what the Karlo nets use plus the switches we implement besides.
DECODER_CONFIGS = {
    # Karlo's decoder shape: resnet-only first block, simple cross-attention elsewhere, scale-shift, identity
    # class embedding.
    "karlo_like": dict(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64, 96), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=48, attention_head_dim=16,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8),
    # Per-block layers and head sizes (up blocks index head sizes *unreversed*, like diffusers), additive time
    # conditioning, no class embedding, context group norm, unusual scales, kernels and embedding sizes. The
    # large norm_eps tells the resnets' eps apart from the attention norms' fixed 1e-5.
    "variant": dict(
        sample_size=16, in_channels=4, out_channels=3, block_out_channels=(32, 64), layers_per_block=[1, 3],
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=64, attention_head_dim=[8, 32],
        cross_attention_norm="group_norm", resnet_time_scale_shift="default", norm_num_groups=16, norm_eps=1e-2,
        resnet_skip_time_act=True, resnet_out_scale_factor=1.5, mid_block_scale_factor=1.25,
        flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=96, conv_in_kernel=5, conv_out_kernel=1,
        center_input_sample=True),
}

SUPER_RES_CONFIGS = {
    # Karlo's upsampler shape (4 resnet-only blocks, no attention, additive time conditioning).
    "karlo_like": dict(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=3,
        down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
        add_attention=False, norm_num_groups=8),
    # Mid-block self-attention under scale-shift conditioning, where diffusers gives it no group norm.
    "attention_scale_shift": dict(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
        add_attention=True, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
        norm_num_groups=16, mid_block_scale_factor=2.0, norm_eps=1e-6),
    # Plain-attention mid block with its default norm (groups = norm_num_groups), a single head, no flip.
    "attention_default": dict(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 48, 64), layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
        add_attention=True, attention_head_dim=None, norm_num_groups=16, flip_sin_to_cos=False),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Normal weights of a sensible scale everywhere (diffusers zero-inits some output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _normalized(config) -> dict:
    """A diffusers config as plain JSON values, without bookkeeping keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


@pytest.fixture(scope="module", params=list(DECODER_CONFIGS))
def decoder_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**DECODER_CONFIGS[request.param]).eval()
    _randomize(ref, seed=1)
    folder = str(tmp_path_factory.mktemp(f"decoder_{request.param}"))
    ref.save_pretrained(folder)
    return ref, load_model(folder, ConditionalUNet), folder


@pytest.fixture(scope="module", params=list(SUPER_RES_CONFIGS))
def super_res_pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = UNet2DModel(**SUPER_RES_CONFIGS[request.param]).eval()
    _randomize(ref, seed=2)
    folder = str(tmp_path_factory.mktemp(f"super_res_{request.param}"))
    ref.save_pretrained(folder)
    return ref, load_model(folder, SuperResUNet), folder


def _decoder_inputs(model: ConditionalUNet, n: int = 2, text_len: int = 6, seed: int = 0, size: int | None = None):
    """A CFG-shaped batch of 2n: n unconditional rows then n conditional rows, 4 extra context tokens in front
    of `text_len` text tokens, the text padded differently per row. `size`: the map size (default: the
    config's sample_size)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    batch, length = 2 * n, 4 + text_len
    size = size or c.sample_size
    sample = torch.randn(batch, c.in_channels, size, size, generator=g)
    context = torch.randn(batch, length, c.cross_attention_dim, generator=g)
    text_lengths = torch.tensor([1, text_len, 3, text_len - 2][:n] * 2)
    mask = torch.cat([torch.ones(batch, 4, dtype=torch.bool),
                      torch.arange(text_len)[None, :] < text_lengths[:, None]], dim=1)
    labels = torch.randn(batch, c.time_embed_dim, generator=g) if c.class_embed_type == "identity" else None
    return sample, context, labels, mask


def _ref_decoder(ref, sample, t, context, labels, mask):
    with torch.no_grad():
        return ref(sample, t, context, class_labels=labels, attention_mask=mask).sample


def _timesteps(batch: int):
    return [("int", 731), ("0-dim", torch.tensor(412)), ("per-row", torch.linspace(3, 997, batch).long())]


# ------------------------------------------------------------------------------------------------ decoder

def test_decoder_matches_diffusers(decoder_pair):
    ref, ours, _ = decoder_pair
    sample, context, labels, mask = _decoder_inputs(ours)
    for label, t in _timesteps(sample.shape[0]):
        with torch.no_grad():
            out = ours(sample, t, context, labels, mask)
        expected = _ref_decoder(ref, sample, t, context, labels, mask)
        assert out.shape == expected.shape == (sample.shape[0], ours.config.out_channels, *sample.shape[2:])
        assert max_rel_err(out, expected) <= TOL, label


# Map sizes for the bitwise checks: the attention layers then run down to 2x2 and 1x1 maps, where a projection
# computed as a batched mm over the strided pixel view (rather than diffusers' one mm over copied rows) rounds
# differently, at any thread count.
BITWISE_SIZES = (16, 8, 4)


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_decoder_bit_identical_to_diffusers(decoder_pair, threads):
    """fp32 CPU outputs equal diffusers' bit for bit, at every thread count and map size: the cascade needs it,
    as Karlo's first step of each stage (t = 999) amplifies a one-ulp difference about 2×10⁴."""
    ref, ours, _ = decoder_pair
    for size in BITWISE_SIZES:
        sample, context, labels, mask = _decoder_inputs(ours, seed=7, size=size)
        with torch_threads(threads):
            with torch.no_grad():
                out = ours(sample, 999, context, labels, mask)
            expected = _ref_decoder(ref, sample, 999, context, labels, mask)
        assert torch.equal(out, expected), (size, (out - expected).abs().max().item())
        assert expected.abs().max() > 0.1  # not vacuous


def test_decoder_fractional_timestep_and_no_mask(decoder_pair):
    ref, ours, _ = decoder_pair
    sample, context, labels, _ = _decoder_inputs(ours, n=1, seed=3)
    for t in (417.25, torch.tensor([17.5, 980.0])):
        with torch.no_grad():
            out = ours(sample, t, context, labels, None)
        assert max_rel_err(out, _ref_decoder(ref, sample, t, context, labels, None)) <= TOL


def test_decoder_mask_and_conditioning_matter(decoder_pair):
    """Guards against a vacuous parity: the mask, the context and the class labels all change the output."""
    _, ours, _ = decoder_pair
    sample, context, labels, mask = _decoder_inputs(ours)
    with torch.no_grad():
        base = ours(sample, 500, context, labels, mask)
        unmasked = ours(sample, 500, context, labels, torch.ones_like(mask))
        other_context = ours(sample, 500, context.flip(1), labels, mask)
        other_t = ours(sample, 100, context, labels, mask)
    for other in (unmasked, other_context, other_t):
        assert max_rel_err(other, base) > 1e-3
    fully_kept_rows = mask.all(dim=1)  # rows with nothing padded are unaffected by dropping the mask
    assert max_rel_err(unmasked[fully_kept_rows], base[fully_kept_rows]) <= TOL
    if labels is not None:
        with torch.no_grad():
            other_labels = ours(sample, 500, context, labels.flip(0), mask)
        assert max_rel_err(other_labels, base) > 1e-3


def test_decoder_rows_are_independent(decoder_pair):
    """A CFG batch equals its halves run separately (no cross-row leakage through masks or broadcasting)."""
    _, ours, _ = decoder_pair
    sample, context, labels, mask = _decoder_inputs(ours)
    t = torch.tensor([5, 900, 5, 900])
    with torch.no_grad():
        full = ours(sample, t, context, labels, mask)
        halves = [ours(sample[s], t[s], context[s], None if labels is None else labels[s], mask[s])
                  for s in (slice(0, 2), slice(2, 4))]
    assert max_rel_err(torch.cat(halves), full) <= TOL


def test_decoder_round_trip_through_diffusers(decoder_pair, tmp_path):
    ref, ours, _ = decoder_pair
    save_model(ours, str(tmp_path))
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path)).eval()
    assert _normalized(reloaded.config) == _normalized(ref.config)
    ours_state, theirs = ours.state_dict(), reloaded.state_dict()
    assert ours_state.keys() == theirs.keys()
    assert all(torch.equal(ours_state[k], theirs[k]) for k in ours_state)
    sample, context, labels, mask = _decoder_inputs(ours, seed=5)
    with torch.no_grad():
        out = ours(sample, 250, context, labels, mask)
    assert max_rel_err(_ref_decoder(reloaded, sample, 250, context, labels, mask), out) <= TOL


def test_decoder_low_precision_runs_close(decoder_pair):
    _, _, folder = decoder_pair
    ours32 = load_model(folder, ConditionalUNet)
    ours16 = load_model(folder, ConditionalUNet, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    sample, context, labels, mask = _decoder_inputs(ours32, n=1)
    with torch.no_grad():
        expected = ours32(sample, 300, context, labels, mask)
        out = ours16(sample.bfloat16(), torch.tensor(300), context.bfloat16(),
                     None if labels is None else labels.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, expected) < 0.05


def test_decoder_rejects_bad_inputs(decoder_pair):
    _, ours, _ = decoder_pair
    sample, context, labels, mask = _decoder_inputs(ours)
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.zeros(3), context, labels, mask)
    with pytest.raises(TypeError, match="attention_mask"):
        ours(sample, 1, context, labels, mask.long())
    with pytest.raises(ValueError, match="attention_mask"):
        ours(sample, 1, context, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(sample, 1, context[..., :-1], labels, mask)
    with pytest.raises(ValueError, match="sample"):
        ours(sample[..., :-1], 1, context, labels, mask)
    if labels is not None:
        with pytest.raises(TypeError, match="class_labels"):
            ours(sample, 1, context, None, mask)
    else:
        with pytest.raises(ValueError, match="class_labels"):
            ours(sample, 1, context, torch.zeros(sample.shape[0], ours.config.time_embed_dim), mask)


# --------------------------------------------------------------------------------------------- super-res

def test_super_res_matches_diffusers(super_res_pair):
    ref, ours, _ = super_res_pair
    g = torch.Generator().manual_seed(0)
    size = ours.config.sample_size
    sample = torch.randn(2, ours.config.in_channels, size, size, generator=g)
    # 599.9 checks diffusers' truncation of Python floats; the tensor case keeps its fraction.
    cases = _timesteps(2) + [("float", 599.9), ("fractional tensor", torch.tensor([10.25, 999.0]))]
    outputs = []
    for label, t in cases:
        with torch.no_grad():
            out = ours(sample, t)
            expected = ref(sample, t).sample
        assert out.shape == expected.shape == (2, ours.config.out_channels, size, size)
        assert max_rel_err(out, expected) <= TOL, label
        outputs.append(out)
    assert max_rel_err(outputs[0], outputs[1]) > 1e-3  # the timestep matters


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_super_res_bit_identical_to_diffusers(super_res_pair, threads):
    """As for the decoder: bit for bit at every thread count, on maps small enough that the mid-block
    attention (where there is one) runs on 2x2 pixels."""
    ref, ours, _ = super_res_pair
    factor = 2 ** (len(ours.config.block_out_channels) - 1)
    for size in sorted({max(s, factor) for s in BITWISE_SIZES}):
        sample = torch.randn(2, ours.config.in_channels, size, size, generator=torch.Generator().manual_seed(size))
        with torch_threads(threads), torch.no_grad():
            out = ours(sample, 999)
            expected = ref(sample, 999).sample
        assert torch.equal(out, expected), (size, (out - expected).abs().max().item())
        assert expected.abs().max() > 0.1


def test_super_res_round_trip_through_diffusers(super_res_pair, tmp_path):
    ref, ours, _ = super_res_pair
    save_model(ours, str(tmp_path))
    reloaded = UNet2DModel.from_pretrained(str(tmp_path)).eval()
    assert _normalized(reloaded.config) == _normalized(ref.config)
    ours_state, theirs = ours.state_dict(), reloaded.state_dict()
    assert ours_state.keys() == theirs.keys()
    assert all(torch.equal(ours_state[k], theirs[k]) for k in ours_state)
    sample = torch.randn(2, ours.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert max_rel_err(reloaded(sample, t).sample, ours(sample, t)) <= TOL


def test_super_res_rejects_bad_inputs(super_res_pair):
    _, ours, _ = super_res_pair
    sample = torch.randn(2, ours.config.in_channels, 16, 16)
    with pytest.raises(ValueError, match="sample"):
        ours(sample[:, :-1], 1)
    with pytest.raises(ValueError, match="sample"):
        ours(sample[..., :15], 1)  # 15 is no multiple of 2, 4 or 8
    with pytest.raises(TypeError, match="timestep"):
        ours(sample, "7")
    with pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.zeros(2, 1))


# ---------------------------------------------------------------------------------------------- configs

def _karlo_decoder_config() -> dict:
    return {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 3, "out_channels": 6,
            "layers_per_block": 3, "block_out_channels": [320, 640, 960, 1280],
            "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
            "cross_attention_dim": 1536, "attention_head_dim": 64, "class_embed_type": "identity",
            "resnet_time_scale_shift": "scale_shift"}


def _karlo_super_res_config() -> dict:
    return {"_class_name": "UNet2DModel", "sample_size": 256, "in_channels": 6, "out_channels": 3,
            "layers_per_block": 3, "block_out_channels": [320, 640, 960, 1280],
            "down_block_types": ["ResnetDownsampleBlock2D"] * 4, "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
            "add_attention": False}


def test_karlo_configs_build_the_reference_architecture():
    """Karlo's published configs (diffusers' conversion script) give the same tensors as diffusers builds."""
    for cls, config_cls, raw, ref_cls in (
            (ConditionalUNet, ConditionalUNetConfig, _karlo_decoder_config(), UNet2DConditionModel),
            (SuperResUNet, SuperResUNetConfig, _karlo_super_res_config(), UNet2DModel)):
        config = config_cls.from_config(Config(raw, "karlo/config.json"))
        with torch.device("meta"):
            ours = cls(config)
            ref = ref_cls(**{k: v for k, v in raw.items() if not k.startswith("_")})
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
        # to_dict is a complete config: every key diffusers writes, with the same values.
        assert config.to_dict().keys() - {"_class_name", "_diffusers_version"} == set(_normalized(ref.config))
        assert {k: v for k, v in config.to_dict().items() if not k.startswith("_")} == _normalized(ref.config)


EXTRA_ARCHITECTURES = [
    (UNet2DConditionModel, ConditionalUNet, dict(
        block_out_channels=(32, 64, 96, 128), layers_per_block=[3, 1, 2, 1], attention_head_dim=[32, 16, 32, 32],
        down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                          "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                        "SimpleCrossAttnUpBlock2D"),
        mid_block_type=None, cross_attention_dim=40, norm_num_groups=8)),
    (UNet2DModel, SuperResUNet, dict(
        block_out_channels=(32, 64, 96), layers_per_block=2, add_attention=True, attention_head_dim=32,
        attn_norm_num_groups=4, resnet_time_scale_shift="scale_shift", norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3)),
    (UNet2DModel, SuperResUNet, dict(
        block_out_channels=(32, 64), layers_per_block=1, mid_block_type=None, norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2)),
]


@pytest.mark.parametrize("ref_cls, cls, kwargs", EXTRA_ARCHITECTURES)
def test_more_configs_build_the_reference_architecture(ref_cls, cls, kwargs):
    """Structure only (meta tensors): per-block layer/head lists, no mid block, explicit attention groups."""
    with torch.device("meta"):
        ref = ref_cls(**kwargs)
        config = cls.config_class.from_config(Config(json.loads(json.dumps(dict(ref.config))), "x/config.json"))
        ours = cls(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v for k, v in config.to_dict().items() if not k.startswith("_")} == _normalized(ref.config)


def test_karlo_decoder_head_count():
    config = ConditionalUNetConfig.from_config(Config(_karlo_decoder_config(), "decoder/config.json"))
    with torch.device("meta"):
        model = ConditionalUNet(config)
    # attention_head_dim is the head *size* for simple cross-attention: 640 channels -> 10 heads of 64.
    assert model.down_blocks[1].attentions[0].heads == 10 and model.mid_block.attentions[0].heads == 20


DECODER_BAD = [
    ("down_block_types", ["CrossAttnDownBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3),
    ("up_block_types", ["UpBlock2D"] * 4),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("resnet_time_scale_shift", "spatial"),
    ("class_embed_type", "projection"),
    ("act_fn", "gelu"),
    ("attention_head_dim", 48),  # does not divide 320
    ("attention_head_dim", [64, 64]),  # wrong length
    ("layers_per_block", 0),
    ("norm_num_groups", 7),
    ("only_cross_attention", True),
    ("cross_attention_norm", "layer_norm"),
    ("addition_embed_type", "text"),
    ("time_embedding_type", "fourier"),
    ("num_attention_heads", 8),
    ("encoder_hid_dim", 768),
    ("conv_in_kernel", 4),
    ("block_out_channels", [320, 640, 960]),  # length differs from the block types
    ("norm_eps", True),
    ("some_future_switch", 1),
]

SUPER_RES_BAD = [
    ("down_block_types", ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D"] * 4),
    ("mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("resnet_time_scale_shift", "ada_group"),
    ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("layers_per_block", [3, 3, 3, 3]),
    ("attention_head_dim", 48),  # with add_attention: does not divide 1280
    ("norm_num_groups", 6),
    ("some_future_switch", 1),
]


@pytest.mark.parametrize("key, value", DECODER_BAD + [("_class_name", "UNet2DModel")])
def test_decoder_bad_config_names_key_and_file(tmp_path, key, value):
    raw = {**_karlo_decoder_config(), key: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_model(str(tmp_path), ConditionalUNet)  # fails on the config, before looking for weights
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("key, value", SUPER_RES_BAD + [("_class_name", "UNet2DConditionModel")])
def test_super_res_bad_config_names_key_and_file(tmp_path, key, value):
    raw = {**_karlo_super_res_config(), key: value}
    if key == "attention_head_dim":
        raw["add_attention"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_model(str(tmp_path), SuperResUNet)
    assert key in str(err.value) and str(path) in str(err.value)


def test_missing_keys_take_diffusers_defaults():
    """An absent key means diffusers' default; for the block types that default is unsupported."""
    raw = _karlo_decoder_config()
    del raw["down_block_types"]
    with pytest.raises(ConfigError, match="down_block_types"):
        ConditionalUNetConfig.from_config(Config(raw, "decoder/config.json"))
    raw = _karlo_super_res_config()
    del raw["add_attention"]  # UNet2DModel's default is True: the mid block gets attention
    config = SuperResUNetConfig.from_config(Config(raw, "super_res/config.json"))
    assert config.add_attention is True and config.resnet_time_scale_shift == "default"
