"""Loading whole cascades: presets, the on-disk layout, and every way a folder can be wrong."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import unclip
from unclip import ConfigError, WeightsError
from unclip.presets import build_preset

STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    unclip.Pipeline.from_preset("tiny", seed=0).save_pretrained(str(path))
    return str(path)


@pytest.fixture
def copy_of(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return str(dst)


def _snapshot(root):
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files} | {
        os.path.relpath(d, root): 0 for d, _, _ in os.walk(root)}


def _images(pipe, seed=0):
    return pipe("a red square", generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False,
                **STEPS).images


def test_save_load_roundtrip_is_exact(saved):
    built, loaded = unclip.Pipeline.from_preset("tiny", seed=0), unclip.Pipeline.from_pretrained(saved)
    for name in ("text_encoder", "prior", "text_proj", "decoder"):
        a, b = getattr(built.components, name).state_dict(), getattr(loaded.components, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Bit-identical weights. CPU kernels may still round differently with the memory alignment of freshly
    # allocated vs file-loaded tensors, and the first super-resolution step (x0 = x/sqrt(ā), ā ≈ 2e-9 at
    # t = 999) amplifies one-ulp differences to ~1e-4 in a few pixels of this random cascade.
    torch.testing.assert_close(_images(built), _images(loaded), rtol=0, atol=2e-3)


def test_model_call_defaults_are_saved_loaded_and_used(copy_of, tmp_path):
    # A model folder may recommend its own guidance scales (the toy model does); a call's keyword still wins.
    _edit_json(os.path.join(copy_of, "model_index.json"), _unclip_call_defaults={"decoder_guidance_scale": 3})
    pipe = unclip.Pipeline.from_pretrained(copy_of)
    assert pipe.call_default("decoder_guidance_scale") == 3.0 and pipe.call_default("prior_guidance_scale") == 4.0
    assert pipe.call_default("decoder_guidance_scale", 5.0) == 5.0
    default = _images(pipe)
    torch.testing.assert_close(default, pipe("a red square", generator=torch.Generator().manual_seed(0),
                                             output_type="pt", progress=False, decoder_guidance_scale=3.0,
                                             **STEPS).images, rtol=0, atol=0)
    assert not torch.equal(default, pipe("a red square", generator=torch.Generator().manual_seed(0),
                                         output_type="pt", progress=False, decoder_guidance_scale=8.0,
                                         **STEPS).images)
    pipe.save_pretrained(str(tmp_path / "again"))
    assert json.load(open(tmp_path / "again" / "model_index.json"))["_unclip_call_defaults"] == {
        "decoder_guidance_scale": 3.0}
    assert unclip.Pipeline.from_pretrained(str(tmp_path / "again")).call_default("decoder_guidance_scale") == 3.0


def test_preset_seed_changes_weights():
    a = build_preset("tiny", seed=0).decoder.state_dict()
    b = build_preset("tiny", seed=1).decoder.state_dict()
    c = build_preset("tiny", seed=0).decoder.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_layout_on_disk(saved):
    index = json.load(open(os.path.join(saved, "model_index.json")))
    assert index["_class_name"] == "UnCLIPPipeline"
    for key in ("tokenizer", "text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last",
                "prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        assert key in index and os.path.isdir(os.path.join(saved, key)), key
    assert os.path.isfile(os.path.join(saved, "decoder", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(saved, "text_encoder", "model.safetensors"))
    assert not [f for f in os.listdir(os.path.dirname(saved)) if f.startswith(".")]  # no temp leftovers


def test_loading_imports_neither_diffusers_nor_transformers(saved):
    code = textwrap.dedent(f"""
        import sys, torch, unclip
        pipe = unclip.Pipeline.from_pretrained({saved!r})
        pipe("a cat", generator=torch.Generator().manual_seed(0), progress=False,
             prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
        pipe.save_pretrained({saved + "-again"!r})
        bad = [m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers")]
        assert not bad, bad
        print("clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


def test_sharded_and_bin_weights_load_the_same(copy_of, saved):
    folder = os.path.join(copy_of, "decoder")
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, os.path.join(folder, name))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    expected = _images(unclip.Pipeline.from_pretrained(saved))
    torch.testing.assert_close(_images(unclip.Pipeline.from_pretrained(copy_of)), expected, rtol=0, atol=0)

    for name in shards:
        os.remove(os.path.join(folder, name))
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    torch.testing.assert_close(_images(unclip.Pipeline.from_pretrained(copy_of)), expected, rtol=0, atol=0)


def test_bin_with_code_is_refused(copy_of):
    folder = os.path.join(copy_of, "text_proj")
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    torch.save({"weights": torch.zeros(1), "evil": os.system}, os.path.join(folder, "diffusion_pytorch_model.bin"))
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.bin"):
        unclip.Pipeline.from_pretrained(copy_of)


def _edit_json(path, **changes):
    data = json.load(open(path))
    data.update(changes)
    json.dump(data, open(path, "w"))


def _write(root, rel, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(os.path.join(root, *rel.split("/")), mode) as f:
        f.write(content)


def _edit_text(root, rel, old, new):
    path = os.path.join(root, *rel.split("/"))
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))


def _retype(root, component, name, dtype):
    """Store every float tensor of one weights file as `dtype` (e.g. a conversion gone wrong)."""
    path = os.path.join(root, component, name)
    state = load_file(path)
    save_file({k: (v * 100).to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path)


def _shard(root, edit_map):
    """Split the decoder's weights into two shards with an index whose weight_map is `edit_map(weight_map)`."""
    folder = os.path.join(root, "decoder")
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for n, ks in shards.items():
        save_file({k: state[k] for k in ks}, os.path.join(folder, n))
    weight_map = {k: n for n, ks in shards.items() for k in ks}
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": edit_map(weight_map)}, f)


@pytest.mark.parametrize("breakage, error, pattern", [
    (lambda d: shutil.rmtree(d), ConfigError, "model directory not found"),
    (lambda d: os.remove(os.path.join(d, "model_index.json")), ConfigError, "model_index.json: file not found"),
    (lambda d: open(os.path.join(d, "model_index.json"), "w").write("{not json"), ConfigError, "not valid JSON"),
    (lambda d: _edit_json(os.path.join(d, "model_index.json"), decoder=["diffusers", "UNet2DModel"]),
     ConfigError, r"model_index.json: config key 'decoder'"),
    (lambda d: _edit_json(os.path.join(d, "model_index.json"), decoder=None), ConfigError, "'decoder' is required"),
    (lambda d: _edit_json(os.path.join(d, "decoder", "config.json"), resnet_time_scale_shift="ada_group"),
     ConfigError, r"decoder[/\\]config.json: config key 'resnet_time_scale_shift'"),
    (lambda d: _edit_json(os.path.join(d, "prior_scheduler", "scheduler_config.json"), variance_type="learned"),
     ConfigError, r"prior_scheduler[/\\]scheduler_config.json: config key 'variance_type'"),
    (lambda d: _edit_json(os.path.join(d, "decoder", "config.json"), block_out_channels=[32, 48]),
     WeightsError, r"mis-shaped \(\d+\): .*down_blocks"),
    (lambda d: os.remove(os.path.join(d, "prior", "diffusion_pytorch_model.safetensors")),
     WeightsError, r"prior: no weights found"),
    (lambda d: open(os.path.join(d, "prior", "diffusion_pytorch_model.safetensors"), "wb").write(b"\0" * 64),
     WeightsError, "cannot read weights"),
    (lambda d: _edit_json(os.path.join(d, "model_index.json"), _unclip_call_defaults={"guidance": 3}),
     ConfigError, r"_unclip_call_defaults' has unknown key 'guidance'"),
    (lambda d: _edit_json(os.path.join(d, "model_index.json"), _unclip_call_defaults={"decoder_guidance_scale": 0.5}),
     ConfigError, r"decoder_guidance_scale'\] = 0.5 must be a number in \[1, 100\]"),
    # Every way a JSON file can fail to parse is a ConfigError naming the file.
    (lambda d: _write(d, "decoder/config.json", "[" * 100_000 + "]" * 100_000), ConfigError,
     r"decoder[/\\]config.json: not valid JSON \(nested too deeply\)"),
    (lambda d: _write(d, "decoder/config.json", '{"sample_size": ' + "9" * 5000 + "}"), ConfigError,
     r"decoder[/\\]config.json: not valid JSON \(Exceeds the limit"),
    (lambda d: _write(d, "prior/config.json", b'{"_class_name": "Prior\xff"}'), ConfigError,
     r"prior[/\\]config.json: not valid UTF-8"),
    (lambda d: _edit_text(d, "prior/config.json", '"dropout": 0.0', '"dropout": NaN'), ConfigError,
     r"prior[/\\]config.json: not valid JSON \(NaN is not a JSON number\)"),
    (lambda d: _edit_text(d, "prior/config.json", '"dropout": 0.0', '"dropout": 1e999'), ConfigError,
     r"prior[/\\]config.json: not valid JSON \(the number 1e999 does not fit"),
    # Bounds checked before anything is built or allocated.
    (lambda d: _edit_json(os.path.join(d, "decoder_scheduler", "scheduler_config.json"),
                          num_train_timesteps=10**12), ConfigError,
     r"decoder_scheduler[/\\]scheduler_config.json: config key 'num_train_timesteps' = 1000000000000 must be <= "),
    (lambda d: _edit_json(os.path.join(d, "decoder", "config.json"), sample_size=10**6), ConfigError,
     r"decoder[/\\]config.json: config key 'sample_size' = 1000000 exceeds 4096"),
    (lambda d: _edit_json(os.path.join(d, "super_res_first", "config.json"), block_out_channels=[32, 10**7]),
     ConfigError, r"super_res_first[/\\]config.json: config key 'block_out_channels' .* exceeds"),
    (lambda d: _edit_json(os.path.join(d, "prior", "config.json"), num_layers=10**6), ConfigError,
     r"prior[/\\]config.json: config key 'num_layers' = 1000000 exceeds"),
    (lambda d: _edit_json(os.path.join(d, "text_encoder", "config.json"), max_position_embeddings=10**9),
     ConfigError, r"text_encoder[/\\]config.json: config key 'max_position_embeddings' .* exceeds"),
    # Tensors of the wrong kind, and broken shard indexes.
    (lambda d: _retype(d, "text_proj", "diffusion_pytorch_model.safetensors", torch.int64), WeightsError,
     r"tensor\(s\) of the wrong dtype: .*text_proj[/\\]diffusion_pytorch_model.safetensors: "
     r"clip_extra_context_tokens_proj.bias is int64, the model's is float32"),
    (lambda d: _shard(d, lambda m: list(m)), WeightsError, r"key 'weight_map' = \[.* must be a non-empty object"),
    (lambda d: _shard(d, lambda m: {k: 7 for k in m}), WeightsError, r"weight_map\['.*'\] = 7 must be a shard"),
    (lambda d: _shard(d, lambda m: {k: "../x.safetensors" for k in m}), WeightsError, "plain file name"),
], ids=["no-dir", "no-index", "bad-json", "wrong-class", "missing-component", "bad-config-value",
        "bad-scheduler", "mis-shaped", "no-weights", "corrupt-weights", "call-default-key", "call-default-value",
        "json-deep", "json-5000-digits", "json-utf8", "json-nan", "json-overflow", "timesteps-bound",
        "sample-size-bound", "channels-bound", "layers-bound", "positions-bound", "int-tensor",
        "weight-map-list", "weight-map-ints", "weight-map-path"])
def test_bad_folders_give_clear_errors(copy_of, breakage, error, pattern):
    breakage(copy_of)
    before = _snapshot(copy_of) if os.path.isdir(copy_of) else None
    with pytest.raises(error, match=pattern):
        unclip.Pipeline.from_pretrained(copy_of)
    if before is not None:
        assert _snapshot(copy_of) == before  # loading never writes into the model folder


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s.pop("norm_out.weight"), r"missing \(1\): norm_out.weight"),
    (lambda s: s.update(extra_tensor=torch.zeros(2)), r"unexpected \(1\): extra_tensor"),
])
def test_missing_and_unexpected_tensors_are_listed(copy_of, edit, pattern):
    path = os.path.join(copy_of, "prior", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)
    with pytest.raises(WeightsError, match=pattern):
        unclip.Pipeline.from_pretrained(copy_of)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    pipe = unclip.Pipeline.from_preset("tiny")
    import unclip.models as models

    calls = []

    def failing(model, folder, dtype=None):
        calls.append(folder)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(model, folder, dtype)
    original = models.save_model
    monkeypatch.setattr(models, "save_model", failing)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    pipe.save_pretrained(str(tmp_path / "out"))  # still usable afterwards
    assert os.listdir(tmp_path) == ["out"]


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_karlo_preset_has_karlo_sizes():
    c = build_preset("karlo", device="meta")
    # Karlo (docs/architecture.md): prior 1022M, decoder 885M, each SR 692M, CLIP text tower 123M.
    for module, millions in ((c.prior, 1022), (c.decoder, 885), (c.upsamplers[0].first, 692),
                             (c.upsamplers[0].last, 692), (c.text_encoder, 123)):
        assert abs(_count(module) / 1e6 - millions) / millions < 0.01, (type(module).__name__, _count(module))
    assert c.decoder.config.sample_size == 64 and c.upsamplers[0].first.config.sample_size == 256


def test_dalle2_preset_has_paper_shape():
    c = build_preset("dalle2", device="meta")
    assert [u.first.config.sample_size for u in c.upsamplers] == [256, 1024]
    # Paper: decoder 3.5B, upsamplers 700M and 300M (within 15%).
    for module, millions in ((c.decoder, 3500), (c.upsamplers[0].first, 700), (c.upsamplers[1].first, 300)):
        assert abs(_count(module) / 1e6 - millions) / millions < 0.15, _count(module)


def test_unknown_preset_and_bad_arguments():
    with pytest.raises(ValueError, match="preset name must be one of tiny, karlo, dalle2"):
        unclip.Pipeline.from_preset("huge")
    with pytest.raises(ValueError, match="dtype must be one of"):
        unclip.Pipeline.from_preset("tiny", dtype="int8")
    with pytest.raises(ValueError, match="backend must be one of"):
        unclip.Pipeline.from_preset("tiny", backend="jax")


def test_folder_saved_by_diffusers_and_transformers_5_loads_and_draws_their_images(saved, tmp_path):
    """diffusers 0.42's UnCLIPPipeline.save_pretrained (transformers 5 writes the tokenizer as tokenizer.json +
    tokenizer_config.json only, and text_proj is named as a diffusers class): the folder loads and our images
    equal diffusers' (fp32 CPU, max |d| <= 1e-4)."""
    import numpy as np
    from helpers import diffusers_unclip_pipeline
    theirs = diffusers_unclip_pipeline(saved)
    folder = tmp_path / "saved-by-diffusers"
    theirs.save_pretrained(str(folder))
    assert sorted(os.listdir(folder / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.load(open(folder / "model_index.json"))["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]
    ours = unclip.Pipeline.from_pretrained(str(folder))
    steps = dict(prior_num_inference_steps=4, decoder_num_inference_steps=5, super_res_num_inference_steps=3)
    prompt = ["a red circle on a white background", "An Astronaut, riding; a HORSE!!"]
    a = ours(prompt, generator=torch.Generator().manual_seed(7), output_type="np", progress=False, **steps).images
    b = theirs(prompt, generator=torch.Generator().manual_seed(7), output_type="np", **steps).images
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4, np.abs(a - b).max()
    assert ((a > 0.01) & (a < 0.99)).mean() > 0.3 and a.std() > 0.01  # not vacuous: real, unsaturated images
    # And what we write back is a folder diffusers' own components load again.
    ours.save_pretrained(str(tmp_path / "again"))
    assert diffusers_unclip_pipeline(str(tmp_path / "again")) is not None
