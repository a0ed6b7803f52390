"""Input pipeline: images per second of the D_CLIP and SA-1B streams per worker count, and the
share of a training step's time spent waiting for data.

    python -m bench.bench_data                    # 2000 photo-like 683x512 JPEGs, 24 SA-1B images
    python -m bench.bench_data --quick            # small, for CI
    fastsamclip bench data --workers 0,2,4,8 --step-ms 187,115

The data are written first, in the real formats, from pictures that ship offline (never zeros):
D_CLIP as img2dataset shards of photo-like 683 x 512 JPEGs (random crops of scikit-image's
pictures, quality 95, 250 per shard), D_SAM as SA-1B files of 2250 x 1500 JPEGs with ~100 COCO-RLE
masks each (the package's own writers). Rows (``bench/results/data.csv``):

- ``clip 224`` / ``clip 448`` / ``clip 224/448`` (the mixed schedule), impl ``stream w=N``: the
  training stream itself (:class:`~fastsamclip.data.ClipStream`, PIL with JPEG draft mode, N
  DataLoader workers; 0: in the measuring process), a per-rank batch of ``--batch`` images at 224
  (constant pixels: a quarter of it at 448). References, in one process: ``pil full`` (PIL without
  draft mode, the decoding the stream did before draft mode) and ``torchvision cpu`` (torchvision's
  ``decode_jpeg`` and the GPU path's resize, on the CPU); on CUDA ``stream cuda w=N`` (the workers
  read, nvJPEG decodes on the GPU).
- ``sa1b 1024``, impl ``stream w=N``: :class:`~fastsamclip.data.SamStream` (decode, resize to
  1024, mask draw, RLE decode, prompts, low-res masks), ``--sam-batch`` images per batch.
- ``wait live`` / ``wait cached``: a consumer that spends ``step_ms`` per batch (as a GPU step
  would, sleeping, so the workers have the CPU) on the mixed schedule; ``wait_frac`` is the share
  of its time spent in ``next()``. ``step_ms`` (at 224 and at 448): ``--step-ms``, else the
  fastest stage-2 GPU row of ``bench train`` scaled to the batch, else the FLOP model: per image
  131 GFLOP (224) / 554 (448) for the student's CLIP path forward and backward, plus 162 for the
  ViT-L/14 teacher with live teachers (counted with torch's FlopCounterMode on the full-size models,
  ``--count-flops``), at ``--tflops`` achieved (400: about half the bf16 peak measured on an H200).

Timing: wall clock around ``--batches`` batches after one untimed batch (worker start-up and the
first decode), median img/s over ``--repeats`` runs; the runs of a case's rows take turns, so a
shared machine's changing load falls alike on all of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from fastsamclip.data import (
    ClipStream,
    MultiResolutionConfig,
    PromptConfig,
    SA1BDataset,
    SamStream,
    decode_views_on,
    samples,
)
from fastsamclip.kernels import use_backend
from fastsamclip.modeling import CLIPHeadConfig, build_sam, load_clip_teacher, samclip_from_teachers
from fastsamclip.transforms import clip_pixels, decode_rgb

from .harness import RESULTS_DIR, Result, append_csv, format_extras, read_csv, scratch_dir

# GFLOP per image, counted with FlopCounterMode on the full-size models (``--count-flops``):
# SAM ViT-B student's CLIP path (backbone + CLIP head), forward and backward, per side; the
# OpenCLIP ViT-L/14 teacher's forward (it always sees 224 px).
STUDENT_GFLOP = {224: 131.0, 448: 554.5}
TEACHER_GFLOP = 162.0


# ------------------------------------------------------------------------------------ data
def photo_like(n: int, size: Tuple[int, int] = (683, 512), seed: int = 0) -> List[np.ndarray]:
    """``n`` distinct photo-like images of ``size`` (W, H): random crops (60-100% of the short
    side, random aspect) of scikit-image's pictures, flipped at random, resized bicubic."""
    pics = [p for p in samples.load_sample_images().values() if min(p.shape[:2]) >= 300]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = pics[i % len(pics)]
        h, w = a.shape[:2]
        ch = int(h * rng.uniform(0.6, 1.0))
        cw = min(w, int(ch * size[0] / size[1] * rng.uniform(0.8, 1.2)))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = a[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC)))
    return out


def sa1b_like(n: int, size: Tuple[int, int] = (2250, 1500), masks: int = 100, seed: int = 0):
    """SA-1B geometry: ``n`` images of ``size`` (W, H) with about ``masks`` object-like masks each
    (superpixels of a 1/10 version, upsampled), as (image, masks) pairs for ``samples.write_sa1b``."""
    for a in photo_like(n, size, seed):
        small = np.asarray(Image.fromarray(a).resize((size[0] // 10, size[1] // 10), Image.BILINEAR))
        m = samples.synthetic_masks(small, n_segments=(masks // 3, masks), min_area_frac=0.0005)[:masks]
        big = np.stack([np.asarray(Image.fromarray(x.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
                        for x in m])
        yield a, big


def write_data(root: str, n_clip: int, n_sam: int, shard_size: int, quick: bool) -> Tuple[str, str]:
    clip_dir, sam_dir = os.path.join(root, "clip"), os.path.join(root, "sa1b")
    if not os.path.isdir(clip_dir):
        size = (228, 171) if quick else (683, 512)  # quick: the mechanics, small pictures
        shards = samples.write_clip_shards(clip_dir, photo_like(n_clip, size), shard_size=shard_size)
        print(f"wrote {n_clip} D_CLIP images in {len(shards)} shards to {clip_dir}", flush=True)
    if not os.path.isdir(sam_dir):
        size = (450, 300) if quick else (2250, 1500)
        samples.write_sa1b(sam_dir, sa1b_like(n_sam, size, 20 if quick else 100))
        print(f"wrote {n_sam} SA-1B images of {size[0]}x{size[1]} to {sam_dir}", flush=True)
    shards = sorted(f for f in os.listdir(clip_dir) if f.endswith(".tar"))
    return os.path.join(clip_dir, "{%s..%s}.tar" % (shards[0][:-4], shards[-1][:-4])), sam_dir


# ------------------------------------------------------------------------------------ timing
def rate(next_batch, batches: int) -> Tuple[float, float]:
    """(img/s, ms per batch) over ``batches`` calls of ``next_batch`` (returns the batch's image
    count), after one untimed call."""
    next_batch()
    t0, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next_batch()
    dt = time.perf_counter() - t0
    return images / dt, dt / batches * 1e3


def clip_stream(spec: str, mr: MultiResolutionConfig, workers: int, decoder: str = "cpu", device=None):
    s = ClipStream(spec, mr, num_workers=workers, holdout=0.01, decoder=decoder, device=device,
                   pin_memory=decoder == "cuda" or (device is not None and torch.device(device).type == "cuda"))

    def step() -> int:
        keys, pixels, _ = s.next()
        if pixels.is_cuda:
            torch.cuda.synchronize()
        return len(keys)

    return s, step


def reference(spec: str, mr: MultiResolutionConfig, how: str):
    """One process decoding the stream's records without the stream's own decoder."""
    s = ClipStream(spec, mr, holdout=0.01)
    records = s.source.records(raw=True, repeat=True, worker=(0, 1))
    k = [0]

    def step() -> int:
        r = mr.draw_resolution(0, k[0])
        k[0] += 1
        datas = [d for _, d in (next(records) for _ in range(mr.batch_size(r))) if d is not None]
        if how == "pil full":
            torch.stack([clip_pixels(decode_rgb(d), r) for d in datas])
        else:
            views = decode_views_on(datas, r, "cpu")
            torch.stack([v for v in views if v is not None])
        return len(datas)

    return step


# ------------------------------------------------------------------------------------ step model
def step_model(args) -> Tuple[Dict[str, Dict[int, float]], str]:
    """Per-batch step ms at 224 and 448, live and cached teachers, and where the numbers come from."""
    b = {224: args.batch, 448: max(1, args.batch // 4)}
    if args.step_ms:
        ms = [float(x) for x in args.step_ms.split(",")]
        given = {224: ms[0], 448: ms[-1]}
        return {"live": given, "cached": given}, "--step-ms"
    rows = []
    path = args.train_csv or os.path.join(RESULTS_DIR, "train.csv")
    if os.path.isfile(path):
        rows = [r for r in read_csv(path) if not r["device"].startswith("cpu") and r["status"] == "ok"
                and r["case"].startswith("stage2 clip")]
    per_image: Dict[int, float] = {}
    for r in rows:  # the fastest stage-2 GPU step per CLIP image at each side (SA-1B part included)
        res, clip_b = int(r["case"].split()[1][4:]), int(r["case"].split()[2][1:])
        per_image[res] = min(per_image.get(res, float("inf")), float(r["ms"]) / clip_b)
    if 224 in per_image and 448 in per_image:
        ms = {r: per_image[r] * b[r] for r in b}
        return {"live": ms, "cached": ms}, "bench train's fastest stage-2 GPU rows"
    model = {}
    for kind, teacher in (("live", TEACHER_GFLOP), ("cached", 0.0)):
        model[kind] = {r: b[r] * (STUDENT_GFLOP[r] + teacher) / (args.tflops * 1e3) * 1e3 for r in b}
    return model, f"the FLOP model at {args.tflops:g} TFLOP/s"


def wait_fraction(stream_step, stream, step_ms: Dict[int, float], batches: int) -> float:
    """A consumer that spends ``step_ms[r]`` per batch: the share of its time spent waiting for data."""
    stream_step()  # start-up, not counted
    waited = total = 0.0
    for _ in range(batches):
        t0 = time.perf_counter()
        keys, _, r = stream.next()
        t1 = time.perf_counter()
        time.sleep(step_ms[r] / 1e3)
        waited += t1 - t0
        total += time.perf_counter() - t0
    return waited / total


def count_flops() -> None:
    """Count the FLOP model's numbers on the full-size models (random weights, ~1 minute, ~3 GB)."""
    sam, clip = build_sam("vit_b"), load_clip_teacher("ViT-L-14", None)
    student = samclip_from_teachers(sam, clip, clip_head=CLIPHeadConfig(out_dim=clip.embed_dim), sam_config="vit_b")
    student.to("meta")
    clip.to("meta")
    for r in (224, 448):
        with FlopCounterMode(display=False) as c, use_backend("reference"):
            student.clip_embeddings(student.forward_features(torch.empty(1, 3, r, r, device="meta"))).sum().backward()
        print(f"student CLIP path, forward + backward, {r} px: {c.get_total_flops() / 1e9:.1f} GFLOP per image")
    with FlopCounterMode(display=False) as c, torch.no_grad():
        clip.encode_image(torch.empty(1, 3, 224, 224, device="meta"))
    print(f"CLIP ViT-L/14 teacher forward, 224 px: {c.get_total_flops() / 1e9:.1f} GFLOP per image")


# ------------------------------------------------------------------------------------ main
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small data and batches (CI)")
    p.add_argument("--data", default=None, help="folder to write the data to, or reuse (default: a temporary one)")
    p.add_argument("--images", type=int, default=None, help="D_CLIP images (default 2000; quick 96)")
    p.add_argument("--sam-images", type=int, default=None, help="SA-1B images (default 24; quick 4)")
    p.add_argument("--workers", default=None, help="DataLoader worker counts (default 0,1,2,4,8 up to the CPUs; quick 0,2)")
    p.add_argument("--batch", type=int, default=None, help="per-rank D_CLIP batch at 224 (default 256; quick 16)")
    p.add_argument("--sam-batch", type=int, default=4, help="per-rank SA-1B batch (default 4: 32 over 8 GPUs)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per row (default 8; quick 3)")
    p.add_argument("--repeats", type=int, default=None, help="runs per row, median (default 3; quick 1)")
    p.add_argument("--step-ms", default=None, help="the data-wait consumer's ms per batch: 'A' or 'A224,A448'")
    p.add_argument("--tflops", type=float, default=400.0, help="achieved TFLOP/s of the FLOP model")
    p.add_argument("--train-csv", default=None, help="bench train's results (default bench/results/train.csv)")
    p.add_argument("--parts", default="clip,sa1b,wait", help="subset of clip,sa1b,wait")
    p.add_argument("--schedules", default="224,448,mixed", help="D_CLIP rows: subset of 224,448,mixed")
    p.add_argument("--device", default=None, help="cuda: also the GPU decode path (default: cuda if available)")
    p.add_argument("--count-flops", action="store_true", help="count the FLOP model's numbers and exit")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/data.csv)")
    args = p.parse_args(argv)
    if args.count_flops:
        count_flops()
        return 0
    q = args.quick
    args.images = args.images or (96 if q else 2000)
    args.sam_images = args.sam_images or (4 if q else 24)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = _ints(args.workers) if args.workers else ([0, 2] if q else [w for w in (0, 1, 2, 4, 8) if w <= cpus])
    args.batch = args.batch or (16 if q else 256)
    args.batches = args.batches or (3 if q else 8)
    args.repeats = args.repeats or (1 if q else 3)
    parts = set(args.parts.split(","))
    for name, v in (("--images", args.images), ("--sam-images", args.sam_images), ("--batch", args.batch),
                    ("--sam-batch", args.sam_batch), ("--batches", args.batches), ("--repeats", args.repeats)):
        if v < 1:
            p.error(f"{name} must be at least 1, got {v}")
    if min(workers, default=0) < 0 or not parts <= {"clip", "sa1b", "wait"} or args.tflops <= 0 or not set(
            args.schedules.split(",")) <= {"224", "448", "mixed"}:
        p.error("--workers must be >= 0, --parts a subset of clip,sa1b,wait, --schedules of 224,448,mixed, "
                "--tflops positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shard_size = max(8, args.images // 8)  # 8 shards: up to 8 workers each read their own
    if max(workers) > args.images // shard_size:
        p.error(f"--workers {max(workers)}: the D_CLIP written has {args.images // shard_size} shards")
    root = args.data or scratch_dir("fastsamclip-bench-data-")
    spec, sam_dir = write_data(root, args.images, args.sam_images, shard_size, q)
    out_csv = args.out or os.path.join(RESULTS_DIR, "data.csv")
    rows: List[Result] = []

    def case_rows(case: str, batches: int, impls: List[Tuple[str, object, dict]]) -> None:
        """Every impl of a case, each timed ``--repeats`` times in turn (round-robin, so that a
        shared machine's load falls alike on all of them), median img/s per impl."""
        runs: Dict[str, list] = {name: [] for name, _, _ in impls}
        failed: Dict[str, str] = {}
        for repeat in range(args.repeats):
            for name, make, _ in impls:
                if name in failed:
                    continue
                try:
                    made = make()
                    runs[name].append(rate(made[1] if isinstance(made, tuple) else made, batches))
                    print(f"  {case} {name}: run {repeat + 1}/{args.repeats} {runs[name][-1][0]:.1f} img/s",
                          file=sys.stderr, flush=True)
                except Exception as e:  # a path that breaks is a row with its error, not a crash
                    failed[name] = f"failed: {type(e).__name__}: {e}"[:200]
                made = None  # a stream's workers stop here, before the next one starts its own
        for name, _, extra in impls:
            if name in failed:
                rows.append(Result("data", case, name, "stream", status=failed[name]))
            else:
                img_s, ms = statistics.median(r[0] for r in runs[name]), statistics.median(r[1] for r in runs[name])
                rows.append(Result("data", case, name, "stream", ms=ms, extra={"img_s": round(img_s, 1), **extra}))
            print(f"{case:14s} {name:18s} {rows[-1].extra.get('img_s', rows[-1].status)}", flush=True)

    schedules = {f"clip {'224/448' if k == 'mixed' else k}": {"224": (224,), "448": (448,), "mixed": (224, 448)}[k]
                 for k in args.schedules.split(",")}
    if "clip" in parts:
        for case, res in schedules.items():
            mr = MultiResolutionConfig(resolutions=res, base_batch=args.batch, base_res=224, seed=1)
            impls = [(f"stream w={w}", lambda w=w: clip_stream(spec, mr, w), {"workers": w, "batch": args.batch})
                     for w in workers]
            if device.type == "cuda":
                impls += [(f"stream cuda w={w}", lambda w=w: clip_stream(spec, mr, w, "cuda", device), {"workers": w})
                          for w in workers]
            impls += [(how, lambda how=how: reference(spec, mr, how), {"workers": 0})
                      for how in ("pil full", "torchvision cpu")]
            case_rows(case, args.batches, impls)
    if "sa1b" in parts:
        ds = SA1BDataset(sam_dir, PromptConfig(masks_per_image=32))

        def sam(w):
            s = SamStream(ds, range(len(ds)), min(args.sam_batch, len(ds)), 0, num_workers=w)
            return s, lambda: len(s.next())

        case_rows("sa1b 1024", min(args.batches, 4),
                  [(f"stream w={w}", lambda w=w: sam(w), {"workers": w}) for w in workers])
    if "wait" in parts:
        model, source = step_model(args)
        mr = MultiResolutionConfig(resolutions=(224, 448), base_batch=args.batch, base_res=224, seed=1)
        waits: Dict[Tuple[str, int], list] = {(kind, w): [] for kind in model for w in workers}
        for _ in range(args.repeats):  # in turns, as the rate rows
            for kind, w in waits:
                s, step = clip_stream(spec, mr, w)
                waits[(kind, w)].append(100 * wait_fraction(step, s, model[kind], args.batches))
                s = step = None
        for (kind, w), got in waits.items():
            ms = model[kind]
            rows.append(Result("data", f"wait {kind}", f"stream w={w}", "consumer", extra={
                "workers": w, "step_ms_224": round(ms[224], 1), "step_ms_448": round(ms[448], 1), "source": source,
                "wait_pct": round(statistics.median(got), 1)}))
            print(f"wait {kind:9s} stream w={w:<9d} {rows[-1].extra['wait_pct']}% waiting", flush=True)
    path = append_csv(rows, out_csv)
    print()
    print(format_extras(rows, [("img/s", "img_s"), ("workers", "workers"), ("wait %", "wait_pct"),
                               ("step ms 224", "step_ms_224"), ("step ms 448", "step_ms_448")]))
    print(f"appended {len(rows)} rows to {path}" + (f"; data in {root}" if args.data else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
