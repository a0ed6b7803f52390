"""The HTTP server under load against calling the predictor in-process: throughput, p50/p99 latency.

    python -m fastsamclip.bench.bench_serve [--checkpoint merged.safetensors] [--concurrency 8]
    fastsamclip bench serve --quick        # tiny model on the CPU, for CI

Workload per request (``--task``): ``segment`` (default) = one picture (PNG, base64 JSON), one box
prompt, one mask back as COCO RLE: a backbone pass and a decoder pass, what an interactive client
asks; ``embed`` = the pooled CLIP embedding (backbone only). The pictures cycle through
``--images`` scikit-image samples, so consecutive requests are different images.

* ``in-process``: the predictor called one request after another in this process
  (``set_image`` + ``segment``, or ``embed_images``) on the decoded image: no HTTP, no JSON, no
  PNG decoding, no batching. Its throughput is 1 / mean latency.
* ``http``: ``fastsamclip serve`` in a child process (one model worker, dynamic batching with
  ``--max-batch-size`` / ``--batch-timeout-ms``), ``--concurrency`` client threads each sending
  its share of ``--requests`` requests back to back through one keep-alive connection; latency
  per request as the client sees it (upload, decode, queue, batch, answer), throughput = requests
  / wall time of the whole run, and the mean backbone batch the answers report.

Warm-up requests are not timed. Rows are appended to ``bench/results/serve.csv``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from fastsamclip.data import samples
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.serve import ServerProcess

from .bench_inference import make_quick_checkpoint, make_random_checkpoint
from .harness import Result, append_csv, format_table, full_size_device, percentile, scratch_dir

IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "hubble_deep_field")


def _box(image: np.ndarray) -> List[float]:
    h, w = image.shape[:2]
    return [w * 0.2, h * 0.2, w * 0.8, h * 0.8]


def _payload(task: str, image: np.ndarray) -> dict:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    body = {"image": base64.b64encode(buf.getvalue()).decode("ascii")}
    if task == "segment":
        body.update(boxes=[_box(image)], multimask_output=False)
    return body


def _stats(latencies_ms: List[float], wall_s: float) -> Dict[str, float]:
    lat = sorted(latencies_ms)
    return {"p50": statistics.median(lat), "p99": percentile(lat, 0.99), "req_s": len(lat) / wall_s}


def in_process(predictor: SAMCLIPPredictor, task: str, images: List[np.ndarray], n: int, warmup: int) -> Dict[str, float]:
    def one(image):
        if task == "segment":
            predictor.set_image(image)
            predictor.segment(boxes=_box(image), multimask_output=False)
        else:
            predictor.embed_images(image)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize(predictor.device)

    for i in range(warmup):
        one(images[i % len(images)])
    times = []
    t_start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        one(images[i % len(images)])
        times.append((time.perf_counter() - t0) * 1e3)
    stats = _stats(times, time.perf_counter() - t_start)
    stats["req_s"] = 1e3 / statistics.mean(times)  # one after another: the wall time is the sum
    return stats


def over_http(url: str, task: str, payloads: List[dict], n: int, concurrency: int, warmup: int) -> Dict[str, float]:
    import httpx  # optional dependency (extra "serve"): the client

    path = f"{url}/v1/{task}"
    with httpx.Client(timeout=120.0) as c:
        for i in range(warmup):
            c.post(path, json=payloads[i % len(payloads)]).raise_for_status()
    latencies: List[float] = []
    batches: List[int] = []
    errors: List[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def client() -> None:
        with httpx.Client(timeout=120.0) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = c.post(path, json=payloads[i % len(payloads)])
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        latencies.append(ms)
                        batches.append(r.json()["batch"]["backbone_batch"])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} requests failed, e.g. {errors[0]}")
    stats = _stats(latencies, wall)
    stats["mean_batch"] = statistics.mean(batches)
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="merged .safetensors (default: random weights, SAM vit_b + CLIP ViT-L-14; "
                                        "with --quick a tiny model)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    p.add_argument("--task", default="segment", choices=("segment", "embed"))
    p.add_argument("--concurrency", type=int, default=8, help="client threads sending at once")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help=f"distinct pictures cycled through (at most {len(IMAGES)})")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout-ms", type=float, default=10.0)
    p.add_argument("--compile", action="store_true", help="the server and the in-process predictor compile")
    p.add_argument("--quick", action="store_true", help="tiny model, 32 requests, concurrency 4 (CPU smoke run)")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/serve.csv)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not 1 <= args.images <= len(IMAGES) or args.concurrency < 1 or args.requests < 1:
        p.error(f"--images must be 1..{len(IMAGES)}, --concurrency and --requests at least 1")
    device = full_size_device(p, args.device, args.quick)
    tmp = scratch_dir("fastsamclip-bench-serve-")
    if args.quick:
        args.requests, args.warmup, args.concurrency = min(args.requests, 32), 2, min(args.concurrency, 4)
        args.checkpoint = args.checkpoint or make_quick_checkpoint(tmp)
    args.checkpoint = args.checkpoint or make_random_checkpoint(tmp)
    images = [samples.sample_image(name) for name in IMAGES[: args.images]]
    case = f"{os.path.basename(args.checkpoint)} {args.task} {args.images} images"

    predictor = SAMCLIPPredictor(args.checkpoint, device=device, compile=args.compile)
    local = in_process(predictor, args.task, images, args.requests, args.warmup)
    del predictor
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    server_args = ["--device", "cuda" if device.startswith("cuda") else "cpu", "--max-batch-size",
                   str(args.max_batch_size), "--batch-timeout-ms", str(args.batch_timeout_ms)]
    server_args += ["--compile"] if args.compile else []
    payloads = [_payload(args.task, im) for im in images]
    with ServerProcess(args.checkpoint, server_args, log_path=os.path.join(tmp, "server.log")) as server:
        remote = over_http(server.url, args.task, payloads, args.requests, args.concurrency, args.warmup)
        start_s = server.start_seconds

    http = f"http c={args.concurrency} b={args.max_batch_size} w={args.batch_timeout_ms:g}ms"
    rows = []
    for impl, s, extra in (("in-process predictor", local, {}),
                           (http, remote, {"mean_batch": round(remote["mean_batch"], 2), "ready_s": round(start_s, 1)})):
        common = {"req_s": round(s["req_s"], 2), "p99_ms": round(s["p99"], 2), "requests": args.requests, **extra}
        rows += [Result(bench="serve", case=case, impl=impl, mode="request p50", ms=s["p50"], extra=common),
                 Result(bench="serve", case=case, impl=impl, mode="request p99", ms=s["p99"], extra=common)]
    path = append_csv(rows, args.out)
    print(format_table(rows))
    print(f"throughput: in-process {local['req_s']:.1f} req/s, http {remote['req_s']:.1f} req/s "
          f"(mean backbone batch {remote['mean_batch']:.2f}; server ready in {start_s:.0f} s)")
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
