"""The README's examples run as written, and its diffusers-interop claims hold.

Every ```python / ```bash block of README.md is preceded by a marker saying how it is tested:
  <!-- example: setup ... -->     the set-up commands: .ci/run runs them in a fresh virtual environment
  <!-- example: toy ... -->       runs here as written (the embedded toy model, CPU)
  <!-- example: karlo ... -->     needs real Karlo weights: runs here with `path/to/...` replaced by a saved
                                  random-weight folder (and, without CUDA, on the CPU in fp32)
  <!-- example: synopsis ... -->  option syntax or real exports; the comment names the tests that run it
The Python blocks run in README order in one namespace (as a reader would paste them); a karlo block runs in
a copy of it, so its `pipe` does not replace the toy one.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import unclip
from unclip.presets import TOY_PATH

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("setup", "toy", "karlo", "synopsis")
FAST = dict(prior_num_inference_steps=4, decoder_num_inference_steps=5, super_res_num_inference_steps=3)


@dataclass
class Example:
    kind: str | None
    language: str
    code: str
    line: int


def readme_examples(text: str) -> list[Example]:
    """Every fenced python/bash block with the kind named by the last marker since the previous block."""
    examples, kind, block, start = [], None, None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if block is not None:
            if line.startswith("```"):
                examples.append(Example(kind, block[0], "\n".join(block[1:]) + "\n", start))
                block, kind = None, None
            else:
                block.append(line)
            continue
        marker = re.match(r"<!-- example: (\w+)", line)
        if marker:
            kind = marker.group(1)
        elif re.match(r"```(python|bash)\s*$", line):
            block, start = [line[3:].strip()], number
        elif line.startswith("```"):  # another kind of block (a table of output, a diagram): no marker needed
            kind = None
    return examples


EXAMPLES = readme_examples((ROOT / "README.md").read_text(encoding="utf-8"))


def _of(kind: str, language: str) -> list[Example]:
    return [e for e in EXAMPLES if e.kind == kind and e.language == language]


@pytest.fixture(scope="module")
def karlo_like(tmp_path_factory):
    """A saved random-weight cascade (tiny preset: prior, decoder, upsampler, image encoder) standing in for
    Karlo's folders."""
    folder = str(tmp_path_factory.mktemp("weights") / "random-karlo")
    unclip.Pipeline.from_preset("tiny", seed=0).save_pretrained(folder)
    return folder


STEPS = 2  # every sampling step count of the examples, so that they stay cheap on a 2-core CPU


class _FewSteps:
    """A pipeline whose sampling calls run with STEPS steps per stage, whatever the example passes (the step
    counts are not what the examples show); everything else is the pipeline's own."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        attr = getattr(self._pipe, name)
        if name not in ("variations", "invert", "interpolate", "text_diff", "inpaint", "outpaint", "img2img"):
            return attr
        return lambda *args, **kwargs: self._capped(attr, args, kwargs)

    def __call__(self, *args, **kwargs):
        return self._capped(self._pipe, args, kwargs)

    def __repr__(self):
        return repr(self._pipe)

    @staticmethod
    def _capped(method, args, kwargs):
        import inspect
        bound = inspect.signature(method).bind(*args, **kwargs)
        for name in inspect.signature(method).parameters:
            if name.endswith("num_inference_steps"):
                bound.arguments[name] = STEPS
        return method(*bound.args, **bound.kwargs)


def _few_steps_python(code: str) -> str:
    return re.sub(r"(unclip\.Pipeline\.from_(?:preset|pretrained)\((?:[^()]|\([^()]*\))*\))", r"_FewSteps(\1)",
                  code)


def _few_steps_shell(code: str) -> str:
    """Each `unclip generate|vary|interpolate|edit` command gets --steps (and --prior-steps) of STEPS appended
    (the last occurrence of a flag wins); --from-png and --help commands are left as they are."""
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        command, hash_, comment = line.partition(" #")
        m = re.match(r"\s*unclip (generate|vary|interpolate|edit)\b", command)
        if m and "--from-png" not in command and "--help" not in command:
            n = 3 if m.group(1) == "generate" else 2
            command = command.rstrip() + " --steps" + f" {STEPS}" * n
            if m.group(1) == "interpolate":
                command += f" --prior-steps {STEPS}"
        lines.append(command + hash_ + comment)
    return "\n".join(lines) + "\n"


def _as_karlo(code: str, folder: str) -> str:
    code = re.sub(r"path/to/karlo[\w-]*", folder, code)
    if not torch.cuda.is_available():  # the same call on this machine's CPU
        code = code.replace('device="cuda"', 'device="cpu"').replace("dtype=torch.float16", "dtype=torch.float32")
        code = code.replace("--device cuda", "--device cpu").replace("--dtype fp16", "--dtype fp32")
    return code


# --------------------------------------------------------------------------------------------- the markers

def test_every_example_says_how_it_is_tested():
    unmarked = [e.line for e in EXAMPLES if e.kind not in KINDS]
    assert not unmarked, f"README.md blocks at lines {unmarked} have no <!-- example: {'|'.join(KINDS)} --> marker"
    for kind in ("setup", "toy", "karlo"):
        assert any(e.kind == kind for e in EXAMPLES), kind
    assert any(e.kind == "toy" and e.language == "python" for e in EXAMPLES)
    assert any(e.kind == "toy" and e.language == "bash" for e in EXAMPLES)


def test_the_setup_examples_are_what_ci_runs_in_a_fresh_venv():
    setup = [e.code.strip() for e in EXAMPLES if e.kind == "setup"]
    assert len(setup) == 2 and "pytest" in setup[1] and "unclip generate" in setup[0]
    read = [subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_setup.py"), str(ROOT / "README.md"), str(n)],
                           capture_output=True, text=True, check=True).stdout.strip() for n in (1, 2)]
    assert read == setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "readme_block 1" in ci and "readme_block 2" in ci


# --------------------------------------------------------------------------------------------- running them

def test_the_python_examples_run(karlo_like, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # save_pretrained("my-cascade") writes here
    namespace: dict = {}
    ran = []
    for e in EXAMPLES:
        if e.language != "python" or e.kind not in ("toy", "karlo"):
            continue
        code = _few_steps_python(e.code if e.kind == "toy" else _as_karlo(e.code, karlo_like))
        namespace["_FewSteps"] = _FewSteps
        exec(compile(code, f"README.md:{e.line}", "exec"), namespace if e.kind == "toy" else dict(namespace))
        ran.append(e.line)
    assert len(ran) == len(_of("toy", "python")) + len(_of("karlo", "python")) >= 3
    # What the comments of the toy examples claim.
    assert repr(namespace["pipe"]).startswith("Pipeline('preset toy', backend='torch', device='cpu', dtype=float32")
    assert len(namespace["out"].images) == 4  # the variations call came last
    x0, inv = namespace["x0"], namespace["inv"]
    size = namespace["pipe"].components.decoder.config.sample_size
    assert x0.shape == (1, 3, size, size) and x0.shape == inv.image.shape and -1.5 < x0.min() and x0.max() < 1.5
    assert len(namespace["series"].images) == 5 and len(namespace["edits"].images) == 3
    assert (tmp_path / "my-cascade" / "model_index.json").is_file()


def test_the_shell_examples_run(karlo_like, tmp_path):
    from PIL import Image

    from unclip import shapes
    program = shutil.which("unclip")
    assert program, "the `unclip` program is not on PATH (install the package: see the README's set-up)"
    scenes = shapes.sample_scenes(4, rng=0)
    for name, scene in zip(("photo.png", "a.png", "b.png", "cat.png"), scenes):
        Image.fromarray(shapes.render(scene)).save(tmp_path / name)
    blocks = _of("toy", "bash") + _of("karlo", "bash")
    assert len(blocks) >= 3
    for e in blocks:
        code = _few_steps_shell(e.code if e.kind == "toy" else _as_karlo(e.code, karlo_like))
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, f"README.md:{e.line}\n{code}\n{run.stderr[-3000:]}"
    made = set(os.listdir(tmp_path))
    assert {"circle-0.png", "circle-1.png", "again.png", "var-3.png", "var-sheet.png", "morph-6.png", "t2t-sheet.png",
            "edit-2.png"} <= made, sorted(made)
    with Image.open(tmp_path / "circle-1.png") as a, Image.open(tmp_path / "again.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # "the same image again, bit for bit"


# --------------------------------------------------------------------------------------------- diffusers

def _diffusers_from_pretrained(folder: str):
    from diffusers import UnCLIPPipeline
    pipe = UnCLIPPipeline.from_pretrained(folder).to(torch.float32)  # the toy folder holds fp16 weights
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(ours, theirs, prompt, seed=7) -> float:
    a = ours(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", progress=False,
             prior_guidance_scale=4.0, decoder_guidance_scale=8.0, **FAST).images
    b = theirs(prompt, generator=torch.Generator().manual_seed(seed), output_type="np",
               prior_guidance_scale=4.0, decoder_guidance_scale=8.0, **FAST).images
    assert a.shape == b.shape and a.std() > 0.01
    return float(np.abs(a - b).max())


def test_diffusers_loads_our_saved_folder_and_draws_our_images(karlo_like):
    """README: "A folder written by save_pretrained ... loads in diffusers 0.42's UnCLIPPipeline.from_pretrained
    and draws the same images at the same seed" (fp32 CPU, max |d| <= 1e-4)."""
    theirs = _diffusers_from_pretrained(karlo_like)
    ours = unclip.Pipeline.from_pretrained(karlo_like)
    assert _max_diff(ours, theirs, ["a red circle", "An Astronaut, riding; a HORSE!!"]) <= 1e-4


def test_diffusers_loads_the_toy_folder_and_draws_our_images():
    """README (The toy model): diffusers' own UnCLIPPipeline runs the folder and draws the same images."""
    theirs = _diffusers_from_pretrained(TOY_PATH)
    ours = unclip.Pipeline.from_preset("toy")
    assert _max_diff(ours, theirs, "a large red circle on the left on a white background") <= 1e-4


@pytest.mark.parametrize("library", ["unclip", "diffusers", "diffusers.pipelines.deprecated.unclip.text_proj"],
                         ids=["karlo-form", "written-by-diffusers", "ours"])
def test_every_text_proj_entry_form_loads_in_ours(library, tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(TOY_PATH, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_proj"] = [library, "UnCLIPTextProjModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = unclip.Pipeline.from_pretrained(str(folder))
    assert pipe.components.text_proj is not None
