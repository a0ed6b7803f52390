"""Training checkpoints: everything an exact resume needs, written atomically.

A checkpoint holds the model, optimizer and scheduler states, both streams' positions, every RNG
and the run's history, so a run killed at step k and resumed equals the uninterrupted run bit for
bit (tested). It is refused when the run around it differs in what the resume would silently
change: another format, another world size (the data are sharded by rank), other stage lengths.
"""

from __future__ import annotations

import os
import random
from typing import Dict, Sequence

import numpy as np
import torch

from fastsamclip.errors import ConfigError
from fastsamclip.files import atomic_write
from fastsamclip.modeling.teachers import CheckpointError, check_state_dict

CHECKPOINT_FORMAT = "fastsamclip.train"
CHECKPOINT_VERSION = 1


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
    """Write ``state`` (plus the format stamp) to each path, atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    for path in paths:
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_checkpoint(path: str, student: torch.nn.Module, world_size: int,
                             stage_steps: Dict[int, int]) -> dict:
    """The state at ``path``, checked against this run, with the student's weights loaded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start, "
                                "or point --out at the run's folder")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a fastsamclip training checkpoint of version {CHECKPOINT_VERSION}")
    if state["world_size"] != world_size:
        raise ConfigError(f"{path} was written by {state['world_size']} processes, this run has "
                         f"{world_size}; exact resume needs the same number (the data are sharded by rank)")
    if {int(k): v for k, v in state["stage_steps"].items()} != stage_steps:
        raise ConfigError(f"{path} planned stage lengths {state['stage_steps']}, this config gives "
                         f"{stage_steps}; resume with the same config")
    check_state_dict(student, state["model"], "training", path)
    student.load_state_dict(state["model"])
    return state
