"""The metrics, exact by construction: hand-computed cases, an oracle, an independent implementation."""

import json
import math

import numpy as np
import pytest
import torch

from fastsamclip.files import finite_or_none, write_json
from fastsamclip.eval.metrics import (ConfusionMatrix, best_rank_of_positives, per_class_accuracy, stable_ranks,
                                      topk_accuracy)


def test_hand_built_case_with_ignore_pixels_an_absent_class_and_unlabelled_predictions():
    # 4 classes; class 3 is neither in the ground truth nor predicted (absent: left out of mIoU).
    gt = np.array([[0, 0, 1, 1],
                   [0, 255, 1, 2],
                   [2, 2, 255, 2]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, -1, 2],      # (1,1) ignored whatever is predicted; (1,2) gt 1 left unlabelled
                     [2, 0, 1, -1]])      # (2,2) ignored; (2,3) gt 2 unlabelled
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    s = cm.scores(["a", "b", "c", "d"])
    # class 0: gt pixels (0,0),(0,1),(1,0) -> TP 2 ((0,0),(1,0)); FP: (2,1) -> 1; FN: (0,1) -> 1 => 2/4
    # class 1: gt (0,2),(0,3),(1,2) -> TP 2; FN 1 (unlabelled); FP (0,1) -> 1 => 2/4
    # class 2: gt (1,3),(2,0),(2,1),(2,3) -> TP 2 ((1,3),(2,0)); FN 2 ((2,1) predicted 0, (2,3) unlabelled); FP 0 => 2/4
    assert s["per_class_IoU"] == {"a": 50.0, "b": 50.0, "c": 50.0, "d": None}
    assert s["mIoU"] == 50.0
    assert s["classes_present"] == 3
    assert s["labelled_pixels"] == 10
    assert s["pixel_accuracy"] == 60.0  # 6 right of the 10 labelled pixels
    assert s["per_class_accuracy"] == {"a": 200 / 3, "b": 200 / 3, "c": 50.0, "d": None}


def test_a_class_only_predicted_counts_with_iou_zero():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 2]]), np.array([[0, 0]]))
    s = cm.scores()
    assert s["per_class_IoU"] == {"0": 50.0, "1": None, "2": 0.0}
    assert s["mIoU"] == 25.0


def test_oracle_gives_100_and_counts_add_up_across_images():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(5)
    for _ in range(3):
        gt = rng.integers(0, 5, (7, 9))
        gt[rng.random(gt.shape) < 0.2] = 255
        cm.update(np.where(gt == 255, 0, gt), gt)
    s = cm.scores()
    assert s["mIoU"] == 100.0 and s["pixel_accuracy"] == 100.0


def test_out_of_range_values_are_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([[0]]), np.array([[3]]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([[5]]), np.array([[0]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_agrees_with_torchmetrics_multiclass_jaccard_on_random_label_maps():
    tm = pytest.importorskip("torchmetrics", reason="torchmetrics (the test extra) is the independent implementation")
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(1)
    c = 6
    ours = ConfusionMatrix(c)
    theirs = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="none")
    for _ in range(4):
        gt = rng.integers(0, c - 1, (13, 17))  # class c-1 never in the ground truth ...
        gt[rng.random(gt.shape) < 0.15] = 255
        noise = rng.integers(0, c - 1, gt.shape)  # ... nor predicted: absent
        pred = np.where((rng.random(gt.shape) < 0.5) & (gt != 255), gt, noise)  # right about half the time
        ours.update(pred, gt)
        theirs.update(torch.from_numpy(pred), torch.from_numpy(gt))
    ref = theirs.compute().double() * 100
    s = ours.scores()
    for k in range(c - 1):
        assert math.isclose(s["per_class_IoU"][str(k)], float(ref[k]), rel_tol=1e-6), (k, s["per_class_IoU"], ref)
    assert s["per_class_IoU"][str(c - 1)] is None
    assert math.isclose(s["mIoU"], float(ref[: c - 1].mean()), rel_tol=1e-6)
    assert tm  # imported


def test_stable_ranks_resolve_ties_to_the_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1],
                           [0.2, 0.2, 0.2, 0.2],
                           [0.3, 0.1, 0.7, 0.7]])
    assert stable_ranks(scores, torch.tensor([2, 3, 0])).tolist() == [1, 3, 2]
    assert stable_ranks(scores, torch.tensor([1, 0, 3])).tolist() == [0, 0, 1]


def test_best_rank_of_positives_takes_any_positive():
    scores = torch.tensor([[0.1, 0.8, 0.3, 0.8]])
    pos = torch.tensor([[True, False, False, True]])
    assert best_rank_of_positives(scores, pos).tolist() == [1]  # index 3 ties index 1, which comes first


def test_topk_and_per_class_accuracy_with_a_class_without_images():
    ranks, labels = [0, 2, 0, 7], [0, 0, 1, 1]
    assert topk_accuracy(ranks, (1, 5)) == {1: 50.0, 5: 75.0}
    assert per_class_accuracy(ranks, labels, 3) == [50.0, 50.0, None]


def test_json_never_holds_nan_or_infinity(tmp_path):
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2.5)}
    assert finite_or_none(value) == {"a": None, "b": [1.0, None], "c": 2.5}
    path = tmp_path / "r.json"
    write_json(str(path), value)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2.5}
