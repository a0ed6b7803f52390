"""The miniature world: deterministic, disjoint splits, and every layout read back by the real
readers with the exact masks and class names it was drawn with."""

import json
import os

import numpy as np
import pytest

from fastsamclip.data import SA1BDataset, decode_rle, expand_shard_spec
from fastsamclip.data.prompts import PromptConfig
from fastsamclip.eval.common import EvalInputError
from fastsamclip.eval.datasets import open_classify, open_retrieval, open_semantic
from fastsamclip.eval.instances import InstanceSet
from fastsamclip.miniature import CLASSES, WorldConfig, render_canvas, world_paths, write_world
from fastsamclip.miniature.world import DIGIT_SPLIT, HELDOUT_BACKGROUNDS, TRAIN_BACKGROUNDS, digit_indices, semantic_map

from .conftest import HELDOUT, TRAIN


def test_a_canvas_is_a_pure_function_of_seed_split_and_index():
    cfg = WorldConfig()
    a = [render_canvas(cfg, "train", i) for i in (5, 2)]
    b = render_canvas(cfg, "train", 2), render_canvas(cfg, "train", 5)  # another order
    assert np.array_equal(a[1].image, b[0].image) and np.array_equal(a[0].masks, b[1].masks)
    assert a[0].classes == b[1].classes
    other = render_canvas(WorldConfig(seed=1), "train", 2)
    assert not np.array_equal(other.image, a[1].image)
    assert not np.array_equal(render_canvas(cfg, "heldout", 2).image, a[1].image)


def test_objects_are_disjoint_named_and_drawn_where_their_masks_are():
    cfg = WorldConfig()
    for i in range(20):
        c = render_canvas(cfg, "heldout", i)
        assert 1 <= len(c.classes) <= cfg.max_objects and c.masks.shape == (len(c.classes), cfg.side, cfg.side)
        assert c.masks.sum(0).max() == 1  # no pixel belongs to two objects
        assert all(m.sum() > 30 for m in c.masks)
        lab = semantic_map(c)
        assert set(np.unique(lab)) - {0} == {k + 1 for k in c.classes}


def test_train_and_heldout_share_no_digit_and_no_background():
    assert not set(TRAIN_BACKGROUNDS) & set(HELDOUT_BACKGROUNDS)
    for d in range(10):
        tr, ho = digit_indices("train", d), digit_indices("heldout", d)
        assert len(tr) > 50 and len(ho) > 20
        assert tr.max() < DIGIT_SPLIT <= ho.min()


def test_every_layout_reads_back_through_the_real_readers(world):
    root, meta = world["root"], world["meta"]
    p = world_paths(root)
    assert meta["classes"] == list(CLASSES)
    # D_CLIP: each canvas and each of its objects' crops, with captions naming them.
    shards = expand_shard_spec(p["clip_data"])
    assert len(shards) == meta["clip_shards"] and meta["clip_samples"] > TRAIN
    # D_SAM: every object of a training canvas is a mask of its SA-1B json.
    sa = SA1BDataset(p["sam_data"], PromptConfig(masks_per_image=4), long_side=128)
    assert len(sa) == TRAIN
    raw = sa.load_raw(3)  # sa_4.json: canvas 3 (SA-1B numbers from 1)
    c = render_canvas(WorldConfig(), "train", 3)
    assert raw.key == "sa_4" and {m.tobytes() for m in raw.masks} == {m.tobytes() for m in c.masks}
    # Crops: an ImageNet-style folder of the held-out objects, one folder per class name.
    crops = open_classify("folder", p["crops"], "val")
    assert sorted(crops.classes) == sorted(CLASSES)  # folders in name order, as ImageNet's
    held = [render_canvas(WorldConfig(), "heldout", i) for i in range(HELDOUT)]
    assert len(crops.samples) == sum(len(h.classes) for h in held)
    # VOC layout with the world's class names: the label maps are the exact masks.
    voc = open_semantic("voc", p["voc"], "val", p["voc_class_names"])
    assert voc.classes == ("background",) + CLASSES and voc.background == 0
    assert len(voc.samples) == HELDOUT
    assert np.array_equal(voc.read_label(voc.samples[4]), semantic_map(held[4]))
    # COCO instances: every object with its exact mask and its class's name.
    inst = InstanceSet("coco", p["coco"])
    assert [inst.coco.cats[k]["name"] for k in sorted(inst.coco.cats)] == list(CLASSES)
    anns = inst.coco.imgToAnns[5]  # image ids start at 1: canvas 4
    assert [inst.coco.cats[a["category_id"]]["name"] for a in anns] == held[4].names
    for a, m in zip(anns, held[4].masks):
        assert np.array_equal(decode_rle(a["segmentation"]), m)
    # Retrieval: five captions per canvas, each naming its objects.
    ret = open_retrieval("coco", p["retrieval"], "test")
    assert len(ret.images) == HELDOUT and len(ret.captions) == 5 * HELDOUT
    assert all(name in ret.captions[20] for name in held[4].names)


def test_a_world_is_not_overwritten_unless_asked(world, tmp_path):
    again = write_world(world["root"], TRAIN, HELDOUT, shard_size=20)  # same settings: kept as it is
    assert again == world["meta"]
    small = str(tmp_path / "w")
    write_world(small, 2, 2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_world(small, 3, 2)
    meta = write_world(small, 3, 2, overwrite=True)
    assert meta["train"] == 3
    with open(os.path.join(small, "heldout", "dataset_coco.json")) as f:
        assert len(json.load(f)["images"]) == 2


def test_class_names_belong_to_the_voc_layout(world):
    p = world_paths(world["root"])
    with pytest.raises(EvalInputError, match="VOC-layout"):
        open_semantic("ade20k", p["voc"], "val", p["voc_class_names"])
