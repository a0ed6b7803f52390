"""``fastsamclip demo``: the README's main command, on its embedded default."""

from __future__ import annotations

import sys

from fastsamclip.cli.common import one_line_errors, require
from fastsamclip.demo import run_demo, run_distill_demo


@one_line_errors("demo")
def cmd_demo(args) -> int:
    if args.merge_only:
        report = run_demo(out_dir=args.out, sam_type=args.sam_type)
        ok = report["reload_identical"] and report["text_equals_teacher"] and report["mask_max_abs_diff_vs_sam"] < 1e-4
        if not ok:
            print("demo: the merged model does not match its teachers (see above)", file=sys.stderr)
        return 0 if ok else 1
    require("webdataset", "pycocotools")  # the train extra: shards and SA-1B masks, said before any work
    report = run_distill_demo(out_dir=args.out, overwrite=args.overwrite)
    if not report["distillation_worked"]:
        print("demo: distillation did not raise the student's zero-shot top-1 above its value at merge while "
              "keeping its point mIoU within 0.03 of the SAM teacher's (see the table)", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    s = sub.add_parser("demo", help="the paper's recipe on the miniature world's shipped teachers (all three stages, "
                                    "a few minutes on a CPU) and the table of held-out skills; --merge-only: merge "
                                    "small random teachers, save, reload, run")
    s.add_argument("--out", default=None, help="output folder (default ./fastsamclip-demo)")
    s.add_argument("--sam-type", default="vit_tiny", help="--merge-only: the random SAM teacher's config")
    s.add_argument("--overwrite", action="store_true", help="run again in an --out that holds an earlier demo run "
                                                            "(its world is kept when it has the same settings)")
    s.add_argument("--merge-only", action="store_true",
                   help="only merge small teachers, save, reload and run on a sample picture (no training)")
    s.set_defaults(fn=cmd_demo)
