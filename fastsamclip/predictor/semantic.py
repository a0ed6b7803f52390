"""Zero-shot semantic segmentation from one image: the CLIP head alone, or composed with the SAM head.

mode "clip" (the paper's CLIP-head protocol, 448 px): per-patch CLIP embeddings in SAM's geometry
-> cosine with the class text embeddings -> softmax over classes -> bilinear upsampling to the
image (upscale to the padded input, crop, resize) -> argmax.

mode "composed" (the paper's both-heads protocol, one native pass): coarse class maps from the
same pass's per-patch embeddings -> for every class whose maximum score over the image passes
``threshold``, 1..points_per_class points at its highest-scoring patches (more points the more
confident: n = 1 + round((p - 1) * (max - threshold) / (1 - threshold))), kept at least 2 patches
apart, each at the centre of its patch's part inside the image; these points plus the class's coarse map (as logits, resized to the decoder's 4x grid)
prompt the SAM head, one prompt per class, one mask each -> masks at the original size ->
per-pixel argmax of the logits across classes, background (-1) where no class logit is positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.transforms import MASK_THRESHOLD, postprocess_masks, sam_pixels


@dataclass
class SemanticResult:
    """What ``semantic_segment`` returns.

    label_map: (H, W) int64, the class index per pixel, -1 for background (composed mode: no
        class mask positive there; clip mode never gives -1).
    scores: (L, H, W) float32 per-class maps at the original size: clip mode the softmax
        probabilities; composed mode the sigmoid of the SAM head's mask logits (0 for classes
        that were not prompted).
    class_scores: (L,) the maximum coarse CLIP score of each class (what the threshold tests).
    prompted: indices of the classes the SAM head was prompted with (composed mode).
    points: per prompted class, the (x, y) points in original pixels given to the SAM head.
    """

    label_map: np.ndarray
    scores: np.ndarray
    labels: Tuple[str, ...]
    mode: str
    class_scores: np.ndarray
    prompted: List[int] = field(default_factory=list)
    points: Dict[int, List[Tuple[float, float]]] = field(default_factory=dict)


def class_maps(patches: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(1, gh, gw, E) per-patch embeddings, (L, E) unit text -> (L, gh, gw) softmax over classes."""
    cos = F.normalize(patches[0].float(), dim=-1) @ text.T  # (gh, gw, L)
    return (logit_scale * cos).softmax(-1).permute(2, 0, 1)


def coarse_mask_logits(probs: torch.Tensor, valid: Tuple[int, int]) -> torch.Tensor:
    """(P, g, g) class probabilities -> (P, 1, 4g, 4g) mask-prompt logits on the decoder's grid.

    logit(p) turns probability 0.5 into the decision boundary 0, as SAM's own low-res logits;
    eps = 1e-3 bounds them to +-6.9, the range of SAM's typical mask logits. The padding
    patches are set to the most negative value: no image there.
    """
    p = probs.clone()
    p[:, valid[0]:, :] = 0.0
    p[:, :, valid[1]:] = 0.0
    up = F.interpolate(p[:, None], scale_factor=4, mode="bilinear", align_corners=False)
    return torch.logit(up, eps=1e-3)


def pick_points(valid: torch.Tensor, threshold: float, points_per_class: int) -> Tuple[List[int], List[list]]:
    """(L, vh, vw) class probabilities over the image's patches -> (classes to prompt, their
    (row, col) patches): the rule in the module docstring."""
    vw = valid.shape[-1]
    class_scores = valid.flatten(1).amax(1)
    prompted, point_sets = [], []
    for c in range(valid.shape[0]):
        top = float(class_scores[c])
        if top < threshold:
            continue
        conf = 1.0 if threshold >= 1 else (top - threshold) / (1.0 - threshold)
        n = 1 + int(round((points_per_class - 1) * min(max(conf, 0.0), 1.0)))
        picked: List[Tuple[int, int]] = []
        for idx in torch.argsort(valid[c].flatten(), descending=True).tolist():
            r, q = divmod(idx, vw)
            if all(max(abs(r - r0), abs(q - q0)) >= 2 for r0, q0 in picked):
                picked.append((r, q))
                if len(picked) == n:
                    break
        prompted.append(c)
        point_sets.append(picked)
    return prompted, point_sets


@torch.no_grad()
def segment_clip(predictor, rgb: np.ndarray, labels, text: torch.Tensor, resolution: int) -> SemanticResult:
    """mode "clip" on one uint8 image at ``resolution`` (SAM's geometry)."""
    patch = predictor.patch_size
    if resolution % patch:
        raise ValueError(f"resolution must be a multiple of the patch size {patch}, got {resolution}")
    x, input_size = sam_pixels(rgb, resolution)
    x = predictor.model.preprocess(x[None].to(predictor.device), input_size)
    patches = predictor.forward(x, clip=False, sam=False, clip_patches=True)["clip_patches"]
    return clip_result(patches, text, predictor.text.logit_scale(), labels, input_size, rgb.shape[:2], resolution,
                       patch)


def clip_result(patches: torch.Tensor, text: torch.Tensor, logit_scale: float, labels, input_size, original_size,
                resolution: int, patch: int) -> SemanticResult:
    """mode "clip" from one image's (1, g, g, E) per-patch embeddings of a pass at ``resolution``."""
    probs = class_maps(patches, text, logit_scale)  # (L, g, g)
    scores = postprocess_masks(probs[None], input_size, original_size, resolution)[0]
    gh, gw = (-(-s // patch) for s in input_size)
    class_scores = probs[:, :gh, :gw].flatten(1).amax(1)
    return SemanticResult(label_map=scores.argmax(0).cpu().numpy(), scores=scores.cpu().numpy(),
                          labels=tuple(labels), mode="clip", class_scores=class_scores.cpu().numpy())


@torch.no_grad()
def segment_composed(predictor, labels, text: torch.Tensor, threshold: float, points_per_class: int) -> SemanticResult:
    """mode "composed" on the predictor's current image (set_image already ran the one pass)."""
    patch = predictor.patch_size
    probs = class_maps(predictor.clip_patches, text, predictor.text.logit_scale())  # (L, g, g), padded grid
    # Only patches that hold image pixels may be picked (the rest is padding).
    vh, vw = (-(-s // patch) for s in predictor.input_size)
    valid = probs[:, :vh, :vw]
    class_scores = valid.flatten(1).amax(1)
    prompted, point_sets = pick_points(valid, threshold, points_per_class)
    h, w = predictor.original_size
    scores = torch.zeros(len(labels), h, w)
    label_map = torch.full((h, w), -1, dtype=torch.int64)
    points_out: Dict[int, List[Tuple[float, float]]] = {}
    if prompted:
        n_max = max(len(p) for p in point_sets)
        coords = torch.zeros(len(prompted), n_max, 2)
        plabels = torch.full((len(prompted), n_max), -1, dtype=torch.int)  # -1: padding, ignored by SAM
        ih, iw = predictor.input_size
        sx, sy = w / iw, h / ih
        for k, picked in enumerate(point_sets):
            for j, (r, q) in enumerate(picked):
                # The centre of the patch's part inside the image, in the padded input frame (where
                # SAM's coordinates live): a patch on the last row or column may reach into padding.
                coords[k, j] = torch.tensor([(q * patch + min((q + 1) * patch, iw)) / 2,
                                             (r * patch + min((r + 1) * patch, ih)) / 2])
                plabels[k, j] = 1
            points_out[prompted[k]] = [(float(x) * sx, float(y) * sy) for x, y in coords[k, :len(picked)].tolist()]
        mask_logits = coarse_mask_logits(probs[prompted], (vh, vw))
        low_res, _ = predictor.decode(coords, plabels, None, mask_logits, multimask_output=False)
        logits = postprocess_masks(low_res, predictor.input_size, predictor.original_size,
                                   predictor.img_size)[:, 0].cpu()
        best, arg = logits.max(0)
        label_map = torch.where(best > MASK_THRESHOLD, torch.tensor(prompted)[arg], label_map)
        scores[prompted] = logits.sigmoid()
    return SemanticResult(label_map=label_map.numpy(), scores=scores.numpy(), labels=labels, mode="composed",
                          class_scores=class_scores.cpu().numpy(), prompted=prompted, points=points_out)
