"""How log messages look and where they go: one format in every command, and in every process a
command starts (the server's model worker configures itself the same way).

    2026-12-03 10:41:07 INFO fastsamclip.kernels: relpos_attention: using 'sdpa' (...)

The package's loggers (``fastsamclip.*``) show WARNING and above, INFO with ``-v`` and DEBUG with
``-vv``; a command whose progress is its log (``distill``) shows its own logger at INFO within
:func:`showing`. Other libraries' messages show from WARNING (open_clip logs every model it builds
at INFO). One handler on the root logger writes them all to stderr, so a library's warning has the
shape of the package's. Installed before the command's modules are imported, it also keeps
open_clip's module-level ``logging.info`` calls from installing logging's default format
(``basicConfig``), which printed the same message as ``WARNING:fastsamclip.kernels:...`` in some
commands and bare (logging's last-resort handler) in others.

Standard library only: the command line's parser imports it before anything heavy.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
PACKAGE = "fastsamclip"


def verbosity_level(verbosity: int) -> int:
    """The package's level for a count of ``-v``: 0 WARNING, 1 INFO, 2 or more DEBUG."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def _ours_or_a_warning(record: logging.LogRecord) -> bool:
    """The package's records pass (their loggers' levels chose them already); other libraries'
    from WARNING, whatever the root logger's level is."""
    return (record.levelno >= logging.WARNING or record.name == PACKAGE
            or record.name.startswith(PACKAGE + "."))


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made (a redirected or captured stderr), in :data:`FORMAT`."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        self.addFilter(_ours_or_a_warning)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure(level: int = logging.WARNING) -> Callable[[], None]:
    """The package's messages from ``level``, other libraries' from WARNING, on stderr in
    :data:`FORMAT`. Returns the function that puts back what was there before (a command called
    in-process leaves the logging of its caller as it found it)."""
    root, package = logging.getLogger(), logging.getLogger(PACKAGE)
    before = package.level, package.propagate
    handler = StderrHandler()
    root.addHandler(handler)
    package.setLevel(level)
    package.propagate = True

    def restore() -> None:
        root.removeHandler(handler)
        package.setLevel(before[0])
        package.propagate = before[1]

    return restore


@contextlib.contextmanager
def to_stderr(level: int = logging.WARNING) -> Iterator[None]:
    """:func:`configure` for the duration of the block."""
    restore = configure(level)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def showing(name: str, level: int = logging.INFO) -> Iterator[None]:
    """Logger ``name``'s messages from ``level`` within the block (a command's progress), or from
    a lower level where one was asked for (``-vv``)."""
    logger = logging.getLogger(name)
    before = logger.level
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextlib.contextmanager
def quiet(name: str = PACKAGE, level: int = logging.ERROR) -> Iterator[None]:
    """Logger ``name``'s messages only from ``level`` within the block (or the decorated function:
    where the output is itself the report, a table or benchmark rows), and what it showed before
    afterwards, so a caller in the same process (a test, ``bench all``) keeps its own logging."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(before)
