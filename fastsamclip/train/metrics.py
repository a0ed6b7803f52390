"""The run's record: ``metrics.jsonl`` every N steps and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
import logging
import os

from fastsamclip.files import append_json_line, atomic_write

logger = logging.getLogger("fastsamclip.train")


class MetricsLog:
    """Appends step records to ``out/metrics.jsonl`` and, when tensorboard is installed and asked
    for, writes their float fields as scalars to ``out/tb``. Only the main rank writes."""

    def __init__(self, out: str, log_every: int, tensorboard: bool, enabled: bool = True):
        self.out, self.log_every, self.enabled = out, max(1, log_every), enabled
        self._want_tb = tensorboard and enabled
        self._tb = None
        self._purge_step = None  # set on resume: TensorBoard drops events from this step on

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
                self._tb = SummaryWriter(os.path.join(self.out, "tb"), purge_step=self._purge_step)
        return self._tb

    def resume_at(self, global_step: int) -> None:
        """A resumed run replays the steps after its checkpoint: drop their records (a killed run
        may have logged them), so every step is in ``metrics.jsonl`` once; TensorBoard purges them
        from its event files at the first new scalar."""
        self._purge_step = global_step + 1
        path = os.path.join(self.out, "metrics.jsonl")
        if not self.enabled or not os.path.exists(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["global_step"] <= global_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut by the kill: it goes too
                continue
        if kept != lines:
            def write(tmp: str) -> None:
                with open(tmp, "w") as f:
                    f.writelines(kept)

            atomic_write(path, write)

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
