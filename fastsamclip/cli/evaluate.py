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

import argparse
import sys
from typing import List, Optional

from fastsamclip.eval import classify, instances, retrieval, semantic
from fastsamclip.eval.common import EvalInputError, check_out_path
from fastsamclip.eval.datasets import (
    SEMANTIC_DATASETS,
    open_classify,
    open_retrieval,
    open_semantic,
)
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
from fastsamclip.predictor.engine import DTYPES

TASKS = {
    "classify": "zero-shot classification: top-1/top-5 on ImageNet, ImageNet-v2, Places365, an image folder or a CSV",
    "semantic": "zero-shot semantic segmentation: mIoU on VOC, Pascal Context, ADE20K, COCO-Stuff, COCO-Panoptic",
    "instances": "box-prompted instance segmentation: COCOeval mask AP on COCO or LVIS",
    "retrieval": "image-text retrieval: recall@1/5/10 on the Karpathy splits of Flickr30k and COCO",
}
DATASETS = {
    "classify": ("imagenet", "imagenet-v2", "places365", "folder", "csv"),
    "semantic": tuple(SEMANTIC_DATASETS),
    "instances": ("coco", "lvis"),
    "retrieval": ("flickr30k", "coco"),
}
DEFAULT_SPLIT = {"classify": "val", "semantic": "val", "instances": "val", "retrieval": "test"}


def _common(p: argparse.ArgumentParser, task: str) -> None:
    m = p.add_argument_group("model (one of --checkpoint or --teacher)")
    m.add_argument("--checkpoint", default=None, help="merged .safetensors (from `fastsamclip merge` or `distill`)")
    m.add_argument("--teacher", choices=("sam", "clip"), default=None, help="evaluate a teacher through the same code")
    m.add_argument("--sam-checkpoint", default=None, help="official SAM .pth (--teacher sam)")
    m.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h (--teacher sam)")
    m.add_argument("--clip-model", default=None, help="open_clip model name, or local-dir:/folder (--teacher clip)")
    m.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file (--teacher clip)")
    d = p.add_argument_group("data")
    d.add_argument("--data-root", required=True, help="the dataset's folder, as downloaded")
    d.add_argument("--dataset", required=True, choices=DATASETS[task])
    d.add_argument("--split", default=None, help=f"default {DEFAULT_SPLIT[task]}")
    d.add_argument("--limit", type=int, default=None, help="evaluate the first N images of the split only")
    o = p.add_argument_group("run and output")
    o.add_argument("--out", default=None, help="results JSON to write (model, checkpoint hash, dataset, metrics)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    o.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    o.add_argument("--workers", type=int, default=2, help="image-decoding worker processes per rank")
    o.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    o.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="merged model's backbone and CLIP head precision (recorded in the results); auto: bf16 on "
                        "CUDA and on a CPU with native bf16, else fp32")
    o.add_argument("--clip-token-pool", type=int, default=1, metavar="K",
                   help="merged model: the CLIP head on the backbone's tokens pooled K x K; 1: all tokens")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` with its four tasks on the main command's subparsers."""
    p = subparsers.add_parser("eval", help="the paper's evaluations on the datasets' own layouts (results JSON + "
                                           "Markdown table with the paper's numbers)",
                              description="Evaluate a merged checkpoint or a teacher; " + "; ".join(
                                  f"{k}: {v}" for k, v in TASKS.items()))
    sub = p.add_subparsers(dest="eval_task", required=True)

    s = sub.add_parser("classify", help=TASKS["classify"])
    _common(s, "classify")
    s.add_argument("--resolution", type=int, default=None,
                   help="input side (224, 336, 448, 1024; default 224, a CLIP teacher's own size)")
    s.add_argument("--templates", choices=("openai", "simple"), default="openai",
                   help="prompt templates: the CLIP paper's 80 (default) or open_clip's 7")
    s.add_argument("--class-names", default=None, help="file of class names, one per line (line i = class i)")
    s.add_argument("--csv", default=None, help="--dataset csv: the file,label CSV (default <data-root>/<split>.csv)")
    s.add_argument("--save-predictions", default=None, metavar="DIR", help="write a CSV of file, label, prediction")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("semantic", help=TASKS["semantic"])
    _common(s, "semantic")
    s.add_argument("--mode", choices=("clip", "composed"), default="clip",
                   help="clip: the CLIP head at --resolution (paper: 448); composed: both heads at the native size")
    s.add_argument("--resolution", type=int, default=None, help="CLIP-head input side (default 448)")
    s.add_argument("--templates", choices=("openai", "simple"), default="openai")
    s.add_argument("--threshold", type=float, default=0.5, help="composed: class score that prompts the SAM head")
    s.add_argument("--background-threshold", type=float, default=None,
                   help="voc, clip mode: prompt the 20 objects only; background where the best probability is below this")
    s.add_argument("--class-names", default=None,
                   help="voc layout with classes of its own: a file naming label values 0 (background), 1, 2, ...")
    s.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="one label PNG per image, named after it, in the dataset's own label encoding")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("instances", help=TASKS["instances"])
    _common(s, "instances")
    s.add_argument("--detections", default=None,
                   help="COCO results json of boxes to prompt with (the paper: ViTDet-B's); default the ground-truth boxes")
    s.add_argument("--annotations", default=None,
                   help="instances json (default annotations/instances_<split>2017.json, or lvis_v1_<split>.json)")
    s.add_argument("--save-predictions", default=None, metavar="DIR", help="write the masks as a COCO results json")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("retrieval", help=TASKS["retrieval"])
    _common(s, "retrieval")
    s.add_argument("--resolution", type=int, default=None, help="image side (default 224, a CLIP teacher's own size)")
    s.add_argument("--karpathy", default=None, help="Karpathy-split json (default <data-root>/dataset_<name>.json)")
    s.add_argument("--images", default=None, help="image folder (default flickr30k-images/, or <data-root> for COCO)")
    s.add_argument("--captions-per-image", type=int, default=5, help="first N captions of each image (0: all)")
    s.set_defaults(fn=cmd_eval)
    return p


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
    split = args.split or DEFAULT_SPLIT[task]
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


def register(sub) -> None:
    add_parser(sub)
