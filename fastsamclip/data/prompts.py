"""Box and point prompts drawn from masks (SAM's training prompts).

Coordinates are (x, y) in pixels; a point is the integer index of a pixel (SAM's prompt encoder
adds 0.5 itself to reach the pixel centre). Boxes are XYXY with the max corner the index of the
last mask pixel (inclusive), as in ``segment_anything.utils.amg.batched_mask_to_box``. Draws are
reproducible: the same generator state gives the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptConfig:
    masks_per_image: int = 32  # masks drawn per image (SAM-CLIP: 32; all of them if fewer)
    use_boxes: bool = True  # emit one box prompt per mask
    points_per_mask: int = 1  # foreground points per mask, uniform over mask pixels (0: none)
    box_jitter: float = 0.1  # each box coordinate moves by U(-j, j) x box side (SAM's training noise)
    box_jitter_max_px: float = 20.0  # cap on that move in pixels (SAM: "up to a maximum of 20 pixels")


@dataclass
class Prompts:
    """Prompts for M masks of one image, in ORIGINAL image pixel coordinates."""

    indices: np.ndarray  # (M,) int64: which of the given masks were drawn, in draw order
    boxes: np.ndarray | None  # (M, 4) float32 XYXY, max corner inclusive; None if use_boxes=False
    points: np.ndarray | None  # (M, P, 2) float32 (x, y) pixel indices; None if P == 0
    point_labels: np.ndarray | None  # (M, P) int64, 1 = foreground


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool -> (M, 4) float32 tight XYXY boxes, max corner inclusive; empty mask -> 0s.

    Same convention as ``segment_anything.utils.amg.batched_mask_to_box``.
    """
    m = np.asarray(masks, bool)
    rows, cols = m.any(axis=2), m.any(axis=1)  # (M, H), (M, W)
    h, w = m.shape[1:]
    y0 = rows.argmax(1)
    y1 = h - 1 - rows[:, ::-1].argmax(1)
    x0 = cols.argmax(1)
    x1 = w - 1 - cols[:, ::-1].argmax(1)
    boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
    boxes[~rows.any(1)] = 0
    return boxes


def select_masks(num_masks: int, masks_per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``masks_per_image`` masks drawn without replacement (all if fewer)."""
    if num_masks <= masks_per_image:
        return np.arange(num_masks)
    return np.sort(rng.choice(num_masks, masks_per_image, replace=False))


def sample_prompts(masks: np.ndarray, config: PromptConfig, rng: np.random.Generator) -> Prompts:
    """Draw masks and prompts for one image.

    ``masks``: (N, H, W) bool, non-empty. Draws up to ``config.masks_per_image`` of them
    (:func:`select_masks`), then per drawn mask a box (tight box, each side jittered by up to
    ``box_jitter`` of the box's width/height and ``box_jitter_max_px`` pixels, clamped to the
    image) and ``points_per_mask`` points chosen uniformly among the mask's pixels.
    Reproducible: same ``rng`` state, same prompts.
    """
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    idx = select_masks(n, config.masks_per_image, rng)
    chosen = masks[idx]
    boxes = points = labels = None
    if config.use_boxes:
        boxes = masks_to_boxes(chosen)
        if config.box_jitter > 0:
            side = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], 1)
            side = np.tile(side, 2)  # (M, 4): width for x0/x1, height for y0/y1
            move = np.minimum(side * config.box_jitter, config.box_jitter_max_px)
            boxes = boxes + rng.uniform(-1.0, 1.0, boxes.shape) * move
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w - 1)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h - 1)
            # Opposite corners may cross on thin masks: keep XYXY ordered.
            boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                                    np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        boxes = boxes.astype(np.float32)
    p = config.points_per_mask
    if p > 0:
        points = np.zeros((len(idx), p, 2), np.float32)
        for j, m in enumerate(chosen):
            flat = np.flatnonzero(m)
            if flat.size == 0:
                raise ValueError(f"mask {int(idx[j])} is empty: no pixel to put a point on")
            pick = flat[rng.integers(flat.size, size=p)]
            points[j, :, 0], points[j, :, 1] = pick % w, pick // w
        labels = np.ones((len(idx), p), np.int64)
    return Prompts(indices=idx.astype(np.int64), boxes=boxes, points=points, point_labels=labels)

