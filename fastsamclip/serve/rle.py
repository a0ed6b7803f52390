"""Masks as COCO RLE: ``{"size": [h, w], "counts": str}``, what ``pycocotools.mask.decode`` reads.

Run lengths of the column-major (Fortran order) mask, starting with a run of zeros, written as
pycocotools' ``rleToString`` does (6-bit groups from chr 48, 0x20 = more, runs from the fourth
on delta-coded against the run two before). ``fastsamclip.data.sa1b.rle_run_lengths`` is the
reader this is tested against, with pycocotools where installed.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> run lengths of the column-major flattening, zeros first (the first may be 0)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds)
    return np.concatenate(([0], runs)) if flat[0] else runs


def counts_string(runs: np.ndarray) -> str:
    """pycocotools' ``rleToString`` of the run lengths."""
    out: List[str] = []
    runs = [int(r) for r in runs]
    for i, r in enumerate(runs):
        x = r - runs[i - 2] if i > 2 else r
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def encode_rle(mask: np.ndarray) -> Dict[str, object]:
    """(h, w) bool mask -> COCO RLE ``{"size": [h, w], "counts": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_rle takes one (h, w) mask, got shape {m.shape}")
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": counts_string(run_lengths(m))}
