"""Files written so that nothing is half-written, nothing is replaced unasked, and JSON is always JSON.

- :func:`atomic_write`: a temporary file in the same folder, then a rename over the target, so an
  interrupted write leaves the previous file or none. The file gets the mode a plain ``open``
  would give it (``0o666`` less the umask), or keeps the mode of the file it replaces; a disk
  that is read-only or full is an :class:`~fastsamclip.errors.OutputError` naming the path.
- :func:`writable_dir`: a folder made (or found) and proved writable before any work starts.
- :func:`staged_folder`: files added to a folder all together or not at all (none, and no new
  folder, when the block fails).
- :func:`staged_dir`: an output folder written whole into a hidden sibling, then moved into place
  (replacing an earlier one only when asked), so a reader never sees a half-written or mixed folder.
- :func:`sha256_file` / :func:`sha256_bytes`: content digests (integrity records).
- :func:`write_json` / :func:`json_line`: NaN and Infinity (JSON has no such numbers) become
  ``null`` anywhere in the object, numpy scalars become Python numbers, and ``allow_nan=False``
  guards the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from fastsamclip.errors import OutputError

# Errors of a disk that cannot take the write: said in one line, never a traceback.
DISK_ERRNOS = {errno.EROFS: "the disk is read-only", errno.ENOSPC: "the disk is full",
               errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "no permission to write there",
               errno.EPERM: "no permission to write there"}


def _umask() -> int:
    """The process's umask, read without changing it where /proc has it (os.umask can only be
    read by setting it, which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cannot_write(path: str, e: OSError, hint: str = "") -> OutputError:
    """One line for an OSError met writing ``path``."""
    why = DISK_ERRNOS.get(e.errno, e.strerror or type(e).__name__)
    return OutputError(f"cannot write {os.path.normpath(path)}: {why} ({e.strerror or e}){'; ' + hint if hint else ''}")


def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
    """Call ``write_fn(tmp_path)`` then rename over ``path`` (same folder, so the rename is atomic).

    The new file's mode is the umask's (as ``open`` gives), or the replaced file's. An OSError of
    the disk (read-only, full, no permission) becomes an ``OutputError`` naming ``path``; the
    previous file, if any, is untouched either way."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    except OSError as e:
        raise cannot_write(path, e) from e
    os.close(fd)
    try:
        write_fn(tmp)
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise cannot_write(path, e) from e
        raise


@contextlib.contextmanager
def _parents_made_or_none(path: str) -> Iterator[None]:
    """The missing folders above ``path`` are the block's to make; when it fails, those it made
    are removed again (deepest first), so a failed write leaves no new folder behind."""
    created, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


@contextlib.contextmanager
def staged_folder(out_dir: str, last: Sequence[str] = ()) -> Iterator[str]:
    """Yields a fresh hidden folder beside ``out_dir`` to write into. When the block ends without an
    error, its files move into ``out_dir`` (created then; a file of the same name is replaced, any
    other file kept), those named in ``last`` after the others (an index written once what it
    lists is in place); on an error the staged files are deleted and ``out_dir`` is as it was, not
    even created (nor are the missing folders above it)."""
    out = os.path.abspath(out_dir)
    with _parents_made_or_none(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
        try:
            yield stage
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(stage), key=lambda n: (n in last, n)):
                os.replace(os.path.join(stage, name), os.path.join(out, name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def writable_dir(path: str, what: str = "--out", create: bool = True) -> str:
    """Prove a file can be written in folder ``path`` before any work starts (``create``: make it
    and its parents first; else probe its deepest existing ancestor, creating nothing); an
    ``OutputError`` naming ``what`` otherwise. Returns ``path``."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
            probe = path
        else:
            probe = os.path.abspath(path)
            while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
                probe = os.path.dirname(probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputError(f"{what} {os.path.normpath(path)}: cannot write there: "
                          f"{DISK_ERRNOS.get(e.errno, e.strerror or type(e).__name__)} ({e.strerror or e}); "
                          "choose a writable folder") from e
    return path


def check_output_dir(out: str, replace: bool, owned: Optional[Callable[[str], bool]] = None) -> None:
    """``out`` may be absent or empty; with ``replace`` it may hold files, each of which ``owned``
    (the names the command writes) accepts: a folder holding anything else is never replaced
    whole (``--out ~ --overwrite`` must not empty a home folder)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"--out {out} is a file, not a folder: choose another --out")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not replace:
        raise OutputError(f"--out {out} holds files already (an earlier run's?): pass --overwrite to replace the "
                          "folder whole, or choose another --out")
    foreign = sorted(n for n in os.listdir(out)
                     if not os.path.isfile(os.path.join(out, n)) or (owned is not None and not owned(n)))
    if foreign:
        raise OutputError(f"--out {out} holds {foreign[0]!r}, which this command does not write; --overwrite "
                          "replaces the folder whole: choose another --out")


@contextlib.contextmanager
def staged_dir(out: str, replace: bool = False, owned: Optional[Callable[[str], bool]] = None) -> Iterator[str]:
    """Yield a hidden empty folder beside ``out``; when the block ends without an error, it
    becomes ``out``. ``replace``: ``out`` may exist and is replaced whole (the earlier folder
    goes only once the new one is complete; see :func:`check_output_dir` for what may be
    replaced); otherwise ``out`` must be absent or empty. On an error the staged folder goes and
    ``out`` is as it was (not even created, nor the missing folders above it)."""
    out = os.path.normpath(out)
    parent = os.path.dirname(os.path.abspath(out))
    with _parents_made_or_none(out):
        writable_dir(parent, "--out")
        check_output_dir(out, replace, owned)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
        try:
            yield stage
            old = None
            if os.path.exists(out):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
                os.replace(out, os.path.join(old, "out"))
            os.replace(stage, out)
            os.chmod(out, 0o777 & ~_umask())  # mkdtemp makes 0o700: the mode os.makedirs would give
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(stage, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                raise cannot_write(out, e) from e
            raise


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data) -> str:
    """The sha256 of a bytes-like object (a memoryview of a tensor's storage: no copy)."""
    return hashlib.sha256(data).hexdigest()


def finite_or_none(value: Any) -> Any:
    """NaN/Infinity anywhere in nested dicts/lists/tuples -> None; numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite_or_none` (obj), refusing any non-finite number left."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Atomic JSON file, never NaN."""
    text = json_text(obj, indent=indent) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def append_json_line(path: str, obj: Any) -> None:
    """One JSON record appended to a ``.jsonl`` file, never NaN."""
    try:
        with open(path, "a") as f:
            f.write(json_text(obj) + "\n")
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise cannot_write(path, e) from e
        raise
