"""Metrics kept exact: integer counts summed across images and ranks, ratios taken once at the end.

Semantic segmentation (the standard protocol of mmsegmentation / detectron2's SemSegEvaluator):
ONE confusion matrix over every labelled pixel of the split, rows = ground truth, columns =
prediction. IoU_c = TP / (TP + FP + FN); mIoU = the mean over classes whose union TP + FP + FN
is non-empty (a class neither present nor predicted anywhere in the split is left out, and its
IoU is reported as null); pixel accuracy = trace / labelled pixels. A pixel the model left
unlabelled (prediction -1: the composed mode where no class mask is positive, on a dataset
without a background class) is a miss of its ground-truth class: it adds to that class's FN
and to the pixel-accuracy denominator, and to no class's FP.

Ranking (classification top-k, retrieval recall@K): the rank of the right answer is the number
of candidates scored strictly higher plus the number scored EQUAL with a lower index, i.e. the
position in a stable descending sort. Exact ties (constructed embeddings, duplicated images)
thus resolve to the lower class / item index, deterministically and identically on every
world size.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

IGNORE = 255  # the ignore label of every dataset here once mapped to contiguous train ids


class ConfusionMatrix:
    """(C, C) int64 counts, plus a (C,) vector of pixels left unlabelled by the model."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.unlabelled = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, ignore_index: int = IGNORE) -> None:
        """pred: (H, W) ints in -1..C-1 (-1: no prediction); gt: (H, W) ints in 0..C-1 or
        ``ignore_index``. Raises ValueError for shapes that differ or values out of range."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction of shape {pred.shape} for a label map of shape {gt.shape}")
        keep = gt != ignore_index
        g = gt[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        c = self.num_classes
        if g.size and (g.min() < 0 or g.max() >= c):
            raise ValueError(f"label values {sorted(set(g[(g < 0) | (g >= c)].tolist()))[:8]} outside 0..{c - 1}")
        if p.size and (p.min() < -1 or p.max() >= c):
            raise ValueError(f"predicted values outside -1..{c - 1}: {sorted(set(p[(p < -1) | (p >= c)].tolist()))[:8]}")
        none = p < 0
        self.unlabelled += np.bincount(g[none], minlength=c)
        self.matrix += np.bincount(g[~none] * c + p[~none], minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge confusion matrices of {other.num_classes} and {self.num_classes} classes")
        self.matrix += other.matrix
        self.unlabelled += other.unlabelled
        return self

    def state(self) -> dict:
        return {"matrix": self.matrix, "unlabelled": self.unlabelled}

    @classmethod
    def from_state(cls, state: dict) -> "ConfusionMatrix":
        cm = cls(state["matrix"].shape[0])
        cm.matrix += state["matrix"]
        cm.unlabelled += state["unlabelled"]
        return cm

    def scores(self, class_names: Optional[Sequence[str]] = None) -> dict:
        """{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class_IoU", "per_class_accuracy",
        "classes_present"} in percent; per-class values are None for classes with an empty
        union (IoU) or no labelled pixel (accuracy)."""
        return semantic_scores(self.matrix, self.unlabelled, class_names)


def semantic_scores(matrix: np.ndarray, unlabelled: Optional[np.ndarray] = None,
                    class_names: Optional[Sequence[str]] = None) -> dict:
    m = np.asarray(matrix, dtype=np.int64)
    c = m.shape[0]
    unl = np.zeros(c, np.int64) if unlabelled is None else np.asarray(unlabelled, np.int64)
    tp = np.diag(m)
    gt_pixels = m.sum(1) + unl  # every labelled pixel of class c
    pred_pixels = m.sum(0)
    union = gt_pixels + pred_pixels - tp
    total = int(gt_pixels.sum())
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    present = union > 0
    iou = [100.0 * int(tp[i]) / int(union[i]) if present[i] else None for i in range(c)]
    acc = [100.0 * int(tp[i]) / int(gt_pixels[i]) if gt_pixels[i] > 0 else None for i in range(c)]
    valid_iou = [v for v in iou if v is not None]
    valid_acc = [v for v in acc if v is not None]
    return {
        "mIoU": float(np.mean(valid_iou)) if valid_iou else None,
        "pixel_accuracy": 100.0 * int(tp.sum()) / total if total else None,
        "mean_accuracy": float(np.mean(valid_acc)) if valid_acc else None,
        "classes_present": int(present.sum()),
        "labelled_pixels": total,
        "per_class_IoU": dict(zip(names, iou)),
        "per_class_accuracy": dict(zip(names, acc)),
    }


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------


def stable_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``targets[i]`` among ``scores[i]`` in a stable descending sort.

    scores (Q, N) float, targets (Q,) long -> (Q,) long:
    rank = #{j : s_j > s_t} + #{j < t : s_j == s_t}.
    """
    s_t = scores.gather(1, targets[:, None])
    higher = (scores > s_t).sum(1)
    idx = torch.arange(scores.shape[1], device=scores.device)[None]
    tied_before = ((scores == s_t) & (idx < targets[:, None])).sum(1)
    return higher + tied_before


def best_rank_of_positives(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """scores (Q, N), positives (Q, N) bool (each row at least one) -> (Q,) the best stable rank
    among the positives (image-to-text retrieval: any of the image's captions counts)."""
    ranks = []
    for q in range(scores.shape[0]):
        cols = positives[q].nonzero()[:, 0]
        r = stable_ranks(scores[q:q + 1].expand(len(cols), -1), cols)
        ranks.append(r.min())
    return torch.stack(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def topk_accuracy(ranks: Sequence[int], ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Percent of queries whose rank (0-based) is below k, for each k."""
    r = np.asarray(list(ranks), dtype=np.int64)
    if r.size == 0:
        raise ValueError("no ranks to score")
    return {int(k): 100.0 * float((r < k).mean()) for k in ks}


def per_class_accuracy(ranks: Sequence[int], labels: Sequence[int], num_classes: int, k: int = 1) -> List[Optional[float]]:
    """Top-k accuracy of each class over its own images; None for a class with no image."""
    r = np.asarray(list(ranks), np.int64)
    y = np.asarray(list(labels), np.int64)
    out: List[Optional[float]] = []
    for c in range(num_classes):
        sel = y == c
        out.append(100.0 * float((r[sel] < k).mean()) if sel.any() else None)
    return out
