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
