"""What every command shares: versions, and turning bad input into one line and exit code 2."""

from __future__ import annotations

import functools
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional, Tuple, Type

from fastsamclip.errors import InputError

# Errors that mean "the input is not what the command needs": one line, exit 2. Anything else is a
# bug and keeps its traceback.
INPUT_ERRORS: Tuple[Type[BaseException], ...] = (InputError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


# Optional packages -> the extra of setup.py that installs them (None: by the command, below).
EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export", "litserve": "serve",
          "fastapi": "serve", "multipart": "serve", "python_multipart": "serve", "httpx": "serve",
          "webdataset": "train", "braceexpand": "train", "tensorboard": "train", "matplotlib": "bench",
          "pynvml": "bench", "pycocotools": None}
# pycocotools is in two extras: the evaluation's, and training's (the SA-1B reader).
COMMAND_EXTRAS = {"eval": "eval", "demo": "train", "distill": "train", "cache-teachers": "train", "bench": "bench"}


def missing_extra(e: ImportError, command: str) -> Optional[str]:
    """The one line for an optional package that is not installed, or None when ``e`` is not one."""
    name = (e.name or "").split(".")[0]
    if name not in EXTRAS:
        return None
    extra = EXTRAS[name] or COMMAND_EXTRAS.get(command, "eval")
    return (f"fastsamclip {command}: needs the Python package {name!r}, which is not installed here: "
            f"pip install \"fastsamclip[{extra}]\" (or pip install -e \".[{extra}]\" in a checkout)")


def require(*modules: str) -> None:
    """A missing optional package raises ModuleNotFoundError now, before any work (``main``
    prints which extra installs it)."""
    for m in modules:
        if sys.modules.get(m, False) is None or (m not in sys.modules and importlib.util.find_spec(m) is None):
            raise ModuleNotFoundError(f"No module named {m!r}", name=m)


def package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def one_line_errors(name: str, errors: Tuple[Type[BaseException], ...] = INPUT_ERRORS) -> Callable:
    """Decorate a command: an input error prints ``name: first line of the message`` and returns 2."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(args) -> int:
            try:
                return fn(args)
            except errors as e:
                print(f"{name}: {e}".splitlines()[0], file=sys.stderr)
                return 2

        return run

    return wrap

