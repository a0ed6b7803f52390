"""Segment everything and name every mask: SAM's generator + CLIP on every box crop, against one pass.

    python -m bench.bench_everything                  # GPU: SAM vit_b @1024 + CLIP ViT-B-16, 20 labels
    python -m bench.bench_everything --quick          # tiny models on the CPU, for CI
    python -m bench.bench_everything --device cpu --points-per-side 6 --images 2   # the CPU ratio

Two pipelines on the same images with the same generator parameters and labels:

- ``sam-amg+clip-crops/<clip>``: ``segment_anything.SamAutomaticMaskGenerator(sam).generate``, then
  the open_clip teacher on every mask's box crop (CLIP's eval geometry, batches of 32), each mask
  labelled by the softmax over the labels: the pipeline people assemble today.
- ``samclip-generate``: ``SAMCLIPPredictor.generate(image, labels=...)``: the merged model (built
  from the same SAM and CLIP teachers, so its SAM side IS that SAM) gives the same masks and
  names them from the same backbone pass.

Both sides use the same label embeddings (the teacher's text tower with the 80 templates, which
the merged model carries unchanged; computed before timing, as a deployment caches them).
Per row: p50 and p90 ms per image, img/s over the timed passes, peak memory of one image (CUDA
allocator peak; on the CPU the peak resident memory above the start, sampled every 5 ms), masks
per image, and for the merged row: mask agreement (the share of the generator's masks with a
counterpart of IoU >= 0.99, and the mean best IoU), label agreement (the share of matched masks
given the same label by both), and ``label_agreement_same_head``: the same comparison with the
MERGED model's own CLIP head run on each box crop (``classify``), which separates what the
pooling changes from what distillation has not yet taught the head (with random or undistilled
weights the first agreement is chance). The speed-up is the generator row's p50 over the merged
row's.

Weights: random unless checkpoints are given. Random SAM weights predict IoUs near zero and
unstable masks, so the thresholds default to off (``pred_iou_thresh=0``,
``stability_score_thresh=0``) and the NMS to 1.0 (random masks are image-wide textures: every box
is the image and NMS at 0.7 would keep one mask): every candidate becomes a mask, 3 x
points_per_side**2 of them, a known count (SA-1B averages ~100 masks per image: points_per_side 6
gives 108). With real weights the generator's defaults apply. Rows go to
``bench/results/everything.csv``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from fastsamclip.data import samples
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.transforms import clip_pixels

from .harness import (LABELS, Result, append_csv, format_extras, format_table, full_size_device, percentile,
                      scratch_dir, sync)

IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "clock")


# ------------------------------------------------------------------------------------ the baseline
def label_box_crops(clip, image: np.ndarray, boxes_xywh: Sequence[Sequence[float]], text: torch.Tensor,
                    logit_scale: float, batch_size: int = 32) -> torch.Tensor:
    """CLIP on every mask's box crop, as people pair SAM's masks with CLIP: each XYWH box cut from
    the uint8 (H, W, 3) image, CLIP's eval geometry (``clip_pixels``: shortest side resized, centre
    crop), the teacher's normalisation and image tower in batches. Returns (M, L) probabilities,
    the softmax of ``logit_scale * cos`` against the (L, E) unit ``text`` embeddings."""
    if not len(boxes_xywh):
        return torch.zeros(0, text.shape[0])
    device = next(clip.model.parameters()).device
    crops = [clip_pixels(crop, clip.image_size) for crop in box_crops(image, boxes_xywh)]
    probs = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            emb = clip.encode_image(clip.preprocess(torch.stack(crops[i:i + batch_size]).to(device)),
                                    normalize=True).float()
            probs.append((logit_scale * emb @ text.to(emb).T).softmax(-1).cpu())
    return torch.cat(probs)


def box_crops(image: np.ndarray, boxes_xywh: Sequence[Sequence[float]]) -> List[np.ndarray]:
    """Each XYWH box cut from the (H, W, 3) image, rounded, kept inside it, at least 1 px."""
    h, w = image.shape[:2]
    out = []
    for x, y, bw, bh in boxes_xywh:
        x0, y0 = min(max(int(round(x)), 0), w - 1), min(max(int(round(y)), 0), h - 1)
        out.append(np.ascontiguousarray(image[y0:y0 + max(int(round(bh)), 1), x0:x0 + max(int(round(bw)), 1)]))
    return out


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory of a block above its start, MB: the CUDA allocator's peak, or on the CPU the
    resident set (``/proc/self/statm``) sampled every 5 ms; None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _rss() -> Optional[int]:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            rss = self._rss()
            if rss is not None:
                self._max = max(self._max, rss)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._max = self._rss()
            if self._base is not None:
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss() or 0)
            self.peak_mb = (self._max - self._base) / 2**20


def run_pipeline(fn: Callable[[np.ndarray], list], images: List[np.ndarray], device: torch.device, warmup: int,
                 iters: int):
    """Warm-up on the first image, then ``iters`` passes over all images, each image timed on its
    own (synchronised). Returns (outputs of the last pass, per-image ms, seconds in all, peak MB)."""
    for _ in range(warmup):
        fn(images[0])
    sync(device)
    times, outs, peak = [], [], None
    t_all = time.perf_counter()
    for it in range(iters):
        outs = []
        for k, image in enumerate(images):
            if it == 0 and k == 0:
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    outs.append(fn(image))
                    sync(device)
                    times.append((time.perf_counter() - t0) * 1e3)
                peak = mem.peak_mb
                continue
            t0 = time.perf_counter()
            outs.append(fn(image))
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return outs, times, time.perf_counter() - t_all, peak


def agreement(ref: List[dict], out: List[dict], ref_labels: torch.Tensor, out_labels: Sequence[Optional[str]],
              labels: Sequence[str], iou_min: float = 0.99) -> Dict[str, float]:
    """Masks of ``ref`` matched to their best-IoU counterpart in ``out``; the label shares over matches."""
    if not ref:
        return {"matched": 1.0 if not out else 0.0, "mean_iou": 1.0 if not out else 0.0, "label": float("nan"),
                "pairs": []}
    a = torch.as_tensor(np.stack([r["segmentation"] for r in ref])).flatten(1).float()
    b = torch.as_tensor(np.stack([r["segmentation"] for r in out])).flatten(1).float() if out else None
    if b is None:
        return {"matched": 0.0, "mean_iou": 0.0, "label": float("nan"), "pairs": []}
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / union.clamp_min(1)
    best, j = iou.max(1)
    pairs = [(i, int(j[i])) for i in range(len(ref)) if best[i] >= iou_min]
    ref_names = [labels[int(k)] for k in ref_labels.argmax(-1)] if len(ref_labels) else []
    same = [ref_names[i] == out_labels[k] for i, k in pairs]
    return {"matched": len(pairs) / len(ref), "mean_iou": float(best.mean()),
            "label": (sum(same) / len(same)) if same else float("nan"), "pairs": pairs}


# ------------------------------------------------------------------------------------ main
def build(args, device: torch.device, tmp: str):
    if args.quick:
        sam_ckpt = args.sam_checkpoint or samples.write_sam_checkpoint(os.path.join(tmp, "sam.pth"), args.sam_type)
        clip_name, pretrained = samples.write_clip_local_dir(os.path.join(tmp, "clip")), None
    else:
        sam_ckpt, clip_name, pretrained = args.sam_checkpoint, args.clip_model, args.clip_pretrained
    torch.manual_seed(0)
    sam = load_sam_teacher(sam_ckpt, args.sam_type) if sam_ckpt else samples.random_sam(args.sam_type)
    clip = load_clip_teacher(clip_name, pretrained)
    merged = samclip_from_teachers(sam, clip, sam_config=args.sam_type)
    predictor = SAMCLIPPredictor(merged, device=device)
    return sam.to(device).eval(), clip.to(device).eval(), predictor


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, 2 small images (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--sam-type", default=None, help="SAM config (default vit_b; quick vit_tiny)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM .pth (default: random weights)")
    p.add_argument("--clip-model", default="ViT-B-16", help="open_clip name of the CLIP teacher")
    p.add_argument("--clip-pretrained", default=None, help="its tag or weights file (default: random)")
    p.add_argument("--images", type=int, default=None, help=f"how many of {', '.join(IMAGES)} (default 4; quick 2)")
    p.add_argument("--max-side", type=int, default=None, help="downscale images to this longest side (quick 160)")
    p.add_argument("--labels", type=int, default=20, help=f"class labels, at most {len(LABELS)}")
    p.add_argument("--points-per-side", type=int, default=None, help="generator grid (default 16; quick 4)")
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--pred-iou-thresh", type=float, default=None, help="default 0.88, or 0 with random SAM weights")
    p.add_argument("--stability-score-thresh", type=float, default=None,
                   help="default 0.95, or 0 with random SAM weights")
    p.add_argument("--box-nms-thresh", type=float, default=None, help="default 0.7, or 1.0 with random SAM weights")
    p.add_argument("--crop-n-layers", type=int, default=0)
    p.add_argument("--iters", type=int, default=None, help="timed passes over the images (default 2; quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-same-head", action="store_true", help="skip the label agreement with the merged head on crops")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/everything.csv)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = args.quick
    device = torch.device(full_size_device(p, args.device, q))
    if not 1 <= args.labels <= len(LABELS):
        p.error(f"--labels must be between 1 and {len(LABELS)}")
    args.sam_type = args.sam_type or ("vit_tiny" if q else "vit_b")
    n_images = args.images or (2 if q else 4)
    if not 1 <= n_images <= len(IMAGES):
        p.error(f"--images must be between 1 and {len(IMAGES)}")
    args.max_side = args.max_side or (160 if q else None)
    iters = args.iters or (1 if q else 2)
    random_sam = args.sam_checkpoint is None
    params = dict(points_per_side=args.points_per_side or (4 if q else 16), points_per_batch=args.points_per_batch,
                  pred_iou_thresh=args.pred_iou_thresh if args.pred_iou_thresh is not None else (
                      0.0 if random_sam else 0.88),
                  stability_score_thresh=args.stability_score_thresh if args.stability_score_thresh is not None else (
                      0.0 if random_sam else 0.95),
                  box_nms_thresh=args.box_nms_thresh if args.box_nms_thresh is not None else (
                      1.0 if random_sam else 0.7),
                  crop_n_layers=args.crop_n_layers)
    labels = LABELS[: args.labels]

    tmp = scratch_dir("fastsamclip-everything-")
    sam, clip, predictor = build(args, device, tmp)
    images = list(samples.load_sample_images(IMAGES[:n_images], max_side=args.max_side).values())
    text = predictor.text_embeddings(labels)  # the teacher's text tower and templates, for both sides
    scale = predictor.logit_scale()
    amg = SamAutomaticMaskGenerator(sam, **params)

    def baseline(image):
        recs = amg.generate(image)
        return recs, label_box_crops(clip, image, [r["bbox"] for r in recs], text, scale)

    def merged(image):
        return predictor.generate(image, labels=labels, **params)

    base_out, base_ms, base_s, base_peak = run_pipeline(baseline, images, device, args.warmup, iters)
    ours_out, ours_ms, ours_s, ours_peak = run_pipeline(merged, images, device, args.warmup, iters)

    agree = [agreement(r, o, lab, [m["label"] for m in o], labels) for (r, lab), o in zip(base_out, ours_out)]
    same_head = []
    if not args.no_same_head:
        for (recs, _), o, image, a in zip(base_out, ours_out, images, agree):
            if a["pairs"]:
                crops = box_crops(image, [recs[i]["bbox"] for i, _ in a["pairs"]])
                head = predictor.classify(crops, labels).argmax(-1)
                same_head.append([labels[int(h)] == o[k]["label"] for h, (_, k) in zip(head, a["pairs"])])
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
    case = (f"{n_images} images ({', '.join(sizes)}) {args.sam_type}@{predictor.img_size} pps{params['points_per_side']} "
            f"{len(labels)} labels")
    mean = lambda xs: round(float(np.nanmean(xs)), 4) if len(xs) and not np.all(np.isnan(xs)) else "n/a"  # noqa: E731
    rows = []
    for impl, outs, ms, total, peak in (
            (f"sam-amg+clip-crops/{os.path.basename(str(args.clip_model)) if not q else 'tiny-clip'}",
             [o[0] for o in base_out], base_ms, base_s, base_peak),
            ("samclip-generate", ours_out, ours_ms, ours_s, ours_peak)):
        s = sorted(ms)
        extra = {"device": str(device), "dtype": "fp32", "img_s": round(len(ms) / total, 4),
                 "p90_ms": round(percentile(s, 0.9), 2), "masks_per_image": round(statistics.mean(len(o) for o in outs), 1),
                 "points_per_side": params["points_per_side"], "box_nms_thresh": params["box_nms_thresh"],
                 "pred_iou_thresh": params["pred_iou_thresh"], "labels": len(labels),
                 "weights": "random" if random_sam else "checkpoint", "threads": torch.get_num_threads()}
        if impl == "samclip-generate":
            extra.update(mask_agreement=mean([a["matched"] for a in agree]),
                         mean_best_iou=mean([a["mean_iou"] for a in agree]),
                         label_agreement=mean([a["label"] for a in agree]),
                         label_agreement_same_head=mean([float(np.mean(x)) for x in same_head if x])
                         if not args.no_same_head else "skipped",
                         speedup=round(statistics.median(base_ms) / statistics.median(ms), 3))
        rows.append(Result(bench="everything", case=case, impl=impl, mode="everything+labels",
                           ms=statistics.median(ms), peak_mem_mb=peak, extra=extra))
    path = append_csv(rows, args.out)
    print(format_table(rows))
    print()
    print(format_extras(rows, [("img/s", "img_s"), ("p90 ms", "p90_ms"), ("masks/img", "masks_per_image"),
                               ("mask agr", "mask_agreement"), ("label agr", "label_agreement"),
                               ("same-head agr", "label_agreement_same_head"), ("speed-up", "speedup")]))
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
