"""Instances: ground-truth masks score AP 100 in COCOeval, LVIS's federated rules hold, and the SAM
teacher through the merged model's SAM head at initialisation scores exactly the teacher's numbers."""

import json

import numpy as np
import pytest

from fastsamclip.eval import instances
from fastsamclip.eval.instances import InstanceSet, coco_evaluate, encode_masks
from fastsamclip.eval.models import MergedModel, SAMTeacherModel


def _oracle(iset):
    """predict(image_id, rgb, boxes) -> the ground-truth masks of the image's boxes, in order."""
    masks = {}
    for ann in sorted(iset.coco.anns.values(), key=lambda a: a["id"]):
        if not ann.get("iscrowd", 0):
            masks.setdefault(ann["image_id"], []).append(iset.coco.annToMask(ann).astype(bool))

    def predict(image_id, rgb, boxes):
        got = masks[image_id]
        assert len(got) == len(boxes)
        return np.stack(got)

    return predict


@pytest.mark.parametrize("name", ["coco", "lvis"])
def test_ground_truth_masks_give_ap_100(name, data, one_process):
    iset = InstanceSet(name, data[name]["root"])
    out = instances.evaluate(None, iset, one_process, predict=_oracle(iset))
    m = out["metrics"]
    assert m["AP"] == 100.0 and m["AP50"] == 100.0 and m["AP75"] == 100.0
    assert out["evaluated"] == 3 and m["boxes"] == "ground truth"
    if name == "lvis":
        assert all(m[k] in (100.0, None) for k in ("APr", "APc", "APf"))


def _gt_results(iset):
    out = []
    for ann in sorted(iset.coco.anns.values(), key=lambda a: a["id"]):
        if not ann.get("iscrowd", 0):
            (rle,) = encode_masks(iset.coco.annToMask(ann).astype(bool)[None])
            out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "segmentation": rle, "score": 0.9})
    return out


def test_lvis_federated_rules(data):
    iset = InstanceSet("lvis", data["lvis"]["root"])
    results = _gt_results(iset)
    ids = iset.image_ids
    pos = {i: {a["category_id"] for a in iset.coco.anns.values() if a["image_id"] == i} for i in ids}
    a, b = ids[0], ids[1]
    elsewhere = next(c for c in sorted(pos[b]) if c not in pos[a])  # annotated on b, not on a
    img = iset.coco.imgs[a]
    wrong = encode_masks(np.ones((1, img["height"], img["width"]), bool))[0]
    fp = lambda cat: results + [{"image_id": a, "category_id": cat, "segmentation": wrong, "score": 0.99}]  # noqa: E731

    def ap(neg, not_exhaustive, res):
        img["neg_category_ids"], img["not_exhaustive_category_ids"] = neg, not_exhaustive
        return coco_evaluate(iset, res, ids)["AP"]

    assert ap([], [], results) == 100.0
    # No information on the category in image a: the detection is dropped, not a false positive.
    assert ap([], [], fp(elsewhere)) == 100.0
    # Known absent from a (a negative category): the same detection is a false positive.
    assert ap([elsewhere], [], fp(elsewhere)) < 100.0
    # A category of a annotated exhaustively: an unmatched detection is a false positive ...
    own = sorted(pos[a])[0]
    assert ap([], [], fp(own)) < 100.0
    # ... and ignored when the category is marked not exhaustive on a.
    assert ap([], [own], fp(own)) == 100.0


def test_sam_teacher_and_merged_sam_head_give_identical_numbers(models, data, one_process, tmp_path):
    iset = InstanceSet("coco", data["coco"]["root"])
    det = data["coco"]["detections"]
    teacher = SAMTeacherModel(None, "vit_tiny", models["predictor"].device, sam=models["sam"])
    merged = MergedModel(models["predictor"], models["predictor"].device)
    a = instances.evaluate(teacher, iset, one_process, det, save_dir=str(tmp_path / "t"))
    b = instances.evaluate(merged, iset, one_process, det, save_dir=str(tmp_path / "m"))
    assert a["metrics"] == b["metrics"]
    ra = json.loads((tmp_path / "t" / "coco_val_segm_results.json").read_text())
    rb = json.loads((tmp_path / "m" / "coco_val_segm_results.json").read_text())
    assert len(ra) == len(rb) == a["metrics"]["masks"] > 0
    same = sum(x["segmentation"] == y["segmentation"] for x, y in zip(ra, rb))
    assert same == len(ra), f"{len(ra) - same} of {len(ra)} masks differ between the SAM teacher and the merged model"
    assert [(r["image_id"], r["category_id"], r["score"]) for r in ra] == [
        (r["image_id"], r["category_id"], r["score"]) for r in rb]


def test_boxes_are_clipped_and_detections_capped(data):
    assert instances._xyxy_clipped([-2.0, 3.0, 10.0, 100.0], 20, 30) == [0.0, 3.0, 8.0, 30.0]
    iset = InstanceSet("coco", data["coco"]["root"])
    iset.max_dets = 2
    assert max(len(v) for v in iset.detections(data["coco"]["detections"]).values()) == 2
