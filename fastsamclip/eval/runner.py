"""Running a task over a split on one process or many, and reporting it.

Sharding: under ``torchrun`` (WORLD_SIZE > 1) rank r takes samples r, r + W, r + 2W, ... of the
split (after ``--limit``); each rank reads and evaluates its own samples, then the per-rank
states (integer confusion counts, per-sample ranks, embeddings, COCO results) are gathered on
rank 0, which computes the metrics once, prints the table and writes the JSON. The metrics are
therefore those of one process over the whole split. Object collectives go through a gloo group
(the CPU), so the same code runs with NCCL for the model and on CPU-only machines.

Errors under many ranks: a bad input found by one rank (a label map of the wrong size) is
carried to the gather like a result; every rank then raises the error found at the lowest
sample index, so all ranks exit 2 with the same line and none waits forever.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fastsamclip import __version__
from fastsamclip.eval.common import EvalInputError, Skipped, first_error
from fastsamclip.eval.paper import CITATION, paper_rows


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # gloo group for object collectives
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> List[int]:
        return list(range(self.rank, n, self.world))

    def all_gather(self, obj) -> List[Any]:
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj) -> Optional[List[Any]]:
        """Every rank's object on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: Optional[List[Any]] = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def agree(self, error: Optional[EvalInputError]) -> None:
        """Raise on every rank the first error any rank found."""
        err = first_error(self.all_gather(error))
        if err is not None:
            raise err

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_arg: Optional[str]) -> tuple:
    """(Dist, device). torchrun's WORLD_SIZE/RANK/LOCAL_RANK select the process group and the GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else 0)
    if world == 1:
        return Dist(), device
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Dist(dist.get_rank(), dist.get_world_size(), local, group, owns), device


# ---------------------------------------------------------------------------------------------
# The per-rank loop
# ---------------------------------------------------------------------------------------------


class _Indexed(Dataset):
    """The rank's samples through ``load(sample) -> item`` (run in DataLoader workers)."""

    def __init__(self, samples: Sequence, load: Callable) -> None:
        self.samples, self.load = samples, load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.load(self.samples[i])


def _as_list(batch):
    return batch


def iterate(samples: Sequence, load: Callable, batch_size: int, workers: int, progress: bool,
            desc: str) -> Iterable[list]:
    """Batches (lists) of ``load(sample)`` with a progress bar in images/s on rank 0.

    ``load`` runs in worker processes when ``workers`` > 0 and must not raise for bad input:
    it returns the error or the skip inside its item, so the message reaches the user intact.
    """
    loader = DataLoader(_Indexed(samples, load), batch_size=max(1, batch_size), shuffle=False,
                        num_workers=workers, collate_fn=_as_list, persistent_workers=False)
    bar = None
    if progress:
        bar = tqdm(total=len(samples), desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        for batch in loader:
            yield batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


@dataclass
class RankResult:
    state: Any  # the task's mergeable state
    evaluated: int
    skipped: List[Skipped]
    error: Optional[EvalInputError] = None


def gather_results(d: Dist, result: RankResult) -> Optional[List[RankResult]]:
    """All ranks agree on errors first (small), then rank 0 receives every state."""
    d.agree(result.error)
    return d.gather(result)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown_table(report: dict, rows: Sequence[tuple]) -> str:
    """rows: (label, this run's value, key in the paper's metrics) -> a Markdown table with the
    paper's numbers beside; the citation and any caveat below it."""
    paper = paper_rows(report["task"], report["dataset"], report.get("setting", {}))
    columns = [p.model for p in paper]
    title = f"eval {report['task']} {report['dataset']} {report['split']}"
    extra = ", ".join(f"{k} {v}" for k, v in report.get("setting", {}).items() if v is not None)
    head = f"| {title}{' (' + extra + ')' if extra else ''} | this run ({report['model']['kind']}) |"
    head += "".join(f" {c} (paper) |" for c in columns)
    lines = [head, "|---|---:|" + "---:|" * len(columns)]
    for label, value, key in rows:
        cells = [fmt(p.metrics.get(key), 1) if key in p.metrics else "" for p in paper]
        lines.append(f"| {label} | {fmt(value)} |" + "".join(f" {c} |" for c in cells))
    notes = [n for p in paper for n in p.notes_for(report.get("setting", {}))]
    if paper:
        lines.append("")
        lines.append(f"Paper: {CITATION}.")
        lines += [f"Note: {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines)


def base_report(task: str, model, dataset: str, split: str, data_root: str, setting: dict, d: Dist,
                seconds: float, evaluated: int, skipped: List[Skipped], argv: Optional[Sequence[str]]) -> dict:
    skipped = sorted(skipped, key=lambda s: s.index)
    return {
        "task": task,
        "model": model.info,
        "dataset": dataset,
        "split": split,
        "data_root": os.path.abspath(data_root),
        "setting": setting,
        "resolution": setting.get("resolution"),
        "mode": setting.get("mode"),
        "images": {"evaluated": evaluated, "skipped": len(skipped), "skipped_files": [s.to_dict() for s in skipped]},
        "world_size": d.world,
        "seconds": round(seconds, 3),
        "images_per_second": round(evaluated / seconds, 3) if seconds > 0 else None,
        "fastsamclip_version": __version__,
        "command": "fastsamclip eval " + " ".join(argv) if argv else None,
        "paper": {p.model: p.metrics for p in paper_rows(task, dataset, setting)},
        "paper_citation": CITATION,
    }


def skipped_line(report: dict) -> Optional[str]:
    n = report["images"]["skipped"]
    if not n:
        return None
    files = report["images"]["skipped_files"]
    shown = "; ".join(f"{s['file']} ({s['reason']})" for s in files[:3])
    return f"skipped {n} unreadable image(s), left out of the metrics and listed in the results file: {shown}" + (
        " ..." if n > 3 else "")


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0
