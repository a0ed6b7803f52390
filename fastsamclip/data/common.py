"""Shared plumbing of the readers: skip accounting and DataLoader-worker identity.

Unreadable data are never fatal: every reader keeps ``skipped`` (a :class:`SkipCounter`, one
count per reason) and logs ONE warning per reason, with the running count; the rest are counted
silently. With DataLoader workers each worker process holds its own copy of the counter.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch

logger = logging.getLogger("fastsamclip.data")


class SkipCounter(Counter):
    """Counts skipped samples per reason; logs one warning per reason, the first time.

    ``counter["decode_error"]`` is the number skipped for that reason so far. Later skips of a
    reason already reported are counted silently (a corrupt shard must not flood the log);
    :meth:`log_summary` reports the totals, e.g. at the end of an epoch.
    """

    def __init__(self, source: str = "", quiet: bool = False):
        super().__init__()
        self.source = source  # the data path, named in the warnings
        self.quiet = quiet  # count without logging (start-up probes report through their error)

    def record(self, reason: str, item: str, detail: str = "") -> None:
        self[reason] += 1
        if self[reason] == 1 and not self.quiet:
            logger.warning(
                "%s: skipped %s (%s%s); running count: %d for this reason, %d in total. "
                "Further '%s' skips are counted in .skipped without a warning.",
                self.source, item, reason, f": {detail}" if detail else "", self[reason],
                sum(self.values()), reason)

    def log_summary(self) -> None:
        if self:
            logger.warning("%s: skipped samples so far: %s", self.source, dict(self))

    def __reduce__(self):  # keep `source` when pickled into DataLoader workers
        return (self.__class__, (self.source, self.quiet), None, None, iter(self.items()))


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) outside one."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)



# The most DataLoader workers "auto" gives one rank: past ~16 decoding processes per GPU the tar
# reads and the collation in the training process become the limit, not the decoding.
MAX_AUTO_WORKERS = 16


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers(device_type: str, local_ranks: int = 1, cpus: int | None = None) -> int:
    """DataLoader workers per rank when not given (``--num-workers -1``).

    On CUDA: the rank's share of the machine's CPUs (``cpus // local_ranks``) less one for the
    training process itself (its Python loop, kernel launches and pinning thread), at least 1, at
    most ``MAX_AUTO_WORKERS``. On the CPU: 0 (the step itself uses every core, and a worker would
    take them from it).
    """
    if device_type != "cuda":
        return 0
    per_rank = (cpu_count() if cpus is None else cpus) // max(1, local_ranks)
    return max(1, min(MAX_AUTO_WORKERS, per_rank - 1))
