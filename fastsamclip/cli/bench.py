"""``fastsamclip bench NAME ARGS...``: every benchmark from the installed command.

Each benchmark is a program of ``fastsamclip.bench`` picked by name at run time and imported only
then (``importlib``): importing them all up front would cost seconds per command and fix choices
some of them make at import (the Triton interpreter on a machine without a GPU) before the chosen
one runs.
"""

from __future__ import annotations

import importlib
import sys

from fastsamclip.cli.common import require
from fastsamclip.cli.parsers import BENCH_ALL

# The modules of fastsamclip.bench that run each name, in order.
MODULES = {"e2e": ("e2e",), "train": ("bench_train",), "attention": ("bench_relpos_attention",),
           "losses": ("bench_cosine_distill", "bench_linear_cosine_distill", "bench_focal_dice"),
           "inference": ("bench_inference",), "everything": ("bench_everything",), "report": ("report",),
           "serve": ("bench_serve",), "gpu": ("gpu",), "data": ("bench_data",),
           "cache": ("bench_cache",)}
# Optional packages a benchmark cannot start without (missing: one line naming the extra).
REQUIRES = {"serve": ("litserve", "httpx"), "data": ("webdataset", "pycocotools"),
            "cache": ("webdataset", "pycocotools")}


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
