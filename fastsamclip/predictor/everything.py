"""Segment everything, and name every mask, from one backbone pass per image (per crop).

``segment_anything.SamAutomaticMaskGenerator`` on the merged model, with the same parameters and
the same records (``segmentation``, ``area``, ``bbox`` XYWH, ``predicted_iou``, ``point_coords``,
``stability_score``, ``crop_box`` XYWH), built from ``segment_anything.utils.amg``'s own pieces
(point grids, crop boxes, stability score, mask boxes, crop-edge test, uncropping, RLE) and
torchvision's ``batched_nms``, in the same order, so that for the same SAM weights the masks are
upstream's (tested). Where it departs from upstream, it is for speed and gives the same result:

- The IoU threshold is applied to the decoder's low-res outputs BEFORE they are upscaled
  (upstream upscales every candidate first); the test is per mask, so the survivors are the same.
- Survivors are upscaled in chunks of at most ``UPSCALE_BYTES`` of float logits, whatever
  ``points_per_batch`` is, so a large point batch does not multiply the full-size memory.
- Candidates are kept as their low-res logits (256 x 256 at 1024 px, whatever the image size)
  until the non-maximum suppressions have run; only the final masks are upscaled again,
  uncropped and, for the RLE modes, encoded. Upstream RLE-encodes every candidate of every batch
  (a per-mask Python loop) and decodes the survivors back for ``binary_mask``. Upscaling the same
  logits twice with the same op gives the same masks.
- Everything up to the records stays on the model's device: thresholds, stability scores,
  boxes, the crop-edge test, both NMS, and the naming below.

Naming (``labels``): each mask's CLIP embedding is pooled from the SAME pass's per-patch CLIP
embeddings (``clip_patches``), as a coverage-weighted average of the UNIT per-patch embeddings:
the mask's low-res logits (4 x 4 cells per patch) thresholded at 0 and average-pooled to the
patch grid give the fraction of each patch inside the mask, and those fractions weight the
patches. Why this pooling:

- The per-patch projected embeddings are the dense CLIP signal the merged model is evaluated on
  (the paper's zero-shot semantic segmentation takes the cosine of each patch with the class
  texts). Averaging unit vectors averages their cosines with every text
  (``cos(sum_i w_i u_i, t) = sum_i w_i cos(u_i, t) / |sum_i w_i u_i|``), so the label is the class
  with the highest coverage-weighted mean patch score inside the mask: the semantic map's vote,
  counted over the mask.
- Unit vectors first, so a few high-norm patches cannot outvote the rest of the mask.
- Coverage weights rather than a 0/1 patch set: a boundary patch that is half background counts
  half, and a mask smaller than one patch still gets the patches it touches.
- Average, not the max pooling the CLIP head uses for its global embedding: that max is over
  head tokens before the head's LayerNorm + MLP, so per mask it would need an (M, patches, width)
  masked max (GBs at 1024 px for a few hundred masks) and the MLP again per mask; and a max over a
  mask is decided by single patches, often the boundary ones that see the neighbouring object.
  The weighted average is one (M, patches) @ (patches, E) product for all masks at once.
- Masks whose low-res mask is empty at the grid (possible for masks thinner than a low-res cell)
  fall back to the sigmoid of their logits as soft coverage.

Probabilities are the softmax over the labels of ``logit_scale * cos`` (the CLIP teacher's
temperature, as ``classify``); a mask whose best probability is below ``label_threshold`` keeps
``label = None`` ("other"). The label texts' embeddings come from
``SAMCLIPPredictor.text_embeddings`` (80 templates by default, cached per label set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import (
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from skimage.measure import label as connected_components
from torchvision.ops.boxes import batched_nms, box_area

from fastsamclip.predictor.text import check_labels
from fastsamclip.transforms import MASK_THRESHOLD, apply_coords, postprocess_masks

log = logging.getLogger(__name__)

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Full-size float logits upscaled at once (bytes); 1 GiB is ~85 candidates at 1024 x 1024 with
# the masks and the stability score's temporaries, and bounds the memory at any points_per_batch.
UPSCALE_BYTES = 1 << 30
# Final masks rendered and RLE-encoded at once (bytes of bool masks).
RENDER_BYTES = 256 << 20


def unknown_fields(cls, params: Dict[str, Any]) -> List[str]:
    """The names in ``params`` that are not fields of the dataclass ``cls``, sorted."""
    return sorted(set(params) - {f.name for f in fields(cls)})


@dataclass(frozen=True)
class EverythingParams:
    """``SamAutomaticMaskGenerator``'s parameters, with its defaults and meanings."""

    points_per_side: Optional[int] = 32  # grid of points_per_side**2 points; None: point_grids gives them
    points_per_batch: int = 64  # points through the decoder at once (x3 masks each); raise it on a GPU
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU is above this (off at <= 0)
    stability_score_thresh: float = 0.95  # keep masks at least this stable (off at <= 0)
    stability_score_offset: float = 1.0  # logit offset of the stability score's two thresholds
    box_nms_thresh: float = 0.7  # box IoU above which NMS drops the lower-scored mask, per crop
    crop_n_layers: int = 0  # layers of crops (layer i: (2**i)**2 crops), each a backbone pass
    crop_nms_thresh: float = 0.7  # box IoU of the NMS between crops (smaller crops preferred)
    crop_overlap_ratio: float = 512 / 1500  # overlap of the first layer's crops, fraction of the short side
    crop_n_points_downscale_factor: int = 1  # layer i samples points_per_side / factor**i per side
    point_grids: Optional[Sequence[np.ndarray]] = None  # explicit (N, 2) grids in [0, 1], one per layer
    min_mask_region_area: int = 0  # > 0: remove holes and islands smaller than this, then NMS again
    output_mode: str = "binary_mask"  # "binary_mask", "uncompressed_rle" or "coco_rle"

    @classmethod
    def from_kwargs(cls, params: Dict[str, Any]) -> "EverythingParams":
        unknown = unknown_fields(cls, params)
        if unknown:
            raise TypeError(f"generate() got unknown parameters {unknown}; known: "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**params)

    def grids(self) -> List[np.ndarray]:
        """The point grid of each crop layer, after checking every parameter."""
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids (points_per_side=None "
                             "with point_grids), as SamAutomaticMaskGenerator")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        for name in ("points_per_side", "points_per_batch", "crop_n_layers", "crop_n_points_downscale_factor",
                     "min_mask_region_area"):
            v = getattr(self, name)  # 2.5 points per side would build an empty grid and find nothing
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer, float))
                                  or not float(v).is_integer()):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        for name in ("points_per_batch", "crop_n_points_downscale_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop_n_layers < 0 or self.min_mask_region_area < 0:
            raise ValueError("crop_n_layers and min_mask_region_area must be >= 0")
        for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
                     "crop_nms_thresh", "crop_overlap_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(float(v)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.points_per_side is not None:
            if int(self.points_per_side) < 1:
                raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
            grids = build_all_layer_point_grids(int(self.points_per_side), self.crop_n_layers,
                                                self.crop_n_points_downscale_factor)
            if any(len(g) == 0 for g in grids):
                raise ValueError(f"points_per_side {self.points_per_side} with crop_n_points_downscale_factor "
                                 f"{self.crop_n_points_downscale_factor} leaves a crop layer without points")
            return grids
        grids = [np.asarray(g, dtype=np.float64) for g in self.point_grids]
        if len(grids) < self.crop_n_layers + 1:
            raise ValueError(f"point_grids has {len(grids)} grids; crop_n_layers={self.crop_n_layers} needs "
                             f"{self.crop_n_layers + 1} (one per layer)")
        for i, g in enumerate(grids):
            if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or not np.isfinite(g).all():
                raise ValueError(f"point_grids[{i}] must be a non-empty (N, 2) array of finite XY in [0, 1], "
                                 f"got shape {g.shape}")
        return grids


@dataclass
class _Crop:
    """One crop's surviving candidates (after its NMS), on the device, in the image frame."""

    box: List[int]  # XYXY in the image
    input_size: Tuple[int, int]  # the crop resized for the model, before padding
    low_res: torch.Tensor  # (N, 4gh, 4gw) float32 logits
    iou: torch.Tensor  # (N,)
    stability: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) XYXY in the image
    points: torch.Tensor  # (N, 2) float64 XY in the image
    probs: Optional[torch.Tensor] = None  # (N, L) label probabilities
    cos: Optional[torch.Tensor] = None  # (N, L) cosine with each label's text embedding


# ------------------------------------------------------------------------------------ naming
def mask_patch_weights(low_res: torch.Tensor, grid: Tuple[int, int], valid_lowres: Tuple[int, int]) -> torch.Tensor:
    """(N, 4gh, 4gw) low-res logits -> (N, gh * gw): the fraction of each patch inside each mask.

    Low-res cells outside the image (``valid_lowres`` (rows, cols) hold pixels) never count.
    A mask with no cell inside at the grid uses the sigmoid of its logits as soft coverage.
    """
    n = low_res.shape[0]
    factor = low_res.shape[-1] // grid[1]
    inside = torch.zeros(low_res.shape[-2:], dtype=torch.bool, device=low_res.device)
    inside[:valid_lowres[0], :valid_lowres[1]] = True
    hard = ((low_res > MASK_THRESHOLD) & inside).float()
    cells = grid[0] * grid[1]
    weights = F.avg_pool2d(hard[:, None], factor)[:, 0].reshape(n, cells)
    empty = weights.sum(-1) == 0
    if empty.any():
        soft = low_res[empty].float().sigmoid() * inside
        weights[empty] = F.avg_pool2d(soft[:, None], factor)[:, 0].reshape(-1, cells)
    return weights


def name_masks(weights: torch.Tensor, patches: torch.Tensor, text: torch.Tensor, logit_scale: float
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled mask embeddings against the label texts (the pooling in the module docstring).

    weights (N, gh * gw); patches (gh, gw, E) per-patch CLIP embeddings (not normalised); text
    (L, E) unit. Returns (probabilities (N, L), cosines (N, L)). Plain torch::

        emb = F.normalize(weights @ F.normalize(patches.flatten(0, 1), dim=-1), dim=-1)
        cos = emb @ text.T;  probs = (logit_scale * cos).softmax(-1)
    """
    unit = F.normalize(patches.float().reshape(-1, patches.shape[-1]), dim=-1)
    emb = F.normalize(weights.float() @ unit, dim=-1)
    cos = emb @ text.float().T
    return (logit_scale * cos).softmax(-1), cos


# ------------------------------------------------------------------------------------ masks
def _crop_embeddings(predictor, rgb: Optional[np.ndarray], crop_box: List[int], want_patches: bool):
    """(SAM embeddings (1, C, g, g), per-patch CLIP (g, g, E) or None, input_size): ONE backbone
    pass over the crop, or the predictor's cached pass when ``rgb`` is None (its current image)."""
    if rgb is None:
        return predictor.features, (predictor.clip_patches[0] if want_patches else None), predictor.input_size
    x0, y0, x1, y1 = crop_box
    x, input_size = predictor._sam_input(np.ascontiguousarray(rgb[y0:y1, x0:x1]), predictor.img_size)
    out = predictor.forward(x, clip=False, sam=True, clip_patches=want_patches)
    return out["sam"], (out["clip_patches"][0] if want_patches else None), tuple(input_size)


def _upscale(predictor, low_res: torch.Tensor, input_size, crop_hw) -> torch.Tensor:
    """(n, 4g, 4g) low-res -> (n, h, w) float32 logits at the crop's size (SAM's postprocessing)."""
    return postprocess_masks(low_res[:, None].float(), input_size, crop_hw, predictor.img_size)[:, 0]


def _process_crop(predictor, rgb, cached: bool, crop_box: List[int], grid: np.ndarray, orig_hw: Tuple[int, int],
                  p: EverythingParams, text: Optional[torch.Tensor]) -> _Crop:
    """``SamAutomaticMaskGenerator._process_crop`` + ``_process_batch`` on the device."""
    dev = predictor.device
    x0, y0, x1, y1 = crop_box
    crop_hw = (y1 - y0, x1 - x0)
    orig_h, orig_w = orig_hw
    feats, patches, input_size = _crop_embeddings(predictor, None if cached else rgb, crop_box, text is not None)
    points_for_image = grid * np.array(crop_hw)[None, ::-1]
    per_point_bytes = 4 * crop_hw[0] * crop_hw[1] * 3  # float logits + bool masks + stability temporaries
    chunk = max(1, UPSCALE_BYTES // per_point_bytes)
    keep_low, keep_iou, keep_stab, keep_boxes, keep_pts = [], [], [], [], []
    for s in range(0, len(points_for_image), p.points_per_batch):
        points = points_for_image[s:s + p.points_per_batch]
        # Float64 as upstream (the prompt encoder divides by the input size before casting).
        coords = torch.as_tensor(apply_coords(points, crop_hw, predictor.img_size), device=dev)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=dev)
        low_res, iou = predictor.model.predict_masks(feats, (predictor.img_size, predictor.img_size),
                                                     points=(coords[:, None, :], labels[:, None]),
                                                     multimask_output=True)
        k = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1).float(), iou.flatten(0, 1).float()
        pts = torch.as_tensor(points, device=dev).repeat_interleave(k, dim=0)
        if p.pred_iou_thresh > 0.0:  # per mask: the same survivors before or after upscaling
            keep = iou > p.pred_iou_thresh
            low_res, iou, pts = low_res[keep], iou[keep], pts[keep]
        for c in range(0, low_res.shape[0], chunk):
            lr = low_res[c:c + chunk]
            logits = _upscale(predictor, lr, input_size, crop_hw)
            stab = calculate_stability_score(logits, MASK_THRESHOLD, p.stability_score_offset)
            keep = stab >= p.stability_score_thresh if p.stability_score_thresh > 0.0 else torch.ones_like(
                stab, dtype=torch.bool)
            masks = logits[keep] > MASK_THRESHOLD
            del logits
            boxes = batched_mask_to_box(masks)
            del masks
            near = is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            idx = keep.nonzero()[:, 0][~near]
            keep_low.append(lr[idx])
            keep_iou.append(iou[c:c + chunk][idx])
            keep_stab.append(stab[idx])
            keep_boxes.append(boxes[~near])
            keep_pts.append(pts[c:c + chunk][idx])
    g = feats.shape[-1]
    low = torch.cat(keep_low) if keep_low else torch.zeros(0, 4 * g, 4 * g, device=dev)
    iou = torch.cat(keep_iou) if keep_iou else torch.zeros(0, device=dev)
    stab = torch.cat(keep_stab) if keep_stab else torch.zeros(0, device=dev)
    boxes = torch.cat(keep_boxes) if keep_boxes else torch.zeros(0, 4, dtype=torch.long, device=dev)
    pts = torch.cat(keep_pts) if keep_pts else torch.zeros(0, 2, dtype=torch.float64, device=dev)
    # Duplicates within the crop.
    keep = batched_nms(boxes.float(), iou, torch.zeros_like(iou), iou_threshold=p.box_nms_thresh)
    crop = _Crop(box=list(crop_box), input_size=tuple(input_size), low_res=low[keep], iou=iou[keep],
                 stability=stab[keep], boxes=uncrop_boxes_xyxy(boxes[keep], crop_box),
                 points=uncrop_points(pts[keep], crop_box))
    if text is not None:
        lowres_px = predictor.img_size / low.shape[-1]  # pixels of the padded input per low-res cell
        valid = tuple(int(np.ceil(s / lowres_px)) for s in input_size)
        weights = mask_patch_weights(crop.low_res, tuple(patches.shape[:2]), valid)
        crop.probs, crop.cos = name_masks(weights, patches, text, predictor.logit_scale())
    return crop


def _render(predictor, crops: List[_Crop], which: torch.Tensor, idx: torch.Tensor, orig_hw) -> torch.Tensor:
    """Bool (n, H, W) final masks of candidates ``idx`` (crop ``which``, row in that crop)."""
    out = torch.zeros(len(idx), *orig_hw, dtype=torch.bool, device=predictor.device)
    for ci in torch.unique(which).tolist():
        rows = (which == ci).nonzero()[:, 0]
        crop = crops[ci]
        x0, y0, x1, y1 = crop.box
        logits = _upscale(predictor, crop.low_res[idx[rows]], crop.input_size, (y1 - y0, x1 - x0))
        out[rows] = uncrop_masks(logits > MASK_THRESHOLD, crop.box, *orig_hw)
    return out


def _small_regions_mask(mask: np.ndarray, area: int, mode: str) -> Tuple[np.ndarray, bool]:
    """``segment_anything.utils.amg.remove_small_regions`` (OpenCV, 8-connected), or the same rule
    with scikit-image's 8-connected labelling where OpenCV (optional) is not installed."""
    try:
        import cv2  # noqa: F401  optional: upstream's own implementation needs it

        return remove_small_regions(mask, area, mode)
    except ImportError:
        pass
    correct_holes = mode == "holes"
    working = correct_holes ^ mask
    regions = connected_components(working, connectivity=2, background=0)
    sizes = np.bincount(regions.ravel())[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(len(sizes) + 1) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


def _coco_counts_string(counts: Sequence[int]) -> str:
    """pycocotools' ``rleToString``: 6-bit groups from chr 48, deltas against the run two before."""
    out = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def coco_rle(uncompressed: Dict[str, Any]) -> Dict[str, Any]:
    """COCO's compressed RLE ``{"size": [h, w], "counts": str}`` of an uncompressed one: upstream's
    ``coco_encode_rle`` (pycocotools), or the same string in Python without pycocotools (optional)."""
    try:
        import pycocotools.mask  # noqa: F401  optional: the C encoder, faster
    except ImportError:
        if not _said_python_rle:
            _said_python_rle.append(True)
            log.info("pycocotools is not installed: COCO RLE strings are encoded in Python (slower)")
        return {"size": list(uncompressed["size"]), "counts": _coco_counts_string(uncompressed["counts"])}
    return coco_encode_rle(uncompressed)


_said_python_rle: List[bool] = []


# ------------------------------------------------------------------------------------ generate
@torch.no_grad()
def generate(predictor, rgb: Optional[np.ndarray], params: EverythingParams, labels: Optional[Sequence[str]] = None,
             label_threshold: float = 0.0, templates="openai") -> List[Dict[str, Any]]:
    """``SamAutomaticMaskGenerator(...).generate(rgb)`` with the predictor's model; see the module.

    rgb: uint8 (H, W, 3), or None for the predictor's current image (its cached pass then serves
    the full-image crop: no backbone pass at all without crop layers). Returns upstream's records,
    plus with ``labels`` ``label`` (str, or None below ``label_threshold``), ``label_score`` (its
    probability), ``label_probs`` ({label: probability}) and ``label_similarity`` (the best
    label's cosine).
    """
    grids = params.grids()
    labels = check_labels(labels) if labels is not None else None
    text = predictor.text_embeddings(labels, templates) if labels is not None else None
    if not np.isfinite(label_threshold):
        raise ValueError(f"label_threshold must be a finite probability, got {label_threshold}")
    image = predictor.image if rgb is None else rgb
    orig_hw = tuple(image.shape[:2])
    crop_boxes, layer_idxs = generate_crop_boxes(orig_hw, params.crop_n_layers, params.crop_overlap_ratio)
    crops = [_process_crop(predictor, image, rgb is None and i == 0, box, grids[layer], orig_hw, params, text)
             for i, (box, layer) in enumerate(zip(crop_boxes, layer_idxs))]
    dev = predictor.device
    which = torch.cat([torch.full((len(c.iou),), i, dtype=torch.long, device=dev) for i, c in enumerate(crops)])
    idx = torch.cat([torch.arange(len(c.iou), device=dev) for c in crops])
    boxes = torch.cat([c.boxes for c in crops])
    if len(crops) > 1:  # duplicates between crops: prefer masks from smaller crops
        crop_xyxy = torch.tensor([crops[i].box for i in which.tolist()], dtype=torch.float, device=dev).reshape(-1, 4)
        keep = batched_nms(boxes.float(), 1 / box_area(crop_xyxy), torch.zeros(len(boxes), device=dev),
                           iou_threshold=params.crop_nms_thresh)
        which, idx, boxes = which[keep], idx[keep], boxes[keep]

    def gather(attr: str) -> Optional[torch.Tensor]:
        parts = [getattr(c, attr) for c in crops]
        if parts[0] is None:
            return None
        flat = torch.cat(parts)
        offsets = torch.tensor([0] + [len(c.iou) for c in crops], device=dev).cumsum(0)[:-1]
        return flat[offsets[which] + idx]

    iou, stab, points, probs, cos = (gather(a) for a in ("iou", "stability", "points", "probs", "cos"))
    masks_dev = _render(predictor, crops, which, idx, orig_hw) if params.min_mask_region_area > 0 or (
        params.output_mode == "binary_mask") else None
    if params.min_mask_region_area > 0 and len(idx):
        masks_dev, keep, boxes = _remove_small_regions(masks_dev, boxes, params)
        which, idx, iou, stab, points = which[keep], idx[keep], iou[keep], stab[keep], points[keep]
        probs = probs[keep] if probs is not None else None
        cos = cos[keep] if cos is not None else None
    if masks_dev is not None:
        areas = masks_dev.sum((-1, -2)).tolist()
        segmentations: List[Any] = list(masks_dev.cpu().numpy()) if params.output_mode == "binary_mask" else (
            mask_to_rle_pytorch(masks_dev))
    else:  # RLE without small-region removal: render and encode a bounded chunk at a time
        per = max(1, RENDER_BYTES // (orig_hw[0] * orig_hw[1]))
        areas, segmentations = [], []
        for s in range(0, len(idx), per):
            m = _render(predictor, crops, which[s:s + per], idx[s:s + per], orig_hw)
            areas += m.sum((-1, -2)).tolist()
            segmentations += mask_to_rle_pytorch(m)
    if params.output_mode == "coco_rle":
        segmentations = [coco_rle(r) for r in segmentations]
    return _records(segmentations, areas, boxes, iou, stab, points, [crops[i].box for i in which.tolist()],
                    labels, probs, cos, label_threshold)


def _remove_small_regions(masks: torch.Tensor, boxes: torch.Tensor, params: EverythingParams):
    """``SamAutomaticMaskGenerator.postprocess_small_regions`` on bool masks: holes and islands
    under ``min_mask_region_area`` removed, changed masks ranked after unchanged ones by NMS."""
    new, scores = [], []
    for m in masks.cpu().numpy():
        m, changed = _small_regions_mask(m, params.min_mask_region_area, "holes")
        unchanged = not changed
        m, changed = _small_regions_mask(m, params.min_mask_region_area, "islands")
        new.append(torch.as_tensor(m))
        scores.append(float(unchanged and not changed))
    new_masks = torch.stack(new)
    new_boxes = batched_mask_to_box(new_masks)
    keep = batched_nms(new_boxes.float(), torch.as_tensor(scores), torch.zeros(len(new_boxes)),
                       iou_threshold=max(params.box_nms_thresh, params.crop_nms_thresh))
    boxes = boxes.clone()
    changed = torch.as_tensor(scores) == 0.0
    boxes[changed.to(boxes.device)] = new_boxes[changed].to(boxes)
    keep = keep.to(boxes.device)
    return new_masks.to(masks.device)[keep], keep, boxes[keep]


def _records(segmentations, areas, boxes, iou, stab, points, crop_boxes, labels, probs, cos,
             label_threshold: float) -> List[Dict[str, Any]]:
    boxes_np = boxes.cpu().numpy()
    iou_l, stab_l, pts_l = iou.tolist(), stab.tolist(), points.cpu().numpy().tolist()
    probs_l = probs.cpu().tolist() if probs is not None else None
    cos_l = cos.cpu().tolist() if cos is not None else None
    out = []
    for i, seg in enumerate(segmentations):
        rec = {"segmentation": seg, "area": int(areas[i]), "bbox": box_xyxy_to_xywh(boxes_np[i]).tolist(),
               "predicted_iou": iou_l[i], "point_coords": [pts_l[i]], "stability_score": stab_l[i],
               "crop_box": box_xyxy_to_xywh(np.asarray(crop_boxes[i])).tolist()}
        if probs_l is not None:
            best = int(np.argmax(probs_l[i]))
            rec["label_score"] = probs_l[i][best]
            rec["label"] = labels[best] if probs_l[i][best] >= label_threshold else None
            rec["label_similarity"] = cos_l[i][best]
            rec["label_probs"] = dict(zip(labels, probs_l[i]))
        out.append(rec)
    return out
