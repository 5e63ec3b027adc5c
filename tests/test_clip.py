"""CLIP text/image towers against transformers 5 (reference peer): parity, round-trip, configs, dtypes."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import THREAD_COUNTS, max_rel_err, torch_threads
from unclip.config import Config, ConfigError
from unclip.models import load_model, save_model
from unclip.models.clip import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                                CLIPVisionModelWithProjection)

TOL = 1e-5

# Two deliberately different small text towers. "first_eos" pools at the first eos (pad reuses the eos id, as
# CLIP tokenizers often do); "legacy" has the pre-#24773 eos_token_id == 2, which pools at argmax(input_ids).
TEXT_CONFIGS = {
    "first_eos": dict(vocab_size=99, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
                      hidden_act="quick_gelu", bos_token_id=97, eos_token_id=98, pad_token_id=98),
    "legacy": dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=3, max_position_embeddings=12, projection_dim=40, hidden_act="gelu",
                   layer_norm_eps=1e-6, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
VISION_CONFIGS = {
    "quick_gelu": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu"),
    "gelu": dict(hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=2,
                 image_size=20, patch_size=4, projection_dim=20, hidden_act="gelu", layer_norm_eps=1e-6,
                 num_channels=4),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter gets noise of a sensible scale (norm gains around 1), so no output is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def reference_text(tmp_path, name):
    kw = TEXT_CONFIGS[name]
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**kw))
    randomize(ref, seed=len(name)).save_pretrained(tmp_path / "ref")
    return ref, kw


def reference_vision(tmp_path, name):
    kw = VISION_CONFIGS[name]
    ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**kw))
    randomize(ref, seed=len(name)).save_pretrained(tmp_path / "ref")
    return ref, kw


def text_batch(kw, seed=0):
    """A CFG-shaped batch: two "empty prompt" rows [bos, eos, pad...] then three prompts of various lengths,
    each ended by the tokenizer's eos (the largest id) and padded; plus the matching True=attend mask."""
    g = torch.Generator().manual_seed(seed)
    vocab, length = kw["vocab_size"], kw["max_position_embeddings"]
    bos, pad = kw["bos_token_id"], kw["pad_token_id"]
    eos = vocab - 1 if kw["eos_token_id"] == 2 else kw["eos_token_id"]  # legacy configs: real eos = max id
    rows, masks = [], []
    for n_words in (0, 0, 3, length - 2, 6):
        words = torch.randint(3, vocab - 3, (n_words,), generator=g).tolist()
        ids = [bos] + words + [eos]
        rows.append(ids + [pad] * (length - len(ids)))
        masks.append([True] * len(ids) + [False] * (length - len(ids)))
    return torch.tensor(rows), torch.tensor(masks)


def run_reference_text(ref, ids, mask):
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=None if mask is None else mask.long())
    return out.text_embeds, out.last_hidden_state


# --------------------------------------------------------------------------------------------- text tower

@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_parity_and_round_trip(tmp_path, name):
    ref, kw = reference_text(tmp_path, name)
    ours = load_model(str(tmp_path / "ref"), CLIPTextModelWithProjection)
    assert ours.config.eos_token_id == kw["eos_token_id"] and ours.config.hidden_act == kw["hidden_act"]
    ids, mask = text_batch(kw)
    # Also: another row order, a shorter unpadded sequence, and a mask hiding the first keys (rows that see no
    # key at all: both implementations give those an attention output of zero).
    left_masked = mask.clone()
    left_masked[:, :2] = False
    for ids_, mask_ in ((ids, mask), (ids, None), (ids.flip(0), mask.flip(0)), (ids[2:3, :8], None),
                        (ids, left_masked)):
        with torch.no_grad():
            emb, hidden = ours(ids_, mask_)
        ref_emb, ref_hidden = run_reference_text(ref, ids_, mask_)
        assert emb.shape == (ids_.shape[0], kw["projection_dim"])
        assert hidden.shape == (*ids_.shape, kw["hidden_size"])
        assert max_rel_err(emb, ref_emb) <= TOL
        assert max_rel_err(hidden, ref_hidden) <= TOL
    # The mask changes padded positions' states, but not the pooled eos (padding lies after it, causally unseen).
    with torch.no_grad():
        emb_m, hid_m = ours(ids, mask)
        emb_n, hid_n = ours(ids, None)
    assert max_rel_err(emb_m, emb_n) <= TOL
    assert max_rel_err(hid_m, hid_n) > 1e-3

    # Round trip: our save -> transformers from_pretrained reproduces the reference bit for bit.
    save_model(ours, str(tmp_path / "ours"))
    back = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / "ours")).eval()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim",
                "hidden_act", "layer_norm_eps", "eos_token_id", "vocab_size", "max_position_embeddings"):
        assert getattr(back.config, key) == getattr(ref.config, key), key
    a, b = run_reference_text(back, ids, mask), run_reference_text(ref, ids, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("threads", THREAD_COUNTS, ids=lambda n: f"{n}threads")
def test_towers_bit_identical_to_transformers(tmp_path, threads):
    """fp32 CPU outputs equal transformers' bit for bit at every thread count: the text tower with and
    without a padding mask (causal-only attention runs SDPA's own causal path, as there) and the image tower."""
    ref, kw = reference_text(tmp_path / "text", "first_eos")
    ours = load_model(str(tmp_path / "text" / "ref"), CLIPTextModelWithProjection)
    ids, mask = text_batch(kw, seed=3)
    for mask_ in (None, mask):
        with torch_threads(threads):
            with torch.no_grad():
                got = ours(ids, mask_)
            expected = run_reference_text(ref, ids, mask_)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), mask_ is None
    ref, kw = reference_vision(tmp_path / "vision", "quick_gelu")
    ours = load_model(str(tmp_path / "vision" / "ref"), CLIPVisionModelWithProjection)
    pixels = torch.randn(2, 3, kw["image_size"], kw["image_size"], generator=torch.Generator().manual_seed(2))
    with torch_threads(threads), torch.no_grad():
        got, r = ours(pixels), ref(pixel_values=pixels)
    assert torch.equal(got[0], r.image_embeds) and torch.equal(got[1], r.last_hidden_state)


def test_text_pooling_picks_the_right_token(tmp_path):
    """Pooling differs between the two eos conventions; a token id of 2 inside a legacy prompt must not matter."""
    ref, kw = reference_text(tmp_path, "first_eos")
    ours = load_model(str(tmp_path / "ref"), CLIPTextModelWithProjection)
    ids = torch.tensor([[97, 5, 98, 7, 98, 98, 3, 98, 98, 98, 98, 98, 98, 98, 98, 98]])
    _, hidden = ours(ids)
    emb = ours.text_projection(hidden[0, 2])  # first eos, not a later one
    assert max_rel_err(ours(ids)[0][0], emb) <= TOL
    assert max_rel_err(ours(ids)[0], run_reference_text(ref, ids, None)[0]) <= TOL

    legacy = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        max_position_embeddings=8, projection_dim=8,
                                                        eos_token_id=2)).eval()
    ids = torch.tensor([[0, 2, 50, 63, 1, 1, 1, 1], [0, 63, 1, 1, 1, 1, 1, 2]])
    assert legacy.pool_positions(ids).tolist() == [3, 1]


def test_text_legacy_karlo_style_checkpoint(tmp_path):
    """A transformers ~4.25 style folder (Karlo's text_encoder key set, a stored position_ids tensor) loads."""
    ref, kw = reference_text(tmp_path, "legacy")
    folder = tmp_path / "ref"
    config = {k: v for k, v in kw.items()}
    config.update({"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModelWithProjection"],
                   "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
                   "model_type": "clip_text_model", "torch_dtype": "float32", "transformers_version": "4.25.0.dev0"})
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(kw["max_position_embeddings"])[None]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    ours = load_model(str(folder), CLIPTextModelWithProjection)
    assert "text_model.embeddings.position_ids" not in ours.state_dict()
    ids, mask = text_batch(kw, seed=3)
    emb, hidden = ours(ids, mask)
    ref_emb, ref_hidden = run_reference_text(ref, ids, mask)
    assert max_rel_err(emb, ref_emb) <= TOL and max_rel_err(hidden, ref_hidden) <= TOL


# --------------------------------------------------------------------------------------------- image tower

@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_vision_parity_and_round_trip(tmp_path, name):
    ref, kw = reference_vision(tmp_path, name)
    ours = load_model(str(tmp_path / "ref"), CLIPVisionModelWithProjection)
    c, s = kw.get("num_channels", 3), kw["image_size"]
    pixels = torch.randn(3, c, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb, hidden = ours(pixels)
        r = ref(pixel_values=pixels)
    n_tokens = 1 + (s // kw["patch_size"]) ** 2
    assert emb.shape == (3, kw["projection_dim"]) and hidden.shape == (3, n_tokens, kw["hidden_size"])
    assert max_rel_err(emb, r.image_embeds) <= TOL
    assert max_rel_err(hidden, r.last_hidden_state) <= TOL

    save_model(ours, str(tmp_path / "ours"))
    back = transformers.CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "ours")).eval()
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim",
                "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels"):
        assert getattr(back.config, key) == getattr(ref.config, key), key
    with torch.no_grad():
        b = back(pixel_values=pixels)
    assert torch.equal(b.image_embeds, r.image_embeds) and torch.equal(b.last_hidden_state, r.last_hidden_state)


def test_vision_legacy_checkpoint_with_position_ids(tmp_path):
    ref, kw = reference_vision(tmp_path, "quick_gelu")
    folder = tmp_path / "ref"
    state = load_file(folder / "model.safetensors")
    state["vision_model.embeddings.position_ids"] = torch.arange(1 + 16)[None]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(str(folder), CLIPVisionModelWithProjection)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_err(ours(pixels)[0], ref(pixel_values=pixels).image_embeds) <= TOL


# ---------------------------------------------------------------------------------------------- configs

def _legacy_full_dump(extra: dict) -> dict:
    """The full key set transformers 4.1x wrote for every sub-config (e.g. inside openai/clip-vit-* configs)."""
    d = {"_name_or_path": "", "add_cross_attention": False, "architectures": None, "attention_dropout": 0.0,
         "bad_words_ids": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
         "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
         "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "finetuning_task": None,
         "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
         "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
         "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
         "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
         "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
         "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
         "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "task_specific_params": None,
         "temperature": 1.0, "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None,
         "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
         "transformers_version": "4.16.0.dev0", "use_bfloat16": False}
    d.update(extra)
    return d


def test_configs_accept_every_key_transformers_writes(tmp_path):
    # What transformers 5 save_pretrained writes (dtype, architectures, transformers_version, token ids, ...).
    for hf_cls, hf_cfg, ours_cls in ((transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig,
                                      CLIPTextConfig),
                                     (transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig,
                                      CLIPVisionConfig)):
        hf_cfg(output_hidden_states=True).save_pretrained(tmp_path)  # non-default bookkeeping is written too
        data = json.loads((tmp_path / "config.json").read_text())
        data["architectures"] = [hf_cls.__name__]
        assert ours_cls.from_config(Config(data, "x")) == ours_cls()  # transformers' defaults are ours

    text = CLIPTextConfig.from_config(Config(_legacy_full_dump(
        {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_act": "quick_gelu", "hidden_size": 512,
         "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
         "model_type": "clip_text_model", "num_attention_heads": 8, "num_hidden_layers": 12, "projection_dim": 512,
         "vocab_size": 49408})))
    assert text.eos_token_id == 2 and text.hidden_size == 512
    vision = CLIPVisionConfig.from_config(Config(_legacy_full_dump(
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "hidden_act": "quick_gelu",
         "hidden_size": 1024, "image_size": 224, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
         "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
         "projection_dim": 768})))
    assert vision == CLIPVisionConfig.karlo()
    for config in (CLIPTextConfig.karlo(), CLIPVisionConfig.karlo()):  # our own to_dict reads back identically
        assert type(config).from_config(Config(config.to_dict())) == config


def test_karlo_configs_match_transformers_layout():
    """Karlo-sized towers (built on meta, no memory) have exactly transformers' tensor names and shapes."""
    for ours_cfg, hf_model, hf_cfg, ours_cls in (
            (CLIPTextConfig.karlo(), transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig,
             CLIPTextModelWithProjection),
            (CLIPVisionConfig.karlo(), transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig,
             CLIPVisionModelWithProjection)):
        plain = {k: v for k, v in ours_cfg.to_dict().items() if not k.startswith("_") and k != "architectures"}
        plain.pop("model_type")
        with torch.device("meta"):
            ours = ours_cls(ours_cfg)
            ref = hf_model(hf_cfg(**plain))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        if ours_cls is CLIPTextModelWithProjection:  # docs/architecture.md: Karlo's text encoder has 123 M parameters
            assert 122e6 < sum(p.numel() for p in ours.parameters()) < 125e6


@pytest.mark.parametrize("cls, key, value, message", [
    (CLIPTextConfig, "hidden_act", "relu", "hidden_act"),
    (CLIPVisionConfig, "hidden_act", "gelu_new", "hidden_act"),
    (CLIPTextConfig, "model_type", "clip", "model_type"),
    (CLIPTextConfig, "architectures", ["CLIPTextModel"], "architectures"),
    (CLIPTextConfig, "num_attention_heads", 5, "num_attention_heads"),
    (CLIPTextConfig, "eos_token_id", [49407, 2], "eos_token_id"),
    (CLIPVisionConfig, "image_size", [224, 224], "image_size"),
    (CLIPVisionConfig, "pruned_heads", {"0": [1]}, "pruned_heads"),
    (CLIPTextConfig, "some_new_switch", True, "some_new_switch"),
])
def test_unsupported_config_raises_naming_key_and_file(tmp_path, cls, key, value, message):
    base = CLIPTextConfig(hidden_size=32, num_attention_heads=4) if cls is CLIPTextConfig else CLIPVisionConfig()
    data = base.to_dict()
    data[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        cls.from_config(Config.from_file(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_load_model_reports_bad_hidden_act_with_file(tmp_path):
    ref, kw = reference_text(tmp_path, "first_eos")
    path = tmp_path / "ref" / "config.json"
    data = json.loads(path.read_text())
    data["hidden_act"] = "relu"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="hidden_act") as err:
        load_model(str(tmp_path / "ref"), CLIPTextModelWithProjection)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------- inputs and dtypes

def test_bad_inputs_raise_clear_errors():
    text = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      max_position_embeddings=8, projection_dim=8))
    with pytest.raises(ValueError, match="input_ids"):
        text(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        text(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        text(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIGS["quick_gelu"]))
    with pytest.raises(ValueError, match="pixel_values"):
        vision(torch.zeros(1, 3, 30, 30))


# bf16 keeps 8 significant bits (fp16: 11), so its rounding alone is ~1e-2 after a few layers; measured
# errors here: fp16 ~1.5e-3, bf16 ~1.1e-2.
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_smoke(tmp_path, dtype, tol):
    _, kw = reference_text(tmp_path / "t", "first_eos")
    _, vkw = reference_vision(tmp_path / "v", "quick_gelu")
    for folder, cls, inputs in ((tmp_path / "t" / "ref", CLIPTextModelWithProjection, text_batch(kw)),
                                (tmp_path / "v" / "ref", CLIPVisionModelWithProjection,
                                 (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),))):
        full = load_model(str(folder), cls)
        half = load_model(str(folder), cls, dtype=dtype)
        assert all(p.dtype == dtype for p in half.parameters())
        with torch.no_grad():
            expected, got = full(*inputs), half(*inputs)
        for e, g in zip(expected, got):
            assert g.dtype == dtype and torch.isfinite(g).all()
            assert max_rel_err(g, e) <= tol
