"""The run's record: ``metrics.jsonl`` every N steps and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import logging
import os

from fastsamclip.files import append_json_line

logger = logging.getLogger("fastsamclip.train")


class MetricsLog:
    """Appends step records to ``out/metrics.jsonl`` and, when tensorboard is installed and asked
    for, writes their float fields as scalars to ``out/tb``. Only the main rank writes."""

    def __init__(self, out: str, log_every: int, tensorboard: bool, enabled: bool = True):
        self.out, self.log_every, self.enabled = out, max(1, log_every), enabled
        self._want_tb = tensorboard and enabled
        self._tb = None

    def _writer(self):
        if self._tb is None and self._want_tb:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # optional: the tensorboard package
                )
            except ImportError:
                logger.info("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
                self._want_tb = False
            else:
                self._tb = SummaryWriter(os.path.join(self.out, "tb"))
        return self._tb

    def log(self, rec: dict, last_of_stage: bool) -> None:
        if not self.enabled or not (rec["global_step"] % self.log_every == 0 or last_of_stage):
            return
        append_json_line(os.path.join(self.out, "metrics.jsonl"), rec)  # a skipped step's NaN loss is null
        tb = self._writer()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    tb.add_scalar(f"stage{rec['stage']}/{k}", v, rec["global_step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
