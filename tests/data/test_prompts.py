"""Box and point prompts drawn from masks."""


import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("pycocotools")

from fastsamclip import data as D  # noqa: E402

from .conftest import check_boxes_contain, check_points_on  # noqa: E402

# pycocotools' own decode trips numpy 2's copy-keyword deprecation on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Prompt sampling
# ---------------------------------------------------------------------------------------------


def test_prompt_sampling_boxes_points_and_limits(masks):
    ms = masks["coffee"]
    assert len(ms) > 32  # so that the cap is exercised
    cfg = D.PromptConfig(box_jitter=0.0, points_per_mask=3)
    p = D.sample_prompts(ms, cfg, np.random.default_rng(0))
    assert len(p.indices) == 32 and len(set(p.indices.tolist())) == 32
    assert p.boxes.shape == (32, 4) and p.points.shape == (32, 3, 2) and (p.point_labels == 1).all()
    check_boxes_contain(ms[p.indices], p.boxes, tight=True)
    check_points_on(ms[p.indices], p.points)
    # Fewer masks than the cap: all of them.
    few = D.sample_prompts(ms[:5], cfg, np.random.default_rng(0))
    assert few.indices.tolist() == [0, 1, 2, 3, 4]
    # Matches SAM's own mask-to-box helper.
    from segment_anything.utils.amg import batched_mask_to_box
    ref = batched_mask_to_box(torch.from_numpy(ms[p.indices])).numpy()
    np.testing.assert_array_equal(p.boxes, ref)


def test_prompt_sampling_reproducible(masks):
    ms = masks["rocket"]
    cfg = D.PromptConfig()
    a = D.sample_prompts(ms, cfg, np.random.default_rng(7))
    b = D.sample_prompts(ms, cfg, np.random.default_rng(7))
    c = D.sample_prompts(ms, cfg, np.random.default_rng(8))
    for f in ("indices", "boxes", "points"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.boxes, c.boxes)


def test_box_jitter_bounded_and_clamped(masks):
    ms = masks["astronaut"]
    h, w = ms.shape[1:]
    cfg = D.PromptConfig(masks_per_image=1000, box_jitter=0.1, box_jitter_max_px=20.0)
    p = D.sample_prompts(ms, cfg, np.random.default_rng(1))
    tight = D.masks_to_boxes(ms)
    side = np.tile(np.stack([tight[:, 2] - tight[:, 0] + 1, tight[:, 3] - tight[:, 1] + 1], 1), 2)
    bound = np.minimum(0.1 * side, 20.0) + 1e-4
    assert (np.abs(p.boxes - tight) <= bound).all()
    assert (p.boxes != tight).any()  # the jitter did something
    assert (p.boxes[:, 0::2] >= 0).all() and (p.boxes[:, 0::2] <= w - 1).all()
    assert (p.boxes[:, 1::2] >= 0).all() and (p.boxes[:, 1::2] <= h - 1).all()
    assert (p.boxes[:, 2:] >= p.boxes[:, :2]).all()


def test_points_uniform_over_mask_pixels():
    m = np.zeros((1, 9, 11), bool)
    m[0, [1, 1, 4, 7, 8, 8], [2, 9, 5, 0, 3, 10]] = True  # 6 scattered pixels
    p = D.sample_prompts(m, D.PromptConfig(points_per_mask=1200), np.random.default_rng(0))
    xs, ys = p.points[0, :, 0].astype(int), p.points[0, :, 1].astype(int)
    assert m[0, ys, xs].all()
    counts = np.unique(ys * 11 + xs, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 140 and counts.max() < 260  # ~200 each


