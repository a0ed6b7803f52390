"""The ``semantic`` workload of ``bench.e2e``: one picture segmented into the 20 ``LABELS``.

- ``merged-composed``: the merged predictor's composed mode (one backbone pass, the CLIP head's
  per-patch classes prompting the SAM head).
- ``sam-amg+clip/<clip>``: ``segment_anything.SamAutomaticMaskGenerator``, then CLIP on every
  mask's box crop (``bench_everything.label_box_crops``, the pairing people assemble from the
  two models), each mask painted with its best class, larger masks first.

The two pipelines give different maps, so these rows carry no agreement figure.
"""

from __future__ import annotations

import copy
import statistics
from typing import List

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from fastsamclip.data import samples
from fastsamclip.kernels import use_backend
from fastsamclip.predictor import SAMCLIPPredictor

from .bench_everything import label_box_crops
from .harness import LABELS, Result, measure_batches, nbytes, percentile


def composed_fn(models, image: np.ndarray, device: torch.device):
    """The merged model's training-free semantic segmentation: one pass, CLIP-prompted SAM head."""
    model = copy.deepcopy(models.merged)
    model.text = models.merged_text
    if model.text is None:
        raise RuntimeError("the merged model has no text tower")
    pred = SAMCLIPPredictor(model, device=device)

    def run(_images):
        res = pred.semantic_segment(image, LABELS, mode="composed")
        return {"label_map": torch.from_numpy(res.label_map)}

    return run, [model.image_encoder, model.clip_head, model.prompt_encoder, model.mask_decoder, model.text]


def amg_clip_fn(models, clip_name: str, image: np.ndarray, points_per_side: int, device: torch.device):
    """SAM's automatic masks, then CLIP on every mask's box crop, each labelled by its best class."""
    clip = models.clips[clip_name]
    # Random SAM weights give mask logits within about +-0.1 (vit_tiny) and IoU predictions near
    # zero: the default thresholds (and the stability offset of 1.0) would drop every mask and
    # time an empty CLIP stage, so random weights keep all masks.
    thresh = ({"pred_iou_thresh": -1e9, "stability_score_thresh": -1.0, "stability_score_offset": 0.05}
              if models.random_sam else {})
    amg = SamAutomaticMaskGenerator(models.sam, points_per_side=points_per_side, **thresh)
    with torch.no_grad():
        text = clip.encode_text(clip.tokenize([f"a photo of a {c}." for c in LABELS]).to(device), normalize=True)
    h, w = image.shape[:2]
    counts: List[int] = []  # masks per image, reported beside the timing

    def run(_images):
        masks = amg.generate(image)
        counts.append(len(masks))
        label_map = torch.full((h, w), -1, dtype=torch.long)
        if masks:
            cls = label_box_crops(clip, image, [m["bbox"] for m in masks], text, logit_scale=1.0).argmax(-1)
            for i in sorted(range(len(masks)), key=lambda i: -masks[i]["area"]):  # smaller ones on top
                label_map[torch.from_numpy(masks[i]["segmentation"])] = cls[i]
        return {"label_map": label_map}

    run.mask_counts = counts
    return run, [models.sam, clip.model]


def semantic_rows(models, args, device: torch.device) -> List[Result]:
    """One row per pipeline: img/s, p50/p99 ms, weight MB, masks (AMG), or the row's error."""
    image = samples.sample_image("chelsea")
    case = f"semantic {image.shape[1]}x{image.shape[0]} {len(LABELS)} labels"
    rows = []
    builders = [("merged-composed", lambda: composed_fn(models, image, device))]
    builders += [(f"sam-amg+clip/{c}", (lambda c=c: amg_clip_fn(models, c, image, args.points_per_side, device)))
                 for c in models.clips]
    for impl, build in builders:
        r = Result(bench="e2e", case=case, impl=impl, mode="semantic", extra={"dtype": "fp32", "batch": 1})
        try:
            fn, used = build()
            with use_backend(None):
                _, times, total, peak, power = measure_batches(fn, None, device, args.warmup, args.iters)
        except Exception as e:  # a pipeline that breaks is a row with its error
            r.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(r)
            continue
        r.ms, r.peak_mem_mb = statistics.median(times), peak
        r.extra.update(img_s=round(len(times) / total, 3),
                       p99_ms=round(percentile(times, 0.99), 3),
                       weight_mb=round(nbytes(used) / 2**20, 3),
                       j_per_img=(round(power.joules(total) / len(times), 5) if power.joules(total) is not None
                                  else power.reason or "n/a: too few power samples"),
                       max_rel_err="n/a: different pipelines, no shared reference")
        if impl.startswith("sam-amg"):
            r.extra["points_per_side"] = args.points_per_side
            r.extra["masks"] = fn.mask_counts[-1]
        rows.append(r)
    return rows
