"""``fastsamclip eval TASK``: the paper's tables from one command.

    fastsamclip eval classify  --checkpoint merged.safetensors --data-root /data/imagenet --dataset imagenet
    fastsamclip eval semantic  --checkpoint merged.safetensors --data-root /data/VOCdevkit --dataset voc
    fastsamclip eval instances --teacher sam --sam-checkpoint sam_vit_b_01ec64.pth --data-root /data/coco \\
        --dataset coco --detections vitdet_b_coco_val.json
    fastsamclip eval retrieval --checkpoint merged.safetensors --data-root /data/flickr30k --dataset flickr30k

The same command runs sharded under ``torchrun --nproc_per_node N -m fastsamclip eval ...``.
Bad input exits 2 with one line naming the file and what is wrong.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from fastsamclip.cli.parsers import EVAL_DEFAULT_SPLIT
from fastsamclip.eval import classify, instances, retrieval, semantic
from fastsamclip.eval.common import EvalInputError, check_out_path
from fastsamclip.eval.datasets import open_classify, open_retrieval, open_semantic
from fastsamclip.eval.models import build_model
from fastsamclip.eval.runner import (
    Timer,
    base_report,
    init_distributed,
    markdown_table,
    skipped_line,
)
from fastsamclip.errors import InputError, check_range
from fastsamclip.files import write_json
from fastsamclip.modeling import CheckpointError


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def cmd_eval(args, argv: Optional[List[str]] = None) -> int:
    task = args.eval_task
    try:
        d, device = init_distributed(args.device)
    except (RuntimeError, ValueError) as e:
        print(f"eval {task}: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        return _run(task, args, d, device, argv if argv is not None else sys.argv[2:])
    except (EvalInputError, CheckpointError, FileNotFoundError) as e:
        if d.is_main:
            print(f"eval {task}: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        d.close()


def _setup(task: str, args, device):
    """Everything that can fail on bad input before the first image: dataset, model, flags."""
    check_out_path(args.out, args.overwrite)
    if args.limit is not None and args.limit < 1:
        raise EvalInputError(None, f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise EvalInputError(None, f"--batch-size must be at least 1, got {args.batch_size}")
    numbers = [("--workers", args.workers, 0, None), ("--clip-token-pool", args.clip_token_pool, 1, None)]
    numbers += [(f"--{k.replace('_', '-')}", getattr(args, k), lo, hi) for k, lo, hi in (
        ("threshold", None, None), ("background_threshold", 0.0, 1.0), ("captions_per_image", 0, None),
        ("resolution", 16, None)) if getattr(args, k, None) is not None]
    for flag, value, lo, hi in numbers:
        try:
            check_range(flag, value, lo, hi, integer=isinstance(value, int))
        except InputError as e:
            raise EvalInputError(None, str(e)) from None
    split = args.split or EVAL_DEFAULT_SPLIT[task]
    if task == "classify":
        ds = open_classify(args.dataset, args.data_root, split, args.class_names, args.csv)
    elif task == "semantic":
        ds = open_semantic(args.dataset, args.data_root, split, args.class_names)
    elif task == "instances":
        ds = instances.InstanceSet(args.dataset, args.data_root, split, args.annotations)
        if args.detections:
            ds.detections(args.detections)  # checked now, before the model is loaded
    else:
        ds = open_retrieval(args.dataset, args.data_root, split, args.karpathy, args.images, args.captions_per_image)
    try:
        model = build_model(args, device)
    except (CheckpointError, FileNotFoundError) as e:
        raise EvalInputError(None, _one_line(e)) from e
    why = model.unsupported(task)
    if why:
        raise EvalInputError(None, why)
    return split, ds, model


def _resolution(task: str, args, model) -> int:
    res = getattr(args, "resolution", None)
    if task == "instances":
        return model.default_resolution(task)
    if task == "semantic" and args.mode == "composed":
        native = model.native_size
        if res is not None and res != native:
            raise EvalInputError(None, f"--mode composed runs at the model's native {native} px (one pass for both heads); "
                                       f"drop --resolution {res}")
        return native
    res = res or model.default_resolution(task)
    if model.kind == "CLIP teacher" and res != model.teacher.image_size:
        raise EvalInputError(None, f"the CLIP teacher runs at its own {model.teacher.image_size} px (open_clip does not "
                                   f"resize its position embeddings); drop --resolution {res}")
    if res < 16 or res % 16:
        raise EvalInputError(None, f"--resolution must be a positive multiple of 16, got {res}")
    return res


def _run(task: str, args, d, device, argv) -> int:
    err, setup = None, None
    try:
        setup = _setup(task, args, device)
        resolution = _resolution(task, args, setup[2])
    except EvalInputError as e:
        err = e
    d.agree(err)  # every rank stops on the first bad input any rank found
    split, ds, model = setup
    progress = d.is_main and not args.no_progress
    timer = Timer()
    common = dict(workers=args.workers, limit=args.limit, progress=progress)
    if task == "classify":
        setting = {"resolution": resolution, "templates": args.templates}
        out = classify.evaluate(model, ds, d, resolution, args.templates, args.batch_size,
                                save_dir=args.save_predictions, **common)
        rows = [("top-1", "top1"), ("top-5", "top5"), ("mean per-class top-1", "mean_per_class_top1")]
    elif task == "semantic":
        setting = {"mode": args.mode, "resolution": resolution, "templates": args.templates}
        if args.mode == "composed":
            setting["threshold"] = args.threshold
        if args.background_threshold is not None:
            setting["background_threshold"] = args.background_threshold
        out = semantic.evaluate(model, ds, d, args.mode, resolution, args.templates, args.threshold,
                                args.background_threshold, args.batch_size, save_dir=args.save_predictions, **common)
        rows = [("mIoU", "mIoU"), ("pixel accuracy", "pixel_accuracy"), ("mean class accuracy", "mean_accuracy")]
    elif task == "instances":
        setting = {"boxes": "detections" if args.detections else "ground truth", "resolution": resolution}
        out = instances.evaluate(model, ds, d, args.detections, save_dir=args.save_predictions, **common)
        rows = [(k, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        if args.dataset == "lvis":
            rows += [(k, k) for k in ("APr", "APc", "APf")]
    else:
        setting = {"resolution": resolution, "captions_per_image": args.captions_per_image}
        out = retrieval.evaluate(model, ds, d, resolution, args.batch_size, **common)
        rows = [("R@1 (mean of both directions)", "R@1")] + [
            (f"{name} R@{k}", f"{key}_R@{k}") for key, name in (("i2t", "image-to-text"), ("t2i", "text-to-image"))
            for k in (1, 5, 10)]
    if out is None:  # not rank 0
        return 0
    report = base_report(task, model, args.dataset, getattr(ds, "split", split), args.data_root, setting, d, timer.seconds(),
                         out["evaluated"], out["skipped"], argv)
    if out["metrics"] is None:
        raise EvalInputError(args.data_root, f"no image of the split could be read ({report['images']['skipped']} skipped, "
                                             f"first: {report['images']['skipped_files'][0]['file'] if out['skipped'] else '-'})")
    report["metrics"] = out["metrics"]
    if "per_class" in out:
        report["per_class"] = out["per_class"]
    if getattr(args, "save_predictions", None):
        report["predictions"] = args.save_predictions
    table = markdown_table(report, [(label, out["metrics"].get(key), key) for label, key in rows])
    print(table)
    line = skipped_line(report)
    if line:
        print(line, file=sys.stderr)
    if args.out:
        write_json(args.out, report)
        print(f"results written to {args.out}")
    return 0
