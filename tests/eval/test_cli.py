"""`fastsamclip eval TASK` end to end on every tiny layout, and its one-line answers to bad input."""

import json
import os
import shutil

import pytest

from fastsamclip.cli import main
from fastsamclip.cli.parsers import EVAL_DATASETS as DATASETS
from fastsamclip.eval.datasets import SEMANTIC_DATASETS

FAST = ["--workers", "0", "--no-progress"]


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _cases(data, models):
    r, m = data["root"], ["--checkpoint", models["merged"]]
    sem = ["--templates", "simple", "--resolution", "64"]
    return {
        "imagenet": (["classify", *m, "--data-root", data["imagenet"]["root"], "--dataset", "imagenet", "--templates",
                      "simple", "--resolution", "64"], "top1"),
        "imagenet-v2": (["classify", *m, "--data-root", data["imagenet-v2"]["root"], "--dataset", "imagenet-v2",
                         "--class-names", os.path.join(r, "in1k_names.txt"), "--templates", "simple", "--resolution", "64"],
                        "top1"),
        "places365": (["classify", *m, "--data-root", data["places365"]["root"], "--dataset", "places365", "--templates",
                       "simple", "--resolution", "64"], "top5"),
        "folder": (["classify", "--teacher", "clip", "--clip-model", models["clip_name"], "--data-root",
                    data["folder"]["root"], "--dataset", "folder", "--templates", "simple"], "top1"),
        "csv": (["classify", *m, "--data-root", data["csv"]["root"], "--dataset", "csv", "--class-names",
                 data["csv"]["class_names"], "--templates", "simple", "--resolution", "64", "--workers", "2"], "top1"),
        "voc": (["semantic", *m, "--data-root", os.path.join(r, "VOCdevkit"), "--dataset", "voc", *sem], "mIoU"),
        "voc-composed": (["semantic", *m, "--data-root", os.path.join(r, "VOCdevkit"), "--dataset", "voc", "--mode",
                          "composed", "--templates", "simple"], "mIoU"),
        "pascal-context": (["semantic", *m, "--data-root", os.path.join(r, "VOCdevkit"), "--dataset", "pascal-context",
                            *sem], "mIoU"),
        "ade20k": (["semantic", *m, "--data-root", r, "--dataset", "ade20k", *sem], "mIoU"),
        "coco-stuff": (["semantic", *m, "--data-root", data["coco-stuff"]["root"], "--dataset", "coco-stuff", *sem], "mIoU"),
        "coco-panoptic": (["semantic", *m, "--data-root", data["coco-panoptic"]["root"], "--dataset", "coco-panoptic",
                           *sem], "mIoU"),
        "coco": (["instances", *m, "--data-root", data["coco"]["root"], "--dataset", "coco", "--detections",
                  data["coco"]["detections"]], "AP"),
        "coco-sam": (["instances", "--teacher", "sam", "--sam-checkpoint", models["sam_path"], "--sam-type", "vit_tiny",
                      "--data-root", data["coco"]["root"], "--dataset", "coco", "--detections", data["coco"]["detections"]],
                     "AP"),
        "lvis": (["instances", *m, "--data-root", data["lvis"]["root"], "--dataset", "lvis"], "APr"),
        "flickr30k": (["retrieval", *m, "--data-root", data["flickr30k"]["root"], "--dataset", "flickr30k",
                       "--resolution", "64"], "R@1"),
        "coco-retrieval": (["retrieval", *m, "--data-root", data["coco-retrieval"]["root"], "--dataset", "coco",
                            "--resolution", "64"], "t2i_R@10"),
    }


CASES = ("imagenet", "imagenet-v2", "places365", "folder", "csv", "voc", "voc-composed", "pascal-context", "ade20k",
         "coco-stuff", "coco-panoptic", "coco", "coco-sam", "lvis", "flickr30k", "coco-retrieval")


def test_the_dataset_choices_are_the_readers():
    assert DATASETS["semantic"] == tuple(SEMANTIC_DATASETS)


@pytest.mark.parametrize("case", CASES)
def test_end_to_end_on_each_layout(case, data, models, tmp_path, capsys):
    if case == "imagenet-v2":
        with open(os.path.join(data["root"], "in1k_names.txt"), "w") as f:
            f.write("\n".join(f"class {i}" for i in range(1000)))
    argv, key = _cases(data, models)[case]
    out_json = tmp_path / "results.json"
    rc, out, err = _run(capsys, ["eval", *argv, "--out", str(out_json), *FAST])
    assert rc == 0, err
    assert out.startswith("| eval ") and "| this run (" in out and "results written to" in out
    text = out_json.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rep = json.loads(text)
    assert key in rep["metrics"] and rep["images"]["evaluated"] > 0 and rep["images"]["skipped"] == 0
    assert rep["dataset"] == argv[argv.index("--dataset") + 1] and rep["world_size"] == 1
    assert rep["model"]["sha256"] and len(rep["model"]["sha256"]) == 64
    assert rep["split"] and "resolution" in rep and "mode" in rep
    if rep["paper"]:
        assert "(paper)" in out and "SAM-CLIP" in rep["paper_citation"]
    # Never overwritten without --overwrite.
    rc, _, err = _run(capsys, ["eval", *argv, "--out", str(out_json), *FAST])
    assert rc == 2 and "exists already; pass --overwrite" in err and err.count("\n") == 1


def test_predictions_saved_and_corrupt_images_listed(data, models, tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(data["coco"]["root"], root)
    (root / "val2017" / "000000000002.jpg").write_bytes(b"truncated")
    rc, out, err = _run(capsys, ["eval", "instances", "--checkpoint", models["merged"], "--data-root", str(root),
                                 "--dataset", "coco", "--out", str(tmp_path / "r.json"), "--save-predictions",
                                 str(tmp_path / "pred"), *FAST])
    assert rc == 0, err
    assert "skipped 1 unreadable image(s)" in err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["images"] == {"evaluated": 2, "skipped": 1, "skipped_files": [
        {"file": str(root / "val2017" / "000000000002.jpg"), "reason": rep["images"]["skipped_files"][0]["reason"]}]}
    results = json.loads((tmp_path / "pred" / "coco_val_segm_results.json").read_text())
    assert results and {r["image_id"] for r in results} == {1, 3}
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "score"}
    assert rep["metrics"]["boxes"] == "ground truth" and "not comparable" in out


def _bad_inputs(data, models, tmp):
    m = ["--checkpoint", models["merged"]]
    voc = os.path.join(data["root"], "VOCdevkit")
    big = tmp / "VOC2012"
    shutil.copytree(data["voc"]["root"], big)
    from PIL import Image

    label = big / "SegmentationClass" / (data["voc"]["val"][1] + ".png")
    im = Image.open(label)
    im.resize((im.width + 3, im.height)).save(label)
    dets = json.loads(open(data["coco"]["detections"]).read())
    dets[0]["image_id"] = 777
    (tmp / "other.json").write_text(json.dumps(dets))
    (tmp / "empty" / "val").mkdir(parents=True)
    return [
        (["semantic", *m, "--data-root", voc, "--dataset", "voc", "--split", "test"],
         "ImageSets/Segmentation/test.txt: split file not found"),
        (["semantic", *m, "--data-root", str(big), "--dataset", "voc", "--templates", "simple", "--resolution", "64"],
         f"{label}: label map is"),
        (["semantic", *m, "--data-root", voc, "--dataset", "ade20k"], "is not an ADE20K folder"),
        (["instances", *m, "--data-root", data["coco"]["root"], "--dataset", "coco", "--detections",
          str(tmp / "other.json")], "a detections file for another image set"),
        (["classify", *m, "--data-root", str(tmp / "empty"), "--dataset", "folder"], "has no class folders"),
        (["semantic", "--teacher", "sam", "--sam-checkpoint", models["sam_path"], "--sam-type", "vit_tiny",
          "--data-root", voc, "--dataset", "voc"], "the SAM teacher cannot run `eval semantic`"),
        (["instances", "--teacher", "clip", "--clip-model", models["clip_name"], "--data-root", data["coco"]["root"],
          "--dataset", "coco"], "the CLIP teacher cannot run `eval instances`"),
        (["instances", "--teacher", "sam", "--sam-checkpoint", models["sam_path"], "--data-root", data["coco"]["root"],
          "--dataset", "coco"], "is a SAM vit_tiny checkpoint but model type 'vit_b' was asked for"),
        (["classify", "--data-root", data["folder"]["root"], "--dataset", "folder"], "give --checkpoint"),
        (["semantic", *m, "--data-root", voc, "--dataset", "voc", "--mode", "composed", "--resolution", "448"],
         "--mode composed runs at the model's native 128 px"),
        (["retrieval", "--teacher", "clip", "--clip-model", models["clip_name"], "--data-root",
          data["flickr30k"]["root"], "--dataset", "flickr30k", "--resolution", "224"], "the CLIP teacher runs at its own 64 px"),
    ]


def test_bad_input_is_one_line_and_exit_2(data, models, tmp_path, capsys):
    for argv, expected in _bad_inputs(data, models, tmp_path):
        rc, out, err = _run(capsys, ["eval", *argv, *FAST])
        assert rc == 2, (argv, err)
        assert expected in err, (expected, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"eval {argv[0]}: ")


def test_limit_and_the_progress_bar_in_images_per_second(data, models, tmp_path, capsys):
    rc, out, err = _run(capsys, ["eval", "semantic", "--checkpoint", models["merged"], "--data-root",
                                 os.path.join(data["root"], "VOCdevkit"), "--dataset", "voc", "--templates", "simple",
                                 "--resolution", "64", "--limit", "2", "--batch-size", "1", "--workers", "0",
                                 "--out", str(tmp_path / "r.json")])
    assert rc == 0, err
    assert "img/s" in err and "semantic voc" in err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["images"]["evaluated"] == 2 and rep["images_per_second"] > 0
