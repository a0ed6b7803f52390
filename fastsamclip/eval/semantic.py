"""Zero-shot semantic segmentation: per-class IoU, mIoU and pixel accuracy over a split.

Protocol decisions the paper leaves open, and what this harness does:
- Input size and resize: the CLIP-head mode runs ONE pass per image at ``--resolution`` (448 by
  default, the paper's "448x448 input -> 28x28 patch features") in SAM's geometry: the longest
  side resized to 448, the rest padded, so the whole image is seen at once and its aspect ratio
  is kept. No sliding window and no short-side resize (the mmsegmentation-style protocol of
  some zero-shot papers), since the paper describes a single 448 px pass.
- Output size: class probabilities (softmax over classes of the scaled cosine per patch) are
  bilinearly upsampled to the padded input, cropped and resized to the ORIGINAL image, then the
  argmax is taken; the metric is computed at the label map's full resolution.
- Composed mode: ``SAMCLIPPredictor.semantic_segment(mode="composed")`` at the model's native
  size (1024 px for ViT-B): CLIP maps from the same pass prompt the SAM head per class passing
  ``--threshold`` (0.5, the paper's VOC value).
- Background on VOC (21 classes with background, as the VOC numbers the paper compares with):
  in the CLIP-head mode "background" is one more class name prompted like the others, unless
  ``--background-threshold T`` is given, in which case only the 20 object classes are prompted
  and a pixel whose highest class probability is below T is background (GroupViT's rule). In
  the composed mode the 20 object classes are prompted and background is where no class mask
  is positive. On datasets without a background class (ADE20K, Context-59, COCO-Stuff,
  COCO-Panoptic), a composed-mode pixel with no positive mask is left unlabelled and counts as
  a miss of its ground-truth class (see ``metrics``).
- Prompts: the 80 OpenAI templates by default; class names as in ``classnames``.
- Ignored pixels (VOC's 255 borders, ADE's 0, ...) take no part; mIoU is over the classes with
  a non-empty union in the split.
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from fastsamclip.eval.common import EvalInputError, read_rgb_or_skip
from fastsamclip.eval.datasets import SegSample, SemanticDataset, check_label_size
from fastsamclip.eval.metrics import ConfusionMatrix
from fastsamclip.eval.models import EvalModel
from fastsamclip.eval.runner import Dist, RankResult, gather_results, iterate


class Loader:
    """(sample, rgb, label, skip, error) per sample; never raises (runs in DataLoader workers)."""

    def __init__(self, ds: SemanticDataset) -> None:
        self.ds = ds

    def __call__(self, sample: SegSample):
        rgb, skip = read_rgb_or_skip(sample.image, sample.index)
        if skip is not None:
            return sample, None, None, skip, None
        try:
            label = self.ds.read_label(sample)
            check_label_size(sample, rgb, label)
        except EvalInputError as e:
            e.index = sample.index
            return sample, None, None, None, e
        return sample, rgb, label, None, None


class Segmenter:
    """Turns images into train-id label maps (-1 = no prediction) for one dataset and mode."""

    def __init__(self, model: EvalModel, ds: SemanticDataset, mode: str, resolution: int, templates: str,
                 threshold: float = 0.5, background_threshold: Optional[float] = None) -> None:
        self.model, self.ds, self.mode, self.resolution = model, ds, mode, resolution
        self.templates, self.threshold, self.background_threshold = templates, threshold, background_threshold
        prompts = list(ds.prompts)
        bg = ds.background
        # Train id of each prompted class.
        if bg is not None and (mode == "composed" or background_threshold is not None):
            self.ids = np.array([i for i in range(len(prompts)) if i != bg])
        else:
            self.ids = np.arange(len(prompts))
        self.prompts = [prompts[i] for i in self.ids]
        self.text = model.class_embeddings(self.prompts, templates) if mode == "clip" else None

    def __call__(self, rgbs: List[np.ndarray]) -> List[np.ndarray]:
        bg = self.ds.background
        if self.mode == "composed":
            out = []
            for rgb in rgbs:
                k = self.model.semantic_composed(rgb, self.prompts, self.templates, self.threshold)
                out.append(np.where(k < 0, -1 if bg is None else bg, self.ids[np.clip(k, 0, None)]))
            return out
        out = []
        for probs in self.model.semantic_probs(rgbs, self.text, self.resolution):
            best, arg = probs.max(0)
            pred = self.ids[arg.cpu().numpy()]
            if self.background_threshold is not None and bg is not None:
                pred = np.where(best.cpu().numpy() < self.background_threshold, bg, pred)
            out.append(pred)
        return out


def run_shard(segment, ds: SemanticDataset, samples: List[SegSample], batch_size: int, workers: int, progress: bool,
              save_dir: Optional[str]) -> RankResult:
    cm = ConfusionMatrix(len(ds.classes))
    skipped, n = [], 0
    for batch in iterate(samples, Loader(ds), batch_size, workers, progress, f"semantic {ds.name}"):
        errors = [e for *_, e in batch if e is not None]
        if errors:
            return RankResult(None, n, skipped, errors[0])
        skipped += [s for *_, s, _ in batch if s is not None]
        good = [(sample, rgb, label) for sample, rgb, label, s, _ in batch if s is None]
        if not good:
            continue
        preds = segment([rgb for _, rgb, _ in good])
        for (sample, _, label), pred in zip(good, preds):
            cm.update(pred, label)
            if save_dir:
                ds.encode_prediction(pred).save(os.path.join(save_dir, sample.name + ".png"))
        n += len(good)
    return RankResult(cm.state(), n, skipped)


def evaluate(model: EvalModel, ds: SemanticDataset, d: Dist, mode: str = "clip", resolution: int = 448,
             templates: str = "openai", threshold: float = 0.5, background_threshold: Optional[float] = None,
             batch_size: int = 8, workers: int = 0, limit: Optional[int] = None, progress: bool = False,
             save_dir: Optional[str] = None, segmenter=None):
    """Returns on rank 0 {"metrics", "per_class", "evaluated", "skipped"}; None elsewhere.
    ``segmenter`` replaces the model's (a callable rgbs -> label maps; tests pass an oracle)."""
    if background_threshold is not None and ds.background is None:
        raise EvalInputError(None, f"--background-threshold applies to datasets with a background class (voc), not {ds.name}")
    segment = segmenter or Segmenter(model, ds, mode, resolution, templates, threshold, background_threshold)
    samples = ds.samples[:limit] if limit else ds.samples
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    mine = [samples[i] for i in d.shard(len(samples))]
    gathered = gather_results(d, run_shard(segment, ds, mine, batch_size, workers, progress, save_dir))
    if gathered is None:
        return None
    cm = ConfusionMatrix(len(ds.classes))
    for g in gathered:
        cm.merge(ConfusionMatrix.from_state(g.state))
    skipped = [s for g in gathered for s in g.skipped]
    evaluated = sum(g.evaluated for g in gathered)
    if evaluated == 0:
        return {"metrics": None, "evaluated": 0, "skipped": skipped}
    s = cm.scores(ds.classes)
    metrics = {k: s[k] for k in ("mIoU", "pixel_accuracy", "mean_accuracy", "classes_present", "labelled_pixels")}
    return {"metrics": metrics, "per_class": {"IoU": s["per_class_IoU"], "accuracy": s["per_class_accuracy"]},
            "evaluated": evaluated, "skipped": skipped}
