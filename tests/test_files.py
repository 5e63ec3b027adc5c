"""Atomic and recoverable writes (unclip.files) and everything that replaces user data through them:
saved models, PNGs of `unclip generate` and `unclip interpolate`.

Each interrupted-write test runs the write once to list its steps (every os.open / os.write / os.fsync /
os.chmod / os.mkdir / os.replace / os.rename call, the atomic folder exchange and safetensors' file writer),
then again with a fault at each step in turn (an exception, KeyboardInterrupt, OSError(ENOSPC)), and checks
that the destination holds the complete old data (or, for a fault after the final rename, the complete new
data) and that no temporary file or folder is left behind.
"""
import errno
import hashlib
import os
import stat

import pytest
import torch

import unclip
from unclip import files
from unclip.cli import main
from unclip.loading import save_components
from unclip.presets import build_components

ERRORS = (RuntimeError("injected failure"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device"))
COUNTED = ("open", "write", "fsync", "chmod", "mkdir", "replace", "rename")


class Faults:
    """Counts the write steps of a call and raises `error` at step `fail_at` (1-based; None: never). Opens
    for writing count, opens for reading do not. fsync is counted but not performed: durability is not
    what these tests measure, and it is slow."""

    def __init__(self, monkeypatch, fail_at=None, error=None):
        self.steps, self.fail_at, self.error = [], fail_at, error
        for name in COUNTED:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(files, "exchange_paths", self._wrap("exchange", files.exchange_paths))
        import safetensors.torch
        monkeypatch.setattr(safetensors.torch, "save_file", self._wrap("save_file", safetensors.torch.save_file))

    def _wrap(self, name, real):
        def step(*args, **kwargs):
            if name == "open" and not args[1] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return real(*args, **kwargs)  # reading (a folder to fsync, rmtree's walk) is not a write step
            self.steps.append(name)
            if len(self.steps) == self.fail_at:
                raise self.error
            if name == "fsync":
                return None
            return real(*args, **kwargs)
        return step


def _tree(root):
    """{relative path: sha256} of every file under root (plus folders, as None)."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = None
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                out[os.path.relpath(os.path.join(folder, n), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _run_with_faults(monkeypatch, action, check, reset, *, errors=ERRORS, every=1):
    """`action()` once fault-free (returns its steps), then with a fault at each step; `reset()` restores the
    old data before every run, `check(raised, step, steps)` runs after each. With `every` > 1 the error
    types take turns over the steps instead of all three at each."""
    reset()
    with monkeypatch.context() as m:
        faults = Faults(m)
        action()
        steps = list(faults.steps)
    assert steps
    for k in range(1, len(steps) + 1):
        chosen = errors if every == 1 else (errors[k % len(errors)],)
        for error in chosen:
            reset()
            with monkeypatch.context() as m:
                Faults(m, fail_at=k, error=error)
                try:
                    action()
                    raised = None
                except BaseException as e:  # noqa: B036 - KeyboardInterrupt is one of the injected faults
                    raised = e
            assert raised is None or raised is error or raised.__cause__ is error, (k, steps[k - 1], raised)
            check(raised, k, steps)
    return steps


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("kind", ["bytes", "with", "image"])
def test_file_write_survives_a_fault_at_every_step(tmp_path, monkeypatch, kind):
    from PIL import Image
    path = tmp_path / "out.png"
    old_image, new_image = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))

    def write_old():
        files.atomic_save_image(old_image, path)
        return path.read_bytes()

    old = write_old()
    if kind == "bytes":
        new = b"new contents " * 1000

        def action():
            files.atomic_write_bytes(path, new)
    elif kind == "with":
        new = b"written through a path"

        def action():
            files.atomic_write_with(path, lambda tmp: open(tmp, "wb").write(new))
    else:
        def action():
            files.atomic_save_image(new_image, path)

    def check(raised, k, steps):
        data = path.read_bytes()
        commit = steps.index("replace") + 1
        if raised is not None and k <= commit:
            assert data == old, (k, steps[k - 1])
        if kind != "image":
            assert data in (old, new)
        assert os.listdir(tmp_path) == ["out.png"], (k, steps[k - 1], os.listdir(tmp_path))

    steps = _run_with_faults(monkeypatch, action, check, write_old)
    assert {"open", "write", "fsync", "replace"} <= set(steps) or kind == "with"
    action()
    assert path.read_bytes() != old


def test_new_files_and_folders_get_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        files.atomic_write_bytes(tmp_path / "a.bin", b"x")
        staged = files.make_staging_dir(tmp_path / "dir")
        assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644
        assert stat.S_IMODE(os.stat(staged).st_mode) == 0o755
        os.umask(0o002)
        files.atomic_write_bytes(tmp_path / "b.bin", b"x")
        assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o664
        # A replaced file keeps the permissions its owner gave it.
        os.chmod(tmp_path / "a.bin", 0o640)
        files.atomic_write_bytes(tmp_path / "a.bin", b"y")
        assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o640
    finally:
        os.umask(previous)


def test_write_refuses_a_folder_and_unknown_image_type(tmp_path):
    from PIL import Image
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        files.atomic_write_bytes(tmp_path / "d", b"x")
    with pytest.raises(ValueError, match="extension"):
        files.atomic_save_image(Image.new("RGB", (2, 2)), tmp_path / "x.unknown")
    assert sorted(os.listdir(tmp_path)) == ["d"]


# ------------------------------------------------------------------------------------------------ folders
def _make(folder, contents):
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_text(data)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_replace_dir_survives_a_fault_at_every_step(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    dest = tmp_path / "model"
    _make(dest, {"a": "old a", "b": "old b"})
    old = _tree(dest)

    def reset():
        if _tree(dest) != old:
            for name in os.listdir(dest):
                os.remove(dest / name)
            (dest / "a").write_text("old a")
            (dest / "b").write_text("old b")

    def action():
        staged = files.make_staging_dir(dest)
        try:
            files.atomic_write_bytes(os.path.join(staged, "a"), b"new a")
            files.replace_dir(staged, str(dest))
        except BaseException:
            files.discard_dir(staged)
            raise

    def check(raised, k, steps):
        now = _tree(dest)
        swap = max(i for i, s in enumerate(steps) if s in ("exchange", "rename")) + 1
        if raised is not None and k <= swap:
            assert now == old, (k, steps[k - 1])
        assert now in (old, {"a": hashlib.sha256(b"new a").hexdigest()}), (k, steps[k - 1], now)
        assert os.listdir(tmp_path) == ["model"], (k, steps[k - 1], os.listdir(tmp_path))

    steps = _run_with_faults(monkeypatch, action, check, reset)
    assert ("exchange" in steps) == exchange or not exchange


def test_interrupt_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The fallback path moves the old folder aside first: a Ctrl-C right then must not strand it."""
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    dest, staged = tmp_path / "model", tmp_path / "staged"
    _make(dest, {"weights": "old"})
    _make(staged, {"weights": "new"})
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the old folder is aside now; the new one is not yet in place
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(str(staged), str(dest))
    assert (dest / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["model", "staged"]  # the staging folder is the caller's to discard


def test_real_ctrl_c_is_held_back_during_the_swap(tmp_path, monkeypatch):
    import signal
    monkeypatch.setattr(files, "exchange_paths", lambda a, b: False)
    dest, staged = tmp_path / "model", tmp_path / "staged"
    _make(dest, {"weights": "old"})
    _make(staged, {"weights": "new"})
    real = os.rename

    def rename(a, b):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of the swap
        return real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(str(staged), str(dest))
    assert (dest / "weights").read_text() == "new"  # the swap completed, then the interrupt arrived
    assert os.listdir(tmp_path) == ["model"]


def test_a_leftover_old_folder_is_reported(tmp_path, monkeypatch):
    dest, staged = tmp_path / "model", tmp_path / "staged"
    _make(dest, {"weights": "old"})
    _make(staged, {"weights": "new"})
    monkeypatch.setattr(files.shutil, "rmtree", lambda path, ignore_errors=False: None)  # e.g. permissions
    with pytest.warns(UserWarning, match="previous folder could not be fully deleted"):
        files.replace_dir(str(staged), str(dest))
    assert (dest / "weights").read_text() == "new"


# ------------------------------------------------------------------------------------------------ models
def _small(seed=0):
    """A cascade far smaller than tiny (same layout, no image encoder), so that saving it once per write
    step stays fast."""
    from unclip.presets import _clip_text, _decoder, _prior, _super_res, _text_proj
    return build_components({"text_encoder": _clip_text(None, 16, 1, 2, 16), "prior": _prior(2, 8, 1, 16),
                             "text_proj": _text_proj(16, 32, 16), "decoder": _decoder(16, (8, 16), 1, 16, 8, groups=4),
                             "super_res": [_super_res(32, (8, 16), 1, groups=4)]}, seed=seed)


@pytest.fixture(scope="module")
def small():
    return _small()


def test_save_pretrained_onto_a_model_survives_a_fault_at_every_step(tmp_path, monkeypatch, small):
    root = tmp_path / "model"
    save_components(small, str(root))
    (root / "my_notes.txt").write_text("kept with the old model")
    old = _tree(root)
    different = _small(seed=1)

    def action():
        save_components(different, str(root))

    def reset():
        if _tree(root) != old:
            save_components(small, str(root))
            (root / "my_notes.txt").write_text("kept with the old model")

    def check(raised, k, steps):
        now = _tree(root)
        swap = len(steps) - steps[::-1].index("exchange")
        if raised is not None and k <= swap:
            assert now == old, (k, steps[k - 1])
        assert now == old or ("model_index.json" in now and "my_notes.txt" not in now), (k, steps[k - 1])
        assert os.listdir(tmp_path) == ["model"], (k, steps[k - 1], os.listdir(tmp_path))

    # Every step, the three error types taking turns (all three at each would take minutes here).
    steps = _run_with_faults(monkeypatch, action, check, reset, every=3)
    assert steps.count("save_file") >= 6 and "exchange" in steps


def test_save_pretrained_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path, small):
    mine = tmp_path / "photos"
    _make(mine, {"holiday.jpg": "precious"})
    with pytest.raises(FileExistsError, match="not a model folder.*overwrite=True"):
        save_components(small, str(mine))
    assert _tree(mine) == {"holiday.jpg": hashlib.sha256(b"precious").hexdigest()}
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_components(small, str(tmp_path / "file"))
    assert sorted(os.listdir(tmp_path)) == ["file", "photos"]
    save_components(small, str(mine), overwrite=True)  # asked for explicitly
    assert (mine / "model_index.json").is_file() and not (mine / "holiday.jpg").exists()
    (tmp_path / "empty").mkdir()
    save_components(small, str(tmp_path / "empty"))  # an empty folder holds nothing to lose
    assert (tmp_path / "empty" / "model_index.json").is_file()


def test_saved_model_has_umask_permissions(tmp_path, small):
    previous = os.umask(0o022)
    try:
        save_components(small, str(tmp_path / "model"))
    finally:
        os.umask(previous)
    for folder, dirs, names in os.walk(tmp_path / "model"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755, folder
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode) == 0o644, n


# ------------------------------------------------------------------------------------------------ CLI PNGs
def test_generate_png_is_written_atomically(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cat.png"
    out.write_bytes(b"an older image")
    args = ["generate", "a cat", "--preset", "tiny", "--steps", "2", "2", "2", "--out", str(out), "--quiet"]
    real = os.replace

    def disk_full(a, b):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    assert main(args) == 2 and "No space left" in capsys.readouterr().err
    assert out.read_bytes() == b"an older image" and os.listdir(tmp_path) == ["cat.png"]
    monkeypatch.setattr(os, "replace", real)
    assert main(args) == 0
    from PIL import Image
    with Image.open(out) as image:
        assert image.size == (32, 32) and "unclip" in image.info
    assert os.listdir(tmp_path) == ["cat.png"]


def test_interpolate_sheet_is_written_atomically(tmp_path, monkeypatch):
    sheet = tmp_path / "walk-sheet.png"
    sheet.write_bytes(b"an older sheet")
    real = os.replace
    calls = []

    def replace(a, b):
        calls.append(b)
        if os.fspath(b).endswith("walk-sheet.png"):
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        main(["interpolate", "a red cat", "a blue dog", "--preset", "tiny", "--num", "2", "--steps", "2", "2",
              "--prior-steps", "2", "--out", str(tmp_path / "walk.png"), "--quiet"])
    assert sheet.read_bytes() == b"an older sheet"
    assert sorted(os.listdir(tmp_path)) == ["walk-0.png", "walk-1.png", "walk-sheet.png"]
    assert len(calls) == 3


def test_pipeline_save_pretrained_still_round_trips(tmp_path, small):
    pipe = unclip.Pipeline(small)
    pipe.save_pretrained(str(tmp_path / "m"))
    again = unclip.Pipeline.from_pretrained(str(tmp_path / "m"))
    a = pipe.components.decoder.state_dict()
    b = again.components.decoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
