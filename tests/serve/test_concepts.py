"""``POST /v1/concepts``: a validated task answered from the batch's shared backbone pass with what
``SAMCLIPPredictor.segment_text`` gives; bad phrases and parameters are a 422 with the reason,
decided before the request joins a batch. (The live HTTP round trip is in test_server.py, on its
running server.)"""

import io

import pytest
from PIL import Image

from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.serve import Engine, Geometry, Limits, RequestError, make_task
from fastsamclip.serve.app import TASKS, Endpoints
from fastsamclip.serve.requests import TASK_FIELDS

from .test_server import decode_rle

PHRASES = ["a cat", "grass"]
OFF = {"threshold": 0.0, "score_threshold": 0.0, "max_peaks": 4}  # random weights: every peak scored


@pytest.fixture(scope="module")
def setup(micro):
    predictor = SAMCLIPPredictor(micro["merged"], device="cpu", dtype="fp32")
    buf = io.BytesIO()
    Image.fromarray(micro["image"]).save(buf, "PNG")
    geometry = Geometry(img_size=predictor.img_size, patch_size=predictor.patch_size)
    return {"p": predictor, "png": buf.getvalue(), "image": micro["image"], "geometry": geometry}


def test_the_answer_is_segment_texts_from_the_shared_pass(setup):
    p, png, geo = setup["p"], setup["png"], setup["geometry"]
    tasks = [make_task("segment", {"image": png, "boxes": [[2, 3, 40, 30]]}, Limits(), geo),
             make_task("concepts", {"image": png, "phrases": PHRASES, **OFF}, Limits(), geo)]
    answer = Engine(p).run(tasks)[1]
    assert answer["batch"]["backbone_batch"] == 2  # the concepts request rode the segment request's pass
    assert not p.is_image_set  # the worker's predictor holds no request's image afterwards
    body = answer["result"]
    want = p.segment_text(setup["image"], PHRASES, output_mode="coco_rle", **OFF)
    assert body["phrases"] == PHRASES and body["count"] == len(body["instances"]) == len(want) > 2
    assert body["counts"] == {ph: sum(r["phrase"] == ph for r in want) for ph in PHRASES}
    for got, ref in zip(body["instances"], want):
        assert got["phrase"] == ref["phrase"] and got["prompt"] == ref["prompt"]
        assert (decode_rle(got["segmentation"]) != decode_rle(ref["segmentation"])).mean() < 1e-3
        assert got["score"] == pytest.approx(ref["score"], abs=1e-4)


def test_a_kept_image_answers_concepts_without_a_pass(setup):
    """The page's "every instance of..." box sends the id POST /v1/image returned: the same answer
    as with the image itself, from the kept pass."""
    p, png, geo = setup["p"], setup["png"], setup["geometry"]
    engine = Engine(p)
    kept = engine.run([make_task("image", {"image": png}, Limits(), geo)])[0]["result"]
    by_id = engine.run([make_task("concepts", {"image_id": kept["image_id"], "phrases": PHRASES, **OFF}, Limits(),
                                  geo, {kept["image_id"]: tuple(kept["size"])})])[0]
    by_image = engine.run([make_task("concepts", {"image": png, "phrases": PHRASES, **OFF}, Limits(), geo)])[0]
    assert by_id["batch"]["pass"] == "kept" and by_id["result"]["count"] == by_image["result"]["count"] > 2
    for got, ref in zip(by_id["result"]["instances"], by_image["result"]["instances"]):
        assert got["phrase"] == ref["phrase"] and got["segmentation"] == ref["segmentation"]
        assert got["score"] == pytest.approx(ref["score"], abs=1e-5)


@pytest.mark.parametrize("fields, match", [
    ({}, "missing field 'phrases'"),
    ({"phrases": []}, "the list is empty"),
    ({"phrases": ["a cat", ""]}, r"\[1\] is empty"),
    ({"phrases": [f"thing {i}" for i in range(10_000)]}, "10000 phrases in one call"),
    ({"phrases": [1, 2]}, "must be a string, got int"),
    ({"phrases": {"a": 1}}, "got dict"),
    ({"phrases": 5}, "got int"),
    ({"phrases": ["a cat"], "threshold": 2}, r"field 'threshold' must be in \[0, 1\], got 2"),
    ({"phrases": ["a cat"], "nms_thresh": "half"}, "field 'nms_thresh' must be a finite number"),
    ({"phrases": ["a cat"], "max_peaks": 10**6}, "'max_peaks' must be in 1..256"),
    ({"phrases": ["a cat"], "box_prompts": "yes"}, "box_prompts must be true or false"),
    ({"phrases": ["a cat"], "background": []}, "background must name"),
    ({"phrases": ["a cat"], "templates": "mine"}, "'templates' must be"),
    ({"phrases": ["a cat"], "phrase": "a dog"}, r"unknown field\(s\) \['phrase'\]")])
def test_bad_phrases_and_parameters_are_422_before_batching(setup, fields, match):
    with pytest.raises(RequestError, match=match) as e:
        make_task("concepts", {"image": setup["png"], **fields}, Limits(), setup["geometry"])
    assert e.value.status == 422


def test_the_route_and_its_defaults_are_the_predictors():
    assert "concepts" in TASKS and callable(getattr(Endpoints, "post_concepts"))
    spec = TASK_FIELDS["concepts"]
    assert spec["threshold"] == 0.5 and spec["background"] == ("background",) and "output_mode" not in spec
