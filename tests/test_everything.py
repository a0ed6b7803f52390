"""``SAMCLIPPredictor.generate``: equal to segment_anything's SamAutomaticMaskGenerator on the same
SAM weights, one backbone pass per crop, and every mask named from that pass."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import mask_to_rle_pytorch, remove_small_regions
from skimage.measure import label as connected_components

from fastsamclip.data.samples import sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.predictor.everything import (
    EverythingParams,
    _coco_counts_string,
    _small_regions_mask,
    coco_rle,
    mask_patch_weights,
    name_masks,
)

LABELS = ["cat", "dog", "grass"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("everything")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam.pth"), "vit_tiny"), "vit_tiny")
    # Random ConvTranspose weights upsample with a 4 x 4 checkerboard, so every random mask is a
    # texture spanning the whole image, all boxes are the image and NMS keeps one mask. The same
    # kernel at every tap (nearest-neighbour upsampling) gives masks made of patch blocks, boxes
    # of many sizes, and NMS with work to do. Both generators get these same weights.
    with torch.no_grad():
        for i in (0, 3):
            w = sam.mask_decoder.output_upscaling[i].weight
            w.copy_(w[:, :, :1, :1].expand_as(w))
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    predictor = SAMCLIPPredictor(samclip_from_teachers(sam, clip, sam_config="vit_tiny"), device="cpu")
    image = np.asarray(Image.fromarray(sample_image("chelsea")).resize((150, 100), Image.BILINEAR))
    return {"sam": sam, "predictor": predictor, "image": image}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# Random tiny weights predict IoUs within about +-0.3 and logits within +-0.1: the thresholds
# are set where they drop some masks and keep many, so no comparison is vacuous.
THRESH = dict(pred_iou_thresh=0.05, stability_score_thresh=0.1, stability_score_offset=0.02)
CASES = {
    "filters, no suppression": (dict(THRESH, box_nms_thresh=1.0), 20),
    "box nms, odd batches": (dict(box_nms_thresh=0.95, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                  points_per_batch=7), 3),
    "crop layer": (dict(box_nms_thresh=0.95, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1,
                        crop_nms_thresh=1.0,
                        crop_n_points_downscale_factor=2), 3),
    "coco rle": (dict(THRESH, box_nms_thresh=1.0, output_mode="coco_rle"), 20),
    "point grids": (dict(THRESH, box_nms_thresh=1.0, points_per_side=None,
                         point_grids=[np.random.default_rng(0).uniform(0.05, 0.95, (40, 2))]), 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_sam_automatic_mask_generator(setup, case):
    params, at_least = CASES[case]
    params = {"points_per_side": 8, **params}
    ref = SamAutomaticMaskGenerator(setup["sam"], **params).generate(setup["image"])
    out = setup["predictor"].generate(setup["image"], **params)
    assert len(out) == len(ref) >= at_least, (len(out), len(ref))
    n_points = 64 if params["points_per_side"] else 40
    assert len(ref) < 3 * n_points  # a filter or NMS dropped some: the parameters are not all-pass
    for i, (a, b) in enumerate(zip(out, ref)):
        assert set(a) == set(b), set(a) ^ set(b)
        if params.get("output_mode") == "coco_rle":
            assert a["segmentation"] == b["segmentation"], i  # the same RLE string
        else:
            assert _iou(a["segmentation"], b["segmentation"]) >= 0.99, i
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5, i
        assert abs(a["stability_score"] - b["stability_score"]) < 1e-3, i
        assert abs(a["area"] - b["area"]) <= 0.01 * b["area"], i
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1, i
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-9)
        assert list(a["crop_box"]) == [int(v) for v in b["crop_box"]], i


def test_uncompressed_rle_is_upstreams_encoding(setup):
    p = setup["predictor"]
    kw = dict(points_per_side=6, **THRESH, box_nms_thresh=1.0)
    binary = p.generate(setup["image"], **kw)
    rle = p.generate(setup["image"], output_mode="uncompressed_rle", **kw)
    assert len(rle) == len(binary) > 5
    expect = mask_to_rle_pytorch(torch.as_tensor(np.stack([r["segmentation"] for r in binary])))
    assert [r["segmentation"] for r in rle] == expect
    assert [r["area"] for r in rle] == [int(r["segmentation"].sum()) for r in binary]


def test_backbone_runs_once_per_crop_and_not_again_for_the_current_image(setup, monkeypatch):
    p = setup["predictor"]
    enc = p.model.image_encoder
    calls = []
    original = enc.forward_features
    monkeypatch.setattr(enc, "forward_features", lambda x: calls.append(tuple(x.shape)) or original(x))
    p.generate(setup["image"], labels=LABELS, points_per_side=4, points_per_batch=5, crop_n_layers=1, **THRESH)
    assert len(calls) == 5  # the image and its 4 crops, one pass each; masks AND names from it
    calls.clear()
    p.set_image(setup["image"])
    assert len(calls) == 1
    named = p.generate(labels=LABELS, points_per_side=4, **THRESH, box_nms_thresh=1.0)
    assert len(calls) == 1 and named  # generate() reuses the pass of set_image
    again = p.generate(setup["image"], labels=LABELS, points_per_side=4, **THRESH, box_nms_thresh=1.0)
    assert [r["label_probs"] for r in named] == [r["label_probs"] for r in again]
    assert p.is_image_set and p.original_size == setup["image"].shape[:2]  # its image state is intact


def test_every_mask_is_named_with_probabilities_over_all_labels(setup):
    p = setup["predictor"]
    recs = p.generate(setup["image"], labels=LABELS, points_per_side=6, **THRESH, box_nms_thresh=1.0)
    assert len(recs) > 5
    for r in recs:
        assert r["label"] in LABELS and set(r["label_probs"]) == set(LABELS)
        assert abs(sum(r["label_probs"].values()) - 1) < 1e-5
        assert r["label_score"] == max(r["label_probs"].values()) == r["label_probs"][r["label"]]
        assert -1 <= r["label_similarity"] <= 1
    # The "other" threshold: above every best probability, no mask is named; the rest stays.
    other = p.generate(setup["image"], labels=LABELS, label_threshold=1.01, points_per_side=6, **THRESH,
                       box_nms_thresh=1.0)
    assert [r["label"] for r in other] == [None] * len(recs)
    assert [r["label_score"] for r in other] == [r["label_score"] for r in recs]
    # Text embeddings are computed once per label set.
    assert all((lab, "openai") in p.text._cache for lab in LABELS)


def test_pooling_weights_patches_by_the_fraction_inside_the_mask():
    g, e = 4, 8
    low = torch.full((3, 4 * g, 4 * g), -1.0)
    low[0, :, : 2 * g] = 1.0  # left half
    low[1, :4, :4] = 1.0  # exactly patch (0, 0)
    low[1, :2, 4:8] = 1.0  # half of patch (0, 1)
    low[2, -4:, -4:] = 1.0  # only in the padding: no cell inside the image
    w = mask_patch_weights(low, (g, g), valid_lowres=(4 * g - 4, 4 * g - 4))
    # The last patch row is outside the valid cells (12 of 16): it never counts.
    assert torch.equal(w[0].view(g, g)[:, :2], torch.tensor([[1.0, 1.0]] * 3 + [[0.0, 0.0]]))
    assert w[0].view(g, g)[:, 2:].sum() == 0
    assert w[1].view(g, g)[0, 0] == 1 and w[1].view(g, g)[0, 1] == 0.5 and w[1].sum() == 1.5
    assert w[2].sum() > 0 and torch.all(w[2] < 0.5)  # soft fallback: sigmoid of -1 over the image
    # Patches of the left half carry label 0's text, of the right half label 1's (times a norm,
    # which the unit normalisation removes): the left mask is label 0, near certainly.
    text = torch.nn.functional.normalize(torch.randn(2, e), dim=-1)
    patches = torch.empty(g, g, e)
    patches[:, :2] = 5 * text[0]
    patches[:, 2:] = 0.1 * text[1]
    probs, cos = name_masks(w[:1], patches, text, logit_scale=100.0)
    assert probs[0].argmax() == 0 and probs[0, 0] > 0.99 and abs(cos[0, 0] - 1) < 1e-5


def test_small_regions_rule_without_opencv_is_upstreams():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:13, 10:13] = False  # a 9-pixel hole
    mask[35:37, 35:37] = True  # a 4-pixel island
    filled, changed = _small_regions_mask(mask, 10, "holes")
    assert changed and filled[10:13, 10:13].all()
    cleaned, changed = _small_regions_mask(filled, 10, "islands")
    assert changed and not cleaned[35:, 35:].any() and cleaned[5:30, 5:30].all()
    assert not _small_regions_mask(cleaned, 10, "islands")[1]
    try:
        import cv2  # noqa: F401  optional: compare with upstream's own where it is installed
    except ImportError:
        return
    for mode in ("holes", "islands"):
        ours, ch = _small_regions_mask(mask, 10, mode)
        theirs, ch2 = remove_small_regions(mask, 10, mode)
        assert ch == ch2 and np.array_equal(ours, theirs)


def test_min_mask_region_area_leaves_no_small_hole_or_island(setup):
    recs = setup["predictor"].generate(setup["image"], points_per_side=4, **THRESH, box_nms_thresh=1.0,
                                       min_mask_region_area=60)
    assert recs
    for r in recs:
        m = r["segmentation"]
        holes = np.bincount(connected_components(~m, connectivity=2, background=0).ravel())[1:]
        islands = np.bincount(connected_components(m, connectivity=2, background=0).ravel())[1:]
        assert (holes >= 60).all()
        assert (islands >= 60).all() or len(islands) == 1  # all small: upstream keeps the largest
        assert r["area"] == int(m.sum())


def test_coco_rle_strings_equal_pycocotools():
    pycoco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) > 0.6, np.zeros((9, 7), bool), np.ones((300, 200), bool)]
    blob = np.zeros((64, 64), bool)
    blob[10:50, 3:60] = True
    masks.append(blob)
    for m in masks:
        rle = mask_to_rle_pytorch(torch.as_tensor(m)[None])[0]
        want = pycoco.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        assert _coco_counts_string(rle["counts"]) == want
        assert coco_rle(rle)["counts"] == want and coco_rle(rle)["size"] == list(m.shape)


def test_bad_parameters_are_clear_errors(setup):
    p = setup["predictor"]
    with pytest.raises(TypeError, match="unknown parameters \\['points_per_sides'\\]"):
        p.generate(setup["image"], points_per_sides=4)
    with pytest.raises(ValueError, match="exactly one of points_per_side or point_grids"):
        p.generate(setup["image"], point_grids=[np.array([[0.5, 0.5]])])
    with pytest.raises(ValueError, match="output_mode must be one of"):
        p.generate(setup["image"], output_mode="png")
    with pytest.raises(ValueError, match="crop_n_layers=1 needs 2"):
        p.generate(setup["image"], points_per_side=None, point_grids=[np.array([[0.5, 0.5]])], crop_n_layers=1)
    with pytest.raises(ValueError, match="points_per_batch must be >= 1"):
        EverythingParams(points_per_batch=0).grids()
    fresh = SAMCLIPPredictor(p.model, device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.generate()
    with pytest.raises(TypeError, match="list of class names"):
        p.generate(setup["image"], labels="cat,dog")
    copy.deepcopy(EverythingParams())  # plain data
