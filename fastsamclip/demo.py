"""``fastsamclip demo``: the paper's recipe on the miniature world's teachers (``run_distill_demo``),
and ``--merge-only``: the whole merge path on small random teachers, on the CPU in seconds
(``run_demo``):

1. Writes a small SAM teacher (official ``.pth`` format) and a small CLIP teacher (open_clip
   hub-folder format), with random weights since no model hub is reachable.
2. Loads both through the real loaders, merges them into the SAM-CLIP student, saves the merged
   checkpoint (one safetensors file) and reloads it with the teacher files gone.
3. Runs the three outputs on a real picture at the resolutions asked for: pooled and per-patch
   CLIP embeddings, SAM image embeddings, masks for a point and a box prompt; checks the student
   agrees with the SAM teacher it was initialised from; draws the masks over the picture.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import List, Optional, Sequence

import torch

from fastsamclip import logs
from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.data import samples
from fastsamclip.draw import draw_overlay
from fastsamclip.errors import ConfigError
from fastsamclip.files import write_json
from fastsamclip.miniature import (
    CLASSES,
    SAM_TYPE,
    Limits,
    Recipe,
    distill,
    shipped_paths,
    student_skills,
    teacher_skills,
    write_world,
)
from fastsamclip.modeling import (
    load_clip_teacher,
    load_sam_teacher,
    sam_preprocess,
    samclip_from_teachers,
)
from fastsamclip.train.distiller import RUN_FILES
from fastsamclip.transforms import sam_pixels


def _write_teachers(folder: str, sam_type: str, say) -> tuple:
    """Small random teachers in the official formats: (SAM .pth path, open_clip model name)."""
    say(f"[1/4] writing small teachers in the official formats ({sam_type} SAM .pth, open_clip folder)")
    sam_path = samples.write_sam_checkpoint(os.path.join(folder, f"sam_{sam_type}.pth"), sam_type)
    return sam_path, samples.write_clip_local_dir(os.path.join(folder, "clip"))


def run_demo(out_dir: Optional[str] = None, sam_type: str = "vit_tiny", image_name: str = "chelsea",
             resolutions: Sequence[int] = (64, 128, 256), quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else print
    out_dir = out_dir or os.path.join(os.getcwd(), "fastsamclip-demo")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"out_dir": out_dir}

    with tempfile.TemporaryDirectory() as teachers_dir:
        sam_path, clip_name = _write_teachers(teachers_dir, sam_type, say)
        sam = load_sam_teacher(sam_path, sam_type)
        clip = load_clip_teacher(clip_name)

        say("[2/4] merging them into the SAM-CLIP student and saving one merged checkpoint")
        student = samclip_from_teachers(sam, clip, sam_config=sam_type).eval()
        merged_path = os.path.join(out_dir, "merged.safetensors")
        save_merged(student, merged_path)
        labels = ["a photo of a cat", "a photo of a dog", "a photo of a rocket"]
        tokens = clip.tokenize(labels)
        teacher_text = clip.encode_text(tokens)
    # The teacher files are gone now: the merged file must stand alone.
    model = load_merged(merged_path)
    same = all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), model.state_dict().values()))
    report["reload_identical"] = same
    report["checkpoint_mb"] = os.path.getsize(merged_path) / 2**20
    say(f"      {merged_path}: {report['checkpoint_mb']:.1f} MB, reloaded without the teachers: "
        f"{'identical weights' if same else 'MISMATCH'}")
    text_same = torch.allclose(model.encode_text(model.tokenizer(labels)), teacher_text, atol=1e-6)
    report["text_equals_teacher"] = text_same

    say("[3/4] running the three outputs on a sample picture")
    image = samples.sample_image(image_name)
    rows = []
    with torch.no_grad():
        for res in resolutions:
            pixels, hw = sam_pixels(image, res)
            out = model(model.preprocess(pixels[None], hw), clip=True, sam=True, clip_patches=True)
            sam_ref = sam.image_encoder(sam_preprocess(sam, pixels[None], hw)) if res == sam.image_encoder.img_size else None
            err = (out["sam"] - sam_ref).abs().max().item() if sam_ref is not None else None
            rows.append((res, tuple(out["clip"].shape), tuple(out["clip_patches"].shape), tuple(out["sam"].shape), err))
        native = model.config.sam.backbone.img_size
        pixels, (h, w) = sam_pixels(image, native)
        x = model.preprocess(pixels[None], (h, w))
        emb = model(x, clip=False, sam=True)["sam"]
        scale = native / max(image.shape[:2])
        px, py = image.shape[1] * 0.5, image.shape[0] * 0.45
        box = [image.shape[1] * 0.2, image.shape[0] * 0.1, image.shape[1] * 0.8, image.shape[0] * 0.9]
        pts = (torch.tensor([[[px * scale, py * scale]]]), torch.tensor([[1]]))
        boxes = torch.tensor([box]) * scale
        lowres_p, iou_p = model.predict_masks(emb, (native, native), points=pts)
        lowres_b, iou_b = model.predict_masks(emb, (native, native), boxes=boxes, multimask_output=False)
        # The same prompts through segment_anything's own model: the student starts as SAM.
        sp, de = sam.prompt_encoder(points=pts, boxes=None, masks=None)
        ref_p, _ = sam.mask_decoder(sam.image_encoder(sam_preprocess(sam, pixels[None], (h, w))),
                                    sam.prompt_encoder.get_dense_pe(), sp, de, True)
        report["mask_max_abs_diff_vs_sam"] = (lowres_p - ref_p).abs().max().item()
        full = lambda m: sam.postprocess_masks(m, (h, w), image.shape[:2])[0] > 0  # noqa: E731
        best = int(iou_p[0].argmax())
        mask_point = full(lowres_p)[best].numpy()
        mask_box = full(lowres_b)[0].numpy()
        probs = (100 * torch.nn.functional.normalize(model(x, sam=False)["clip"], dim=-1)
                 @ torch.nn.functional.normalize(model.encode_text(model.tokenizer(labels)), dim=-1).T).softmax(-1)[0]

    say(f"      {'input':>6}  {'CLIP pooled':>12}  {'CLIP per-patch':>18}  {'SAM embeddings':>18}  vs SAM teacher")
    for res, c, cp, s, err in rows:
        say(f"      {res:>4}px  {str(c):>12}  {str(cp):>18}  {str(s):>18}  "
            + (f"max |diff| {err:.2e}" if err is not None else "(teacher is fixed at its own size)"))
    say(f"      point prompt: {lowres_p.shape[1]} masks, IoU predictions {[round(v, 3) for v in iou_p[0].tolist()]}; "
        f"box prompt: 1 mask; student vs segment_anything masks: max |diff| {report['mask_max_abs_diff_vs_sam']:.2e}")
    say("      zero-shot scores (random teacher weights, so no meaning yet): "
        + ", ".join(f"{lab!r}: {p:.2f}" for lab, p in zip(labels, probs.tolist())))
    report["resolutions"] = rows

    say("[4/4] drawing the masks")
    png = draw_overlay(image, [mask_point, mask_box], ["point prompt (best of 3)", "box prompt"],
                       os.path.join(out_dir, "masks.png"), title=f"SAM-CLIP student ({sam_type}), random teacher weights",
                       prompts=[{"point": (px, py)}, {"box": box}])
    report["overlay"] = png
    params = {p: model.num_parameters(p) for p in ("image_encoder", "clip_head", "prompt_encoder", "mask_decoder", "text")}
    say("      parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))
    say(f"      overlay: {png}")
    report["seconds"] = time.perf_counter() - t0
    say(f"done in {report['seconds']:.1f} s; merged checkpoint {merged_path}")
    return report


# ---------------------------------------------------------------------------------------------
# `fastsamclip demo`: the recipe on the miniature world's teachers, on the CPU in minutes
# ---------------------------------------------------------------------------------------------
DEMO_WORLD = {"train": 1000, "heldout": 100}  # canvases (the world of `fastsamclip miniature world` has 4000 / 300)
DEMO_LIMITS = Limits(crops=None, canvases=None, semantic=50, everything=20)
TARGETS = {"top1": 3.0, "point": 0.03}  # the student within this of its teacher (points; mIoU)
ROWS = (("zero-shot top-1 @64 px (%)", "top1", "{:.1f}"), ("zero-shot top-1 @128 px (%)", "top1_high", "{:.1f}"),
        ("point mIoU", "point", "{:.3f}"), ("box mIoU", "box", "{:.3f}"),
        ("CLIP-head semantic mIoU (%)", "semantic_clip", "{:.1f}"),
        ("composed semantic mIoU (%)", "semantic_composed", "{:.1f}"))


def demo_table(teacher: dict, merged: dict, distilled: dict) -> List[str]:
    """The Markdown table: teachers / student at merge / student after distillation."""
    lines = ["| held-out skill | teachers | student at merge | student after distillation |", "|---|---:|---:|---:|"]
    for label, key, f in ROWS:
        if key == "semantic_composed":
            t = f"{teacher['semantic_everything']:.1f} (SAM everything + CLIP crops)"
        elif key == "top1_high":
            t = "-"  # the CLIP teacher has one input size
        else:
            t = f.format(teacher[key]) if key in teacher else "-"
        lines.append(f"| {label} | {t} | {f.format(merged[key])} | {f.format(distilled[key])} |")
    return lines


def check_demo_out(out_dir: str, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier demo run, naming the demo's own flag."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, "run", "run", f))]
    if existing and not overwrite:
        raise ConfigError(f"--out {out_dir} holds an earlier demo run ({', '.join(existing)} in run/run/): pass "
                          "--overwrite to run the demo again there, or choose another --out")


@logs.quiet()  # the table is the output; warnings would bury it
def run_distill_demo(out_dir: Optional[str] = None, quiet: bool = False, overwrite: bool = False,
                     recipe: Recipe = Recipe(), world: Optional[dict] = None, limits: Limits = DEMO_LIMITS) -> dict:
    """The paper's recipe on the teachers shipped with the package (trained on the miniature
    world, never retrained here): write the world, measure the teachers, merge, run the three
    stages, measure the student at merge and after distillation on the held-out split, print the
    table. Returns the numbers, the targets' check and the seconds."""
    say = (lambda *a: None) if quiet else print
    out_dir = out_dir or os.path.join(os.getcwd(), "fastsamclip-demo")
    check_demo_out(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    teachers = shipped_paths()
    sizes = world or DEMO_WORLD
    say(f"[1/5] the miniature world: {sizes['train']} training and {sizes['heldout']} held-out canvases of "
        f"{len(CLASSES)} classes on photo backgrounds (real layouts: WebDataset shards, SA-1B json + RLE, "
        "crops folder, VOC, COCO)")
    world_root = os.path.join(out_dir, "world")
    write_world(world_root, sizes["train"], sizes["heldout"], overwrite=overwrite)
    say(f"      {world_root} ({time.perf_counter() - t0:.0f} s)")
    say(f"[2/5] the shipped teachers: open_clip model folder {teachers['clip'][len('local-dir:'):]} and "
        f"segment_anything {SAM_TYPE} {teachers['sam']}; their held-out skills")
    teacher = teacher_skills(world_root, teachers, limits)
    say(f"      CLIP zero-shot top-1 {teacher['top1']:.1f}%, SAM point mIoU {teacher['point']:.3f}, box mIoU "
        f"{teacher['box']:.3f} ({time.perf_counter() - t0:.0f} s)")
    say(f"[3/5] merging, then the three stages: stage 1 head probing ({recipe.stage_steps[0]} steps), stage 2 "
        f"CLIP + {recipe.sam_loss_weight:g} x SAM rehearsal ({recipe.stage_steps[1]} steps), stage 3 resolutions "
        f"{'/'.join(map(str, recipe.stage3_resolutions))} px ({recipe.stage_steps[2]} steps)")
    paths = distill(world_root, os.path.join(out_dir, "run"), recipe, teachers, progress=not quiet, overwrite=overwrite)
    say(f"      {paths['final']} ({time.perf_counter() - t0:.0f} s)")
    say("[4/5] the student's held-out skills at merge and after distillation")
    merged = student_skills(paths["merge"], world_root, limits)
    distilled = student_skills(paths["final"], world_root, limits)
    say("[5/5] held-out skills (zero-shot through `eval classify`'s 80 templates, semantic through "
        "`eval semantic`, prompts as SAM evaluates them)")
    table = demo_table(teacher, merged, distilled)
    for line in table:
        say(line)
    gaps = {"top1": teacher["top1"] - distilled["top1"], "point": teacher["point"] - distilled["point"]}
    met = {k: gaps[k] <= TARGETS[k] for k in TARGETS}
    say(f"targets: zero-shot top-1 within {TARGETS['top1']:g} points of the CLIP teacher: "
        f"{'met' if met['top1'] else 'NOT met'} ({gaps['top1']:+.1f}); point mIoU within {TARGETS['point']:g} of "
        f"the SAM teacher: {'met' if met['point'] else 'NOT met'} ({gaps['point']:+.3f})")
    report = {"out_dir": out_dir, "world": world_root, "teachers": teacher, "merge": merged, "distilled": distilled,
              "gaps": gaps, "targets_met": met, "paths": paths, "recipe": dataclasses.asdict(recipe),
              # The recipe did its job when the student gained CLIP's skill and kept SAM's.
              "distillation_worked": distilled["top1"] > merged["top1"]
              and distilled["point"] >= teacher["point"] - TARGETS["point"]}
    report["seconds"] = time.perf_counter() - t0
    write_json(os.path.join(out_dir, "demo.json"), report)
    say(f"done in {report['seconds']:.0f} s; merged checkpoint {paths['final']}, numbers in "
        f"{os.path.join(out_dir, 'demo.json')}")
    return report
