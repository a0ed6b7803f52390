"""What a prompt must be, checked without the model: the predictor's rules, which the server also
applies to a request before it joins a batch (so a bad prompt never costs a backbone pass).

Prompts are in ORIGINAL image pixels: a point (or box corner) may lie anywhere on the image,
edges included (0 <= x <= W, 0 <= y <= H); point labels are 1 (foreground), 0 (background) or
-1 (padding, ignored); boxes are XYXY with x0 <= x1 and y0 <= y1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from fastsamclip.errors import InputError

POINT_LABELS = (-1, 0, 1)


def check_inside(what: str, xy: np.ndarray, original_size: Tuple[int, int], valid: Optional[np.ndarray] = None) -> None:
    """(P, N, 2) XY on an image of ``original_size`` (H, W); ``valid`` (P, N) masks padding out."""
    h, w = original_size
    bad = ~np.isfinite(xy).all(-1) | (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
    if valid is not None:
        bad &= valid
    if bad.any():
        p, i = (int(v) for v in np.argwhere(bad)[0])
        x, y = xy[p, i]
        raise InputError(f"{what} {i} of prompt {p} at (x={x:g}, y={y:g}) is outside the image of "
                         f"{w}x{h} (WxH) pixels; prompts are in original image pixels")


def check_point_labels(labels: np.ndarray) -> None:
    if not np.isin(labels, POINT_LABELS).all():
        raise InputError(f"point labels must be 1 (foreground), 0 (background) or -1 (padding), "
                         f"got {sorted(set(np.unique(labels).tolist()))}")


def check_boxes(boxes: np.ndarray, original_size: Tuple[int, int]) -> None:
    """(P, 4) XYXY boxes: corners on the image, not flipped."""
    check_inside("box corner", boxes.reshape(-1, 2, 2), original_size)
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        p = int(np.argwhere(flipped)[0][0])
        raise InputError(f"box of prompt {p} {boxes[p].tolist()} has x1 < x0 or y1 < y0; boxes are XYXY")
