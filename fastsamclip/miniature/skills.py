"""What a model of the miniature world can do, measured on the held-out split through the
evaluation harness: one source of truth for the teachers, the demo and the ablations.

- zero-shot top-1: ``fastsamclip.eval.classify`` on the held-out crops folder (the 80 OpenAI
  templates unless told), as ``fastsamclip eval classify --dataset folder`` runs it;
- semantic mIoU: ``fastsamclip.eval.semantic`` on the VOC-layout split with the world's class
  names (``--class-names``), CLIP-head mode or composed, as ``fastsamclip eval semantic`` runs it;
- point and box mIoU: every object of the COCO json prompted once, the mask scored against its
  ground truth (IoU at the canvas's pixels, mean over objects). The box is the object's exact
  box; the point is the object's pixel farthest from its boundary (the interior point SAM's own
  single-point evaluation starts from), decoded with three masks and the one of highest predicted
  IoU kept (``SamPredictor``'s rule). The SAM teacher answers through ``segment_anything``'s
  ``SamPredictor``, the merged model through ``SAMCLIPPredictor.segment``.
- "SAM everything, then CLIP": ``segment_anything``'s automatic mask generator with the SAM
  teacher, each mask labelled by the CLIP teacher on the mask's box crop (a class, or
  background), written into a label map largest mask first; scored by the semantic harness.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from fastsamclip.data import decode_rle
from fastsamclip.eval import classify, semantic
from fastsamclip.eval.common import read_image
from fastsamclip.eval.datasets import open_classify, open_semantic
from fastsamclip.eval.models import CLIPTeacherModel, EvalModel, MergedModel, SAMTeacherModel
from fastsamclip.eval.runner import Dist

DIST = Dist()  # one process


def world_paths(world_root: str) -> Dict[str, str]:
    with open(os.path.join(world_root, "world.json")) as f:
        paths = json.load(f)["paths"]
    # The layouts sit at fixed places under the root: follow the folder if it moved.
    rel = {"crops": "heldout/crops", "voc": "heldout", "voc_class_names": "heldout/VOC2012/class_names.txt",
           "coco": "heldout/coco", "retrieval": "heldout", "sam_data": "sa1b"}
    out = {k: os.path.join(world_root, v) for k, v in rel.items()}
    out["clip_data"] = os.path.join(world_root, "clip", os.path.basename(paths["clip_data"]))
    return out


def zero_shot_top1(model: EvalModel, world_root: str, resolution: int, templates: str = "openai",
                   limit: Optional[int] = None) -> float:
    """Top-1 (percent) over the held-out crops."""
    ds = open_classify("folder", world_paths(world_root)["crops"], "val")
    out = classify.evaluate(model, ds, DIST, resolution, templates, batch_size=64, limit=limit)
    return out["metrics"]["top1"]


def semantic_miou(model: EvalModel, world_root: str, mode: str, resolution: int, templates: str = "openai",
                  limit: Optional[int] = None, segmenter=None) -> float:
    """mIoU (percent) over the held-out canvases, background included as VOC counts it."""
    p = world_paths(world_root)
    ds = open_semantic("voc", p["voc"], "val", p["voc_class_names"])
    out = semantic.evaluate(model, ds, DIST, mode, resolution, templates, batch_size=16, limit=limit,
                            segmenter=segmenter)
    return out["metrics"]["mIoU"]


def _objects(world_root: str, limit: Optional[int]) -> List[dict]:
    """The held-out objects: per canvas, its image path and each object's mask, box and point."""
    coco = world_paths(world_root)["coco"]
    with open(os.path.join(coco, "annotations", "instances_val2017.json")) as f:
        data = json.load(f)
    images = data["images"][:limit] if limit else data["images"]
    by_image = {im["id"]: {"path": os.path.join(coco, "val2017", im["file_name"]), "masks": [], "boxes": [],
                           "points": []} for im in images}
    for a in data["annotations"]:
        if a["image_id"] not in by_image:
            continue
        m = decode_rle(a["segmentation"])
        d = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        bx, by, bw, bh = a["bbox"]
        e = by_image[a["image_id"]]
        e["masks"].append(m)
        e["boxes"].append([bx, by, bx + bw, by + bh])
        e["points"].append([x + 0.5, y + 0.5])
    return list(by_image.values())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


@torch.no_grad()
def _decode(model: EvalModel, rgb: np.ndarray, points: Optional[np.ndarray], boxes: Optional[np.ndarray]):
    """(P, K, H, W) bool masks and (P, K) predicted IoUs for P single-point prompts (K = 3) or
    P boxes (K = 1), through the model's own predictor."""
    multimask = points is not None
    if isinstance(model, MergedModel):
        p = model.predictor
        p.set_image(rgb)
        masks, scores, _ = p.segment(points=None if points is None else points[:, None],
                                     boxes=boxes, multimask_output=multimask)
        return masks, scores
    if isinstance(model, SAMTeacherModel):
        p: SamPredictor = model.sam_predictor
        p.set_image(rgb)
        dev = model.device
        kw = {}
        if points is not None:
            kw["point_coords"] = torch.as_tensor(p.transform.apply_coords(points[:, None].astype(np.float64),
                                                                          p.original_size), dtype=torch.float, device=dev)
            kw["point_labels"] = torch.ones(len(points), 1, dtype=torch.int, device=dev)
        else:
            kw["point_coords"] = kw["point_labels"] = None
            kw["boxes"] = torch.as_tensor(p.transform.apply_boxes(boxes.astype(np.float64), p.original_size),
                                          dtype=torch.float, device=dev)
        masks, scores, _ = p.predict_torch(multimask_output=multimask, **kw)
        return masks.cpu().numpy(), scores.cpu().numpy()
    raise TypeError(f"the {model.kind} has no mask decoder")


def prompt_miou(model: EvalModel, world_root: str, limit: Optional[int] = None) -> Dict[str, float]:
    """{"point": mIoU, "box": mIoU} over the held-out objects (fractions, 0..1)."""
    ious: Dict[str, List[float]] = {"point": [], "box": []}
    for e in _objects(world_root, limit):
        if not e["masks"]:
            continue
        rgb = read_image(e["path"])
        for kind in ("point", "box"):
            arg = np.asarray(e["points" if kind == "point" else "boxes"], np.float64)
            masks, scores = _decode(model, rgb, arg if kind == "point" else None, arg if kind == "box" else None)
            best = scores.argmax(1)
            ious[kind] += [_iou(masks[i, best[i]], gt) for i, gt in enumerate(e["masks"])]
    return {k: float(np.mean(v)) for k, v in ious.items()}


class EverythingThenCLIP:
    """Semantic label maps from SAM's automatic masks, each named by the CLIP teacher on its box
    crop: the training-free pipeline the paper compares with (27.2 mIoU on VOC)."""

    def __init__(self, sam: SAMTeacherModel, clip: CLIPTeacherModel, class_names: Sequence[str],
                 templates: str = "openai", points_per_side: int = 16) -> None:
        self.generator = SamAutomaticMaskGenerator(sam.sam, points_per_side=points_per_side)
        self.clip = clip
        self.text = clip.class_embeddings(list(class_names), templates)  # background is one of them (value 0)

    @torch.no_grad()
    def __call__(self, rgbs: List[np.ndarray]) -> List[np.ndarray]:
        out = []
        for rgb in rgbs:
            records = sorted(self.generator.generate(rgb), key=lambda r: -r["area"])
            label = np.zeros(rgb.shape[:2], np.int64)  # no mask: background
            if records:
                crops = []
                for r in records:
                    x, y, w, h = (int(round(v)) for v in r["bbox"])
                    crops.append(rgb[y:y + max(h, 1), x:x + max(w, 1)])
                emb = self.clip.image_embeddings(crops, self.clip.teacher.image_size)
                names = (emb @ self.text.T).argmax(1).tolist()
                for r, k in zip(records, names):  # largest first: smaller masks are drawn over it
                    label[r["segmentation"]] = k
            out.append(label)
        return out
