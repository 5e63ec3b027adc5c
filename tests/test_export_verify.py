"""Exported folders verify what they load: the sha256 of every file, the manifest's own checksum, every
manifest key; and publishing an export is atomic and recoverable like every other folder write."""
import errno
import json
import os
import shutil
import stat

import pytest
import torch

pytest.importorskip("onnx", reason="the onnx package is not installed (pip install onnx)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript (torch's ONNX exporter) is not installed")

from unclip import files  # noqa: E402
from unclip.config import ConfigError  # noqa: E402
from unclip.export import onnx as onnx_export  # noqa: E402
from unclip.export.loader import load_exported  # noqa: E402
from unclip.presets import build_components, preset_configs  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small fp32 export (one-layer transformers, one-block U-Nets, no image encoder) and its components."""
    configs = preset_configs("tiny")
    configs["text_encoder"]["num_hidden_layers"] = configs["prior"]["num_layers"] = 1
    for unet in (configs["decoder"], configs["super_res"][0]):
        unet.update(block_out_channels=[32], down_block_types=unet["down_block_types"][:1],
                    up_block_types=unet["up_block_types"][-1:])
    configs["image_encoder"] = None
    configs.pop("feature_extractor", None)
    c = build_components(configs, seed=3)
    c.upsamplers[0].last = c.upsamplers[0].first
    previous = os.umask(0o022)
    try:
        out = onnx_export.export_onnx(c, str(tmp_path_factory.mktemp("verify") / "onnx"))
    finally:
        os.umask(previous)
    return c, out


@pytest.fixture
def copy(export, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(export[1], dst)
    return dst


def _flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def _text_proj_output(components):
    c = components.text_proj.config
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, c.clip_embeddings_dim, generator=gen), torch.randn(4, c.clip_embeddings_dim, generator=gen),
            torch.randn(4, 77, c.clip_embeddings_dim, generator=gen), True)
    with torch.no_grad():
        return components.text_proj(*args)[0]


@pytest.mark.parametrize("target, where", [
    ("text_proj/model.onnx.data", 0.5),  # a weight
    ("text_proj/model.onnx", 0.98),      # the graph file itself
    ("prior/clip_stats.safetensors", 0.99),
    ("tokenizer/vocab.json", 0.5),
])
def test_a_flipped_byte_is_refused_at_load(copy, target, where):
    _flip_byte(copy / target, where)
    with pytest.raises(ConfigError, match=rf"{target} does not match its sha256 in manifest.json"):
        load_exported(str(copy))


def test_verification_can_be_turned_off(export, copy, monkeypatch):
    expected = _text_proj_output(load_exported(export[1]))
    _flip_byte(copy / "text_proj" / "model.onnx.data", 0.5)
    # Opting out skips the hashing (sizes are still checked): the changed weight then reaches the output,
    # which is what the check prevents by default.
    changed = _text_proj_output(load_exported(str(copy), verify=False))
    assert not torch.equal(changed, expected)
    monkeypatch.setenv("UNCLIP_VERIFY_EXPORTS", "0")
    load_exported(str(copy))
    monkeypatch.setenv("UNCLIP_VERIFY_EXPORTS", "1")
    with pytest.raises(ConfigError, match="sha256"):
        load_exported(str(copy))
    with pytest.raises(ConfigError, match="sha256"):
        load_exported(str(copy), verify=True)
    with pytest.raises(TypeError, match="verify"):
        onnx_export.verification_enabled("no")
    (copy / "text_proj" / "model.onnx.data").write_bytes(b"short")
    with pytest.raises(ConfigError, match="has 5 bytes"):
        load_exported(str(copy), verify=False)


def test_an_edited_manifest_is_refused(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["manifest_sha256"] == onnx_export.manifest_checksum(manifest)
    manifest["schedulers"]["decoder"]["clip_sample_range"] = 2.0  # would change the images
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ConfigError, match="does not match its checksum"):
        load_exported(str(copy))
    del manifest["manifest_sha256"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="'manifest_sha256' is required"):
        load_exported(str(copy))


def _drop(*keys):
    def edit(m):
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(m):
        obj = m
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, key", [
    (_drop("format_version"), "format_version"),
    (_set(1, "format_version"), "format_version"),
    (_drop("networks", "decoder", "graph"), "networks.decoder.graph"),
    (_drop("networks", "decoder", "files"), "networks.decoder.files"),
    (_drop("networks", "text_proj"), "networks"),
    (_set([], "networks"), "networks"),
    (_drop("networks", "prior", "kind"), "networks.prior.kind"),
    (_set("vae", "networks", "prior", "kind"), "networks.prior.kind"),
    (_set("x/../../etc/passwd", "networks", "decoder", "graph"), "networks.decoder.graph"),
    (_drop("networks", "decoder", "graph_sha256"), "networks.decoder.graph_sha256"),
    (lambda m: m["networks"]["decoder"]["files"].update({"../outside": {"sha256": "0" * 64, "bytes": 1}}),
     "networks.decoder.files.../outside"),
    (lambda m: m["networks"]["decoder"]["files"]["decoder/model.onnx"].update(bytes="12"),
     "networks.decoder.files.decoder/model.onnx.bytes"),
    (lambda m: m["networks"]["decoder"]["files"]["decoder/model.onnx"].update(sha256="xyz"),
     "networks.decoder.files.decoder/model.onnx.sha256"),
    (_drop("tokenizer", "folder"), "tokenizer.folder"),
    (_set("../elsewhere", "tokenizer", "folder"), "tokenizer.folder"),
    (_drop("schedulers", "decoder"), "schedulers.decoder"),
    (_drop("schedulers", "prior"), "schedulers.prior"),
    (_set([], "upsamplers"), "upsamplers"),
    (lambda m: m["upsamplers"][0].pop("first"), "upsamplers[0].first"),
    (lambda m: m["upsamplers"][0].update(last="decoder"), "upsamplers[0].last"),
    (lambda m: m["upsamplers"][0].update(scheduler=None), "upsamplers[0].scheduler"),
    (_set("fp8", "dtype"), "dtype"),
    (_set({"name": "batch", "min": 1}, "batch_axis"), "batch_axis.max"),
    (lambda m: m["networks"]["decoder"]["inputs"][0].update(shape=[2, 3]), "networks.decoder.inputs[0].shape"),
    (_set("not a list", "networks", "decoder", "ops"), "networks.decoder.ops"),
    (_set(3, "call_defaults"), "call_defaults"),
])
def test_every_manifest_key_is_validated(copy, edit, key):
    """A manifest whose checksum matches (written by hand or another tool) but which lacks a key or holds
    a wrong type: ConfigError naming the key, never a KeyError or TypeError."""
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["manifest_sha256"] = onnx_export.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as info:
        load_exported(str(copy))
    assert f"key '{key}" in str(info.value) and "manifest.json" in str(info.value), str(info.value)


def test_export_files_have_umask_permissions(export):
    for folder, _, names in os.walk(export[1]):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode) == 0o644, (folder, n)


# ------------------------------------------------------------------------------------------------ publish
def _fake_export(path, marker):
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"marker": marker}))
    (path / "decoder").mkdir()
    (path / "decoder" / "model.onnx").write_text(marker)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("injected")], ids=["ctrl-c", "enospc", "exception"])
def test_publish_keeps_the_old_export_on_a_fault_at_every_step(tmp_path, monkeypatch, exchange, error):
    if not exchange:
        monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    out = tmp_path / "onnx"
    _fake_export(out, "old")
    real = {name: getattr(os, name) for name in ("rename", "replace", "mkdir")}
    real_exchange = files.exchange_paths

    def run(fail_at):
        calls = []

        def counted(name, fn):
            def step(*args, **kwargs):
                calls.append(name)
                if len(calls) == fail_at:
                    raise error
                return fn(*args, **kwargs)
            return step
        staged = onnx_export.staging_dir(str(out))
        _fake_export_into(staged)
        with monkeypatch.context() as m:
            for name, fn in real.items():
                m.setattr(os, name, counted(name, fn))
            m.setattr(files, "exchange_paths", counted("exchange", real_exchange))
            try:
                onnx_export.publish(staged, str(out))
                return calls, None
            except BaseException as e:  # noqa: B036 - KeyboardInterrupt is injected
                files.discard_dir(staged)
                return calls, e

    def _fake_export_into(staged):
        (open(os.path.join(staged, "manifest.json"), "w")).write(json.dumps({"marker": "new"}))

    steps, _ = run(None)
    assert json.loads((out / "manifest.json").read_text()) == {"marker": "new"}
    for k in range(1, len(steps) + 1):
        shutil.rmtree(out)
        _fake_export(out, "old")
        _, raised = run(k)
        marker = json.loads((out / "manifest.json").read_text())["marker"]
        if raised is not None:
            assert marker == "old" and (out / "decoder" / "model.onnx").read_text() == "old", (k, steps)
        assert os.listdir(tmp_path) == ["onnx"], (k, steps, os.listdir(tmp_path))


def test_publish_refuses_to_replace_what_is_not_an_export(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    staged = onnx_export.staging_dir(str(mine))
    with pytest.raises(FileExistsError, match="not an unclip ONNX export"):
        onnx_export.publish(staged, str(mine))
    files.discard_dir(staged)
    assert os.listdir(tmp_path) == ["mine"] and (mine / "notes.txt").read_text() == "keep me"
