"""Held-out agreement of the student with its teachers: the run's report card.

- CLIP: on the held-out D_CLIP images (a hash split, the paper's 1%), the cosine between the
  student's pooled CLIP embedding and the CLIP teacher's at each asked resolution (the same r x r
  view for both); for the full-token path and, side by side, for each token-pooled path (the CLIP
  head on the trunk tokens averaged k x k) from the same backbone pass.
- SAM: on the held-out SA-1B images, the mean IoU between the student's masks and the SAM
  teacher's for the same box and point prompts (both logits thresholded at 0; an empty union
  counts as agreement). The prompts are the draw of epoch :data:`HELD_OUT_EPOCH`, whatever epoch
  the training stream has reached, so the same weights always get the same number (a run resumed
  in stage 3 reports what the uninterrupted run reports).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.errors import DataError
from fastsamclip.modeling import SAMCLIP
from fastsamclip.train.targets import TeacherTargets, student_masks
from fastsamclip.transforms import apply_boxes, apply_coords, clip_pixels, sam_pixels

HELD_OUT_EPOCH = 0  # the held-out images' mask and prompt draw: fixed, never the stream's epoch


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, h, w) bool, (M, h, w) bool -> (M,) IoU, 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def held_out_prompts(raw, k: int, sam_size: int, device: torch.device) -> Dict[str, object]:
    """Up to ``k`` of a raw sample's drawn prompts of each kind, mapped to the model input frame."""
    p, size, out = raw.prompts, raw.image.shape[:2], {}
    if p.boxes is not None:
        out["boxes"] = apply_boxes(torch.from_numpy(p.boxes[:k]), size, sam_size).to(device)
    if p.points is not None:
        out["points"] = (apply_coords(torch.from_numpy(p.points[:k]), size, sam_size).to(device),
                         torch.from_numpy(p.point_labels[:k]).to(device))
    return out


@torch.no_grad()
def evaluate_agreement(student: SAMCLIP, targets: TeacherTargets, clip_images: Sequence, sam_data,
                       indices: Sequence[int], resolutions: Sequence[int], sam_size: int, masks_per_image: int,
                       device: torch.device, autocast, batch_size: int = 16, token_pools: Sequence[int] = ()
                       ) -> dict:
    """{"clip_cosine": {r: mean cosine}, "clip_cosine_pooled": {k: {r: mean cosine}}, "clip_images":
    n, "mask_iou": mean IoU, "images": n, "masks": m}; ``clip_images``: held-out D_CLIP
    ``(identity, image)`` pairs. The teachers run live here (held-out images are never in the cache)."""
    was_training = student.training
    student.eval()
    if not clip_images:
        raise DataError("no held-out D_CLIP image could be read for the report")
    pools = (1,) + tuple(int(k) for k in token_pools)
    cos: Dict[int, Dict[int, list]] = {k: {int(r): [] for r in resolutions} for k in pools}
    for r in cos[1]:
        for i in range(0, len(clip_images), batch_size):
            x = torch.stack([clip_pixels(im, r) for _, im in clip_images[i:i + batch_size]]).to(device)
            t = targets.live_clip(x)
            with autocast():
                feats = student.forward_features(student.preprocess(x))
            for k in pools:
                with autocast():
                    s = student.clip_embeddings(feats, token_pool=k).float()
                cos[k][r] += F.cosine_similarity(s, t, dim=-1).tolist()
    ious = []
    for idx in indices:
        raw = sam_data.load_raw(idx, epoch=HELD_OUT_EPOCH)
        if raw is None:
            continue
        x, hw = sam_pixels(raw.image, sam_size)
        x = x[None].to(device)
        with autocast():
            s_emb = student(student.preprocess(x, hw), clip=False, sam=True)["sam"]
        t_emb = targets.live_sam(x, hw)
        prompts = held_out_prompts(raw, min(masks_per_image, len(raw.prompts.indices)), sam_size, device)
        if prompts:
            s_l = student_masks(student, s_emb, prompts, (sam_size, sam_size))
            t_l = targets.masks(t_emb[0], prompts)
            ious += mask_iou(s_l[:, 0] > 0, t_l[:, 0] > 0).tolist()
    student.train(was_training)
    if not ious:
        raise DataError("no held-out SA-1B image could be read for the report")
    means = {k: {r: float(np.mean(v)) for r, v in c.items()} for k, c in cos.items()}
    return {"clip_cosine": means.pop(1), "clip_cosine_pooled": means, "clip_images": len(clip_images),
            "mask_iou": float(np.mean(ious)), "images": len(indices), "masks": len(ious)}
