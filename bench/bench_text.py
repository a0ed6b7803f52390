"""Segment by text: every instance of 1, 5 and 20 phrases, against the two pipelines people assemble.

    python -m bench.bench_text --device cpu --images 2          # ViT-B at 1024 px on the CPU, random weights
    python -m bench.bench_text                                  # GPU: the same at full speed
    python -m bench.bench_text --quick                          # tiny models on the CPU, for CI

Three pipelines answer "every instance of these phrases" on the same images, for each phrase count:

- ``samclip-segment_text``: ``SAMCLIPPredictor.segment_text(image, phrases)``: one backbone pass,
  the phrases' peaks and regions through SAM's decoder, masks scored and suppressed per phrase.
- ``samclip-generate+filter``: ``SAMCLIPPredictor.generate(image, labels=phrases + background)``
  (segment everything, every mask named from the same pass), keeping the masks named as a phrase.
- ``sam-amg+clip-crops+filter/<clip>``: ``segment_anything.SamAutomaticMaskGenerator(sam)`` then
  the open_clip teacher on every mask's box crop (``bench_everything.label_box_crops``), softmax
  over phrases + background, keeping the masks named as a phrase.

All three use the same text embeddings (the teacher's text tower, 80 templates, computed before
timing as a deployment caches them) and the same background prompt. The merged model is built
from the same SAM and CLIP (its SAM side IS that SAM). fp32 on both sides unless ``--dtype``.

Workload with random weights (the default; real checkpoints by flag): random SAM weights predict
IoUs near zero and random CLIP weights match no phrase, so every filter would drop everything and
time nothing. So, as ``bench_everything``: the generators' thresholds are off and their NMS at
1.0, at ``--points-per-side`` 6 (108 masks per image, SA-1B's average count; the decoder then sees
108 candidates where the default 32 x 32 grid gives it 3072, which flatters both baselines), and
``segment_text`` runs at ``threshold=0``, ``score_threshold=0``: every phrase at its cap of
``max_peaks`` (32) points plus one region box, all scored and rendered after suppression: the most
decoder work it does per phrase. Each row reports the instances per image beside its speed.
Timing: warm-up on the first image, then per image each pipeline in turn (interleaved, so a shared
machine's drifting load weighs on all three alike; each row records the mean 1-minute load average
over its calls), every call timed on its own (wall clock on the CPU, synchronised on CUDA); p50 per
image, and img/s as images over the sum of the pipeline's own call times. Rows go to
``bench/results/text.csv`` as each phrase count is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from fastsamclip.data import samples

from .bench_everything import IMAGES, PeakMemory, build, label_box_crops
from .harness import LABELS, Result, append_csv, environment, format_extras, format_table, full_size_device, percentile
from .harness import sync

BACKGROUND = ("background",)
PHRASE_COUNTS = (1, 5, 20)


def time_interleaved(fns, images, device: torch.device, warmup: int, iters: int):
    """Warm-up on the first image, then per image each pipeline in turn (so a machine whose load
    drifts slows every pipeline alike), each call timed on its own and synchronised. Returns per
    pipeline (outputs of the last pass, per-image ms, peak MB of its first timed call, mean
    1-minute load average over its calls)."""
    for _ in range(warmup):
        for _, fn in fns:
            fn(images[0])
    sync(device)
    outs = {impl: [] for impl, _ in fns}
    ms = {impl: [] for impl, _ in fns}
    load = {impl: [] for impl, _ in fns}
    peak = {}
    for it in range(iters):
        for image in images:
            for impl, fn in fns:
                load[impl].append(os.getloadavg()[0])
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    out = fn(image)
                    sync(device)
                    ms[impl].append((time.perf_counter() - t0) * 1e3)
                peak.setdefault(impl, mem.peak_mb)
                if it == iters - 1:
                    outs[impl].append(out)
    return {impl: (outs[impl], ms[impl], peak[impl], float(np.mean(load[impl]))) for impl, _ in fns}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models on the CPU, 1 small image, 1 and 5 phrases (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--sam-type", default=None, help="SAM config (default vit_b; quick vit_tiny)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM .pth (default: random weights)")
    p.add_argument("--clip-model", default="ViT-B-16", help="open_clip name of the CLIP teacher")
    p.add_argument("--clip-pretrained", default=None, help="its tag or weights file (default: random)")
    p.add_argument("--phrases", type=int, nargs="+", default=None,
                   help=f"phrase counts to measure (default {' '.join(map(str, PHRASE_COUNTS))}; quick 1 5), "
                        f"at most {len(LABELS)}")
    p.add_argument("--images", type=int, default=None, help=f"how many of {', '.join(IMAGES)} (default 2; quick 1)")
    p.add_argument("--max-side", type=int, default=None, help="downscale images to this longest side (quick 160)")
    p.add_argument("--points-per-side", type=int, default=6, help="the generators' grid (see the docstring)")
    p.add_argument("--max-peaks", type=int, default=32, help="segment_text's point prompts per phrase (its default)")
    p.add_argument("--iters", type=int, default=1, help="timed passes over the images")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/text.csv)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = args.quick
    device = torch.device(full_size_device(p, args.device, q))
    counts = args.phrases or ((1, 5) if q else PHRASE_COUNTS)
    if not all(1 <= n <= len(LABELS) for n in counts):
        p.error(f"--phrases: each count must be between 1 and {len(LABELS)}")
    args.sam_type = args.sam_type or ("vit_tiny" if q else "vit_b")
    n_images = args.images or (1 if q else 2)
    if not 1 <= n_images <= len(IMAGES):
        p.error(f"--images must be between 1 and {len(IMAGES)}")
    random = args.sam_checkpoint is None
    amg_params = dict(points_per_side=args.points_per_side, pred_iou_thresh=0.0 if random else 0.88,
                      stability_score_thresh=0.0 if random else 0.95, box_nms_thresh=1.0 if random else 0.7)
    text_params = dict(max_peaks=args.max_peaks, **(dict(threshold=0.0, score_threshold=0.0) if random else {}))

    with tempfile.TemporaryDirectory(prefix="fastsamclip-text-") as tmp:  # --quick's tiny teachers, loaded from it
        sam, clip, predictor = build(argparse.Namespace(quick=q, sam_checkpoint=args.sam_checkpoint,
                                                        sam_type=args.sam_type, clip_model=args.clip_model,
                                                        clip_pretrained=args.clip_pretrained), device, tmp)
    max_side = args.max_side or (160 if q else None)
    images = list(samples.load_sample_images(IMAGES[:n_images], max_side=max_side).values())
    amg = SamAutomaticMaskGenerator(sam, **amg_params)
    scale = predictor.logit_scale()
    clip_name = "tiny-clip" if q else os.path.basename(str(args.clip_model))
    rows, env, path = [], environment(), None
    for n in counts:
        phrases = LABELS[:n]
        names = list(phrases) + list(BACKGROUND)
        text = predictor.text_embeddings(names)  # cached before timing, for every pipeline

        def ours(image):
            return predictor.segment_text(image, phrases, **text_params)

        def generate_filter(image):
            return [r for r in predictor.generate(image, labels=names, **amg_params) if r["label"] in phrases]

        def amg_clip_filter(image):
            recs = amg.generate(image)
            probs = label_box_crops(clip, image, [r["bbox"] for r in recs], text, scale)
            return [r for r, k in zip(recs, probs.argmax(-1).tolist()) if k < n]

        sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in images})
        case = f"{n_images} images ({', '.join(sizes)}) {args.sam_type}@{predictor.img_size} {n} phrases"
        fns = (("samclip-segment_text", ours), ("samclip-generate+filter", generate_filter),
               (f"sam-amg+clip-crops+filter/{clip_name}", amg_clip_filter))
        measured = time_interleaved(fns, images, device, args.warmup, args.iters)
        ours_p50 = statistics.median(measured["samclip-segment_text"][1])
        for impl, (outs, ms, peak, load) in measured.items():
            s = sorted(ms)
            extra = {"device": str(device), "dtype": "fp32", "phrases": n, "img_s": round(1e3 * len(ms) / sum(ms), 4),
                     "p50_ms": round(statistics.median(ms), 2), "p90_ms": round(percentile(s, 0.9), 2),
                     "instances_per_image": round(float(np.mean([len(o) for o in outs])), 1),
                     "points_per_side": args.points_per_side, "max_peaks": args.max_peaks,
                     "weights": "random" if random else "checkpoint",
                     "threads": torch.get_num_threads(), "images": n_images, "load_avg": round(load, 1)}
            if impl != "samclip-segment_text":
                extra["text_speedup"] = round(statistics.median(ms) / ours_p50, 3)
            rows.append(Result(bench="text", case=case, impl=impl, mode="instances-of-phrases",
                               ms=statistics.median(ms), peak_mem_mb=peak, extra=extra))
        path = append_csv(rows[-len(measured):], args.out or None, env)  # each phrase count as it is measured
        print(f"{n} phrases: " + ", ".join(f"{r.impl} {r.ms:.0f} ms" for r in rows[-len(measured):]), flush=True)
    print(format_table(rows))
    print()
    print(format_extras(rows, [("phrases", "phrases"), ("img/s", "img_s"), ("p50 ms", "p50_ms"),
                               ("instances/img", "instances_per_image"), ("segment_text speed-up", "text_speedup")]))
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
