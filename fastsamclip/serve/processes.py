"""The server's processes stop together: on SIGTERM or SIGINT, within seconds, port free, no traceback.

``fastsamclip serve`` is one main process and LitServe's children: the model worker (spawned),
the HTTP server and the multiprocessing manager (forked). Left alone, SIGTERM killed the main
process at once and its children went on answering on the port; SIGINT to the process group
(what Ctrl-C does) reached every child, each printing its own ``KeyboardInterrupt`` traceback and
the manager vanishing under the others; ``kill -9`` of the main process orphaned them all. Here:

- the main process turns SIGTERM into the ``KeyboardInterrupt`` LitServe's graceful shutdown
  handles (:func:`stopping_on_signals`), and :func:`stop_children` ends whatever child is still there
  (SIGTERM, then SIGKILL after a short grace), whenever ``run`` returns or raises;
- every child ignores SIGINT (the main process alone decides) and takes SIGTERM's default, and
  a watchdog thread ends it when its parent is gone (``kill -9``): :func:`child_of_server`, run
  in forked children through ``multiprocessing``'s after-fork hook and by the model worker's
  ``setup``. The watchdog wakes every :data:`WATCH_PERIOD_S` seconds, nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from typing import Iterator, Optional

log = logging.getLogger("fastsamclip.serve")

WATCH_PERIOD_S = 0.5  # how often a child checks that its parent is alive
STOP_GRACE_S = 3.0  # SIGTERM to SIGKILL for a child that outlives the graceful shutdown


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # re-parented: the server's main process is gone
            os._exit(0)
        time.sleep(WATCH_PERIOD_S)


def child_of_server(parent: Optional[int] = None) -> None:
    """In a child of the server: SIGINT ignored, SIGTERM the default, and an exit when ``parent``
    (default: the current parent) dies."""
    parent = os.getppid() if parent is None else parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(parent,), name="fastsamclip-parent-watch", daemon=True).start()


class _ForkHook:
    """The after-fork hook's owner (``multiprocessing.util`` keeps hooks by weak reference)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __call__(self, _obj) -> None:
        if os.getpid() != self.parent:
            child_of_server(self.parent)


_HOOK: Optional[_ForkHook] = None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """In the main process, for the server's lifetime: SIGTERM stops it as SIGINT does (LitServe's
    graceful shutdown), and every child forked meanwhile is a :func:`child_of_server`. The
    previous handlers are back afterwards (the caller may be a test or a notebook)."""
    global _HOOK
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _HOOK = _ForkHook(os.getpid())
    multiprocessing.util.register_after_fork(_HOOK, _HOOK)
    for sig in before:
        signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        _HOOK = None  # the registry holds it weakly: the hook goes with it


def stop_children(grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to every live child process of this one, SIGKILL to those alive after ``grace``."""
    children = multiprocessing.active_children()
    for p in children:
        try:
            p.terminate()
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace
    for p in children:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.warning("%s (pid %s) did not stop in %.0f s: killed", p.name, p.pid, grace)
            p.kill()
            p.join(1.0)
