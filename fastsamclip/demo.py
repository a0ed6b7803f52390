"""``fastsamclip demo``: the whole merge path on an embedded default, on the CPU in seconds.

1. Writes a small SAM teacher (official ``.pth`` format) and a small CLIP teacher (open_clip
   hub-folder format), with random weights since no model hub is reachable.
2. Loads both through the real loaders, merges them into the SAM-CLIP student, saves the merged
   checkpoint (one safetensors file) and reloads it with the teacher files gone.
3. Runs the three outputs on a real picture at the resolutions asked for: pooled and per-patch
   CLIP embeddings, SAM image embeddings, masks for a point and a box prompt; checks the student
   agrees with the SAM teacher it was initialised from; draws the masks over the picture.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.data import samples
from fastsamclip.draw import draw_overlay
from fastsamclip.modeling import (
    load_clip_teacher,
    load_sam_teacher,
    sam_preprocess,
    samclip_from_teachers,
)
from fastsamclip.train import Distiller, TrainConfig
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
# `fastsamclip demo`: distillation end to end on the CPU
# ---------------------------------------------------------------------------------------------
def _demo_crops(images: dict, per_image: int, side: int, seed: int = 0) -> List[np.ndarray]:
    """Random square-ish crops of the sample pictures: more D_CLIP images than the 12 pictures."""
    rng = np.random.default_rng(seed)
    out = []
    for a in images.values():
        h, w = a.shape[:2]
        for _ in range(per_image):
            s = int(min(h, w) * rng.uniform(0.5, 1.0))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = Image.fromarray(a[y:y + s, x:x + s]).resize((side, side), Image.BICUBIC)
            out.append(np.asarray(crop))
    return out


def run_distill_demo(out_dir: Optional[str] = None, sam_type: str = "vit_tiny", quiet: bool = False,
                     stage_steps: Sequence[int] = (60, 30, 15), clip_batch: int = 16, overwrite: bool = False) -> dict:
    """Small teachers in the official formats, a small dataset in the real formats (WebDataset
    shards, SA-1B json with COCO RLE masks), all three stages on the CPU, and a before/after table.

    The teachers have random weights (no model hub here), so the numbers show the mechanics, not
    semantic quality: at initialisation the student's SAM side IS the SAM teacher (mask IoU 1.0)
    and its CLIP head is untrained (low cosine); distillation must raise the cosine a lot while
    stage 2's SAM rehearsal keeps the mask IoU close to 1.
    """
    say = (lambda *a: None) if quiet else print
    out_dir = out_dir or os.path.join(os.getcwd(), "fastsamclip-demo")
    os.makedirs(out_dir, exist_ok=True)
    logging.getLogger("fastsamclip").setLevel(logging.ERROR)  # the table is the output; warnings would bury it
    t0 = time.perf_counter()
    report: dict = {"out_dir": out_dir}
    with tempfile.TemporaryDirectory() as work:
        sam_path, clip_name = _write_teachers(work, sam_type, say)
        clip_bytes = sum(os.path.getsize(os.path.join(work, "clip", f)) for f in os.listdir(os.path.join(work, "clip")))
        teacher_bytes = os.path.getsize(sam_path) + clip_bytes

        say("[2/4] writing a small dataset in the real formats (WebDataset shards, SA-1B json + RLE masks)")
        pictures = samples.load_sample_images(max_side=160)
        names = list(pictures)
        held_out = names[-3:]  # SA-1B pictures never seen in training, by either stream
        train_pics = {n: pictures[n] for n in names[:-3]}
        crops = _demo_crops(train_pics, per_image=6, side=128)
        clip_holdout = 0.15  # of the crops, chosen by a hash of each one's identity (the paper holds out 1%)
        shards = samples.write_clip_shards(os.path.join(work, "clip_data"), crops, shard_size=16)
        sa1b = os.path.join(work, "sa1b")
        samples.write_sa1b(sa1b, [(pictures[n], samples.synthetic_masks(pictures[n])) for n in names])
        spec = os.path.join(work, "clip_data", "{00000..%05d}.tar" % (len(shards) - 1))
        say(f"      D_CLIP: {len(crops)} crops in {len(shards)} shards ({clip_holdout:.0%} held out by hash); "
            f"D_SAM: {len(names)} SA-1B images ({len(held_out)} held out: {', '.join(held_out)})")

        s1, s2, s3 = stage_steps
        cfg = TrainConfig(
            sam_checkpoint=sam_path, sam_type=sam_type, clip_model=clip_name, clip_pretrained=None,
            clip_data=spec, sam_data=sa1b, out=os.path.join(out_dir, "run"),
            stage1_steps=s1, stage2_steps=s2, stage3_steps=s3,
            # The tiny CLIP teacher's input is 64 px and vit_tiny's native size 128 px: the analogue
            # of the paper's 224/448 CLIP mix and 1024 px SAM stream.
            clip_batch=clip_batch, clip_base_res=64, clip_resolutions=(64, 96), stage3_resolutions=(64, 96, 128),
            sam_batch=2, masks_per_image=8, eval_images=len(held_out), eval_resolutions=(64, 96, 128),
            clip_holdout=clip_holdout, overwrite=overwrite,
            # Short stages: a short warm-up; otherwise the paper's learning rates.
            warmup_fraction=0.1, progress=not quiet, tensorboard=False,
            checkpoint_every=0, log_every=5)
        say("[3/4] distilling: stage 1 head probing, stage 2 multi-task (CLIP + 10 x SAM), stage 3 resolutions")
        trainer = Distiller(cfg)
        before = trainer.evaluate()
        result = trainer.run()
        after = result["eval"]
        merged = load_merged(result["merged"])
        sam_params = sum(p.numel() for p in trainer.sam.parameters())
        clip_params = sum(p.numel() for p in trainer.clip.parameters())
    merged_params = merged.num_parameters()
    merged_bytes = os.path.getsize(result["merged"])

    say("[4/4] student vs teachers on the held-out images")
    rows = [(f"CLIP cosine @{r}px", before["clip_cosine"][r], after["clip_cosine"][r]) for r in after["clip_cosine"]]
    rows.append(("mask IoU vs SAM teacher", before["mask_iou"], after["mask_iou"]))
    say(f"      {'':28s}{'before':>10s}{'after':>10s}")
    for name, b, a in rows:
        say(f"      {name:28s}{b:>10.4f}{a:>10.4f}")
    say(f"      {'parameters':28s}{'merged':>10s}{'teachers':>10s}")
    say(f"      {'  count':28s}{merged_params / 1e6:>9.2f}M{(sam_params + clip_params) / 1e6:>9.2f}M")
    say(f"      {'  bytes on disk':28s}{merged_bytes / 2**20:>8.1f}MB{teacher_bytes / 2**20:>8.1f}MB")
    cos_b = float(np.mean(list(before["clip_cosine"].values())))
    cos_a = float(np.mean(list(after["clip_cosine"].values())))
    report.update(before=before, after=after, merged=result["merged"], merged_params=merged_params,
                  teacher_params=sam_params + clip_params, merged_bytes=merged_bytes, teacher_bytes=teacher_bytes,
                  stage_steps=result["stage_steps"],
                  distillation_worked=cos_a > cos_b + 0.1 and after["mask_iou"] > 0.9)
    report["seconds"] = time.perf_counter() - t0
    say(f"done in {report['seconds']:.1f} s; merged checkpoint {result['merged']}")
    return report
