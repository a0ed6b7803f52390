"""Shared set-up of the export and serve tests: the smallest merged model (vit_micro backbone, a
one-layer text tower) made from teachers in the official formats, written once per session."""

import json

import numpy as np
import pytest
from PIL import Image

from fastsamclip.checkpoint import save_merged
from fastsamclip.data.samples import TINY_CLIP_CFG, sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import CLIPHeadConfig, load_clip_teacher, load_sam_teacher, samclip_from_teachers

# The text tower encodes 80 templates per label: keep it one narrow layer.
TEST_CLIP_CFG = json.loads(json.dumps(TINY_CLIP_CFG))
TEST_CLIP_CFG["text_cfg"].update(width=32, heads=1, layers=1)


def write_micro_model(folder) -> dict:
    """The SAM teacher (vit_micro, 64 px), the CLIP teacher and their merged checkpoint (one CLIP-head block) in ``folder``;
    plus a non-square picture saved as PNG."""
    sam_path = write_sam_checkpoint(str(folder / "sam_vit_micro.pth"), "vit_micro")
    sam = load_sam_teacher(sam_path, "vit_micro")
    clip = load_clip_teacher(write_clip_local_dir(str(folder / "clip"), model_cfg=TEST_CLIP_CFG))
    merged = str(folder / "merged.safetensors")
    # One CLIP-head block (the paper's three, same code): AOTInductor's CPU compile and the ONNX
    # export scale with the graph, and these are the slow tests.
    head = CLIPHeadConfig(num_blocks=1, out_dim=clip.embed_dim)
    save_merged(samclip_from_teachers(sam, clip, clip_head=head, sam_config="vit_micro"), merged)
    image = np.asarray(Image.fromarray(sample_image("chelsea")))  # 451 x 300
    photo = str(folder / "photo.png")
    Image.fromarray(image).save(photo)
    return {"dir": folder, "sam": sam, "sam_path": sam_path, "merged": merged, "image": image, "photo": photo}


def session_micro_model(tmp_path_factory) -> dict:
    """One model per test session, shared by tests/export and tests/serve (each conftest has its
    own fixture; the second finds the files of the first)."""
    folder = tmp_path_factory.getbasetemp() / "micro-model"
    if (folder / "photo.png").exists():
        sam = load_sam_teacher(str(folder / "sam_vit_micro.pth"), "vit_micro")
        image = np.asarray(Image.open(folder / "photo.png"))
        return {"dir": folder, "sam": sam, "sam_path": str(folder / "sam_vit_micro.pth"),
                "merged": str(folder / "merged.safetensors"), "image": image, "photo": str(folder / "photo.png")}
    folder.mkdir(exist_ok=True)
    return write_micro_model(folder)


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    return session_micro_model(tmp_path_factory)
