"""Files written so that nothing is half-written and JSON is always JSON.

- :func:`atomic_write`: a temporary file in the same folder, then a rename over the target, so an
  interrupted write leaves the previous file or none.
- :func:`staged_folder`: the same for a set of files written into one folder: all of them, or none
  and no new folder.
- :func:`write_json` / :func:`json_line`: NaN and Infinity (JSON has no such numbers) become
  ``null`` anywhere in the object, numpy scalars become Python numbers, and ``allow_nan=False``
  guards the rest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np


def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
    """Call ``write_fn(tmp_path)`` then rename over ``path`` (same folder, so the rename is atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def staged_folder(out_dir: str) -> Iterator[str]:
    """Yields a fresh hidden folder beside ``out_dir`` to write into. When the block ends without an
    error, its files move into ``out_dir`` (created then; a file of the same name is replaced, any
    other file kept); on an error the staged files are deleted and ``out_dir`` is as it was, not
    even created (nor are the missing folders above it)."""
    out = os.path.abspath(out_dir)
    created, parent = [], os.path.dirname(out)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
        try:
            yield stage
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(stage)):
                os.replace(os.path.join(stage, name), os.path.join(out, name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        for folder in created:  # deepest first; only those this call made
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


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
    with open(path, "a") as f:
        f.write(json_text(obj) + "\n")
