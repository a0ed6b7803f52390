"""`fastsamclip predict` as people use it: --everything with names, prompts of several points and
a box, many images where one is bad, inputs of the same name, overlays of very large pictures."""

import json
import os
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from fastsamclip.checkpoint import save_merged
from fastsamclip.cli import main
from fastsamclip.cli.predict import parse_prompt, unique_stems
from fastsamclip.data.samples import sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.draw import _blend, draw_named_masks, draw_overlay
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor

EVERYTHING = ["--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
              "--box-nms-thresh", "1.0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_predict")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam.pth"), "vit_tiny"), "vit_tiny")
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    merged = str(d / "merged.safetensors")
    save_merged(samclip_from_teachers(sam, clip, sam_config="vit_tiny"), merged)
    img = d / "coffee.png"
    Image.fromarray(sample_image("coffee")).resize((120, 90)).save(img)
    return {"dir": d, "merged": merged, "image": str(img), "predictor": SAMCLIPPredictor(merged, device="cpu")}


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(open(path).read(), parse_constant=refuse)


def _decode(rle):
    pycoco = pytest.importorskip("pycocotools.mask")
    return pycoco.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_everything_with_labels_writes_named_coco_rle_masks_and_an_overlay(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", setup["image"], "--checkpoint", setup["merged"], "--everything", "--labels",
               "cup, table,spoon", *EVERYTHING, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {"coffee.json", "coffee_everything.png"} <= set(os.listdir(out))
    rep = _strict_json(out / "coffee.json")
    ev = rep["everything"]
    assert ev["output_mode"] == "coco_rle" and ev["labels"] == ["cup", "table", "spoon"]
    assert ev["params"]["points_per_side"] == 6 and "classification" not in rep
    p = setup["predictor"]
    want = p.generate(np.asarray(Image.open(setup["image"])), labels=["cup", "table", "spoon"], points_per_side=6,
                      pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0)
    assert len(ev["masks"]) == len(want) > 10
    for got, ref in zip(ev["masks"], want):
        assert np.array_equal(_decode(got["segmentation"]), ref["segmentation"])
        assert got["label"] == ref["label"] and got["area"] == ref["area"] and got["bbox"] == ref["bbox"]
        assert abs(sum(got["label_probs"].values()) - 1) < 1e-5
    assert rep["timings_ms"]["everything"] > 0


def test_a_prompt_of_several_points_and_a_box_with_points(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", setup["image"], "--checkpoint", setup["merged"], "--points", "60,45,1;100,60,0", "30,20",
               "--boxes", "5,5,100,80;60,45,1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rep = _strict_json(out / "coffee.json")
    kinds = [(q["kind"], q["points"], q["point_labels"], q["box"], len(q["scores"])) for q in rep["prompts"]]
    assert kinds == [("point", [[60, 45], [100, 60]], [1, 0], None, 1),  # not ambiguous: one mask
                     ("point", [[30, 20]], [1], None, 3),  # one point: SAM's three, the best kept
                     ("box", [[60, 45]], [1], [5, 5, 100, 80], 1)]
    p = setup["predictor"]
    p.set_image(setup["image"])
    m, _, _ = p.segment(points=[[[60, 45], [100, 60]]], point_labels=[[1, 0]], multimask_output=False)
    assert np.array_equal(np.asarray(Image.open(out / "coffee_point0.png")) > 0, m[0, 0])
    m, _, _ = p.segment(points=[[[60, 45]]], point_labels=[[1]], boxes=[[5, 5, 100, 80]], multimask_output=False)
    assert np.array_equal(np.asarray(Image.open(out / "coffee_box0.png")) > 0, m[0, 0])
    assert os.path.exists(out / "coffee_overlay.png")


def test_many_images_go_on_past_one_that_does_not_fit_and_exit_2(setup, tmp_path, capsys):
    small, broken = tmp_path / "small.png", tmp_path / "broken.jpg"
    Image.fromarray(sample_image("coffee")).resize((60, 40)).save(small)
    broken.write_bytes(b"not a picture")
    out = tmp_path / "out"
    rc = main(["predict", str(small), setup["image"], str(broken), "--checkpoint", setup["merged"],
               "--points", "100,60", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 3 and all(line.startswith("predict: ") for line in err), err
    assert str(small) in err[0] and "outside the image of 60x40" in err[0]
    assert str(broken) in err[1] and "cannot read image" in err[1]
    assert "2 of 3 images failed" in err[2]
    names = set(os.listdir(out))
    assert {"coffee.json", "coffee_point0.png", "coffee_overlay.png"} <= names
    assert not any(n.startswith(("small", "broken")) for n in names), names  # nothing half-written


def test_inputs_with_the_same_file_name_keep_their_own_outputs(setup, tmp_path, capsys):
    paths = []
    for folder, name in (("a", "coffee"), ("b", "chelsea")):
        (tmp_path / folder).mkdir()
        paths.append(str(tmp_path / folder / "pic.png"))
        Image.fromarray(sample_image(name)).resize((80, 60)).save(paths[-1])
    out = tmp_path / "out"
    assert main(["predict", *paths, "--checkpoint", setup["merged"], "--points", "40,30", "--out", str(out)]) == 0
    assert _strict_json(out / "pic.json")["image"] == paths[0]
    assert _strict_json(out / "pic-2.json")["image"] == paths[1]
    a, b = (np.asarray(Image.open(out / f)) for f in ("pic_point0.png", "pic-2_point0.png"))
    assert a.shape == b.shape == (60, 80)
    assert unique_stems(["x/p.png", "y/p.jpg", "p-2.png", "z/p.png"]) == ["p", "p-3", "p-2", "p-4"]


@pytest.mark.parametrize("text, kind, match", [
    ("1;1", "point", "expected 2 comma-separated numbers"),
    ("1,2,3", "point", "label must be 1 \\(foreground\\) or 0"),
    ("1,2,3", "box", "expected 4 comma-separated numbers"),
    ("1,2,3,4;5", "box", "expected 2 comma-separated numbers"),
    (" ; ", "point", "is empty"),
])
def test_bad_prompts_are_one_line_errors(setup, tmp_path, capsys, text, kind, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(text, kind)
    rc = main(["predict", setup["image"], "--checkpoint", setup["merged"], {"point": "--points", "box": "--boxes"}[kind], text,
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("predict: ") and err.count("\n") == 1, err
    assert parse_prompt("10,10,200,150;120,80,1;60,40,0", "box") == {
        "points": [[120, 80], [60, 40]], "labels": [1, 0], "box": [10, 10, 200, 150]}


def test_bad_everything_parameters_fail_before_any_image(setup, tmp_path, capsys):
    rc = main(["predict", setup["image"], "--checkpoint", setup["merged"], "--everything", "--points-per-side", "0",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "points_per_side must be >= 1" in err and err.count("\n") == 1, err


def test_overlay_of_a_very_large_picture_is_drawn_downscaled(tmp_path):
    pytest.importorskip("matplotlib")
    h, w = 7000, 9000
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :, 1] = 90
    big = np.zeros((h, w), bool)
    big[1000:6000, 1000:8000] = True
    small = np.zeros((h, w), bool)
    small[2000:3000, 2000:4000] = True
    tracemalloc.start()
    t0 = time.perf_counter()
    path = draw_overlay(image, [big, small], ["box 0", "point 0"], str(tmp_path / "o.png"),
                        prompts=[{"name": "box 0", "box": (1000, 1000, 8000, 6000)},
                                 {"name": "point 0", "points": [(3000, 2500, 1), (7000, 5000, 0)]}])
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert path and seconds < 15, seconds  # 29 s and GBs when drawn at full size
    assert peak < 300 * 2**20, peak / 2**20  # the picture alone is 189 MB; nothing near it is copied
    assert max(Image.open(path).size) <= 1600
    named = draw_named_masks(image, [big, small], ["table", None], str(tmp_path / "e.png"))
    assert named and max(Image.open(named).size) <= 1600


def test_overlapping_masks_keep_their_outlines():
    image = np.full((20, 20, 3), 100, np.uint8)
    outer = np.zeros((20, 20), bool)
    outer[2:18, 2:18] = True
    inner = np.zeros((20, 20), bool)
    inner[6:12, 6:12] = True
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    out = _blend(image, [inner, outer], [blue, red])
    assert tuple(out[6, 8]) == (0, 0, 255)  # the inner mask's outline, inside the outer mask
    assert tuple(out[2, 8]) == (255, 0, 0)  # the outer mask's outline
    assert tuple(out[8, 8]) != tuple(out[14, 14])  # inside the inner mask: both fills, not the outer's alone
