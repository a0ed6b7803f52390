"""The miniature teachers: the shipped files load through the official loaders and have the skill
their training measured; the training command still learns, deterministically."""

import json
import os

import numpy as np
import pytest
import torch
from open_clip.model import CLIP

from fastsamclip.cli import main
from fastsamclip.data.samples import write_sam_checkpoint
from fastsamclip.eval.models import CLIPTeacherModel, SAMTeacherModel
from fastsamclip.miniature import SAM_TYPE, TeacherConfig, WorldConfig, prompt_miou, shipped_paths, zero_shot_top1
from fastsamclip.kernels import focal_dice_loss
from fastsamclip.miniature.teachers import (
    SHIPPED,
    clip_batch,
    multi_positive_clip_loss,
    sam_masks,
    sam_prompts,
    train_sam,
)
from fastsamclip.miniature.world import render_canvas
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, sam_preprocess
from fastsamclip.modeling.teachers import CLIPTeacher

CPU = torch.device("cpu")


def _stated():
    with open(os.path.join(SHIPPED, "skills.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shipped():
    p = shipped_paths()
    return {"clip": CLIPTeacherModel(p["clip"], None, CPU), "sam": SAMTeacherModel(p["sam"], SAM_TYPE, CPU)}


def test_the_shipped_teachers_have_their_stated_skill_on_a_held_out_sample(world, shipped):
    stated = _stated()
    # The sample is small (the reduced world): the bounds leave room for its spread, and sit far
    # above what an untrained teacher scores (top-1 ~6%, mIoU ~0.05).
    top1 = zero_shot_top1(shipped["clip"], world["root"], shipped["clip"].teacher.image_size)
    assert top1 >= stated["top1"] - 15, (top1, stated)
    miou = prompt_miou(shipped["sam"], world["root"])
    assert miou["point"] >= stated["point"] - 0.1 and miou["box"] >= stated["box"] - 0.1, (miou, stated)


def test_the_shipped_files_are_the_official_formats():
    p = shipped_paths()
    folder = p["clip"][len("local-dir:"):]
    assert sorted(os.listdir(folder)) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    sd = torch.load(p["sam"], map_location="cpu", weights_only=True)  # a plain state dict, as sam_vit_b_01ec64.pth
    assert isinstance(sd, dict) and any(k.startswith("image_encoder.") for k in sd)
    assert os.path.getsize(p["sam"]) + sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 12e6


def test_the_teacher_command_learns_on_a_reduced_run(tmp_path):
    out = str(tmp_path / "t")
    assert main(["miniature", "teachers", "--out", out, "--clip-steps", "25", "--sam-steps", "12",
                 "--clip-batch", "24", "--sam-batch", "2"]) == 0
    trained = shipped_paths(out)
    # Each teacher's own loss on a fixed batch of another world's canvases (seed 7: none of them
    # was trained on), against the same architecture untrained.
    world, rng = WorldConfig(seed=7), np.random.default_rng(7)
    x, texts, keys = clip_batch(world, rng, 48, 0)
    clip = load_clip_teacher(trained["clip"])
    torch.manual_seed(0)
    fresh = CLIPTeacher(CLIP(**clip.model_cfg).eval(), clip.tokenizer, clip.model_name, clip.model_cfg)

    def clip_loss(t):
        with torch.no_grad():
            img = t.model.encode_image(t.preprocess(x), normalize=True)
            txt = t.model.encode_text(t.tokenize(texts), normalize=True)
            return multi_positive_clip_loss(img, txt, t.model.logit_scale.exp(), keys).item()

    assert clip_loss(clip) < clip_loss(fresh) - 0.05  # 25 small steps: out of the plateau at chance, barely
    canvases = [render_canvas(world, "heldout", i) for i in range(4)]
    prompts = [torch.from_numpy(np.stack(sam_prompts(c.masks, rng, "box", 0.0))) for c in canvases]

    def sam_loss(path):
        sam = load_sam_teacher(path, SAM_TYPE)
        with torch.no_grad():
            emb = sam.image_encoder(sam_preprocess(sam, torch.stack([torch.from_numpy(c.image).permute(2, 0, 1)
                                                                     for c in canvases]).float()))
            logits = torch.cat([sam_masks(sam, emb[i:i + 1], "box", p, 128)[0][:, 0] for i, p in enumerate(prompts)])
        gt = torch.from_numpy(np.concatenate([c.masks for c in canvases])).float()
        return focal_dice_loss(logits[None], gt[None], 20.0, 1.0, 0.25, 2.0).item()

    untrained = write_sam_checkpoint(str(tmp_path / "random.pth"), SAM_TYPE)
    assert sam_loss(trained["sam"]) < 0.8 * sam_loss(untrained)


def test_teacher_training_is_deterministic_given_its_seed():
    cfg = TeacherConfig(seed=3, sam_steps=2, sam_batch=2)
    a = train_sam(cfg, WorldConfig(), log=lambda *_: None).state_dict()
    b = train_sam(cfg, WorldConfig(), log=lambda *_: None).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_sam(TeacherConfig(seed=4, sam_steps=2, sam_batch=2), WorldConfig(), log=lambda *_: None).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_teacher_command_refuses_to_overwrite_and_a_missing_world(tmp_path, capsys):
    (tmp_path / "training.json").write_text("{}")
    assert main(["miniature", "teachers", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["miniature", "teachers", "--out", str(tmp_path / "new"), "--world", str(tmp_path / "nowhere")]) == 2
    assert "world.json" in capsys.readouterr().err
