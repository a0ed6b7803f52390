"""Zero-shot classification: top-1 / top-5 accuracy over an image-folder, Places365 or CSV split.

Protocol (CLIP's, as the paper uses it): class embeddings are the renormalised mean of the unit
text embeddings of the 80 OpenAI templates filled with each class name (``--templates simple``:
open_clip's 7); an image is resized on its shortest side to ``--resolution`` and centre-cropped
(CLIP's eval geometry); the score of a class is the cosine between the two. The learned
temperature does not change the order, so ranks are taken on the cosine. Ties resolve to the
lower class index (see ``metrics``). A class with no image in the split stays a candidate (it
can be predicted) and its own accuracy is reported as null. With fewer than five classes top-5
is over all of them (and is 100).
"""

from __future__ import annotations

import csv
import os
from typing import List, Optional

import torch

from fastsamclip.eval.common import read_rgb_or_skip
from fastsamclip.eval.datasets import ClassifyDataset, ClsSample
from fastsamclip.eval.metrics import per_class_accuracy, stable_ranks, topk_accuracy
from fastsamclip.eval.models import EvalModel
from fastsamclip.eval.runner import Dist, RankResult, gather_results, iterate


def _load(sample: ClsSample):
    rgb, skip = read_rgb_or_skip(sample.image, sample.index)
    return sample, rgb, skip


def run_shard(model: EvalModel, ds: ClassifyDataset, samples: List[ClsSample], text: torch.Tensor, resolution: int,
              batch_size: int, workers: int, progress: bool) -> RankResult:
    """This rank's samples -> [(index, rank of the true class, top-1 class)]."""
    rows, skipped = [], []
    for batch in iterate(samples, _load, batch_size, workers, progress, f"classify {ds.name}"):
        good = [(s, rgb) for s, rgb, skip in batch if skip is None]
        skipped += [skip for _, _, skip in batch if skip is not None]
        if not good:
            continue
        emb = model.image_embeddings([rgb for _, rgb in good], resolution)
        cos = emb @ text.T
        labels = torch.tensor([s.label for s, _ in good], device=cos.device)
        ranks = stable_ranks(cos, labels).tolist()
        top1 = stable_ranks_top1(cos)
        rows += [(s.index, r, t) for (s, _), r, t in zip(good, ranks, top1)]
    return RankResult(rows, len(rows), skipped)


def stable_ranks_top1(scores: torch.Tensor) -> List[int]:
    """The first index of the maximum (ties: the lower class index)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, 0].tolist()


def evaluate(model: EvalModel, ds: ClassifyDataset, d: Dist, resolution: int, templates: str = "openai",
             batch_size: int = 32, workers: int = 0, limit: Optional[int] = None, progress: bool = False,
             save_dir: Optional[str] = None):
    """(metrics, per-class, evaluated, skipped) on rank 0; (None, None, n, skipped) elsewhere."""
    text = model.class_embeddings(ds.classes, templates)
    samples = ds.samples[:limit] if limit else ds.samples
    mine = [samples[i] for i in d.shard(len(samples))]
    gathered = gather_results(d, run_shard(model, ds, mine, text, resolution, batch_size, workers, progress))
    if gathered is None:
        return None
    rows = sorted(r for g in gathered for r in g.state)
    skipped = [s for g in gathered for s in g.skipped]
    if not rows:
        return {"metrics": None, "evaluated": 0, "skipped": skipped}
    label_of = {s.index: s.label for s in samples}
    ranks = [r for _, r, _ in rows]
    labels = [label_of[i] for i, _, _ in rows]
    acc = topk_accuracy(ranks, (1, 5))
    per_class = per_class_accuracy(ranks, labels, len(ds.classes), k=1)
    present = [v for v in per_class if v is not None]
    metrics = {"top1": acc[1], "top5": acc[5],
               "mean_per_class_top1": sum(present) / len(present) if present else None,
               "classes": len(ds.classes), "classes_with_images": len(present)}
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        path_of = {s.index: s.image for s in samples}
        with open(os.path.join(save_dir, f"{ds.name}_{ds.split}_predictions.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "label", "prediction", "rank_of_label"])
            for i, r, t in rows:
                w.writerow([path_of[i], ds.classes[label_of[i]], ds.classes[t], r])
    return {"metrics": metrics, "per_class": {"top1": dict(zip(ds.classes, per_class))},
            "evaluated": len(rows), "skipped": skipped}
