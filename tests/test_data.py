"""Data pipeline tests on real pictures (skimage.data) written in the real on-disk formats."""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("webdataset")
pytest.importorskip("pycocotools")

from fastsamclip import data as D  # noqa: E402

# pycocotools' own decode trips numpy 2's copy-keyword deprecation on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Shared fixtures: small real images, their masks, and corrupt files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    # 160 px keeps the whole file fast while leaving masks with hundreds of pixels.
    return D.load_sample_images(max_side=160)


@pytest.fixture(scope="module")
def masks(images):
    return {n: D.synthetic_masks(a) for n, a in list(images.items())[:5]}


def _jpeg(a, quality=95):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corrupt(images):
    """Bytes that must be skipped: a truncated jpeg and garbage that is no image at all."""
    good = _jpeg(images["coffee"])
    return {"truncated": good[: len(good) // 2], "garbage": os.urandom(3000)}


def _mean_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


# ---------------------------------------------------------------------------------------------
# D_CLIP: WebDataset shards
# ---------------------------------------------------------------------------------------------


def test_clip_shards_roundtrip_with_brace_spec(tmp_path, images):
    pics = list(images.values())[:10]
    paths = D.write_clip_shards(tmp_path, pics, shard_size=4)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"]  # 5 + 1 digits at 4/shard
    meta = json.loads(tarfile.open(paths[0]).extractfile("000000.json").read())
    assert meta["status"] == "success" and meta["width"] == pics[0].shape[1]

    ds = D.ClipWebDataset(str(tmp_path / "{00000..00002}.tar"), shuffle_shards=False)
    got = list(ds)
    assert len(got) == 10 and not ds.skipped
    assert got[4][0] == "000010"
    for (key, im), a in zip(got, pics):
        assert im.mode == "RGB" and im.size == (a.shape[1], a.shape[0])
        assert _mean_abs(im, a) < 4.0, key  # JPEG q95 is near-lossless


def test_img2dataset_key_width_for_default_shard_size(tmp_path, images):
    path = D.write_clip_shards(tmp_path, [images["rocket"]], shard_size=10000)[0]
    assert tarfile.open(path).getnames()[0] == "000000000.jpg"


def test_clip_shards_skip_and_count_corrupt_samples(tmp_path, images, corrupt, caplog):
    a = list(images.values())
    items = [a[0], corrupt["truncated"], a[1], corrupt["garbage"], None, a[2], corrupt["garbage"], a[3]]
    D.write_clip_shards(tmp_path, items, shard_size=100)
    ds = D.ClipWebDataset(str(tmp_path / "{00000..00000}.tar"))
    with caplog.at_level(logging.WARNING, logger="fastsamclip.data"):
        got = list(ds)
    assert [k for k, _ in got] == ["0000000", "0000002", "0000005", "0000007"]
    assert ds.skipped == {"decode_error": 3, "missing_image": 1}
    # One warning per kind, however many samples of that kind.
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("(decode_error" in m for m in msgs) == 1
    assert sum("(missing_image" in m for m in msgs) == 1
    assert any("running count: 1" in m for m in msgs)


def test_clip_shards_truncated_tar_is_counted_not_fatal(tmp_path, images):
    pics = list(images.values())[:9]
    paths = D.write_clip_shards(tmp_path, pics, shard_size=3)
    raw = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:  # cut inside the second member's data
        f.write(raw[:1500])
    ds = D.ClipWebDataset(str(tmp_path / "{00000..00002}.tar"), shuffle_shards=False)
    keys = [k for k, _ in ds]
    assert keys[:3] == ["000000", "000001", "000002"] and keys[-3:] == ["000020", "000021", "000022"]
    assert len(keys) < 9 and sum(ds.skipped.values()) >= 1


def test_shard_spec_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match=r"nowhere/\{00000\.\.00009\}\.tar"):
        D.ClipWebDataset(str(tmp_path / "nowhere/{00000..00009}.tar"))
    # Partly missing: the existing shards are kept.
    D.write_clip_shards(tmp_path, [images["astronaut"]], shard_size=10)
    assert D.expand_shard_spec(str(tmp_path / "{00000..00004}.tar")) == [str(tmp_path / "00000.tar")]


def test_shards_without_a_readable_sample_fail_at_construction(tmp_path, corrupt):
    D.write_clip_shards(tmp_path, [corrupt["garbage"], corrupt["truncated"], None], shard_size=10)
    spec = str(tmp_path / "{00000..00000}.tar")
    with pytest.raises(RuntimeError, match="none of the first 3 samples could be read") as e:
        D.ClipWebDataset(spec)
    assert spec in str(e.value)


def test_shards_split_disjointly_across_ranks(tmp_path, images):
    pics = list(images.values())[:10]
    D.write_clip_shards(tmp_path, pics, shard_size=2)  # 5 shards
    spec = str(tmp_path / "{00000..00004}.tar")
    per_rank = [[k for k, _ in D.ClipWebDataset(spec, rank=r, world_size=2, seed=3)] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 10
    with pytest.raises(ValueError, match="every rank needs at least one shard"):
        D.ClipWebDataset(spec, rank=0, world_size=6)


# ---------------------------------------------------------------------------------------------
# D_CLIP: image folder
# ---------------------------------------------------------------------------------------------


def test_image_folder_recursive_with_corrupt_files(tmp_path, images, corrupt):
    pics = list(images.values())[:7]
    D.write_image_folder(tmp_path, pics, per_subfolder=3)
    D.write_image_folder(tmp_path / "deep" / "er", [pics[0]], ext=".png")
    D.write_image_folder(tmp_path / "bad", [corrupt["truncated"], corrupt["garbage"]])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.ClipImageFolder(tmp_path)
    assert len(ds) == 10  # 7 + 1 png + 2 corrupt .jpg; the .txt is not listed
    got = [ds[i] for i in range(len(ds))]
    assert sum(g is None for g in got) == 2 and ds.skipped == {"decode_error": 2}
    keys = {g[0] for g in got if g is not None}
    assert "part_1/000003" in keys and os.path.join("deep", "er", "000000") in keys
    k, im = ds[ds.files.index(str(tmp_path / "part_0" / "000001.jpg"))]
    assert _mean_abs(im, pics[1]) < 4.0
    good = next(i for i, g in enumerate(got) if g is not None)
    assert ds[(good, 64)][2] == 64  # the (index, resolution) form carries the resolution
    bad = [ds[(i, 48)] for i, g in enumerate(got) if g is None]
    assert [b[1:] for b in bad] == [(None, 48), (None, 48)]
    assert D.collate_clip(bad).shape == (0, 3, 48, 48)  # all unreadable: empty, not an error
    batch = D.collate_clip(got, resolution=64)
    assert batch.shape == (8, 3, 64, 64) and batch.dtype == torch.float32


def test_image_folder_errors(tmp_path, corrupt):
    with pytest.raises(FileNotFoundError, match="no file with an image extension"):
        D.ClipImageFolder(tmp_path)
    D.write_image_folder(tmp_path, [corrupt["garbage"]] * 3)
    with pytest.raises(RuntimeError, match=str(tmp_path)):
        D.ClipImageFolder(tmp_path)


# ---------------------------------------------------------------------------------------------
# D_SAM: SA-1B
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def sa1b(tmp_path, images, masks):
    pairs = [(images[n], masks[n]) for n in masks]
    stems = D.write_sa1b(tmp_path, pairs)
    return tmp_path, stems, pairs


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
    good = D.encode_rle(m)
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
        assert _mean_abs(raw.image, img) < 4.0
        assert len(raw.masks) == min(32, len(ms))
        first_id = json.load(open(root / f"{stems[i]}.json"))["annotations"][0]["id"]
        for m, aid in zip(raw.masks, raw.annotation_ids):
            np.testing.assert_array_equal(m, ms[aid - first_id])  # ids are consecutive per file
        p = raw.prompts
        _check_boxes_contain(raw.masks[p.indices], p.boxes, tight=True)
        _check_points_on(raw.masks[p.indices], p.points)
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
    batch = D.collate_sam(items)
    assert batch["keys"] == ["sa_4", "sa_5"]


def test_sa1b_without_masks_fails_at_construction(tmp_path, images):
    D.write_sa1b(tmp_path, [(images["chelsea"], np.zeros((0,) + images["chelsea"].shape[:2], bool))] * 3)
    with pytest.raises(RuntimeError, match="at least one decodable mask") as e:
        D.SA1BDataset(tmp_path)
    assert str(tmp_path) in str(e.value) and "no_masks" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no sa_"):
        D.SA1BDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.SA1BDataset(tmp_path / "nothing_here")


def test_sa1b_item_and_collate(sa1b):
    from segment_anything.utils.transforms import ResizeLongestSide

    root, stems, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=8), seed=5)
    item, raw = ds[1], ds.load_raw(1)
    h, w = raw.image.shape[:2]
    t = ResizeLongestSide(1024)
    assert item["image"].shape == (3, 1024, 1024)
    assert item["original_size"] == (h, w) and item["input_size"] == t.get_preprocess_shape(h, w, 1024)
    np.testing.assert_allclose(item["boxes"].numpy(), t.apply_boxes(raw.prompts.boxes, (h, w)), rtol=1e-6)
    np.testing.assert_allclose(item["points"].numpy(), t.apply_coords(raw.prompts.points, (h, w)), rtol=1e-6)
    assert item["gt_masks"].shape == (8, 256, 256)
    small = D.SA1BDataset(root, D.PromptConfig(masks_per_image=8), seed=5)
    small_item = small[0]
    batch = D.collate_sam([small_item, None, item])
    assert batch["image"].shape == (2, 3, 1024, 1024) and batch["boxes"].shape == (2, 8, 4)
    assert batch["points"].shape == (2, 8, 1, 2) and batch["gt_masks"].shape == (2, 8, 256, 256)
    assert batch["original_size"].tolist() == [list(small_item["original_size"]), [h, w]]
    # A drawn subset is reproducible for (seed, epoch) and changes with the epoch.
    again = D.SA1BDataset(root, D.PromptConfig(masks_per_image=8), seed=5)
    assert torch.equal(again[1]["boxes"], item["boxes"])
    again.set_epoch(1)
    assert not torch.equal(again[1]["boxes"], item["boxes"])


def test_collate_sam_pads_unequal_mask_counts(sa1b):
    root, _, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=64))
    a = ds[0]
    b = dict(a, gt_masks=a["gt_masks"][:3], boxes=a["boxes"][:3], points=a["points"][:3],
             point_labels=a["point_labels"][:3])
    batch = D.collate_sam([a, b])
    m = a["gt_masks"].shape[0]
    assert batch["mask_valid"].sum(1).tolist() == [m, 3]
    assert (batch["point_labels"][1, 3:] == -1).all() and (batch["gt_masks"][1, 3:] == 0).all()
    assert torch.equal(batch["boxes"][0], a["boxes"])


# ---------------------------------------------------------------------------------------------
# Prompt sampling
# ---------------------------------------------------------------------------------------------


def _check_boxes_contain(masks, boxes, tight):
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        ys, xs = np.nonzero(m)
        assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
        if tight:
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def _check_points_on(masks, points):
    for m, pts in zip(masks, points):
        for x, y in pts:
            assert x == int(x) and y == int(y) and m[int(y), int(x)]


def test_prompt_sampling_boxes_points_and_limits(masks):
    ms = masks["coffee"]
    assert len(ms) > 32  # so that the cap is exercised
    cfg = D.PromptConfig(box_jitter=0.0, points_per_mask=3)
    p = D.sample_prompts(ms, cfg, np.random.default_rng(0))
    assert len(p.indices) == 32 and len(set(p.indices.tolist())) == 32
    assert p.boxes.shape == (32, 4) and p.points.shape == (32, 3, 2) and (p.point_labels == 1).all()
    _check_boxes_contain(ms[p.indices], p.boxes, tight=True)
    _check_points_on(ms[p.indices], p.points)
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


# ---------------------------------------------------------------------------------------------
# Coordinates and preprocessing against segment_anything / torchvision
# ---------------------------------------------------------------------------------------------

ODD_SIZES = [(160, 107), (97, 1025), (1500, 2250), (333, 333), (64, 1000)]


@pytest.mark.parametrize("hw", ODD_SIZES)
def test_coordinate_mapping_matches_resize_longest_side(hw):
    from segment_anything.utils.transforms import ResizeLongestSide

    t = ResizeLongestSide(1024)
    h, w = hw
    assert D.get_preprocess_shape(h, w) == t.get_preprocess_shape(h, w, 1024)
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, [w, h], size=(5, 3, 2))
    boxes = rng.uniform(0, [w, h, w, h], size=(7, 4))
    np.testing.assert_array_equal(D.apply_coords(coords, hw), t.apply_coords(coords, hw))
    np.testing.assert_array_equal(D.apply_boxes(boxes, hw), t.apply_boxes(boxes, hw))
    ct = torch.from_numpy(coords).float()
    assert torch.equal(D.apply_coords(ct, hw), t.apply_coords_torch(ct, hw))
    bt = torch.from_numpy(boxes).float()
    assert torch.equal(D.apply_boxes(bt, hw), t.apply_boxes_torch(bt, hw))


@pytest.mark.parametrize("name", ["chelsea", "page"])
def test_sam_image_preprocessing_matches_segment_anything(name, images):
    from segment_anything.utils.transforms import ResizeLongestSide

    a = images[name]
    ref = ResizeLongestSide(1024).apply_image(a)
    mean = torch.tensor(D.SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(D.SAM_PIXEL_STD).view(3, 1, 1)
    ref_t = (torch.from_numpy(ref).permute(2, 0, 1).float() - mean) / std
    for inp in (a, torch.from_numpy(a), Image.fromarray(a)):
        x, (h, w) = D.preprocess_sam_image(inp)
        assert x.shape == (3, 1024, 1024) and (h, w) == ref.shape[:2]
        assert torch.equal(x[:, :h, :w], ref_t)
        assert (x[:, h:, :] == 0).all() and (x[:, :, w:] == 0).all()


@pytest.mark.parametrize("res", [224, 448, 97])
def test_clip_preprocessing_matches_torchvision_clip_transform(res, images):
    import torchvision.transforms as T
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # an independent source

    ref_tf = T.Compose([T.Resize(res, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(res),
                        T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    a = images["rocket"]
    ref = ref_tf(Image.fromarray(a))
    for inp in (a, torch.from_numpy(a)):
        x = D.preprocess_clip_image(inp, res)
        assert x.shape == (3, res, res) and x.dtype == torch.float32
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        D.preprocess_clip_image(a.astype(np.float32), res)


def test_lowres_masks_follow_sam_decoder_frame(masks, images):
    ms = masks["coffee"]  # 107 x 160 image -> 171 x 256 valid block of the 256 grid
    h, w = ms.shape[1:]
    low = D.masks_to_lowres(ms)
    nh, nw = D.get_preprocess_shape(h, w, 256)
    assert low.shape == (len(ms), 256, 256) and set(low.unique().tolist()) <= {0.0, 1.0}
    assert (low[:, nh:] == 0).all() and (low[:, :, nw:] == 0).all()
    # Back to the original frame as Sam.postprocess_masks does (upsample to 1024, crop the
    # input size, resize to the original): agrees with the mask it came from.
    ih, iw = D.get_preprocess_shape(h, w)
    up = torch.nn.functional.interpolate(low[:, None], (1024, 1024), mode="bilinear", align_corners=False)
    up = up[..., :ih, :iw]
    back = torch.nn.functional.interpolate(up, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
    m = torch.from_numpy(ms)
    big = m.flatten(1).sum(1) > 400
    iou = (back & m).flatten(1).sum(1) / (back | m).flatten(1).sum(1)
    assert iou[big].min() > 0.85, iou[big].min()


# ---------------------------------------------------------------------------------------------
# Multi-resolution sampler (map-style) and batcher (streams)
# ---------------------------------------------------------------------------------------------


def test_batch_sizes_keep_pixels_per_batch_constant():
    cfg = D.MultiResolutionConfig(base_batch=256)
    assert (cfg.batch_size(224), cfg.batch_size(448)) == (256, 64)
    odd = D.MultiResolutionConfig(base_batch=10, base_res=224)
    assert odd.batch_size(336) == 4 and odd.batch_size(300) == 5  # floor(4.44), floor(5.58)
    assert odd.batch_size(4480) == 1  # at least 1


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


def test_sampler_batches_resolutions_and_determinism():
    cfg = D.MultiResolutionConfig(resolutions=(224, 448), base_batch=16, seed=3)
    s = D.MultiResolutionBatchSampler(1000, cfg)
    e0 = _epoch(s, 0)
    assert len(e0) == len(s)
    res = [b[0][1] for b in e0]
    assert {224, 448} == set(res)
    for b in e0:
        assert len({r for _, r in b}) == 1 and len(b) == cfg.batch_size(b[0][1])
    flat = [i for b in e0 for i, _ in b]
    assert len(flat) == len(set(flat)) and max(flat) < 1000  # no repeats within an epoch
    assert _epoch(D.MultiResolutionBatchSampler(1000, cfg), 0) == e0
    assert _epoch(s, 1) != e0
    other_seed = D.MultiResolutionConfig(resolutions=(224, 448), base_batch=16, seed=4)
    assert _epoch(D.MultiResolutionBatchSampler(1000, other_seed), 0) != e0


def test_sampler_ddp_ranks_disjoint_and_in_step():
    cfg = D.MultiResolutionConfig(base_batch=12, seed=1)
    world = 3
    ranks = [_epoch(D.MultiResolutionBatchSampler(500, cfg, rank=r, world_size=world), 2)
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1
    seen = set()
    for step in zip(*ranks):
        assert len({b[0][1] for b in step}) == 1  # same resolution on every rank
        assert len({len(b) for b in step}) == 1
        for b in step:
            idx = {i for i, _ in b}
            assert not idx & seen
            seen |= idx
    # Without drop_last every sample is seen once (plus wrap-around padding on the last step).
    cfg2 = D.MultiResolutionConfig(base_batch=12, seed=1, drop_last=False)
    allr = [_epoch(D.MultiResolutionBatchSampler(500, cfg2, rank=r, world_size=world), 0)
            for r in range(world)]
    covered = {i for r in allr for b in r for i, _ in b}
    assert covered == set(range(500))


def test_sampler_exact_resume_mid_epoch():
    cfg = D.MultiResolutionConfig(base_batch=8, seed=11)
    full = _epoch(D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2), 4)
    s = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    s.set_epoch(4)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 4 and state["batch_index"] == 5
    r = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    r.load_state_dict(state)
    r.set_epoch(4)  # the training loop's set_epoch on the same epoch keeps the position
    assert head + list(r) == full
    # A position given by the training loop (the DataLoader prefetches ahead of it).
    r2 = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    r2.load_state_dict(s.state_dict(batches_done=3))
    assert list(r2) == full[3:]
    # The next epoch starts from its beginning.
    r.set_epoch(5)
    assert list(r) == _epoch(D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2), 5)
    with pytest.raises(ValueError, match="world_size"):
        D.MultiResolutionBatchSampler(300, cfg, rank=0, world_size=4).load_state_dict(state)


def test_sampler_drives_dataloader_with_folder(tmp_path, images):
    D.write_image_folder(tmp_path, list(images.values()) * 2)
    ds = D.ClipImageFolder(tmp_path)
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=D.MultiResolutionBatchSampler(len(ds), cfg),
                                         collate_fn=D.collate_clip)
    shapes = [tuple(x.shape) for x in loader]
    assert shapes and all(s in {(8, 3, 32, 32), (2, 3, 64, 64)} for s in shapes)


@pytest.fixture()
def stream_shards(tmp_path, images, corrupt):
    # Small pictures: the batcher's cost is in decoding and resizing, not what is tested here.
    pics = list(D.load_sample_images(max_side=48).values()) * 4
    pics[5] = corrupt["garbage"]
    D.write_clip_shards(tmp_path, pics, shard_size=8)  # 48 samples, 6 shards
    return str(tmp_path / "{00000..00005}.tar")


def _run(batcher, limit=None):
    out = []
    for b in batcher:
        out.append((b.batch_index, b.resolution, tuple(b.keys), b.images.sum().item()))
        assert b.images.shape == (len(b.keys), 3, b.resolution, b.resolution)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("buffer", [0, 10])
def test_batcher_variable_batches_and_exact_resume(stream_shards, buffer):
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=2, drop_last=False)
    make = lambda: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(stream_shards, seed=9, shuffle_buffer=buffer), cfg)
    b = make()
    b.set_epoch(1)
    full = _run(b)
    assert {r for _, r, _, _ in full} == {32, 64}
    sizes = {r: {len(k) for _, rr, k, _ in full[:-1] if rr == r} for r in (32, 64)}
    assert sizes[64] == {2} and sizes[32] <= {7, 8}  # 7: the batch that held the corrupt sample
    keys = [k for _, _, ks, _ in full for k in ks]
    assert len(keys) == 47 and len(set(keys)) == 47 and b.source.skipped == {"decode_error": 1}
    # Interrupt after 4 batches, checkpoint, resume in a fresh object.
    first = make()
    first.set_epoch(1)
    head = _run(first, limit=4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert head + _run(resumed) == full
    # A different epoch is a different order.
    other = make()
    other.set_epoch(2)
    assert [k for _, _, k, _ in _run(other)] != [k for _, _, k, _ in full]


def _loader_run(batcher, limit=None, mark=False):
    """Batches through a 2-worker DataLoader, as (index, r, keys, pixel sum) rows."""
    loader = torch.utils.data.DataLoader(batcher, batch_size=None, num_workers=2)
    out = []
    for b in loader:
        out.append((b.batch_index, b.resolution, tuple(b.keys), b.images.sum().item()))
        if mark:
            batcher.mark_consumed(b)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("per_epoch", [None, 9])
def test_batcher_with_dataloader_workers_resumes_exactly(stream_shards, per_epoch):
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=4, drop_last=False)
    make = lambda: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(stream_shards, seed=1), cfg, batches_per_epoch=per_epoch)
    # Without batches_per_epoch the order of the batches after the first worker's stream ends
    # follows the DataLoader's scheduling: compare in batch-index order then.
    canon = (lambda rows: rows) if per_epoch else sorted  # noqa: E731
    full = canon(_loader_run(make()))
    if per_epoch is None:
        assert len({k for k, _, _, _ in full}) == len(full)  # every batch index once
        keys = [k for _, _, ks, _ in full for k in ks]
        assert len(keys) == 47 and len(set(keys)) == 47  # the two workers read disjoint shards
    else:
        assert [k for k, _, _, _ in full] == list(range(per_epoch))  # in batch-index order
    # Batch k's resolution is the one drawn for k, whichever worker made it.
    assert all(r == cfg.draw_resolution(0, k) and len(ks) <= cfg.batch_size(r) for k, r, ks, _ in full)
    assert canon(_loader_run(make())) == canon(full)  # same workers, same batches
    first = make()
    head = _loader_run(first, limit=5, mark=True)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["num_workers"] == 2 and state["positions"][0][1] == 3 and state["positions"][1][1] == 2
    resumed = make()
    resumed.load_state_dict(state)
    assert canon(head + _loader_run(resumed)) == full
    # The shard split depends on the worker count: resuming with another one is refused.
    other = make()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved position is for 2 DataLoader worker"):
        next(iter(other))


def test_batcher_batches_per_epoch_keeps_ddp_ranks_in_step(tmp_path):
    pics = list(D.load_sample_images(max_side=40).values())
    D.write_clip_shards(tmp_path, pics * 2, shard_size=5)  # 24 samples: shards of 5, 5, 5, 5, 4
    spec = str(tmp_path / "{00000..00004}.tar")
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=4, base_res=32, seed=6)
    make = lambda rank: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(spec, rank=rank, world_size=2, seed=2, shuffle_buffer=4), cfg, batches_per_epoch=9)
    runs = [_run(make(r)) for r in range(2)]
    # Rank 0 has 3 shards, rank 1 two, yet both run 9 steps at the same resolutions: their
    # streams start another pass over their own shards when they run out.
    assert [len(r) for r in runs] == [9, 9]
    drawn = [(k, cfg.draw_resolution(0, k)) for k in range(9)]
    assert [x[:2] for x in runs[0]] == [x[:2] for x in runs[1]] == drawn
    keys = [{k for _, _, ks, _ in r for k in ks} for r in runs]
    assert not keys[0] & keys[1]
    assert sum(len(x[2]) for x in runs[1]) > 10  # rank 1 (10 samples) wrapped around
    # Resume across the wrap-around point.
    first = make(1)
    head = _run(first, limit=6)
    resumed = make(1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + _run(resumed) == runs[1]
    with pytest.raises(ValueError, match="batches_per_epoch"):
        D.MultiResolutionBatcher(make(1).source, cfg).load_state_dict(first.state_dict())


def test_shard_spec_list_and_remote_urls(tmp_path, images):
    D.write_clip_shards(tmp_path / "a", [images["coins"]] * 3, shard_size=1)
    D.write_clip_shards(tmp_path / "b", [images["camera"]], shard_size=1)
    got = D.expand_shard_spec([str(tmp_path / "a" / "{00000..00002}.tar"), str(tmp_path / "b" / "00000.tar")])
    want = [str(tmp_path / "a" / f"0000{i}.tar") for i in range(3)] + [str(tmp_path / "b" / "00000.tar")]
    assert got == want
    # Remote shards cannot be checked for existence here and are kept as given.
    assert D.expand_shard_spec("s3://bucket/cc3m/{00000..00001}.tar") == [
        "s3://bucket/cc3m/00000.tar", "s3://bucket/cc3m/00001.tar"]


def test_normalisation_constants_are_the_teachers(images):
    import inspect

    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from segment_anything.modeling import Sam

    sig = inspect.signature(Sam.__init__).parameters
    assert list(D.SAM_PIXEL_MEAN) == sig["pixel_mean"].default
    assert list(D.SAM_PIXEL_STD) == sig["pixel_std"].default
    assert D.OPENAI_CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and D.OPENAI_CLIP_STD == tuple(OPENAI_DATASET_STD)


@pytest.mark.parametrize("size", [128, 1024])
def test_demo_sam_input_is_the_data_preprocessing(size, images):
    from segment_anything.utils.transforms import ResizeLongestSide

    from fastsamclip.demo import sam_input

    a = images["astronaut"][:150]  # not square: the padding is exercised
    x, (h, w) = sam_input(a, size)
    ref = ResizeLongestSide(size).apply_image(a)
    assert x.shape == (1, 3, size, size) and (h, w) == ref.shape[:2]
    ref_t = (torch.from_numpy(ref).permute(2, 0, 1).float() - torch.tensor(D.SAM_PIXEL_MEAN).view(3, 1, 1)) \
        / torch.tensor(D.SAM_PIXEL_STD).view(3, 1, 1)
    assert torch.equal(x[0, :, :h, :w], ref_t) and (x[0, :, h:] == 0).all() and (x[0, :, :, w:] == 0).all()
    assert torch.equal(x[0], D.preprocess_sam_image(a, size)[0])


def test_sa1b_through_dataloader_workers(sa1b):
    # The readers (and their skip counters) are pickled into worker processes.
    root, _, pairs = sa1b
    ds = D.SA1BDataset(root, D.PromptConfig(masks_per_image=4))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=D.collate_sam)
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == len(pairs)
    assert all(b["gt_masks"].shape[1:] == (4, 256, 256) for b in batches)
    assert torch.equal(batches[0]["boxes"][0], ds[0]["boxes"])  # same draw in a worker as here
