"""What every command shares: versions, and turning bad input into one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, List, Tuple, Type

from fastsamclip.modeling import CheckpointError
from fastsamclip.transforms import ImageReadError

# Errors that mean "the input is not what the command needs": one line, exit 2. Anything else is a
# bug and keeps its traceback.
INPUT_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                CheckpointError, ImageReadError)


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


def floats(text: str, n: int, what: str) -> List[float]:
    """``"1,2,3,4"`` -> [1.0, 2.0, 3.0, 4.0], or a ValueError naming the input."""
    parts = text.replace(" ", "").split(",")
    try:
        vals = [float(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ValueError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return vals
