"""The paper's recipe at miniature size: merge the two teachers of the miniature world, run the
three stages through ``fastsamclip.train`` unchanged, and measure every stage's student.

The analogues of the paper's sizes: the CLIP teacher's 64 px input plays CLIP's 224 px, the
CLIP stream of stages 1-2 mixes 64 and 96 px (the paper's 224/448), the SAM stream and the
student's native size are the 128 px canvas (SAM's 1024 px), stage 3 adapts the CLIP head at
64/96/128 px. The student is ``vit_mini`` (the SAM teacher's backbone) with the paper's CLIP
head (three blocks from the last backbone block, max pooling, LayerNorm, two-layer MLP).

Learning rates are set for a few hundred to a thousand steps rather than epochs of 41M images:
stage 1 at 3e-3 (the head learns from scratch there and 8e-4 left it far from the teacher),
stage 2's head at 4e-4 with backbone and mask decoder at the paper's 0.1x of it, stage 3 at the
paper's 8e-4; lambda is the paper's 10, focal:dice SAM's 20:1. ``Recipe`` holds every number of a run, and the
ablations change one field of it at a time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from fastsamclip.checkpoint import save_merged
from fastsamclip.eval.models import CLIPTeacherModel, MergedModel, SAMTeacherModel
from fastsamclip.miniature.skills import EverythingThenCLIP, prompt_miou, semantic_miou, world_paths, zero_shot_top1
from fastsamclip.miniature.teachers import SAM_TYPE, shipped_paths
from fastsamclip.miniature.world import CLASSES
from fastsamclip.modeling import CLIPHeadConfig, SAMCLIPConfig, build_samclip, load_clip_teacher, load_sam_teacher
from fastsamclip.modeling import samclip_from_teachers
from fastsamclip.train import Distiller, TrainConfig

LOW_RES, HIGH_RES = 64, 128  # zero-shot top-1 at the CLIP teacher's size and at the student's native size


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    # Optimizer steps of stages 1, 2, 3. Stage 1 is where the CLIP head learns (the frozen trunk's
    # probe reached 36% top-1 at 400 steps of 8e-4, 81% at 800 of 3e-3, 89% at 1600), and its
    # steps are the cheapest (no backbone gradient): most of the budget goes there.
    stage_steps: Tuple[int, int, int] = (1200, 300, 100)
    clip_batch: int = 64  # D_CLIP images per step at 64 px (the multi-resolution sampler keeps pixels ~constant)
    sam_batch: int = 4  # SA-1B canvases per stage-2 step
    masks_per_image: int = 3  # prompts per canvas (a canvas holds one to three objects)
    sam_loss_weight: float = 10.0  # lambda (paper: 10); 0 is stage 2 on L_CLIP alone, no D_SAM rehearsal
    pool: str = "max"  # the CLIP head's token pooling (paper: max beats avg)
    stage1_lr: float = 3e-3  # paper: 8e-4 over 20 epochs of 41M images; here a few thousand images, 1200 steps
    stage2_lr: float = 4e-4  # the CLIP head in stage 2; backbone and decoder at 0.1x
    stage3_lr: float = 8e-4  # paper
    clip_resolutions: Tuple[int, ...] = (64, 96)
    stage3_resolutions: Tuple[int, ...] = (64, 96, 128)

    def with_(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **kw)


def merge_teachers(path: str, teachers: Optional[Dict[str, str]] = None, pool: str = "max") -> str:
    """The student at merge (the paper's initialisation) saved as a merged checkpoint."""
    t = teachers or shipped_paths()
    sam, clip = load_sam_teacher(t["sam"], SAM_TYPE), load_clip_teacher(t["clip"])
    head = CLIPHeadConfig(out_dim=clip.embed_dim, pool=pool)
    save_merged(samclip_from_teachers(sam, clip, clip_head=head, sam_config=SAM_TYPE), path)
    return path


def _stage_checkpoint_to_merged(ckpt: str, path: str) -> str:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = build_samclip(SAMCLIPConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    save_merged(model, path)
    return path


def distill(world_root: str, out: str, recipe: Recipe = Recipe(), teachers: Optional[Dict[str, str]] = None,
            progress: bool = False, overwrite: bool = False, init: Optional[str] = None) -> Dict[str, str]:
    """One run of the three stages from the merged teachers; returns the merged checkpoint after
    each stage that ran ({"merge", "stage1", "stage2", "stage3"} -> path) and the run's report."""
    t = teachers or shipped_paths()
    p = world_paths(world_root)
    os.makedirs(out, exist_ok=True)
    init = init or merge_teachers(os.path.join(out, "merge.safetensors"), t, recipe.pool)
    s1, s2, s3 = recipe.stage_steps
    cfg = TrainConfig(
        sam_checkpoint=t["sam"], sam_type=SAM_TYPE, clip_model=t["clip"], clip_pretrained=None,
        clip_data=p["clip_data"], sam_data=p["sam_data"], out=os.path.join(out, "run"), init_from=init,
        overwrite=overwrite,
        stage1_steps=s1, stage2_steps=s2, stage3_steps=s3,
        stage1_epochs=0 if s1 == 0 else 20.0, stage2_epochs=0 if s2 == 0 else 16.0,
        stage3_epochs=0 if s3 == 0 else 3.0,
        clip_batch=recipe.clip_batch, clip_base_res=LOW_RES, clip_resolutions=recipe.clip_resolutions,
        stage3_resolutions=recipe.stage3_resolutions, stage3_token_pools=(),
        sam_batch=recipe.sam_batch, masks_per_image=recipe.masks_per_image, sam_loss_weight=recipe.sam_loss_weight,
        stage1_lr=recipe.stage1_lr, stage2_lr=recipe.stage2_lr, stage3_lr=recipe.stage3_lr,
        seed=recipe.seed, clip_holdout=0.02, eval_clip_images=64, eval_images=8, eval_resolutions=(LOW_RES, HIGH_RES),
        warmup_fraction=0.1, progress=progress, tensorboard=False, checkpoint_every=0, log_every=25,
        amp="off", device="cpu")
    report = Distiller(cfg).run()
    ckpts = os.path.join(out, "run", "checkpoints")
    paths = {"merge": init}
    for stage, steps in zip((1, 2), (s1, s2)):
        if steps:
            paths[f"stage{stage}"] = _stage_checkpoint_to_merged(os.path.join(ckpts, f"stage{stage}.pt"),
                                                                 os.path.join(out, f"stage{stage}.safetensors"))
    paths["final"] = report["merged"]
    if s3:
        paths["stage3"] = report["merged"]
    return paths


# ------------------------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class Limits:
    """How much of the held-out split each measurement takes (None: all of it)."""
    crops: Optional[int] = None
    canvases: Optional[int] = None  # point / box prompts
    semantic: Optional[int] = None
    everything: Optional[int] = None


def student_skills(checkpoint: str, world_root: str, limits: Limits = Limits(), what=("top1", "top1_high", "point",
                   "box", "semantic_clip", "semantic_composed"), templates: str = "openai") -> Dict[str, float]:
    """The merged model's skills (top-1 and mIoU in percent, prompt mIoU as fractions), fp32."""
    m = MergedModel(checkpoint, torch.device("cpu"), hash_file=False, dtype="fp32")
    out: Dict[str, float] = {}
    if "top1" in what:
        out["top1"] = zero_shot_top1(m, world_root, LOW_RES, templates, limits.crops)
    if "top1_high" in what:
        out["top1_high"] = zero_shot_top1(m, world_root, HIGH_RES, templates, limits.crops)
    if "point" in what or "box" in what:
        out.update(prompt_miou(m, world_root, limits.canvases))
    if "semantic_clip" in what:
        out["semantic_clip"] = semantic_miou(m, world_root, "clip", HIGH_RES, templates, limits.semantic)
    if "semantic_composed" in what:
        out["semantic_composed"] = semantic_miou(m, world_root, "composed", HIGH_RES, templates, limits.semantic)
    return out


def teacher_skills(world_root: str, teachers: Optional[Dict[str, str]] = None, limits: Limits = Limits(),
                   everything: bool = True, templates: str = "openai") -> Dict[str, float]:
    """The teachers' skills: CLIP's zero-shot top-1 at its own size, SAM's point and box mIoU,
    and the two together as "SAM everything, then CLIP on each mask" (semantic mIoU)."""
    t = teachers or shipped_paths()
    dev = torch.device("cpu")
    clip = CLIPTeacherModel(t["clip"], None, dev)
    sam = SAMTeacherModel(t["sam"], SAM_TYPE, dev)
    out = {"top1": zero_shot_top1(clip, world_root, clip.teacher.image_size, templates, limits.crops)}
    out.update(prompt_miou(sam, world_root, limits.canvases))
    if everything:
        seg = EverythingThenCLIP(sam, clip, ("background",) + CLASSES, templates)
        out["semantic_everything"] = semantic_miou(clip, world_root, "clip", HIGH_RES, templates,
                                                   limits.everything, segmenter=seg)
    return out




