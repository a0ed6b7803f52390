"""Single-image inference latency and time to first result, cold and warm.

    python -m bench.bench_inference [--checkpoint merged.safetensors] [--compile] [--device cuda]
    python -m bench.bench_inference --quick        # tiny model on the CPU, for CI

Workload per request (the low-latency use of the merged model): ``set_image`` (one backbone
pass), ``segment`` with one box prompt, and ``semantic_segment`` in composed mode with 20 labels
(CLIP head -> point and mask prompts -> SAM head). Latency: p50/p99 over ``--iters`` requests on
the same image after warm-up, CUDA events around each whole request (kernels and host work),
synchronised after it (the wall clock on the CPU).

Precision: ``--dtype`` is the predictor's (auto: bf16 on CUDA, fp32 on the CPU); a run in another
dtype than fp32 also serves the request once with an fp32 predictor of the same checkpoint and
reports the agreement beside the latency: the SAM embedding's max relative error, the CLIP
embedding's cosine, the box mask's IoU and the share of semantic-map pixels with the same label.

Time to first result: a fresh process loads the checkpoint, builds the predictor, and serves one
request. Run twice with the same Inductor cache directory: the first ("cold") compiles, the
second ("warm") reads the cache. Without ``--compile`` both are eager and should match.
Rows are appended to ``bench/results/inference.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from fastsamclip.checkpoint import save_merged
from fastsamclip.data import samples
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor

from .harness import LABELS, Result, append_csv, environment, format_table, percentile, scratch_dir, sync, time_calls


def make_random_checkpoint(folder: str, sam_type: str = "vit_b", clip_model: str = "ViT-L-14") -> str:
    """A merged model of the real sizes with random weights (speed does not depend on the values)."""
    torch.manual_seed(0)
    path = os.path.join(folder, f"random-{sam_type}-{clip_model}.safetensors")
    save_merged(samclip_from_teachers(samples.random_sam(sam_type), load_clip_teacher(clip_model, None),
                                      sam_config=sam_type), path)
    return path


def make_quick_checkpoint(folder: str) -> str:
    """A tiny merged model (small teachers in the official formats) for CPU smoke runs."""
    sam = load_sam_teacher(samples.write_sam_checkpoint(os.path.join(folder, "sam.pth"), "vit_tiny"), "vit_tiny")
    clip = load_clip_teacher(samples.write_clip_local_dir(os.path.join(folder, "clip")))
    path = os.path.join(folder, "merged.safetensors")
    save_merged(samclip_from_teachers(sam, clip), path)
    return path


def request(predictor, image: np.ndarray, labels: List[str], resolution: int):
    h, w = image.shape[:2]
    predictor.set_image(image)
    masks, scores, _ = predictor.segment(boxes=[[w * 0.2, h * 0.2, w * 0.8, h * 0.8]], multimask_output=False)
    sem = predictor.semantic_segment(None, labels, mode="composed")
    return masks, scores, sem


def build_predictor(args, dtype=None):
    return SAMCLIPPredictor(args.checkpoint, device=args.device, compile=args.compile,
                            compile_backend=args.compile_backend, cache_dir=args.cache_dir,
                            dtype=dtype or args.dtype)


def agreement_with_fp32(args, predictor, image: np.ndarray, labels: List[str]) -> dict:
    """The request's outputs against an fp32 predictor's on the same image (eager: no compile)."""
    masks, _, sem = request(predictor, image, labels, args.resolution)
    feats, clip = predictor.features.clone(), predictor.clip_embedding.clone()
    ref = SAMCLIPPredictor(args.checkpoint, device=predictor.device, dtype="fp32")
    ref_masks, _, ref_sem = request(ref, image, labels, args.resolution)
    union = np.logical_or(masks, ref_masks).sum()
    return {
        "vs_fp32_sam_rel_err": f"{((feats - ref.features).abs().max() / ref.features.abs().max()).item():.3g}",
        "vs_fp32_clip_cos": f"{torch.nn.functional.cosine_similarity(clip, ref.clip_embedding).min().item():.5f}",
        "vs_fp32_mask_iou": f"{np.logical_and(masks, ref_masks).sum() / union:.4f}" if union else "n/a: empty masks",
        "vs_fp32_label_agreement": f"{(sem.label_map == ref_sem.label_map).mean():.4f}",
    }


def child_first_result(args) -> None:
    """Body of the time-to-first-result process: prints seconds since it started."""
    t0 = float(os.environ["FASTSAMCLIP_TTFR_T0"])
    predictor = build_predictor(args)
    image = samples.sample_image(args.image)
    request(predictor, image, LABELS[: args.labels], args.resolution)
    sync(predictor.device)
    print(json.dumps({"seconds": time.time() - t0}))


def time_to_first_result(args, cache_dir: str) -> float:
    cmd = [sys.executable, "-m", "fastsamclip.bench.bench_inference", "--ttfr-child", "--checkpoint", args.checkpoint,
           "--labels", str(args.labels), "--image", args.image, "--compile-backend", args.compile_backend,
           "--cache-dir", cache_dir, "--dtype", args.dtype] + (["--compile"] if args.compile else []) + (
               ["--device", args.device] if args.device else [])
    env = dict(os.environ, FASTSAMCLIP_TTFR_T0=repr(time.time()))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"first-result process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="merged .safetensors (default: random weights, SAM vit_b + CLIP "
                                        "ViT-L-14; with --quick a tiny model)")
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile per resolution (CUDA graphs on CUDA)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the predictor's precision (auto: bf16 on CUDA, fp32 on the CPU); not fp32: agreement "
                        "with an fp32 predictor is reported")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--labels", type=int, default=20, help="number of class labels (at most 20)")
    p.add_argument("--resolution", type=int, default=448)
    p.add_argument("--image", default="astronaut", help="a skimage.data picture name")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-ttfr", action="store_true", help="skip the cold/warm first-result processes")
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations (CPU smoke run)")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/inference.csv)")
    p.add_argument("--ttfr-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not 1 <= args.labels <= len(LABELS):
        p.error(f"--labels must be between 1 and {len(LABELS)}")
    if args.ttfr_child:
        child_first_result(args)
        return 0
    tmp = scratch_dir("fastsamclip-bench-")
    if args.quick:
        args.iters, args.warmup = min(args.iters, 5), 1
        args.checkpoint = args.checkpoint or make_quick_checkpoint(tmp)
    if not args.checkpoint:
        if args.device is None and not torch.cuda.is_available():
            p.error("no CUDA GPU is visible: the default full-size model would be slow on the CPU; use --quick "
                    "(tiny model), --checkpoint, or --device cpu to run it anyway")
        args.checkpoint = make_random_checkpoint(tmp)

    predictor = build_predictor(args)
    image = samples.sample_image(args.image)
    labels = LABELS[: args.labels]
    for _ in range(args.warmup):
        request(predictor, image, labels, args.resolution)
    sync(predictor.device)
    times, _ = time_calls(lambda: request(predictor, image, labels, args.resolution), args.iters, predictor.device)
    times.sort()
    p50 = statistics.median(times)
    p99 = percentile(times, 0.99)
    mode = "compiled" if args.compile else "eager"
    dtype = str(predictor.dtype).replace("torch.", "").replace("float32", "fp32").replace(
        "bfloat16", "bf16").replace("float16", "fp16")
    extra = {"p99_ms": round(p99, 3), "iters": args.iters, "dtype": dtype}
    if predictor.dtype != torch.float32:
        extra.update(agreement_with_fp32(args, predictor, image, labels))
    case = f"{os.path.basename(args.checkpoint)} {image.shape[1]}x{image.shape[0]} box+{args.labels} labels composed"
    rows = [Result(bench="inference", case=case, impl=mode, mode="request p50", ms=p50, extra=extra),
            Result(bench="inference", case=case, impl=mode, mode="request p99", ms=p99, extra={"dtype": dtype})]
    env = environment()  # one stamp for the run: rows are appended as they are measured
    path = append_csv(rows, args.out, env)
    if not args.no_ttfr:
        cache = args.cache_dir or os.path.join(tmp, "inductor-cache")
        for label in ("first result cold", "first result warm"):
            seconds = time_to_first_result(args, cache)
            rows.append(Result(bench="inference", case=case, impl=mode, mode=label, ms=seconds * 1e3))
            append_csv(rows[-1:], args.out, env)
    print(format_table(rows))
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
