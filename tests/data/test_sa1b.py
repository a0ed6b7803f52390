"""D_SAM: the SA-1B layout, COCO RLE, skip accounting, model inputs."""

import json
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("pycocotools")

from fastsamclip import data as D  # noqa: E402
from fastsamclip.data import samples as S  # noqa: E402

from .conftest import check_boxes_contain, check_points_on, mean_abs  # noqa: E402

# pycocotools' own decode trips numpy 2's copy-keyword deprecation on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_sa1b_files_and_rle_roundtrip(sa1b):
    from pycocotools import mask as mask_utils

    root, stems, pairs = sa1b
    assert stems == [f"sa_{i}" for i in range(1, len(pairs) + 1)]
    for stem, (img, ms) in zip(stems, pairs):
        meta = json.load(open(root / f"{stem}.json"))
        h, w = img.shape[:2]
        assert meta["image"] == {"image_id": int(stem[3:]), "width": w, "height": h,
                                 "file_name": f"{stem}.jpg"}
        assert len(meta["annotations"]) == len(ms)
        for ann, m in zip(meta["annotations"], ms):
            assert isinstance(ann["segmentation"]["counts"], str)
            dec = D.decode_rle(ann["segmentation"], (h, w))
            np.testing.assert_array_equal(dec, m)
            np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), m)
            assert ann["area"] == int(m.sum())
            x, y, bw, bh = ann["bbox"]
            ys, xs = np.nonzero(m)
            assert (x, y, bw, bh) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            px, py = ann["point_coords"][0]
            assert m[int(py), int(px)]
            assert ann["crop_box"] == [0, 0, w, h] and 0 < ann["predicted_iou"] <= 1


def test_rle_parser_rejects_malformed_counts():
    m = np.zeros((7, 9), bool)
    m[2:5, 3:8] = True
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    good = {"size": [7, 9], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(D.decode_rle(good, (7, 9)), m)
    for bad, why in [("", "empty"), ("zzzz", "alphabet"), (good["counts"] + "R", "truncated"),
                     (good["counts"][:-1], "sum")]:
        with pytest.raises(ValueError, match=why):
            D.decode_rle({"size": [7, 9], "counts": bad})
    with pytest.raises(ValueError, match="differs from the image size"):
        D.decode_rle(good, (9, 7))


def test_sa1b_reader_masks_and_prompts(sa1b):
    root, stems, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=32, box_jitter=0.0, points_per_mask=2))
    assert len(ds) == len(pairs)
    for i, (img, ms) in enumerate(pairs):
        raw = ds.load_raw(i)
        assert raw.key == stems[i] and raw.image.shape == img.shape
        assert mean_abs(raw.image, img) < 4.0
        assert len(raw.masks) == min(32, len(ms))
        first_id = json.load(open(root / f"{stems[i]}.json"))["annotations"][0]["id"]
        for m, aid in zip(raw.masks, raw.annotation_ids):
            np.testing.assert_array_equal(m, ms[aid - first_id])  # ids are consecutive per file
        p = raw.prompts
        check_boxes_contain(raw.masks[p.indices], p.boxes, tight=True)
        check_points_on(raw.masks[p.indices], p.points)
    assert not ds.skipped


def test_sa1b_skips_and_counts_corrupt_samples(sa1b, corrupt, caplog):
    root, stems, pairs = sa1b
    img, ms = pairs[0]
    # sa_1: no annotations; sa_2: not json; sa_3: truncated jpg; sa_4: two bad RLEs among good
    meta = json.load(open(root / "sa_1.json"))
    meta["annotations"] = []
    json.dump(meta, open(root / "sa_1.json", "w"))
    (root / "sa_2.json").write_text('{"image": {"image_id": 2, "annotations": [')
    (root / "sa_3.jpg").write_bytes(corrupt["truncated"])
    meta = json.load(open(root / "sa_4.json"))
    n_ann = len(meta["annotations"])
    meta["annotations"][0]["segmentation"]["counts"] = "not an RLE!"
    meta["annotations"][1]["segmentation"]["counts"] = meta["annotations"][1]["segmentation"]["counts"][:-2]
    json.dump(meta, open(root / "sa_4.json", "w"))
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=64))
    with caplog.at_level(logging.WARNING, logger="fastsamclip.data"):
        items = [ds[i] for i in range(len(ds))]
    assert items[0] is None and items[1] is None and items[2] is None
    assert items[3] is not None and items[3]["gt_masks"].shape[0] == n_ann - 2
    assert items[4] is not None
    assert ds.skipped == {"no_masks": 1, "bad_json": 1, "decode_error": 1, "bad_rle": 2}
    assert sum("(bad_rle" in r.getMessage() for r in caplog.records) == 1
    assert [it["key"] for it in items if it is not None] == ["sa_4", "sa_5"]


def test_sa1b_without_masks_fails_at_construction(tmp_path, images):
    S.write_sa1b(tmp_path, [(images["chelsea"], np.zeros((0,) + images["chelsea"].shape[:2], bool))] * 3)
    with pytest.raises(D.DataError, match="at least one decodable mask") as e:
        D.SA1BDataset(tmp_path)
    assert str(tmp_path) in str(e.value) and "no_masks" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no sa_"):
        D.SA1BDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.SA1BDataset(tmp_path / "nothing_here")


def test_sa1b_item_is_the_model_input(sa1b):
    from segment_anything.utils.transforms import ResizeLongestSide

    root, stems, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=8), seed=5)
    item, raw = ds[1], ds.load_raw(1)
    h, w = raw.image.shape[:2]
    t = ResizeLongestSide(1024)
    assert item["image"].shape == (3, 1024, 1024) and item["image"].dtype == torch.uint8
    ih, iw = item["input_size"]
    assert torch.equal(item["image"][:, :ih, :iw], torch.from_numpy(t.apply_image(raw.image)).permute(2, 0, 1))
    assert not item["image"][:, ih:].any() and not item["image"][:, :, iw:].any()
    assert item["original_size"] == (h, w) and item["input_size"] == t.get_preprocess_shape(h, w, 1024)
    np.testing.assert_allclose(item["boxes"].numpy(), t.apply_boxes(raw.prompts.boxes, (h, w)), rtol=1e-6)
    np.testing.assert_allclose(item["points"].numpy(), t.apply_coords(raw.prompts.points, (h, w)), rtol=1e-6)
    assert item["gt_masks"].shape == (8, 256, 256)
    assert item["boxes"].shape == (8, 4) and item["points"].shape == (8, 1, 2)
    # A drawn subset is reproducible for (seed, epoch) and changes with the epoch.
    again = D.SA1BDataset(root, D.PromptConfig(masks_per_image=8), seed=5)
    assert torch.equal(again[1]["boxes"], item["boxes"])
    again.set_epoch(1)
    assert not torch.equal(again[1]["boxes"], item["boxes"])


def test_sa1b_through_dataloader_workers(sa1b):
    # The readers (and their skip counters) are pickled into worker processes.
    root, _, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=4))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=list)
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(pairs)
    assert all(it["gt_masks"].shape[1:] == (256, 256) for b in batches for it in b)
    assert torch.equal(batches[0][0]["boxes"], ds[0]["boxes"])  # same draw in a worker as here
