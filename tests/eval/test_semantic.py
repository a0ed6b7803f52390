"""Semantic segmentation: an oracle scores 100, the batched CLIP-head path is the predictor's, the
composed mode and the background rule map to the dataset's ids, corrupt images are listed."""

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

from fastsamclip.eval import semantic
from fastsamclip.eval.common import read_image
from fastsamclip.eval.datasets import open_semantic
from fastsamclip.eval.models import MergedModel

from ..helpers import assert_close_verbose

LAYOUTS = ("voc", "ade20k", "pascal-context", "coco-stuff", "coco-panoptic")


def _root(data, name):
    return {"voc": data["voc"]["root"], "ade20k": data["root"], "pascal-context": os.path.join(data["root"], "VOCdevkit"),
            "coco-stuff": data["coco-stuff"]["root"], "coco-panoptic": data["coco-panoptic"]["root"]}[name]


def _key(rgb):
    return hashlib.sha1(rgb.tobytes()).hexdigest()


class Oracle:
    """Returns each image's ground truth (ignored pixels given class 0, which the metric skips)."""

    def __init__(self, ds, wrong_pixel=False):
        self.gt = {}
        for s in ds.samples:
            lab = ds.read_label(s).astype(np.int64)
            self.gt[_key(read_image(s.image))] = np.where(lab == 255, 0, lab)
        self.wrong_pixel = wrong_pixel

    def __call__(self, rgbs):
        out = [self.gt[_key(r)].copy() for r in rgbs]
        if self.wrong_pixel:
            out[0][0, 0] = -1
        return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_oracle_predictor_gives_miou_100(name, data, one_process):
    ds = open_semantic(name, _root(data, name))
    out = semantic.evaluate(None, ds, one_process, segmenter=Oracle(ds), batch_size=2)
    assert out["metrics"]["mIoU"] == 100.0 and out["metrics"]["pixel_accuracy"] == 100.0
    assert out["evaluated"] == len(ds.samples) and out["skipped"] == []
    present = [v for v in out["per_class"]["IoU"].values() if v is not None]
    assert present and all(v == 100.0 for v in present)


def test_one_wrong_pixel_lowers_the_score(data, one_process):
    ds = open_semantic("ade20k", data["root"])
    out = semantic.evaluate(None, ds, one_process, segmenter=Oracle(ds, wrong_pixel=True), batch_size=8)
    gt0 = ds.read_label(ds.samples[0])
    if gt0[0, 0] == 255:
        pytest.skip("the corner pixel is ignored in this sample")
    assert out["metrics"]["mIoU"] < 100.0 and out["metrics"]["pixel_accuracy"] < 100.0


def test_batched_clip_mode_is_the_predictors_semantic_segment(models, data):
    p = models["predictor"]
    model = MergedModel(p, p.device)
    ds = open_semantic("voc", data["voc"]["root"])
    rgbs = [read_image(s.image) for s in ds.samples[:2]]
    text = model.class_embeddings(ds.prompts, "simple")
    assert_close_verbose(text, p.text_embeddings(list(ds.prompts), "simple"), 1e-6, 1e-5, "class embeddings")
    for rgb in rgbs:
        ref = p.semantic_segment(rgb, list(ds.prompts), mode="clip", resolution=64, templates="simple")
        (probs,) = model.semantic_probs([rgb], text, 64)
        assert_close_verbose(probs, torch.from_numpy(ref.scores), 1e-5, 1e-4, "clip-mode probabilities")
        assert (probs.argmax(0).numpy() == ref.label_map).all()
    batched = model.semantic_probs(rgbs, text, 64)  # two images of different sizes in one forward pass
    for rgb, probs in zip(rgbs, batched):
        (single,) = model.semantic_probs([rgb], text, 64)
        assert_close_verbose(probs, single, 1e-5, 1e-4, "batch of 2 vs batch of 1")


def test_composed_mode_and_background_map_to_voc_ids(models, data):
    p = models["predictor"]
    model = MergedModel(p, p.device)
    ds = open_semantic("voc", data["voc"]["root"])
    rgb = read_image(ds.samples[0].image)
    seg = semantic.Segmenter(model, ds, "composed", p.img_size, "simple", threshold=0.0)
    assert seg.prompts == list(ds.prompts[1:])  # the 20 objects; background is "no mask"
    (pred,) = seg([rgb])
    ref = p.semantic_segment(rgb, seg.prompts, mode="composed", threshold=0.0, templates="simple").label_map
    assert (pred == np.where(ref < 0, 0, ref + 1)).all()
    bg = semantic.Segmenter(model, ds, "clip", 64, "simple", background_threshold=1.01)
    (pred,) = bg([rgb])
    assert (pred == 0).all()  # no probability reaches 1.01: all background
    nobg = semantic.Segmenter(model, open_semantic("ade20k", data["root"]), "composed", p.img_size, "simple", threshold=1.0)
    (pred,) = nobg([rgb])
    assert (pred == -1).all()  # no class prompted: unlabelled on a dataset without background


def test_model_run_saves_one_png_per_image_and_lists_corrupt_images(models, data, tmp_path, one_process):
    root = tmp_path / "VOC2012"
    shutil.copytree(data["voc"]["root"], root)
    ds = open_semantic("voc", str(root))
    bad = ds.samples[1]
    with open(bad.image, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = MergedModel(models["predictor"], models["predictor"].device)
    out = semantic.evaluate(model, ds, one_process, "clip", 64, "simple", save_dir=str(tmp_path / "pred"), batch_size=2)
    assert out["evaluated"] == len(ds.samples) - 1
    assert [s.file for s in out["skipped"]] == [bad.image] and "cannot read image" in out["skipped"][0].reason
    saved = sorted(os.listdir(tmp_path / "pred"))
    assert saved == sorted(s.name + ".png" for s in ds.samples if s is not bad)
    assert 0.0 <= out["metrics"]["mIoU"] <= 100.0
