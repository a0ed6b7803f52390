"""D_CLIP readers: img2dataset WebDataset shards and image folders, on real pictures."""

import json
import logging
import os
import tarfile

import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("pycocotools")

from fastsamclip import data as D  # noqa: E402
from fastsamclip.data import samples as S  # noqa: E402

from .conftest import mean_abs  # noqa: E402

# pycocotools' own decode trips numpy 2's copy-keyword deprecation on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# D_CLIP: WebDataset shards
# ---------------------------------------------------------------------------------------------


def test_clip_shards_roundtrip_with_brace_spec(tmp_path, images):
    pics = list(images.values())[:10]
    paths = S.write_clip_shards(tmp_path, pics, shard_size=4)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000.jpg", "000000.txt", "000000.json"]  # 5 + 1 digits at 4/shard
    meta = json.loads(tarfile.open(paths[0]).extractfile("000000.json").read())
    assert meta["status"] == "success" and meta["width"] == pics[0].shape[1]

    ds = D.ClipWebDataset(str(tmp_path / "{00000..00002}.tar"), shuffle_shards=False)
    got = list(ds)
    assert len(got) == 10 and not ds.skipped
    assert got[4][0] == f"{tmp_path.name}/00001.tar/000010"  # identity: shard folder / file / key
    for (key, im), a in zip(got, pics):
        assert im.mode == "RGB" and im.size == (a.shape[1], a.shape[0])
        assert mean_abs(im, a) < 4.0, key  # JPEG q95 is near-lossless


def test_img2dataset_key_width_for_default_shard_size(tmp_path, images):
    path = S.write_clip_shards(tmp_path, [images["rocket"]], shard_size=10000)[0]
    assert tarfile.open(path).getnames()[0] == "000000000.jpg"


def test_clip_shards_skip_and_count_corrupt_samples(tmp_path, images, corrupt, caplog):
    a = list(images.values())
    items = [a[0], corrupt["truncated"], a[1], corrupt["garbage"], None, a[2], corrupt["garbage"], a[3]]
    S.write_clip_shards(tmp_path, items, shard_size=100)
    ds = D.ClipWebDataset(str(tmp_path / "{00000..00000}.tar"))
    with caplog.at_level(logging.WARNING, logger="fastsamclip.data"):
        got = list(ds)
    assert [k.rsplit("/", 1)[1] for k, _ in got] == ["0000000", "0000002", "0000005", "0000007"]
    assert ds.skipped == {"decode_error": 3, "missing_image": 1}
    # One warning per kind, however many samples of that kind.
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("(decode_error" in m for m in msgs) == 1
    assert sum("(missing_image" in m for m in msgs) == 1
    assert any("running count: 1" in m for m in msgs)


def test_clip_shards_truncated_tar_is_counted_not_fatal(tmp_path, images):
    pics = list(images.values())[:9]
    paths = S.write_clip_shards(tmp_path, pics, shard_size=3)
    raw = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:  # cut inside the second member's data
        f.write(raw[:1500])
    ds = D.ClipWebDataset(str(tmp_path / "{00000..00002}.tar"), shuffle_shards=False)
    keys = [k.rsplit("/", 1)[1] for k, _ in ds]
    assert keys[:3] == ["000000", "000001", "000002"] and keys[-3:] == ["000020", "000021", "000022"]
    assert len(keys) < 9 and sum(ds.skipped.values()) >= 1


def test_shard_spec_errors(tmp_path, images):
    with pytest.raises(FileNotFoundError, match=r"nowhere/\{00000\.\.00009\}\.tar"):
        D.ClipWebDataset(str(tmp_path / "nowhere/{00000..00009}.tar"))
    # Partly missing: the existing shards are kept.
    S.write_clip_shards(tmp_path, [images["astronaut"]], shard_size=10)
    assert D.expand_shard_spec(str(tmp_path / "{00000..00004}.tar")) == [str(tmp_path / "00000.tar")]


def test_shards_without_a_readable_sample_fail_at_construction(tmp_path, corrupt):
    S.write_clip_shards(tmp_path, [corrupt["garbage"], corrupt["truncated"], None], shard_size=10)
    spec = str(tmp_path / "{00000..00000}.tar")
    with pytest.raises(D.DataError, match="none of the first 3 samples could be read") as e:
        D.ClipWebDataset(spec)
    assert spec in str(e.value)


def test_shards_split_disjointly_across_ranks(tmp_path, images):
    pics = list(images.values())[:10]
    S.write_clip_shards(tmp_path, pics, shard_size=2)  # 5 shards
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
    S.write_image_folder(tmp_path, pics, per_subfolder=3)
    S.write_image_folder(tmp_path / "deep" / "er", [pics[0]], ext=".png")
    S.write_image_folder(tmp_path / "bad", [corrupt["truncated"], corrupt["garbage"]])
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.ClipImageFolder(tmp_path)
    assert len(ds) == 10  # 7 + 1 png + 2 corrupt .jpg; the .txt is not listed
    got = [ds[i] for i in range(len(ds))]
    assert sum(g is None for g in got) == 2 and ds.skipped == {"decode_error": 2}
    keys = {g[0] for g in got if g is not None}
    # identity: the folder's name / the file's path in it, without extension
    assert f"{tmp_path.name}/part_1/000003" in keys and f"{tmp_path.name}/deep/er/000000" in keys
    k, im = ds[ds.files.index(str(tmp_path / "part_0" / "000001.jpg"))]
    assert mean_abs(im, pics[1]) < 4.0
    good = next(i for i, g in enumerate(got) if g is not None)
    assert ds[(good, 64)][2] == 64  # the (index, resolution) form carries the resolution
    bad = [ds[(i, 48)] for i, g in enumerate(got) if g is None]
    assert [b[1:] for b in bad] == [(None, 48), (None, 48)]
    assert D.collate_clip(bad).shape == (0, 3, 48, 48)  # all unreadable: empty, not an error
    batch = D.collate_clip(got, resolution=64)
    assert batch.shape == (8, 3, 64, 64) and batch.dtype == torch.uint8


def test_image_folder_errors(tmp_path, corrupt):
    with pytest.raises(FileNotFoundError, match="no file with an image extension"):
        D.ClipImageFolder(tmp_path)
    S.write_image_folder(tmp_path, [corrupt["garbage"]] * 3)
    with pytest.raises(D.DataError, match=str(tmp_path)):
        D.ClipImageFolder(tmp_path)


def test_shard_spec_list_and_remote_urls(tmp_path, images):
    S.write_clip_shards(tmp_path / "a", [images["coins"]] * 3, shard_size=1)
    S.write_clip_shards(tmp_path / "b", [images["camera"]], shard_size=1)
    got = D.expand_shard_spec([str(tmp_path / "a" / "{00000..00002}.tar"), str(tmp_path / "b" / "00000.tar")])
    want = [str(tmp_path / "a" / f"0000{i}.tar") for i in range(3)] + [str(tmp_path / "b" / "00000.tar")]
    assert got == want
    # Remote shards cannot be checked for existence here and are kept as given.
    assert D.expand_shard_spec("s3://bucket/cc3m/{00000..00001}.tar") == [
        "s3://bucket/cc3m/00000.tar", "s3://bucket/cc3m/00001.tar"]




def test_identities_and_split_follow_the_data_wherever_it_is_mounted(tmp_path, images):
    import shutil

    pics = list(images.values())[:6]
    S.write_clip_shards(tmp_path / "one" / "cc3m", pics, shard_size=3)
    shutil.copytree(tmp_path / "one", tmp_path / "moved" / "elsewhere")
    here, there = (f"{tmp_path / p / 'cc3m'}/{{00000..00001}}.tar" for p in ("one", "moved/elsewhere"))
    keys = [k for k, _ in D.ClipWebDataset(here, shuffle_shards=False)]
    assert keys[0] == "cc3m/00000.tar/000000"
    assert keys == [k for k, _ in D.ClipWebDataset(there, shuffle_shards=False)]
    held = [k for k, _ in D.ClipWebDataset(here, shuffle_shards=False, split="held_out", holdout=0.4, validate=False)]
    assert held == [k for k, _ in D.ClipWebDataset(there, shuffle_shards=False, split="held_out", holdout=0.4,
                                                   validate=False)]
    # Two sources whose shards share a folder and file name could not be told apart: refused.
    with pytest.raises(D.DataError, match="both named 'cc3m/00000.tar'"):
        D.ClipWebDataset(f"{here}::{there}")
