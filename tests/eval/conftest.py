"""Shared set-up of the evaluation tests: tiny teachers in the official formats, the merged model
made from them, and tiny datasets in every real layout, written once per session."""

import json
import os

import pytest

from fastsamclip.checkpoint import save_merged
from fastsamclip.eval import sample_datasets as sd
from fastsamclip.eval.runner import Dist
from fastsamclip.modeling import samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.data.samples import TINY_CLIP_CFG, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher

# A text tower smaller than the package's tiny one: the tests encode thousands of prompts.
TEST_CLIP_CFG = json.loads(json.dumps(TINY_CLIP_CFG))
TEST_CLIP_CFG["text_cfg"].update(width=32, heads=1, layers=1)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-models")
    sam_path = write_sam_checkpoint(str(d / "sam_vit_tiny.pth"), "vit_tiny")
    clip_name = write_clip_local_dir(str(d / "clip"), model_cfg=TEST_CLIP_CFG)
    sam = load_sam_teacher(sam_path, "vit_tiny")
    clip = load_clip_teacher(clip_name)
    merged = str(d / "merged.safetensors")
    save_merged(samclip_from_teachers(sam, clip, sam_config="vit_tiny"), merged)
    return {"dir": d, "sam_path": sam_path, "clip_name": clip_name, "sam": sam, "clip": clip, "merged": merged,
            "predictor": SAMCLIPPredictor(merged, device="cpu", dtype="fp32")}  # exact comparisons


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Every sample layout under one root (the layout ``sample_datasets.write_all`` uses)."""
    root = tmp_path_factory.mktemp("eval-data")
    r = str(root)
    return {
        "root": r,
        "voc": sd.write_voc(os.path.join(r, "VOCdevkit")),
        "ade20k": sd.write_ade20k(r),
        "pascal-context": sd.write_pascal_context(os.path.join(r, "VOCdevkit")),
        "coco-stuff": sd.write_coco_stuff(os.path.join(r, "coco_stuff164k")),
        "coco-panoptic": sd.write_coco_panoptic(os.path.join(r, "coco_panoptic")),
        "coco": sd.write_coco_instances(os.path.join(r, "coco")),
        "lvis": sd.write_lvis(os.path.join(r, "lvis")),
        "imagenet": sd.write_imagenet(os.path.join(r, "imagenet")),
        "imagenet-v2": sd.write_imagenet_v2(os.path.join(r, "imagenet-v2")),
        "places365": sd.write_places365(os.path.join(r, "places365")),
        "folder": sd.write_image_folder(os.path.join(r, "folder")),
        "csv": sd.write_csv_dataset(os.path.join(r, "csv")),
        "flickr30k": sd.write_karpathy(os.path.join(r, "flickr30k"), "flickr30k"),
        "coco-retrieval": sd.write_karpathy(os.path.join(r, "coco-karpathy"), "coco"),
    }


@pytest.fixture
def one_process():
    return Dist()
