"""The cascade core (docs/architecture.md): no import cycles, one request object validating every entry point
before any work, runners from the registry (the documented example runner included), `prepare` never
mutating the caller's modules, observers, and non-finite errors naming the stage."""
import ast
import copy
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import unclip
from unclip.models.layers import Attend, attention_reference
from unclip.observers import Observer
from unclip.presets import build_components, preset_configs
from unclip.runner import RUNNERS, availability, runner_class

ROOT = Path(__file__).resolve().parents[1]
STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
PACKAGES = {"engine": "unclip", "kernels": "unclip.kernels", "export": "unclip.export"}


# --------------------------------------------------------------------------------------------- imports

def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if folder == "engine" and rel.parts[0] in ("kernels", "export"):
                continue  # a development symlink to the real folder
            parts = [package] + list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts).replace("unclip.kernels.kernels", "unclip.kernels")] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Every module of the package that `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_the_package_has_no_import_cycle_and_pipeline_has_no_importers_but_the_face_and_cli():
    modules = _modules()
    assert {"unclip.pipeline", "unclip.cascade", "unclip.runner", "unclip.runners.torch", "unclip.kernels.wiring",
            "unclip.export.loader"} <= set(modules)
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert "unclip.cascade" in graph["unclip.pipeline"]  # the walker sees real edges
    assert "unclip.pipeline" not in graph["unclip.latent_space"]
    importers = {m for m, deps in graph.items() if "unclip.pipeline" in deps}
    assert importers <= {"unclip", "unclip.cli", "unclip.cli_common", "unclip.cli_bench", "unclip.cli_latent",
                         "unclip.cli_export"}, importers
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_can_fail(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import x\n")
    modules = {"unclip.a": a, "unclip.b": b}
    assert _imports("unclip.a", a, modules) == {"unclip.b"} and _imports("unclip.b", b, modules) == {"unclip.a"}


def test_no_reference_to_an_outside_design_document():
    pattern = re.compile(r"DESIGN(\.md)?\s*§|DESIGN\.md")
    for folder in ("engine", "kernels", "export", "tests", "benchmarks", "training", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh") and "assets" not in path.parts and path != Path(__file__):
                assert not pattern.search(path.read_text(errors="ignore")), path


# --------------------------------------------------------------------------------------------- runners

def _example_runner_source() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Adding a backend", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return blocks[0]


@pytest.fixture(scope="module")
def tiny():
    return build_components(preset_configs("tiny"), seed=0)


@pytest.fixture(scope="module")
def counting(tiny):
    source = _example_runner_source()
    assert len(source.strip().splitlines()) <= 30  # a page-sized example, not a module
    namespace = {}
    exec(compile(source, "docs/architecture.md", "exec"), namespace)
    try:
        yield namespace["CountingRunner"]
    finally:
        RUNNERS.pop("counting", None)


def _call(pipe, seed=0, **kw):
    args = dict(prompt="a blue square", output_type="pt", progress=False, generator=torch.Generator().manual_seed(seed),
                **STEPS)
    args.update(kw)
    return pipe(**args)


def test_the_documented_example_runner_registers_and_draws_the_torch_images(counting, tiny):
    assert "counting" in RUNNERS and runner_class("counting") is counting
    pipe = unclip.Pipeline(tiny, backend="counting")
    got = _call(pipe, prior_num_inference_steps=3).images
    assert torch.equal(got, _call(unclip.Pipeline(tiny), prior_num_inference_steps=3).images)
    assert pipe.runner.calls == {"prior": 3, "decoder": 2, "super_res": 2}
    # the documented call, as written
    doc = unclip.Pipeline.from_preset("tiny", backend="counting")
    doc("a red circle", prior_num_inference_steps=3, progress=False, output_type="pt")
    assert doc.runner.calls == {"prior": 3, "decoder": 25, "super_res": 7}


def test_registry_lists_every_backend_with_a_reason_when_unavailable():
    status = availability("cpu")
    assert list(status) == list(RUNNERS) and {"torch", "fast", "onnxruntime", "tensorrt"} <= set(status)
    assert status["torch"] == (True, "")
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and (ok or reason), name
    with pytest.raises(ValueError, match="backend must be one of torch, fast"):
        runner_class("vulkan")


def test_unavailable_backend_is_a_clear_error_before_any_work(tiny, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'fast' is not available here: .*CUDA"):
        unclip.Pipeline(tiny, backend="fast")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the fast backend runs on the CPU only "
                    "under TRITON_INTERPRET=1 (set by the test command)")
def test_fast_then_torch_from_the_same_components_leaves_torch_bit_identical():
    components = build_components(preset_configs("tiny"), seed=0)
    before = _call(unclip.Pipeline(components)).images
    impls = [m.impl for m in components.decoder.modules() if isinstance(m, Attend)]
    fast = unclip.Pipeline(components, backend="fast")
    fast_images = _call(fast, prior_num_inference_steps=1, decoder_num_inference_steps=1,
                        super_res_num_inference_steps=1).images
    assert [m.impl for m in components.decoder.modules() if isinstance(m, Attend)] == impls
    assert all(i is attention_reference for i in impls)
    swapped = [m.impl for m in fast.runner.prepare(components)["decoder"].modules() if isinstance(m, Attend)]
    assert swapped and all(i is not attention_reference for i in swapped)  # the copies run the kernels
    assert torch.isfinite(fast_images).all()
    after = _call(unclip.Pipeline(components)).images
    assert torch.equal(after, before)
    # the copies share the caller's weights: no parameter was duplicated
    prepared = fast.runner.prepare(components)
    assert prepared["decoder"].conv_in.weight is components.decoder.conv_in.weight


def test_torch_runner_refuses_components_of_another_dtype(tiny):
    with pytest.raises(ValueError, match="dtype torch.float16 was asked for, but network 'text_encoder' holds "
                                         "torch.float32 weights"):
        unclip.Pipeline(tiny, dtype=torch.float16)


# --------------------------------------------------------------------------------------------- requests

@pytest.fixture(scope="module")
def two_upsamplers():
    c = copy.deepcopy(preset_configs("tiny"))
    c["super_res"].append(dict(c["super_res"][0], sample_size=48, block_out_channels=[16, 16]))
    return unclip.Pipeline(build_components(c, seed=0))


def _sr_latents(pipe, rows=1):
    up = pipe.components.upsamplers[0].first.config
    return torch.zeros(rows, 3, up.sample_size, up.sample_size)


def test_one_super_res_tensor_with_two_upsamplers_is_refused_by_call(two_upsamplers):
    with pytest.raises(ValueError, match="super_res_latents: this cascade has 2 upsamplers; give a list of 2"):
        _call(two_upsamplers, super_res_latents=_sr_latents(two_upsamplers))
    with pytest.raises(ValueError, match=r"super_res_latents: give exactly 2 entries \(one per upsampler\); got 1"):
        _call(two_upsamplers, super_res_latents=[_sr_latents(two_upsamplers)])
    out = _call(two_upsamplers, super_res_latents=[_sr_latents(two_upsamplers), None]).images
    assert out.shape == (1, 3, 48, 48)  # both upsamplers ran


def test_one_super_res_tensor_with_two_upsamplers_is_refused_by_variations(two_upsamplers):
    image = np.zeros((20, 20, 3), np.uint8)
    kw = dict(decoder_num_inference_steps=1, super_res_num_inference_steps=1, output_type="pt", progress=False)
    with pytest.raises(ValueError, match="super_res_latents: this cascade has 2 upsamplers"):
        two_upsamplers.variations(image, super_res_latents=_sr_latents(two_upsamplers), **kw)
    with pytest.raises(ValueError, match=r"super_res_latents: give exactly 2 entries"):
        two_upsamplers.variations(image, super_res_latents=[_sr_latents(two_upsamplers)], **kw)
    with pytest.raises(ValueError, match=r"super_res_latents\[1\] must have shape \(1, 3, 48, 48\)"):
        two_upsamplers.variations(image, super_res_latents=[None, _sr_latents(two_upsamplers)], **kw)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(generator=[torch.Generator()] * 2), ValueError, "generator: a list needs exactly one torch.Generator per "
                                                          r"image \(1\); got 2"),
    (dict(generator=[torch.Generator(), 3]), TypeError, "generator: every entry of a list must be a torch.Generator"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(decoder_latents=torch.zeros(1, 3, 16, 16, dtype=torch.int64)), TypeError,
     "decoder_latents must be a floating-point tensor"),
    (dict(prior_latents=torch.full((1, 32), float("nan"))), ValueError, "prior_latents contains NaN"),
    (dict(super_res_latents=[None, None]), ValueError, "super_res_latents: give exactly 1 entries"),
    (dict(prompt=None, text_model_output=(torch.zeros(1, 32), torch.zeros(1, 77, 32))), ValueError,
     "text_attention_mask is required"),
    (dict(prompt=None, text_model_output=(torch.zeros(1, 32), torch.zeros(1, 77, 32)),
          text_attention_mask=torch.ones(1, 76, dtype=torch.bool)), ValueError,
     r"text_attention_mask must have shape \(1, 77\)"),
    (dict(prompt=None, text_model_output=(torch.zeros(2, 32), torch.zeros(1, 77, 32)),
          text_attention_mask=torch.ones(1, 77, dtype=torch.bool)), ValueError, "the same B"),
    (dict(prompt="a\ud800b"), ValueError, "prompt holds text that is not valid Unicode"),
    (dict(observer=print), TypeError, "observer must be a unclip.Observer"),
    (dict(prior_candidates=2, generator=[torch.Generator()]), ValueError, "prior_candidates > 1"),
])
def test_bad_calls_fail_before_any_work(counting, tiny, kwargs, error, pattern):
    pipe = unclip.Pipeline(tiny, backend="counting")
    with pytest.raises(error, match=pattern):
        _call(pipe, **kwargs)
    assert pipe.runner.calls == {}  # no stage ran
    assert _call(pipe).images.shape == (1, 3, 32, 32)  # and the pipeline is still usable


@pytest.mark.parametrize("method, kwargs, error, pattern", [
    ("invert", dict(image=np.zeros((8, 8, 3), np.uint8), num_inference_steps=0), ValueError,
     r"num_inference_steps must be in 1\.\.1000"),
    ("invert", dict(decoder_image=torch.zeros(1, 3, 16, 16)), ValueError, "image_embeddings is required"),
    ("variations", dict(image=np.zeros((8, 8, 3), np.uint8), callback="no"), TypeError, "callback must be callable"),
    ("variations", dict(image=np.zeros((8, 8, 3), np.uint8), generator=[torch.Generator()] * 3), ValueError,
     "one torch.Generator per image"),
    ("interpolate", dict(start=np.zeros((8, 8, 3), np.uint8), end="x", num=3, generator=[torch.Generator()]),
     ValueError, "pass one torch.Generator"),
    ("text_diff", dict(image=np.zeros((8, 8, 3), np.uint8), from_caption="a", to_caption="b", thetas=[2.0]),
     ValueError, r"thetas must lie in \[0, 1\]"),
])
def test_latent_space_entry_points_validate_before_any_work(counting, tiny, method, kwargs, error, pattern):
    pipe = unclip.Pipeline(tiny, backend="counting")
    with pytest.raises(error, match=pattern):
        getattr(pipe, method)(**kwargs)
    assert pipe.runner.calls == {}


# --------------------------------------------------------------------------------------------- observers

class Recorder(Observer):
    def __init__(self, wants_steps=False):
        self.events, self.wants_steps = [], wants_steps

    def on_stage_start(self, name, stage):
        self.events.append(("start", name, None if stage is None else stage.plan.num_steps))

    def on_step(self, stage, i, t, latents):
        self.events.append(("step", stage.name, i))

    def on_stage_end(self, name, stage, latents):
        self.events.append(("end", name, None if latents is None else tuple(latents.shape)))


def test_an_observer_sees_every_stage_and_step_in_order(tiny):
    pipe = unclip.Pipeline(tiny)
    rec = Recorder()
    plain = _call(pipe).images
    assert torch.equal(_call(pipe, observer=rec).images, plain)  # observing changes nothing
    starts = [e[1] for e in rec.events if e[0] == "start"]
    assert starts == ["text", "prior", "decoder", "super_res"]
    assert [e[2] for e in rec.events if e[0] == "step" and e[1] == "decoder"] == [0, 1]
    assert ("end", "super_res", (1, 3, 32, 32)) in rec.events
    rec = Recorder()
    pipe.variations(np.zeros((20, 20, 3), np.uint8), decoder_num_inference_steps=2, super_res_num_inference_steps=1,
                    output_type="pt", progress=False, observer=rec)
    assert [e[1] for e in rec.events if e[0] == "start"] == ["image_encoder", "decoder", "super_res"]


def test_non_finite_values_name_the_stage_including_post_processing():
    c = build_components(preset_configs("tiny"), seed=0)
    with torch.no_grad():
        c.prior.clip_std.fill_(float("nan"))
    with pytest.raises(unclip.NonFiniteError, match=r"stage 'prior \(post-processing"):
        _call(unclip.Pipeline(c))
    c = build_components(preset_configs("tiny"), seed=0)
    with torch.no_grad():
        c.upsamplers[0].last.conv_out.bias.fill_(float("nan"))  # (inf would be clipped away in x0)
    with pytest.raises(unclip.NonFiniteError, match="stage 'super_res'"):
        _call(unclip.Pipeline(c))


@pytest.mark.parametrize("name", ["karlo", "dalle2"])
def test_large_presets_wire_text_proj_into_the_decoder(name):
    """On the meta device (no memory): text_proj's outputs have the shapes the preset's decoder takes (karlo's
    time embedding is 4 × the decoder's 320 base channels = 1280, its context 1536 wide)."""
    from unclip.presets import build_preset
    c = build_preset(name, device="meta")
    dim = c.text_proj.config.clip_embeddings_dim
    text = c.text_encoder.config
    with torch.device("meta"):
        context, time_embed = c.text_proj(torch.empty(2, dim), torch.empty(4, text.projection_dim),
                                          torch.empty(4, 77, text.hidden_size), True)
        size = c.decoder.config.sample_size
        mask = torch.ones(4, context.shape[1], dtype=torch.bool)
        out = c.decoder(torch.empty(4, 3, size, size), torch.tensor(999), context, time_embed, mask)
    assert out.shape == (4, 6, size, size)
