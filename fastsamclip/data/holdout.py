"""The held-out split of D_CLIP, chosen by a hash of each sample's identity.

A sample is held out when ``blake2b(identity)`` read as a number in [0, 1) falls below the
fraction (the paper holds out 1%). The identity names the sample and its source (the shard's
folder and file name and the sample's key, or the image folder's name and the file's path in it),
so the split is the same on every rank, after a restart, whatever the shard order and wherever
the data is mounted, and two sources whose keys collide (every img2dataset run numbers its keys
from 000000000) still split independently.
"""

from __future__ import annotations

import hashlib

SPLITS = ("all", "train", "held_out")


def holdout_score(identity: str) -> float:
    """A uniform number in [0, 1) fixed by the identity."""
    return int.from_bytes(hashlib.blake2b(identity.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def in_split(identity: str, split: str, fraction: float) -> bool:
    """Whether a sample belongs to ``split`` ("all", "train" or "held_out") at this held-out fraction."""
    if split == "all" or fraction <= 0:
        return split != "held_out"
    held = holdout_score(identity) < fraction
    return held if split == "held_out" else not held


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
