"""Masks as COCO RLE: ``{"size": [h, w], "counts": str}``, what ``pycocotools.mask.decode`` reads.

``segment_anything``'s run lengths, then the predictor's COCO string (pycocotools' encoder where
installed, the same string in Python otherwise: :func:`fastsamclip.predictor.everything.coco_rle`).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from segment_anything.utils.amg import mask_to_rle_pytorch

from fastsamclip.predictor.everything import coco_rle


def encode_rle(mask: np.ndarray) -> Dict[str, object]:
    """(h, w) bool mask -> COCO RLE ``{"size": [h, w], "counts": str}``."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"encode_rle takes one (h, w) mask, got shape {m.shape}")
    return coco_rle(mask_to_rle_pytorch(torch.from_numpy(m.astype(bool))[None])[0])
