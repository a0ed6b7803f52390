"""Training checkpoints: everything an exact resume needs, written atomically.

A checkpoint holds the model, optimizer and scheduler states, both streams' positions, every RNG
and the run's history, so a run killed at step k and resumed equals the uninterrupted run bit for
bit (tested). It is refused when the run around it differs in what the resume would silently
change: another format, another world size (the data are sharded by rank), other stage lengths.

Nothing is lost to a damaged file: each new ``last.pt`` keeps the one before it as
``previous.pt``, and a resume whose ``last.pt`` is cut, empty or garbage falls back to the newest
intact checkpoint of the folder (``previous.pt`` or a ``stage{N}.pt``) and says which. A disk
that fills up (or turns read-only) while a checkpoint is written is one line naming the file;
the checkpoint written before it is intact.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from fastsamclip.errors import ConfigError, OutputError
from fastsamclip.files import atomic_write
from fastsamclip.modeling.teachers import CheckpointError, check_state_dict

CHECKPOINT_FORMAT = "fastsamclip.train"
CHECKPOINT_VERSION = 1
LAST, PREVIOUS = "last.pt", "previous.pt"
# Where a resume looks when last.pt is damaged (the newest intact one of these is taken).
FALLBACKS = (PREVIOUS, "stage3.pt", "stage2.pt", "stage1.pt")

logger = logging.getLogger("fastsamclip.train")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(paths: Sequence[str], state: dict) -> None:
    """Write ``state`` (plus the format stamp) to each path, atomically; the ``last.pt`` it
    replaces becomes ``previous.pt`` once the new one is complete."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    for path in paths:
        previous = os.path.join(os.path.dirname(path), PREVIOUS) if os.path.basename(path) == LAST else None

        def write(tmp: str, path: str = path, previous: Optional[str] = previous) -> None:
            try:
                torch.save(state, tmp)
            except RuntimeError as e:  # torch's stream writer: a failed write (a full disk) surfaces as this
                free = shutil.disk_usage(os.path.dirname(tmp)).free / 2**20
                raise OutputError(f"cannot write checkpoint {path}: {str(e).strip().splitlines()[-1]} "
                                  f"({free:.0f} MiB free on its disk); free space, then continue with --resume "
                                  "(the checkpoint written before is intact)") from None
            if previous is not None and os.path.exists(path):
                os.replace(path, previous)

        try:
            atomic_write(path, write)
        except OutputError as e:
            if "--resume" in str(e):
                raise
            raise OutputError(f"{e}; free space, then continue with --resume (the checkpoint written before is "
                              "intact)") from None


def _read(path: str) -> Tuple[Optional[dict], str]:
    """(state, "") or (None, why it cannot be read)."""
    try:
        if os.path.getsize(path) == 0:
            return None, "empty file"
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- cut, empty or garbage files raise a zoo of types
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return None, "not a fastsamclip training checkpoint"
    if state.get("version") != CHECKPOINT_VERSION:
        return None, f"training checkpoint version {state.get('version')}, this fastsamclip reads {CHECKPOINT_VERSION}"
    return state, ""


def _position(state: dict) -> int:
    """The global step a checkpoint was written at."""
    steps = {int(k): v for k, v in state["stage_steps"].items()}
    return sum(steps[s] for s in steps if s < state["stage"]) + state["step"]


def find_checkpoint(folder: str) -> Tuple[str, dict]:
    """(path, state) of ``folder/last.pt``, or of the newest intact fallback when last.pt is
    damaged or missing (logged: which file was damaged, which one the run continues from)."""
    last = os.path.join(folder, LAST)
    others = [os.path.join(folder, f) for f in FALLBACKS if os.path.isfile(os.path.join(folder, f))]
    if not os.path.isfile(last) and not others:
        raise FileNotFoundError(f"--resume: no checkpoint at {last}; run without --resume to start, "
                                "or point --out at the run's folder")
    why = "missing"
    if os.path.isfile(last):
        state, why = _read(last)
        if state is not None:
            return last, state
    best: Optional[Tuple[str, dict]] = None
    damaged = [f"{os.path.basename(last)} ({why})"]
    for path in others:
        state, reason = _read(path)
        if state is None:
            damaged.append(f"{os.path.basename(path)} ({reason})")
        elif best is None or _position(state) > _position(best[1]):
            best = (path, state)
    if best is None:
        raise CheckpointError(f"--resume: no intact checkpoint in {folder}: {'; '.join(damaged)}; start over with "
                              "--overwrite")
    path, state = best
    logger.warning("--resume: %s; continuing from %s (stage %d step %d), the newest intact checkpoint",
                   ", ".join(damaged), path, state["stage"], state["step"])
    return path, state


def load_training_checkpoint(folder: str, student: torch.nn.Module, world_size: int,
                             stage_steps: Dict[int, int]) -> dict:
    """The newest intact state in ``folder`` (see :func:`find_checkpoint`), checked against this
    run, with the student's weights loaded."""
    path, state = find_checkpoint(folder)
    if state["world_size"] != world_size:
        raise ConfigError(f"{path} was written by {state['world_size']} processes, this run has "
                         f"{world_size}; exact resume needs the same number (the data are sharded by rank)")
    if {int(k): v for k, v in state["stage_steps"].items()} != stage_steps:
        raise ConfigError(f"{path} planned stage lengths {state['stage_steps']}, this config gives "
                         f"{stage_steps}; resume with the same config")
    check_state_dict(student, state["model"], "training", path)
    student.load_state_dict(state["model"])
    return state
