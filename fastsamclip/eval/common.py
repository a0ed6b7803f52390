"""What every evaluation task shares: the bad-input error, skipped files.

``EvalInputError`` is the one exception for input the user must fix (a missing split file, a
label map of the wrong size, ...): its message is ONE line that names the file and what is
wrong, and the command prints it and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from fastsamclip.errors import InputError
from fastsamclip.predictor import to_rgb_uint8


class EvalInputError(InputError):
    """Input the user must fix; ``str(e)`` is one line naming the file and the problem."""

    def __init__(self, path: Optional[str], problem: str, index: int = -1) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the caller built
        self.index = index  # sample index where it was found (-1: at set-up); the lowest one is reported
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)

    def __reduce__(self):  # crosses ranks in the gather, pickled
        return type(self), (self.path, self.problem, self.index)


@dataclass
class Skipped:
    """A file that could not be decoded: left out of the metrics, counted and listed."""

    file: str
    reason: str
    index: int = -1  # sample index in the split

    def to_dict(self) -> dict:
        return {"file": self.file, "reason": self.reason}


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB through the predictor's conversion rule; raises ``ImageReadError``
    (a ValueError) for a file that cannot be decoded."""
    return to_rgb_uint8(path)


def read_rgb_or_skip(path: str, index: int):
    """(rgb, None) or (None, Skipped) for a corrupt or unreadable image."""
    try:
        return read_image(path), None
    except (ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, Skipped(path, reason, index)


def check_out_path(path: Optional[str], overwrite: bool) -> None:
    if path and os.path.exists(path) and not overwrite:
        raise EvalInputError(path, "exists already; pass --overwrite to replace it, or choose another --out")


def first_error(errors: List[Optional[EvalInputError]]) -> Optional[EvalInputError]:
    """The error found at the lowest sample index (set-up errors first), so every world size
    reports the same line."""
    found = [e for e in errors if e is not None]
    return min(found, key=lambda e: e.index) if found else None
