"""What every command shares: versions, and turning bad input into one line and exit code 2."""

from __future__ import annotations

import functools
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Tuple, Type

from fastsamclip.errors import InputError

# Errors that mean "the input is not what the command needs": one line, exit 2. Anything else is a
# bug and keeps its traceback.
INPUT_ERRORS: Tuple[Type[BaseException], ...] = (InputError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not when it was made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def log_to_stderr(level: int = logging.INFO) -> None:
    """This package's messages at ``level`` on stderr; other libraries' (open_clip logs every
    model it builds at INFO) stay at WARNING."""
    log = logging.getLogger("fastsamclip")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
