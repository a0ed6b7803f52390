"""The teacher cache at scale: a rehearsal on a synthetic D_CLIP of img2dataset shards.

    python -m bench.bench_cache                       # 100k images, caches of 10k / 100k / 1M entries
    python -m bench.bench_cache --quick               # 2k images (CI)
    fastsamclip bench cache --images 100000 --data /tmp/rehearsal

Writes ``--images`` small photo-like JPEGs (96 x 72, random crops of scikit-image's pictures) in
shards of 1000, a few SA-1B images, and tiny teachers in the official formats (a vit_micro SAM, a
32 px one-block open_clip model with 32-d embeddings: the cache's mechanics at the paper's entry
counts, not its bytes). Then, for each entry count of ``--entries`` (images x resolutions, 10
resolutions 16..88 px: the first ``entries / 10`` images):

- ``build``: ``cache_teachers`` (what ``fastsamclip cache-teachers`` runs) in this process:
  seconds, images/s and entries/s;
- ``resume``: a tenth of the pieces deleted (what a build killed at 90% leaves), the command run
  again: seconds to the finished cache; ``done``: run once more on the finished cache;
- ``reader``: in a fresh process, what a training rank pays: seconds to open the cache, RSS
  growth after opening, and after reading a 256-entry batch from every piece (the reader keeps
  the last 64 pieces open); and ``format 3``: the previous format's one ``index.json`` of every
  entry, written for the same entries and loaded as that format did (``json.load``).

RSS is ``VmRSS`` from ``/proc/self/status`` (so Linux); rows go to ``bench/results/cache.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from fastsamclip.data import samples
from fastsamclip.train import TeacherCache, TrainConfig
from fastsamclip.train import cache_teachers as build_cache
from fastsamclip.train.teacher_cache import FORMAT, FORMAT_VERSION

from .bench_data import photo_like
from .harness import RESULTS_DIR, Result, append_csv, format_extras, scratch_dir

SHARD = 1000  # images per shard: write_clip_shards' keys are then f"{shard:05d}{i:03d}"
RESOLUTIONS = tuple(range(16, 89, 8))  # 10 sides: entries = images x 10
# A 32 px open_clip model, one block: the teacher's cost is not what is rehearsed here.
NANO_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32,
                                             "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}


def write_data(root: str, images: int) -> dict:
    """The synthetic D_CLIP, SA-1B and tiny teachers (written once; reused when present)."""
    paths = {"clip": os.path.join(root, "clip"), "sa1b": os.path.join(root, "sa1b"),
             "sam": os.path.join(root, "sam_vit_micro.pth"), "clip_model": os.path.join(root, "clip_model")}
    if not os.path.isdir(paths["clip"]):
        t0 = time.perf_counter()
        pictures = (a for s in range(0, images, SHARD)  # made shard by shard, never all in memory
                    for a in photo_like(min(SHARD, images - s), (96, 72), seed=s))
        samples.write_clip_shards(paths["clip"], pictures, shard_size=SHARD)
        print(f"wrote {images} D_CLIP images in {images // SHARD} shards ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not os.path.isdir(paths["sa1b"]):
        pics = samples.load_sample_images(max_side=64)
        samples.write_sa1b(paths["sa1b"], [(p, samples.synthetic_masks(p)) for p in list(pics.values())[:4]])
        samples.write_sam_checkpoint(paths["sam"], "vit_micro")
        samples.write_clip_local_dir(paths["clip_model"], NANO_CLIP)
    return paths


def spec(paths: dict, shards: int) -> str:
    return os.path.join(paths["clip"], "{00000..%05d}.tar" % (shards - 1))


def cache_teachers(paths: dict, shards: int, out: str) -> float:
    """``fastsamclip cache-teachers`` over the first ``shards`` shards, in this process: seconds."""
    cfg = TrainConfig(sam_checkpoint=paths["sam"], sam_type="vit_micro", clip_model=f"local-dir:{paths['clip_model']}",
                      clip_data=spec(paths, shards), sam_data=paths["sa1b"], clip_resolutions=RESOLUTIONS,
                      stage3_resolutions=(16,), progress=False)
    t0 = time.perf_counter()
    build_cache(cfg, out=out, batch_size=256)
    return time.perf_counter() - t0


READER = r"""
import json, os, random, sys, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
root, kind, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
from fastsamclip.train import TeacherCache
from fastsamclip.train.teacher_cache import FORMAT, FORMAT_VERSION
base = rss()
t0 = time.perf_counter()
if kind == "format 3":
    with open(os.path.join(root, "index-v3.json")) as f:
        index = json.load(f)
    out = {"open_s": time.perf_counter() - t0, "rss_open": rss() - base, "entries": len(index["entries"]["clip"])}
elif kind == "paper index":
    cache = TeacherCache(root)
    out = {"open_s": time.perf_counter() - t0, "rss_open": rss() - base, "entries": len(cache)}
else:
    cache = TeacherCache(root)
    out = {"open_s": time.perf_counter() - t0, "rss_open": rss() - base, "entries": len(cache)}
    rng = random.Random(0)
    t1 = time.perf_counter()
    for s in range(shards):
        keys = ["clip/%05d.tar/%05d%03d" % (s, s, j) for j in rng.sample(range(1000), 256)]
        assert cache.clip_batch(keys, rng.choice([16, 48, 88])).shape == (256, 32)
    out.update(batch_ms=(time.perf_counter() - t1) / shards * 1e3, rss_read=rss() - base)
print(json.dumps(out))
"""


def reader(root: str, kind: str, shards: int) -> dict:
    r = subprocess.run([sys.executable, "-c", READER, root, kind, str(shards)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_format3_index(root: str) -> None:
    """The previous format's index of the same entries (name@r -> chunk file, 4096 per chunk)."""
    cache = TeacherCache(root)
    entries, n = {}, 0
    for name in cache.names("clip"):
        for r in RESOLUTIONS:
            entries[f"{name}@{r}"] = f"clip-{n // 4096:05d}.safetensors"
            n += 1
    with open(os.path.join(root, "index-v3.json"), "w") as f:
        json.dump({"format": "fastsamclip.teacher_cache", "version": 3, "entries": {"clip": entries, "sam": {}}}, f)


def write_paper_index(root: str, images: int = 40_600_000, sides: int = 3, shard: int = 10_000,
                      sam_images: int = 630_000) -> None:
    """The index a cache of the paper's data would have: a piece per img2dataset shard of 10,000
    images (at 3 sides), and per 64 SA-1B images (its pieces themselves are not written)."""
    clip = [[f"cc/{s:05d}.tar/{s:05d}0000", f"cc/{s:05d}.tar/{s:05d}9999", shard,
             f"clip-{s:016x}.safetensors"] for s in range(images // shard)]
    sam = [[f"sa_{i:07d}", f"sa_{min(i + 64, sam_images) - 1:07d}", min(64, sam_images - i), f"sam-{i:016x}.safetensors"]
           for i in range(0, sam_images, 64)]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, "resolutions": list(range(sides)),
                   "pieces": {"clip": clip, "sam": sam}}, f)


def reader_row(out: str, kind: str, shards: int, case: str) -> Result:
    got = reader(out, kind, shards)
    extra = {"seconds": round(got["open_s"], 3), "rss_open_mb": round(got["rss_open"] / 2**20, 1),
             "entries": got["entries"]}
    if "rss_read" in got:
        extra.update(rss_read_mb=round(got["rss_read"] / 2**20, 1), batch_ms=round(got["batch_ms"], 2))
    return Result("cache", case, f"reader {kind}", "open", ms=got["open_s"] * 1e3, extra=extra)


def build(rows: List[Result], paths: dict, shards: int, out: str, case: str, n: int) -> None:
    """Build, resume after a tenth of the pieces is lost, and rerun on the finished cache."""
    took = cache_teachers(paths, shards, out)
    rows.append(Result("cache", case, "build", "cache-teachers", ms=took * 1e3, extra={
        "seconds": round(took, 2), "img_s": round(shards * SHARD / took, 1), "entries_s": round(n / took, 1),
        "pieces": shards + 1}))
    pieces = sorted(f for f in os.listdir(os.path.join(out, "pieces")) if f.startswith("clip-"))
    lost = max(1, len(pieces) // 10)
    for f in random.Random(0).sample(pieces, lost):
        os.remove(os.path.join(out, "pieces", f))
    os.remove(os.path.join(out, "index.json"))
    took = cache_teachers(paths, shards, out)
    rows.append(Result("cache", case, "resume", "cache-teachers", ms=took * 1e3,
                       extra={"seconds": round(took, 2), "rebuilt": lost}))
    took = cache_teachers(paths, shards, out)
    rows.append(Result("cache", case, "done", "cache-teachers", ms=took * 1e3, extra={"seconds": round(took, 2)}))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2k images, caches of 10k and 20k entries")
    p.add_argument("--images", type=int, default=None, help="D_CLIP images written (default 100000; quick 2000)")
    p.add_argument("--entries", default=None, help="cache sizes in entries (default 10000,100000,1000000)")
    p.add_argument("--data", default=None, help="folder to write to, or reuse (default: a temporary one)")
    p.add_argument("--readers-only", action="store_true", help="measure the readers of caches built before in --data")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/cache.csv)")
    args = p.parse_args(argv)
    images = args.images or (2000 if args.quick else 100_000)
    sizes = [int(x) for x in (args.entries or ("10000,20000" if args.quick else "10000,100000,1000000")).split(",")]
    if images < SHARD or images % SHARD or any(n % (SHARD * len(RESOLUTIONS)) or n > images * len(RESOLUTIONS)
                                               for n in sizes):
        p.error(f"--images: a multiple of {SHARD}; --entries: multiples of {SHARD * len(RESOLUTIONS)} "
                f"(whole shards at {len(RESOLUTIONS)} resolutions), at most images x {len(RESOLUTIONS)}")
    if args.readers_only and not args.data:
        p.error("--readers-only measures the caches of an earlier run: give its --data folder")
    root = args.data or scratch_dir("fastsamclip-bench-cache-")
    paths = write_data(root, images)
    rows: List[Result] = []
    for n in sizes:
        shards = n // (SHARD * len(RESOLUTIONS))
        out = os.path.join(root, f"cache-{n}")
        case = f"{n} entries"
        if not args.readers_only:
            build(rows, paths, shards, out, case, n)
        write_format3_index(out)
        for kind in ("format 4", "format 3"):
            rows.append(reader_row(out, kind, shards, case))
        for r in rows[-5:]:
            print(f"{r.case:16s} {r.impl:16s} {r.extra}", flush=True)
    paper = os.path.join(root, "paper-index")
    write_paper_index(paper)
    rows.append(reader_row(paper, "paper index", 0, "40.6M images x 3 + 0.63M SA-1B"))
    print(f"{rows[-1].case} {rows[-1].impl} {rows[-1].extra}", flush=True)
    path = append_csv(rows, args.out or os.path.join(RESULTS_DIR, "cache.csv"))
    print()
    print(format_extras(rows, [("s", "seconds"), ("img/s", "img_s"), ("entries/s", "entries_s"),
                               ("RSS open MB", "rss_open_mb"), ("RSS read MB", "rss_read_mb"),
                               ("batch ms", "batch_ms")]))
    print(f"appended {len(rows)} rows to {path}" + (f"; data in {root}" if args.data else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
