"""`eval instances --prompts text|everything`: instances named by class, scored by COCOeval. A model
that names the ground truth right scores AP 100 and wrong 0 (the category mapping and the per-image
cut); the merged model's segment_text and generate, and SAM's generator + the CLIP teacher on crops,
run through the command with the report saying which."""

import json

import numpy as np
import pytest
from PIL import Image

from fastsamclip.cli import main
from fastsamclip.eval import instances
from fastsamclip.eval.instances import InstanceSet
from fastsamclip.eval.models import EvalModel, MergedModel


class Named(EvalModel):
    """Names every ground-truth mask of the image, by class index of the sorted category ids, shifted
    by ``shift`` classes (0: right), plus ``junk`` whole-image masks of low score."""

    kind = "oracle"
    tasks = ("instances",)

    def __init__(self, iset, shift=0, junk=0):
        super().__init__(None)
        self.iset, self.shift, self.junk, self.calls = iset, shift, junk, []

    def named_instances(self, rgb, names, prompts, background, templates="openai", points_per_side=32):
        self.calls.append((tuple(names), prompts, tuple(background), templates))
        cats = sorted(self.iset.coco.cats)
        image_id = next(i for i, im in self.iset.coco.imgs.items() if (im["height"], im["width"]) == rgb.shape[:2])
        anns = [a for a in self.iset.coco.anns.values() if a["image_id"] == image_id]
        masks = [self.iset.coco.annToMask(a).astype(bool) for a in anns] + [np.ones(rgb.shape[:2], bool)] * self.junk
        classes = [(cats.index(a["category_id"]) + self.shift) % len(cats) for a in anns] + [0] * self.junk
        scores = [0.9] * len(anns) + [0.01] * self.junk
        return np.stack(masks), np.array(classes), np.array(scores)


def test_named_ground_truth_scores_ap_100_and_misnamed_0(data, one_process):
    iset = InstanceSet("coco", data["coco"]["root"])
    sizes = {(im["height"], im["width"]) for im in iset.coco.imgs.values()}
    assert len(sizes) == len(iset.coco.imgs)  # the oracle's key
    right = Named(iset, junk=150)
    out = instances.evaluate(right, iset, one_process, prompts="text", background=("background", "sky"),
                             named={"templates": "simple"})
    assert out["metrics"]["AP"] == 100.0 and out["metrics"]["prompts"] == "text"
    names = tuple(iset.coco.cats[c]["name"] for c in sorted(iset.coco.cats))
    assert right.calls[0] == (names, "text", ("background", "sky"), "simple")  # every category name, every image
    # 150 junk masks per image: only the top 100 by score reach COCOeval.
    assert out["metrics"]["masks"] == 100 * len(iset.image_ids)
    wrong = instances.evaluate(Named(iset, shift=1), iset, one_process, prompts="everything")
    assert wrong["metrics"]["AP"] == 0.0


OFF = '{"pred_iou_thresh": 0, "stability_score_thresh": 0}'  # the generator's filters off


@pytest.mark.parametrize("prompts", ["text", "everything"])
def test_merged_model_through_the_command(models, data, tmp_path, capsys, prompts):
    out = tmp_path / "r.json"
    rc = main(["eval", "instances", "--checkpoint", models["merged"], "--data-root", data["coco"]["root"], "--dataset",
               "coco", "--prompts", prompts, "--limit", "1", "--workers", "0", "--no-progress", "--dtype", "fp32",
               "--templates", "simple", "--points-per-side", "4", "--out", str(out),
               *(["--text-params", '{"box_prompts": false, "max_peaks": 3}'] if prompts == "text" else
                 ["--everything-params", OFF])])
    text = capsys.readouterr().out
    assert rc == 0 and "| AP |" in text and "41.2" not in text  # the box-prompted paper rows do not apply
    rep = json.loads(out.read_text())
    assert rep["setting"]["prompts"] == prompts and rep["setting"]["background"] == ["background"]
    assert 0.0 <= rep["metrics"]["AP"] <= 100.0 and rep["images"]["evaluated"] == 1
    if prompts == "text":
        assert rep["setting"]["text_params"] == {"box_prompts": False, "max_peaks": 3}
    else:  # random weights predict IoUs near 0: SAM's default filters would keep no mask
        assert rep["setting"]["everything_params"] == json.loads(OFF) and rep["metrics"]["masks"] > 0


def test_merged_named_instances_are_segment_texts(models, data):
    iset = InstanceSet("coco", data["coco"]["root"])
    rgb = np.asarray(Image.open(iset.image_path(iset.image_ids[0])).convert("RGB"))
    names = [iset.coco.cats[c]["name"] for c in sorted(iset.coco.cats)]
    m = MergedModel(models["predictor"], "cpu")
    masks, classes, scores = m.named_instances(rgb, names, "text", ("background",), templates="simple")
    want = models["predictor"].segment_text(rgb, names, templates="simple")
    assert len(masks) == len(want) and [names[k] for k in classes] == [r["phrase"] for r in want]
    assert np.array_equal(scores, [r["score"] for r in want])


def test_teachers_pipeline_and_bad_combinations(models, data, tmp_path, capsys):
    root = data["coco"]["root"]
    base = ["eval", "instances", "--data-root", root, "--dataset", "coco", "--limit", "1", "--workers", "0",
            "--no-progress", "--templates", "simple", "--points-per-side", "4"]
    sam = ["--teacher", "sam", "--sam-checkpoint", models["sam_path"], "--sam-type", "vit_tiny"]
    out = tmp_path / "r.json"
    rc = main([*base, *sam, "--clip-model", models["clip_name"], "--prompts", "everything", "--everything-params", OFF,
               "--out", str(out)])
    assert rc == 0 and "SAM and CLIP teachers" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["masks"] > 0
    for argv, msg in [([*sam, "--prompts", "everything"], "give --clip-model"),
                      ([*sam, "--prompts", "text"], "--prompts text is the merged model's segment_text"),
                      (["--checkpoint", models["merged"], "--prompts", "text", "--detections", "x.json"],
                       "drop them with --prompts text"),
                      (["--checkpoint", models["merged"], "--prompts", "text", "--background", " ,"], "names no text"),
                      (["--checkpoint", models["merged"], "--prompts", "text", "--text-params", '{"threshold": 2}'],
                       "--text-params: threshold 2: must be a number in [0, 1]"),
                      (["--checkpoint", models["merged"], "--prompts", "text", "--text-params", "{"], "is not JSON"),
                      (["--checkpoint", models["merged"], "--prompts", "everything", "--text-params", "{}"],
                       "go with --prompts text"),
                      (["--checkpoint", models["merged"], "--prompts", "text", "--everything-params", "{}"],
                       "go with --prompts everything"),
                      (["--checkpoint", models["merged"], "--prompts", "everything", "--everything-params",
                        '{"points_per_side": 4}'], "have flags of their own"),
                      (["--checkpoint", models["merged"], "--prompts", "everything", "--everything-params",
                        '{"pred_iou": 0}'], "unknown parameters ['pred_iou']"),
                      (["--checkpoint", models["merged"], "--prompts", "everything", "--everything-params",
                        '{"points_per_batch": 0}'], "points_per_batch")]:
        assert main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
