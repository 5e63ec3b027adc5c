"""Writing user data so that none is ever lost: atomic, recoverable replacement of files and folders.

A file is written to a temporary sibling (`.NAME.tmp-XXXX`), flushed to disk (fsync), then renamed over the
destination, and the folder is fsynced so the rename itself survives a crash. Until that rename the old file
is untouched; after it the new file is complete. Whatever fails in between - an exception, Ctrl-C
(KeyboardInterrupt), a full disk - the temporary file is removed and the destination holds either all of the
old data or all of the new, never a mix and never nothing.

A folder (a saved model, an export) is written in full into a staging sibling (`make_staging_dir`) and then
swapped into place by `replace_dir`: on Linux in one atomic exchange (renameat2 RENAME_EXCHANGE), elsewhere
in two renames during which Ctrl-C is held back and after any failure the old folder is put back. The old
folder is deleted only once the new one is in place.

Files and folders get ordinary permissions: 0666/0777 minus the umask, as `open()`/`mkdir` would create them
(tempfile's private 0600/0700 would leave a shared model folder unreadable to its other users); a replaced
file keeps the permission bits of the file it replaces.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
import warnings
from typing import Callable

_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# ----------------------------------------------------------------------------------------------- files

def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Replace (or create) the file `path` with `data`, atomically (see the module docstring)."""
    view = memoryview(data).cast("B")

    def write(fd: int) -> None:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])

    _replace_file(path, write_fd=write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8 (line ends as written)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data) -> None:
    """`atomic_write_text` of `data` as indented, key-sorted JSON (the form diffusers writes)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Replace `path` atomically with what `write(tmp_path)` writes to the (already created, empty) file at
    `tmp_path`; for writers that need a path, such as safetensors' `save_file`."""
    _replace_file(path, write_path=write)


def atomic_save_image(image, path: str | os.PathLike, pnginfo=None) -> None:
    """Save a PIL image atomically, in the format of `path`'s extension (PNG when it has none).

    The image is encoded in memory first (at most a few MB), so a failing encoder never touches the disk."""
    from PIL import Image

    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext) if ext else "PNG"
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {ext!r} (use .png)")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG" else {}))
    atomic_write_bytes(path, buffer.getbuffer())


def _replace_file(path, *, write_fd: Callable[[int], None] | None = None,
                  write_path: Callable[[str], None] | None = None) -> None:
    """The one write-fsync-rename sequence behind every atomic file write."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
    tmp, fd = _create_temp_file(folder, os.path.basename(path))
    placed = False
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask gives a new file
        try:
            if write_path is not None:
                os.close(fd)
                fd = -1
                write_path(tmp)  # a writer may recreate the file with its own (private) permissions
                fd = os.open(tmp, os.O_RDONLY | _O_BINARY | _O_CLOEXEC)
            else:
                write_fd(fd)
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        _set_mode(tmp, path, mode)
        os.replace(tmp, path)
        placed = True
    finally:
        if not placed:
            _remove_quietly(tmp)
    fsync_dir(folder)


def _create_temp_file(folder: str, name: str) -> tuple[str, int]:
    """(path, fd) of a new, empty sibling file with the umask's permissions (not mkstemp's 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY | _O_CLOEXEC
    while True:
        tmp = os.path.join(folder, f".{name}.tmp-{secrets.token_hex(4)}")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue


def _set_mode(new: str, existing: str, default: int) -> None:
    """A replacement keeps the permission bits the user gave the file it replaces; a new file gets the
    umask's."""
    try:
        mode = stat.S_IMODE(os.stat(existing).st_mode)
    except FileNotFoundError:
        mode = default
    if stat.S_IMODE(os.stat(new).st_mode) != mode:
        os.chmod(new, mode)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        warnings.warn(f"could not remove the temporary file {path}", stacklevel=3)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (renames, new files) to disk. Best effort: some file systems and Windows do
    not support it, and by then the data itself is already complete."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- folders

def make_staging_dir(dest: str | os.PathLike) -> str:
    """A new, empty sibling folder of `dest` (`.NAME.tmp-XXXX`) to write a complete replacement into, with
    the umask's permissions; hand it to `replace_dir` when finished (or remove it with `discard_dir`)."""
    dest = os.path.abspath(os.fspath(dest))
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    while True:
        path = os.path.join(parent, f".{os.path.basename(dest)}.tmp-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def discard_dir(path: str) -> None:
    """Remove a staging folder after a failure (best effort; warns if something is left behind)."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        warnings.warn(f"could not remove the temporary folder {path}", stacklevel=2)


def replace_dir(staged: str, dest: str) -> None:
    """Put the finished folder `staged` at `dest`, replacing what is there only now.

    Linux: one atomic exchange of the two paths, so `dest` always exists, even if the process is killed.
    Elsewhere (or on file systems without the exchange): `dest` is moved aside to `.NAME.old-XXXX`, `staged`
    renamed into place, and the old folder put back if that fails; Ctrl-C is held back during the two renames
    and delivered right after. The replaced folder is deleted last (a leftover is reported with a warning).
    On any failure `staged` is left as it was, for the caller to discard."""
    staged = os.path.abspath(os.fspath(staged))
    dest = os.path.abspath(os.fspath(dest))
    parent = os.path.dirname(dest)
    if not os.path.lexists(dest):
        os.rename(staged, dest)
        fsync_dir(parent)
        return
    with interrupts_deferred():
        if exchange_paths(staged, dest):
            old = staged  # the exchange left the previous folder under the staging name
        else:
            old = _unused_sibling(dest, "old")
            os.rename(dest, old)
            try:
                os.rename(staged, dest)
            except BaseException as error:
                try:
                    os.rename(old, dest)
                except BaseException:
                    raise OSError(f"{dest}: replacing it failed ({error!r}) and the previous folder could not "
                                  f"be put back; it is at {old}") from error
                raise
        try:
            fsync_dir(parent)
        finally:  # the new folder is in place: the old one goes, whatever happens now
            shutil.rmtree(old, ignore_errors=True)
            if os.path.lexists(old):
                warnings.warn(f"{dest} was replaced, but the previous folder could not be fully deleted: {old}",
                              stacklevel=3)


def _unused_sibling(path: str, tag: str) -> str:
    while True:
        candidate = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False when this system or file
    system cannot, and nothing was changed; raises OSError for other failures."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = func
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    import ctypes
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (SIGINT) for the duration of the block and deliver it right after, so that a block of
    renames is never cut in half. Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt
