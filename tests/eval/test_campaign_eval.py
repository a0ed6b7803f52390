"""The bad-input campaign, kept: evaluation's cases. An annotation whose category is not in the
file's categories dropped out of AP without a word; numbers out of range ran anyway."""

import json

import pytest

from fastsamclip.cli import main

pytest.importorskip("pycocotools", reason="instances needs pycocotools (extra 'eval'); CI installs it")


def one_line(capsys, rc, *matches):
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("eval ") and "Traceback" not in err, err
    for m in matches:
        assert m in err, err


def test_an_annotation_of_an_unknown_category_is_refused_naming_the_file(models, data, tmp_path, capsys):
    ann = json.load(open(data["coco"]["annotations"]))
    ann["annotations"][0]["category_id"] = 999
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(ann))
    rc = main(["eval", "instances", "--checkpoint", models["merged"], "--data-root", data["coco"]["root"],
               "--dataset", "coco", "--annotations", str(path), "--no-progress"])
    one_line(capsys, rc, str(path), "category id(s) [999] are not in its 'categories'")


@pytest.mark.parametrize("task, dataset, flags, match", [
    ("semantic", "voc", ["--workers", "-1"], "--workers -1"),
    ("semantic", "voc", ["--mode", "composed", "--threshold", "nan"], "--threshold nan"),
    ("semantic", "voc", ["--background-threshold", "2"], "--background-threshold 2.0"),
    ("retrieval", "flickr30k", ["--captions-per-image", "-1"], "--captions-per-image -1"),
    ("classify", "imagenet", ["--clip-token-pool", "0"], "--clip-token-pool 0"),
])
def test_numbers_out_of_range_are_refused_before_the_model_loads(models, data, capsys, monkeypatch, task, dataset,
                                                                 flags, match):
    import fastsamclip.cli.evaluate as evaluate

    monkeypatch.setattr(evaluate, "build_model", lambda *a: pytest.fail("the model loaded before the check"))
    root = data[dataset]["root"] if isinstance(data[dataset], dict) else data[dataset]
    rc = main(["eval", task, "--checkpoint", models["merged"], "--data-root", root, "--dataset", dataset, *flags,
               "--no-progress"])
    one_line(capsys, rc, match)
