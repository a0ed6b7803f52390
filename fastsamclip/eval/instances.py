"""Instance segmentation scored by pycocotools' COCOeval (iouType "segm"): box-prompted, or named
by class (``prompts`` "text": every class name as a phrase of ``segment_text``; "everything":
every mask of a generator named with the class names; see ``eval.models``).

Each box (a detection from a file in the COCO results format, or a ground-truth box) prompts
the SAM head once, ``multimask_output=False`` (one mask per box, SAM's protocol for box
prompts); the mask is RLE-encoded with pycocotools and keeps the box's category and score
(1.0 for ground-truth boxes). Choices the paper leaves open:
- Boxes are clipped to the image (detectors emit boxes that overhang it by a fraction of a
  pixel; the predictor refuses prompts outside the image).
- Detections: the highest-scoring ``maxDets`` per image are prompted (100 for COCO, 300 for
  LVIS), since COCOeval / LVIS score no more than that.
- Ground-truth boxes: every non-crowd annotation (crowd regions are ignored by COCOeval anyway).
- Named by class: every category name of the annotation file is asked on every image (one
  ``segment_text`` call, so the names compete for each patch), with the background prompts; the
  highest-scoring ``maxDets`` instances per image are kept.
- Images that could not be decoded are left out of ``imgIds`` (so their ground truth is not
  counted as missed) and listed.
- LVIS v1 is federated: its evaluator (the LVIS API) scores a category on an image only when it
  is among the image's positive or ``neg_category_ids``, and ignores unmatched detections of
  its ``not_exhaustive_category_ids``; up to 300 detections per image; AP also per frequency
  bin (APr/APc/APf). ``LVISFederatedEval`` applies exactly these rules on top of COCOeval
  (which does the matching and the 101-point precision) rather than re-implementing it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from fastsamclip.eval.common import EvalInputError, read_rgb_or_skip
from fastsamclip.files import write_json
from fastsamclip.eval.datasets import load_json, instance_image_path, instances_paths
from fastsamclip.eval.models import EvalModel
from fastsamclip.eval.runner import Dist, RankResult, gather_results, iterate

MAX_DETS = {"coco": 100, "lvis": 300}
BOX_CHUNK = 64  # boxes decoded at once (bounds the (P, H, W) masks in memory)


def _quiet():
    """pycocotools prints progress on stdout; the command prints its own table."""
    return contextlib.redirect_stdout(io.StringIO())


class InstanceSet:
    """The annotation file through pycocotools, checked against --dataset."""

    def __init__(self, name: str, root: str, split: str = "val", annotations: Optional[str] = None) -> None:
        from pycocotools.coco import COCO  # optional (the eval extra): the field's evaluator

        self.name = name
        self.split = split
        self.ann_file, self.image_root = instances_paths(name, root, split, annotations)
        data = load_json(self.ann_file)
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
            raise EvalInputError(self.ann_file, "is not a COCO-format instances json (needs images, annotations, categories)")
        is_lvis = bool(data["categories"]) and "frequency" in data["categories"][0]
        if is_lvis != (name == "lvis"):
            raise EvalInputError(self.ann_file, f"is a {'LVIS' if is_lvis else 'COCO'} annotation file, not one for "
                                                f"--dataset {name}")
        if data["annotations"] and "segmentation" not in data["annotations"][0]:
            raise EvalInputError(self.ann_file, "annotations have no 'segmentation': not an instance-segmentation file")
        cats = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        foreign = sorted({a.get("category_id") for a in data["annotations"]} - cats, key=str)
        if foreign:  # COCOeval would drop those objects from AP without a word
            raise EvalInputError(self.ann_file, f"annotation category id(s) {foreign[:8]} are not in its 'categories' "
                                                "list: the file is inconsistent; fix it or use the dataset's own")
        for ann in data["annotations"]:
            ann.setdefault("iscrowd", 0)  # LVIS has no crowd annotations (nor the key COCOeval reads)
        with _quiet():
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.image_ids = sorted(self.coco.getImgIds())
        if not self.image_ids:
            raise EvalInputError(self.ann_file, "has no image: nothing to evaluate")
        self.max_dets = MAX_DETS[name]

    def image_path(self, image_id: int) -> str:
        return instance_image_path(self.coco.imgs[image_id], self.image_root)

    def gt_boxes(self) -> Dict[int, List[Tuple[list, int, float]]]:
        out: Dict[int, list] = defaultdict(list)
        for ann in sorted(self.coco.anns.values(), key=lambda a: a["id"]):
            if not ann.get("iscrowd", 0):
                out[ann["image_id"]].append((ann["bbox"], ann["category_id"], 1.0))
        return out

    def detections(self, path: str) -> Dict[int, List[Tuple[list, int, float]]]:
        """A COCO results file (list of {image_id, category_id, bbox XYWH, score}), checked to be
        for this image set; the top ``max_dets`` per image by score."""
        dets = load_json(path)
        if not isinstance(dets, list):
            raise EvalInputError(path, "is not a COCO results file (a JSON list of detections)")
        need = {"image_id", "category_id", "bbox", "score"}
        for i, d in enumerate(dets):
            if not isinstance(d, dict) or not need <= set(d):
                raise EvalInputError(path, f"detection {i} lacks {sorted(need - set(d if isinstance(d, dict) else {}))}: "
                                           "expected COCO results with image_id, category_id, bbox (XYWH), score")
            if len(d["bbox"]) != 4:
                raise EvalInputError(path, f"detection {i} has bbox {d['bbox']}: expected [x, y, w, h]")
        imgs = set(self.coco.imgs)
        foreign = sorted({d["image_id"] for d in dets} - imgs)
        if foreign:
            raise EvalInputError(path, f"{len(foreign)} image id(s) are not in {os.path.basename(self.ann_file)} "
                                       f"(first: {foreign[0]}): a detections file for another image set")
        cats = set(self.coco.cats)
        bad_cats = sorted({d["category_id"] for d in dets} - cats)
        if bad_cats:
            raise EvalInputError(path, f"category id(s) {bad_cats[:8]} are not categories of "
                                       f"{os.path.basename(self.ann_file)}")
        per_image: Dict[int, list] = defaultdict(list)
        for d in dets:
            per_image[d["image_id"]].append((d["bbox"], d["category_id"], float(d["score"])))
        for k, v in per_image.items():
            v.sort(key=lambda t: -t[2])  # stable: equal scores keep file order
            per_image[k] = v[:self.max_dets]
        return per_image


def _xyxy_clipped(bbox: list, w: int, h: int) -> List[float]:
    x, y, bw, bh = (float(v) for v in bbox)
    return [min(max(x, 0.0), w), min(max(y, 0.0), h), min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)]


def encode_masks(masks: np.ndarray) -> List[dict]:
    """(P, H, W) bool -> COCO RLEs with str counts (JSON-ready)."""
    from pycocotools import mask as mask_utils  # optional (the eval extra)

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


class Loader:
    def __init__(self, iset: InstanceSet) -> None:
        self.iset = iset

    def __call__(self, item):
        index, image_id = item
        path = self.iset.image_path(image_id)
        rgb, skip = read_rgb_or_skip(path, index)
        err = None
        if rgb is not None:
            info = self.iset.coco.imgs[image_id]
            if (info.get("height"), info.get("width")) != rgb.shape[:2] and info.get("height") is not None:
                err = EvalInputError(path, f"image is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but "
                                           f"{os.path.basename(self.iset.ann_file)} gives {info['width']}x{info['height']}",
                                     index=index)
        return index, image_id, rgb, skip, err


def run_shard(model, iset: InstanceSet, items: List[Tuple[int, int]], boxes: Dict[int, list], workers: int,
              progress: bool, predict=None, prompts: str = "boxes", background: Tuple[str, ...] = (),
              named: Optional[dict] = None) -> RankResult:
    """``predict(image_id, rgb, xyxy (P, 4)) -> (P, H, W) bool`` defaults to the model's SAM head;
    prompts other than "boxes": the model's ``named_instances`` with every category name."""
    predict = predict or (lambda image_id, rgb, xyxy: model.box_masks(rgb, xyxy))
    cat_ids = sorted(iset.coco.cats)
    names = [iset.coco.cats[c]["name"] for c in cat_ids]
    results, skipped, done = [], [], []
    for batch in iterate(items, Loader(iset), 1, workers, progress, f"instances {iset.name}"):
        index, image_id, rgb, skip, err = batch[0]
        if err is not None:
            return RankResult(None, len(done), skipped, err)
        if skip is not None:
            skipped.append(skip)
            continue
        done.append(image_id)
        if prompts != "boxes":
            masks, classes, scores = model.named_instances(rgb, names, prompts, background, **(named or {}))
            top = np.argsort(-scores, kind="stable")[:iset.max_dets]
            for k, rle in zip(top, encode_masks(masks[top])):
                results.append({"image_id": image_id, "category_id": cat_ids[classes[k]], "segmentation": rle,
                                "score": float(scores[k])})
            continue
        box_prompts = boxes.get(image_id, [])
        h, w = rgb.shape[:2]
        for s in range(0, len(box_prompts), BOX_CHUNK):
            part = box_prompts[s:s + BOX_CHUNK]
            xyxy = np.array([_xyxy_clipped(b, w, h) for b, _, _ in part], np.float64)
            for (_, cat, score), rle in zip(part, encode_masks(predict(image_id, rgb, xyxy))):
                results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score})
    return RankResult({"results": results, "image_ids": done}, len(done), skipped)


def _lvis_eval_class():
    from pycocotools.cocoeval import COCOeval  # optional (the eval extra)

    class LVISFederatedEval(COCOeval):
        """COCOeval with the LVIS API's federated rules (``lvis/eval.py``): unmatched detections of a
        category not exhaustively annotated on an image are ignored, not false positives."""

        not_exhaustive: Dict[int, set] = {}

        def evaluateImg(self, imgId, catId, aRng, maxDet):
            out = super().evaluateImg(imgId, catId, aRng, maxDet)
            if out is not None and catId in self.not_exhaustive.get(imgId, ()):
                out["dtIgnore"] = np.logical_or(out["dtIgnore"], out["dtMatches"] == 0)
            return out

    return LVISFederatedEval


def coco_evaluate(iset: InstanceSet, results: List[dict], image_ids: List[int]) -> Dict[str, Optional[float]]:
    """AP, AP50, AP75, APs/APm/APl (and APr/APc/APf for LVIS) in percent; None where COCOeval
    has nothing to average (no ground truth in an area range)."""
    from pycocotools.cocoeval import COCOeval  # optional (the eval extra)

    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not results:
        return {k: 0.0 for k in keys}
    lvis = iset.name == "lvis"
    if lvis:
        pos = defaultdict(set)
        for a in iset.coco.anns.values():
            pos[a["image_id"]].add(a["category_id"])
        allowed = {i: pos[i] | set(iset.coco.imgs[i].get("neg_category_ids", [])) for i in image_ids}
        # Detections of categories with no information on an image are dropped (LVIS _prepare).
        results = [r for r in results if r["category_id"] in allowed.get(r["image_id"], ())]
        if not results:
            return {k: 0.0 for k in keys + ("APr", "APc", "APf")}
    with _quiet():
        dt = iset.coco.loadRes([dict(r) for r in results])
        ev = (_lvis_eval_class() if lvis else COCOeval)(iset.coco, dt, iouType="segm")
        ev.params.imgIds = sorted(image_ids)
        if lvis:
            ev.not_exhaustive = {i: set(iset.coco.imgs[i].get("not_exhaustive_category_ids", [])) for i in image_ids}
            ev.params.maxDets = [1, 10, MAX_DETS["lvis"]]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (T iou thresholds, R recall points, K categories, A areas, M maxDets)
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    m = len(ev.params.maxDets) - 1
    area = {lbl: i for i, lbl in enumerate(ev.params.areaRngLbl)}

    def mean(p):
        v = p[p > -1]
        return 100.0 * float(v.mean()) if v.size else None

    out = {"AP": mean(precision[:, :, :, area["all"], m]), "AP50": mean(precision[t50, :, :, area["all"], m]),
           "AP75": mean(precision[t75, :, :, area["all"], m]), "APs": mean(precision[:, :, :, area["small"], m]),
           "APm": mean(precision[:, :, :, area["medium"], m]), "APl": mean(precision[:, :, :, area["large"], m])}
    if lvis:
        for f in ("r", "c", "f"):
            ks = [k for k, c in enumerate(ev.params.catIds) if iset.coco.cats[c].get("frequency") == f]
            out[f"AP{f}"] = mean(precision[:, :, ks, area["all"], m]) if ks else None
    return out


def evaluate(model: EvalModel, iset: InstanceSet, d: Dist, detections: Optional[str] = None, workers: int = 0,
             limit: Optional[int] = None, progress: bool = False, save_dir: Optional[str] = None, predict=None,
             prompts: str = "boxes", background: Tuple[str, ...] = ("background",), named: Optional[dict] = None):
    """named: ``named_instances``' options (``templates``, ``points_per_side``, ``text_params``,
    ``everything_params``) for prompts other than boxes."""
    boxes = {} if prompts != "boxes" else iset.detections(detections) if detections else iset.gt_boxes()
    ids = iset.image_ids[:limit] if limit else iset.image_ids
    items = [(i, ids[i]) for i in d.shard(len(ids))]
    gathered = gather_results(d, run_shard(model, iset, items, boxes, workers, progress, predict, prompts, background,
                                                   named))
    if gathered is None:
        return None
    results = [r for g in gathered for r in g.state["results"]]
    # One order whatever the world size: by image, then as each image's boxes came.
    order = {img: k for k, img in enumerate(ids)}
    results.sort(key=lambda r: order[r["image_id"]])
    done = sorted(i for g in gathered for i in g.state["image_ids"])
    skipped = [s for g in gathered for s in g.skipped]
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        write_json(os.path.join(save_dir, f"{iset.name}_{iset.split}_segm_results.json"), results)
    if not done:
        return {"metrics": None, "evaluated": 0, "skipped": skipped}
    metrics = coco_evaluate(iset, results, done)
    metrics["masks"] = len(results)
    if prompts == "boxes":
        metrics["boxes"] = "detections" if detections else "ground truth"
    else:
        metrics["prompts"] = prompts
    return {"metrics": metrics, "evaluated": len(done), "skipped": skipped}
