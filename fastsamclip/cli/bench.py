"""``fastsamclip bench NAME ARGS...``: every benchmark from the installed command.

Each benchmark is a program of ``fastsamclip.bench`` picked by name at run time and imported only
then (``importlib``): importing them all up front would cost seconds per command and fix choices
some of them make at import (the Triton interpreter on a machine without a GPU) before the chosen
one runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastsamclip.cli.common import require

BENCHMARKS = {
    "e2e": "the merged model against SAM + CLIP run separately, end to end (img/s, latency, memory, energy)",
    "train": "one training step of each distillation stage: plain torch vs fused vs fused + compiled",
    "attention": "the relative-position attention kernels against every alternative",
    "losses": "the fused distillation losses against eager and compiled torch",
    "inference": "single-request latency and time to first result, cold and warm",
    "everything": "segment everything + name every mask: SAM's generator + CLIP on box crops vs one merged pass",
    "report": "the latest e2e run as Markdown, with the product's claims checked",
    "serve": "the HTTP server under concurrent load against the predictor in-process (throughput, p50/p99)",
    "gpu": "the measurements that matter on a freshly lent GPU in at most 6 minutes, compiles included: --out DIR "
           "(CSVs, summary.md, one archive of every file); --dry-run prints the plan",
    "data": "the input pipeline: D_CLIP and SA-1B img/s per worker count, and the share of a step spent waiting",
    "cache": "the teacher cache at scale: build, resume and a rank's memory at 10k / 100k / 1M entries",
}
# The modules of fastsamclip.bench that run each name, in order.
MODULES = {"e2e": ("e2e",), "train": ("bench_train",), "attention": ("bench_relpos_attention",),
           "losses": ("bench_cosine_distill", "bench_linear_cosine_distill", "bench_focal_dice"),
           "inference": ("bench_inference",), "everything": ("bench_everything",), "report": ("report",),
           "serve": ("bench_serve",), "gpu": ("gpu",), "data": ("bench_data",),
           "cache": ("bench_cache",)}
# Optional packages a benchmark cannot start without (missing: one line naming the extra).
REQUIRES = {"serve": ("litserve", "httpx"), "data": ("webdataset", "pycocotools"),
            "cache": ("webdataset", "pycocotools")}
# `bench all`: every benchmark that needs no input, in this order.
BENCH_ALL = ("attention", "losses", "train", "inference", "everything", "serve", "e2e", "data")


def cmd_bench(args) -> int:
    """Runs ``fastsamclip.bench.<module>.main`` with the remaining arguments (see each one's --help)."""
    names = BENCH_ALL if args.benchmark == "all" else (args.benchmark,)
    if args.benchmark == "all" and [a for a in args.args if a != "--quick"]:
        print("bench all: only --quick is shared by every benchmark; run them one by one for other options",
              file=sys.stderr)
        return 2
    for name in names:
        require(*REQUIRES.get(name, ()))
    worst = 0
    for name in names:
        for module in MODULES[name]:
            if len(names) > 1 or len(MODULES[name]) > 1:
                print(f"\n==== fastsamclip bench {name} ({module}) {' '.join(args.args)}", flush=True)
            rc = importlib.import_module(f"fastsamclip.bench.{module}").main(list(args.args))
            worst = max(worst, rc if isinstance(rc, int) else 0)
    return worst


def register(sub) -> None:
    s = sub.add_parser("bench", help="benchmarks: results appended to bench/results/*.csv, with plots",
                       description="Run a benchmark; arguments after its name go to it (e.g. `fastsamclip bench "
                                   "e2e --quick`, `fastsamclip bench train --help`).\n\n"
                                   + "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items())
                                   + "\n  all        " + ", ".join(BENCH_ALL) + " in turn (optionally --quick)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("benchmark", nargs="?", default="e2e", choices=list(BENCHMARKS) + ["all"],
                   help="which one (default e2e)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    s.set_defaults(fn=cmd_bench)
