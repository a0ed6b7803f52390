"""Segment by text: every instance of each phrase, from the image's one backbone pass.

``SAMCLIPPredictor.segment_text(image, ["a cat", "a dog"])`` runs the backbone once (what
``set_image`` runs) and serves every phrase from it: the CLIP head's per-patch embeddings say where
each phrase matches, SAM's decoder turns those places into instance masks, and the same per-patch
embeddings pooled inside each mask say whether the mask as a whole is the phrase. Steps and defaults
(``ConceptParams``):

1. **Text.** Each phrase's unit embedding by the CLIP zero-shot recipe (``templates``, the 80
   OpenAI templates by default, as ``generate(labels=...)``), and the same for the ``background``
   prompts (default ``("background",)``); cached per phrase across calls, bounded
   (:mod:`fastsamclip.predictor.text`).
2. **Where.** Per patch of the image (padding excluded), the softmax over the phrases AND the
   background prompts of ``logit_scale * cos(unit patch embedding, text)``. A softmax rather than a
   cosine threshold: CLIP's raw cosines are not calibrated across phrases or models, the softmax
   says which text a patch matches best. The background prompts take the patches that are none of
   the phrases (the paper's composed semantic protocol prompts "background" as a class on VOC), so
   one phrase alone is not found everywhere. The phrases of a call compete: a patch that matches
   "a dog" better than "a cat" is not a cat (the answer for a phrase depends on the other phrases
   of the call, as ``generate``'s labels do). A patch is a hit for a phrase at probability
   ``>= threshold`` (0.5: the phrase beats all the other texts together).
3. **Prompts.** Per phrase, the local maxima (3 x 3) of its probability among its hits, at least
   two patches apart, highest first, at most ``max_peaks``: each a foreground point at its patch's
   centre (the part inside the image), asking SAM's three masks (whole, part, subpart: which one
   is the instance is for step 4 to say). With ``box_prompts``, also a box around each connected
   region of hits (8-connected, at most ``max_peaks`` per phrase, highest peak first), one mask each:
   the box gives the extent a single point may not. All phrases' prompts go through the decoder
   together, ``points_per_batch`` prompts at a time.
4. **Scoring.** Each candidate mask's CLIP embedding is pooled from the same per-patch embeddings
   (the coverage-weighted mean of unit patch embeddings that ``generate`` names masks with,
   :mod:`fastsamclip.predictor.everything`), and its ``phrase_score`` is its probability for the
   phrase that prompted it, in the same softmax as step 2. A mask is kept when its phrase_score is
   at least ``threshold`` (the mask as a whole is the phrase, not only its peak) and its ``score``,
   the geometric mean of the decoder's predicted IoU (clamped to [0, 1]) and the phrase_score, is
   at least ``score_threshold`` (0.5): SAM's confidence in the shape and CLIP's in the name, each
   able to veto (a well-named blob or a crisp mask of the wrong thing both score low).
5. **Duplicates.** Per phrase, greedy mask non-maximum suppression by score: a mask is dropped when
   its overlap with a kept mask of the same phrase, the intersection as a share of the SMALLER of
   the two, is above ``nms_thresh`` (0.5). A peak and its region's box, or two peaks of one object,
   give the same instance; and SAM's part and subpart masks of a point lie inside the whole, with
   an IoU that can be well under 0.5 (a half is 0.5, a quarter 0.25), so IoU alone would keep them
   as instances of their own. Instances of one phrase seldom overlap (SAM's mask of an occluded
   object leaves out its occluder). Overlaps on the decoder's low-res masks.

Records, like ``generate``'s: ``phrase``, ``segmentation`` (``output_mode`` "binary_mask",
"uncompressed_rle" or "coco_rle"), ``area``, ``bbox`` (XYWH of the mask), ``score``,
``predicted_iou``, ``phrase_score``, ``similarity`` (the pooled embedding's cosine with the phrase)
and ``prompt`` (``{"point": [x, y]}`` or ``{"box": [x0, y0, x1, y1]}``, original pixels); ordered
by phrase as given, then by score. A phrase absent from the image has no record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, mask_to_rle_pytorch
from skimage.measure import label as connected_components

from fastsamclip.errors import InputError, check_range
from fastsamclip.predictor.everything import (
    OUTPUT_MODES,
    UPSCALE_BYTES,
    coco_rle,
    mask_patch_weights,
    name_masks,
    unknown_fields,
)
from fastsamclip.transforms import MASK_THRESHOLD, postprocess_masks

MAX_PHRASES = 256  # phrases per call: each costs its templates through the text tower once and its prompts
MAX_PHRASE_CHARS = 300  # CLIP's context is 77 tokens; longer text would be cut silently


@dataclass(frozen=True)
class ConceptParams:
    """``segment_text``'s parameters (the module docstring says what each step does with them)."""

    threshold: float = 0.5  # a patch (and a whole mask) is the phrase at this softmax probability
    score_threshold: float = 0.5  # keep masks whose sqrt(predicted IoU x phrase_score) reaches this
    nms_thresh: float = 0.5  # overlap (share of the smaller mask) above which the lower-scored one is dropped
    max_peaks: int = 32  # point prompts per phrase (and box prompts, one per region)
    box_prompts: bool = True  # also a box around each connected region of hits
    points_per_batch: int = 64  # prompts through the decoder at once (bounds its memory)
    background: Tuple[str, ...] = ("background",)  # texts that take the patches no phrase matches
    templates: Any = "openai"  # "openai" (80 prompts), "simple", or a list of format strings
    output_mode: str = "binary_mask"  # "binary_mask", "uncompressed_rle" or "coco_rle"

    @classmethod
    def from_kwargs(cls, params: Dict[str, Any]) -> "ConceptParams":
        unknown = unknown_fields(cls, params)
        if unknown:
            raise InputError(f"segment_text() got unknown parameters {unknown}; known: "
                             f"{', '.join(f.name for f in fields(cls))}")
        if isinstance(params.get("background"), str):
            params = dict(params, background=(params["background"],))
        if params.get("background") is not None:
            params = dict(params, background=tuple(params["background"]))
        cfg = cls(**params).checked()
        return dataclasses.replace(cfg, max_peaks=int(cfg.max_peaks), points_per_batch=int(cfg.points_per_batch))

    def checked(self) -> "ConceptParams":
        """Itself, after checking every parameter (an InputError naming the first bad one)."""
        for name in ("threshold", "score_threshold", "nms_thresh"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("max_peaks", "points_per_batch"):
            check_range(name, getattr(self, name), 1, integer=True)
        if not isinstance(self.box_prompts, bool):
            raise InputError(f"box_prompts must be true or false, got {self.box_prompts!r}")
        if self.output_mode not in OUTPUT_MODES:
            raise InputError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        if not self.background:
            raise InputError("background must name at least one text (default ('background',)): without one, "
                             "a phrase alone would match every patch")
        check_texts(self.background, "background")
        return self


def check_texts(texts, what: str = "phrases") -> Tuple[str, ...]:
    """A non-empty tuple of at most MAX_PHRASES distinct non-empty strings (a single string is one
    phrase), or an InputError (a ValueError) saying what is wrong and what to give."""
    if isinstance(texts, str):
        texts = (texts,)
    if texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise InputError(f"{what} must be a phrase or a list of phrases (strings), got {type(texts).__name__}")
    texts = tuple(texts)
    if not texts:
        raise InputError(f"{what}: the list is empty; give at least one phrase, e.g. [\"a cat\"]")
    if len(texts) > MAX_PHRASES:
        raise InputError(f"{what}: {len(texts)} phrases in one call; at most {MAX_PHRASES} (split the list)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"{what}[{i}] must be a string, got {type(t).__name__} {t!r:.60}")
        if not t.strip():
            raise InputError(f"{what}[{i}] is empty; every phrase needs text")
        if len(t) > MAX_PHRASE_CHARS:
            raise InputError(f"{what}[{i}] has {len(t)} characters; at most {MAX_PHRASE_CHARS} (CLIP reads 77 tokens)")
    dup = sorted({t for t in texts if texts.count(t) > 1})
    if dup:
        raise InputError(f"{what} repeat: {dup}; give each once")
    return texts


def instance_score(predicted_iou, phrase_prob):
    """An instance's score: sqrt(clamp(predicted IoU, 0, 1) x its name's probability), for tensors
    (elementwise), arrays or floats; the rule of step 4, also how the evaluation scores the masks of
    the pipelines it compares with."""
    if isinstance(predicted_iou, torch.Tensor):
        return (predicted_iou.clamp(0, 1) * phrase_prob).sqrt()
    return np.sqrt(np.clip(predicted_iou, 0.0, 1.0) * phrase_prob)


# ------------------------------------------------------------------------------------ prompts
def phrase_maps(patches: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(gh, gw, E) per-patch embeddings, (T, E) unit texts -> (T, gh, gw) softmax over the texts."""
    cos = F.normalize(patches.float(), dim=-1) @ text.float().T
    return (logit_scale * cos).softmax(-1).permute(2, 0, 1)


def find_prompts(probs: torch.Tensor, threshold: float, max_peaks: int, box_prompts: bool
                 ) -> Tuple[List[List[Tuple[int, int]]], List[List[Tuple[int, int, int, int]]]]:
    """(L, vh, vw) phrase probabilities over the image's patches -> per phrase its peak patches
    (row, col) and its regions' patch boxes (r0, c0, r1, c1) inclusive (steps 2-3 of the module).
    On the CPU: a few thousand values, read one by one (on a GPU each read would be a sync)."""
    probs = probs.float().cpu()
    hit = probs >= threshold
    local_max = F.max_pool2d(probs[:, None], 3, stride=1, padding=1)[:, 0] == probs
    peaks_all, boxes_all = [], []
    for k in range(probs.shape[0]):
        p = probs[k]
        cand = (hit[k] & local_max[k]).nonzero().tolist()
        cand.sort(key=lambda rc: -float(p[rc[0], rc[1]]))
        peaks: List[Tuple[int, int]] = []
        for r, c in cand:  # ties on a plateau are local maxima side by side: keep one
            if all(max(abs(r - r0), abs(c - c0)) >= 2 for r0, c0 in peaks):
                peaks.append((r, c))
                if len(peaks) == max_peaks:
                    break
        peaks_all.append(peaks)
        boxes: List[Tuple[int, int, int, int]] = []
        if box_prompts and hit[k].any():
            regions = connected_components(hit[k].numpy(), connectivity=2)
            flat = p.numpy()
            best = []
            for lab in range(1, int(regions.max()) + 1):
                rows, cols = np.nonzero(regions == lab)
                best.append((-float(flat[rows, cols].max()), (int(rows.min()), int(cols.min()), int(rows.max()),
                                                                int(cols.max()))))
            boxes = [b for _, b in sorted(best)[:max_peaks]]
        boxes_all.append(boxes)
    return peaks_all, boxes_all


def _patch_centre(r: int, c: int, patch: int, input_size: Tuple[int, int]) -> Tuple[float, float]:
    """(x, y) in the padded input frame: the centre of the patch's part inside the image."""
    ih, iw = input_size
    return (c * patch + min((c + 1) * patch, iw)) / 2, (r * patch + min((r + 1) * patch, ih)) / 2


# ------------------------------------------------------------------------------------ masks
@dataclass
class _Candidates:
    """Masks kept after scoring, on the device."""

    low_res: List[torch.Tensor]
    phrase: List[torch.Tensor]
    iou: List[torch.Tensor]
    prob: List[torch.Tensor]
    cos: List[torch.Tensor]
    prompt: List[Tuple[str, Tuple[float, ...]]]


def _score(predictor, cands: _Candidates, low: torch.Tensor, iou: torch.Tensor, phrase: torch.Tensor,
           prompts: List[Tuple[str, Tuple[float, ...]]], patches: torch.Tensor, text: torch.Tensor,
           p: ConceptParams) -> None:
    """Step 4 on a decoder batch: low (n, 4g, 4g), iou (n,), phrase (n,) -> the masks worth keeping."""
    lowres_px = predictor.img_size / low.shape[-1]
    valid = tuple(int(math.ceil(s / lowres_px)) for s in predictor.input_size)
    weights = mask_patch_weights(low, tuple(patches.shape[:2]), valid)
    probs, cos = name_masks(weights, patches, text, predictor.logit_scale())
    rows = torch.arange(len(phrase), device=low.device)
    prob, sim = probs[rows, phrase], cos[rows, phrase]
    score = instance_score(iou, prob)
    inside = (low[:, :valid[0], :valid[1]] > MASK_THRESHOLD).flatten(1).any(1)
    keep = ((prob >= p.threshold) & (score >= p.score_threshold) & inside).nonzero()[:, 0]
    cands.low_res.append(low[keep])
    cands.phrase.append(phrase[keep])
    cands.iou.append(iou[keep])
    cands.prob.append(prob[keep])
    cands.cos.append(sim[keep])
    cands.prompt.extend(prompts[i] for i in keep.tolist())


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS on bool masks (n, ...): indices kept, by descending score, a mask dropped when its
    overlap with a kept mask of its own group (intersection / the smaller area) is above ``thresh``.
    Plain torch::

        for i in argsort(-scores): keep i unless any(|m_i & m_j| / min(|m_i|, |m_j|) > thresh
                                                     for kept j with groups[j] == groups[i])
    """
    kept: List[int] = []
    for g in torch.unique(groups).tolist():  # one group at a time: (n_g, n_g) overlaps, never (n, n)
        idx = (groups == g).nonzero()[:, 0]
        flat = masks[idx].flatten(1).float()
        inter = flat @ flat.T
        area = flat.sum(1)
        over = (inter / torch.minimum(area[:, None], area[None, :]).clamp_min(1) > thresh).cpu()
        mine: List[int] = []
        for i in torch.argsort(scores[idx], descending=True, stable=True).tolist():
            if not any(bool(over[i, j]) for j in mine):
                mine.append(i)
        kept += idx[mine].tolist()
    keep = torch.tensor(kept, dtype=torch.long, device=masks.device)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


@torch.no_grad()
def segment_text(predictor, phrases: Tuple[str, ...], p: ConceptParams) -> List[Dict[str, Any]]:
    """The module's steps on the predictor's current image (``set_image`` already ran the pass)."""
    dev, patch = predictor.device, predictor.patch_size
    texts = tuple(phrases) + tuple(b for b in p.background if b not in phrases)
    text = predictor.text_embeddings(texts, p.templates)
    patches = predictor.clip_patches[0]
    ih, iw = predictor.input_size
    vh, vw = -(-ih // patch), -(-iw // patch)
    probs = phrase_maps(patches, text, predictor.logit_scale())[:len(phrases), :vh, :vw]
    peaks, regions = find_prompts(probs, p.threshold, p.max_peaks, p.box_prompts)

    oh, ow = predictor.original_size
    sx, sy = ow / iw, oh / ih
    cands = _Candidates([], [], [], [], [], [])
    point_xy = [(_patch_centre(r, c, patch, (ih, iw)), k) for k, pk in enumerate(peaks) for r, c in pk]
    box_xy = [((c0 * patch, r0 * patch, min((c1 + 1) * patch, iw), min((r1 + 1) * patch, ih)), k)
              for k, rk in enumerate(regions) for r0, c0, r1, c1 in rk]
    for s in range(0, len(point_xy), p.points_per_batch):
        part = point_xy[s:s + p.points_per_batch]
        coords = torch.tensor([xy for xy, _ in part], dtype=torch.float)[:, None]
        low, iou = predictor.decode(coords, torch.ones(len(part), 1, dtype=torch.int), None, None, True)
        k = low.shape[1]
        phrase = torch.tensor([ph for _, ph in part], device=dev).repeat_interleave(k)
        prompts = [("point", (x * sx, y * sy)) for (x, y), _ in part for _ in range(k)]
        _score(predictor, cands, low.flatten(0, 1).float(), iou.flatten().float(), phrase, prompts, patches, text, p)
    for s in range(0, len(box_xy), p.points_per_batch):
        part = box_xy[s:s + p.points_per_batch]
        boxes = torch.tensor([b for b, _ in part], dtype=torch.float)
        low, iou = predictor.decode(None, None, boxes, None, False)
        phrase = torch.tensor([ph for _, ph in part], device=dev)
        prompts = [("box", (x0 * sx, y0 * sy, x1 * sx, y1 * sy)) for (x0, y0, x1, y1), _ in part]
        _score(predictor, cands, low[:, 0].float(), iou[:, 0].float(), phrase, prompts, patches, text, p)

    g4 = 4 * predictor.features.shape[-1]
    low = torch.cat(cands.low_res) if cands.low_res else torch.zeros(0, g4, g4, device=dev)
    phrase = torch.cat(cands.phrase) if cands.phrase else torch.zeros(0, dtype=torch.long, device=dev)
    iou, prob, sim = (torch.cat(x) if x else torch.zeros(0, device=dev) for x in (cands.iou, cands.prob, cands.cos))
    score = instance_score(iou, prob)
    lowres_px = predictor.img_size / g4
    valid = tuple(int(math.ceil(s / lowres_px)) for s in predictor.input_size)
    keep = mask_nms(low[:, :valid[0], :valid[1]] > MASK_THRESHOLD, score, phrase, p.nms_thresh)
    keep = keep[torch.argsort(score[keep], descending=True, stable=True)]
    keep = keep[torch.argsort(phrase[keep], stable=True)]  # by phrase as given, then by score
    return _records(predictor, low[keep], [phrases[i] for i in phrase[keep].tolist()], score[keep], iou[keep],
                    prob[keep], sim[keep], [cands.prompt[i] for i in keep.tolist()], p.output_mode)


def _records(predictor, low: torch.Tensor, names: List[str], score, iou, prob, sim, prompts, output_mode: str
             ) -> List[Dict[str, Any]]:
    """Full-size masks of the kept candidates (a bounded chunk at a time) and their records."""
    oh, ow = predictor.original_size
    chunk = max(1, UPSCALE_BYTES // (4 * oh * ow * 2))
    out: List[Dict[str, Any]] = []
    meta = list(zip(names, score.tolist(), iou.tolist(), prob.tolist(), sim.tolist(), prompts))
    for s in range(0, low.shape[0], chunk):
        masks = postprocess_masks(low[s:s + chunk, None], predictor.input_size, predictor.original_size,
                                  predictor.img_size, threshold=MASK_THRESHOLD)[:, 0]
        areas = masks.sum((-1, -2)).tolist()
        boxes = batched_mask_to_box(masks).cpu().numpy()
        if output_mode == "binary_mask":
            segs: List[Any] = list(masks.cpu().numpy())
        else:
            segs = mask_to_rle_pytorch(masks)
            if output_mode == "coco_rle":
                segs = [coco_rle(r) for r in segs]
        for j, seg in enumerate(segs):
            name, sc, pi, pr, cs, (kind, xy) = meta[s + j]
            if areas[j] == 0:  # a mask of a few low-res cells can vanish at the original size
                continue
            out.append({"phrase": name, "segmentation": seg, "area": int(areas[j]),
                        "bbox": box_xyxy_to_xywh(boxes[j]).tolist(), "score": sc, "predicted_iou": pi,
                        "phrase_score": pr, "similarity": cs, "prompt": {kind: [round(v, 2) for v in xy]}})
    return out
