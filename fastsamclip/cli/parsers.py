"""Every command's options: the whole ``fastsamclip`` parser, built without importing what the
commands run (no torch, open_clip or segment_anything), so ``fastsamclip --help`` and every
``fastsamclip CMD --help`` answer at once; ``tests/test_architecture.py`` checks what this module
imports.

Each command is an :func:`add_command` here naming the function that runs it
(``"predict:cmd_predict"``: ``cmd_predict`` of :mod:`fastsamclip.cli.predict`), imported by
:func:`fastsamclip.cli.main` only when that command runs. Defaults that live with the code they
configure (``EverythingParams``, ``TeacherConfig``, the ahead-of-time build targets) are ``None``
here and filled in where the command runs; choices this module cannot import (the predictor's
dtypes, the semantic datasets) are written out here and checked against their homes by the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re

from fastsamclip.train.config import TrainConfig

# The predictor's dtypes (fastsamclip.predictor.engine.DTYPES) and "auto".
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")

# ----------------------------------------------------------------------------------- the frame
_VERBOSE = argparse.ArgumentParser(add_help=False)
# SUPPRESS: a command's -v adds to nothing when absent, so `fastsamclip -v CMD` keeps its count.
_VERBOSE.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                      help="more messages: -v the package's INFO (e.g. the backend an op falls back to), -vv DEBUG")


def add_command(sub, name: str, run: str, **kwargs) -> argparse.ArgumentParser:
    """A command's parser on ``sub`` (``kwargs``: ``add_parser``'s); ``run`` is the function that
    runs it, ``"module:function"`` of ``fastsamclip.cli``, called with the parsed arguments."""
    s = sub.add_parser(name, parents=[_VERBOSE], **kwargs)
    s.set_defaults(run=run)
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsamclip", description="SAM-CLIP: one ViT for masks and semantics")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages: -v the package's INFO (e.g. the backend an op falls back to), -vv DEBUG; "
                        "also after the command")
    sub = p.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return p


# ------------------------------------------------------------------------------------- info, demo
def info(sub) -> None:
    s = add_command(sub, "info", "info:cmd_info", help="versions, device and every op's backends")
    s.add_argument("--head-dim", type=int, default=64, help="also probe attention at this head dim (ViT-H: 80)")
    s.add_argument("--kernels", action="store_true",
                   help="compile every Triton kernel for GPU targets here (no GPU needed) and print registers, "
                        "spills, shared memory and MMA kind per config; exit 1 on a finding")
    s.add_argument("--targets", default=None, help="with --kernels: GPU targets, comma-separated (default: all)")
    s.add_argument("--dtypes", default="fp16,bf16",
                   help="with --kernels: fp16, bf16, fp32 (TF32), fp32-ieee (exact fp32 attention)")
    s.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="with --kernels: compile processes")


def demo(sub) -> None:
    s = add_command(sub, "demo", "demo:cmd_demo",
                    help="the paper's recipe on the miniature world's shipped teachers (all three stages, a few "
                         "minutes on a CPU) and the table of held-out skills; --merge-only: merge small random "
                         "teachers, save, reload, run")
    s.add_argument("--out", default=None, help="output folder (default ./fastsamclip-demo)")
    s.add_argument("--sam-type", default="vit_tiny", help="--merge-only: the random SAM teacher's config")
    s.add_argument("--overwrite", action="store_true", help="run again in an --out that holds an earlier demo run "
                                                            "(its world is kept when it has the same settings)")
    s.add_argument("--merge-only", action="store_true",
                   help="only merge small teachers, save, reload and run on a sample picture (no training)")


# ------------------------------------------------------------------------- merge, distill, cache
# TrainConfig switches given without a value (the other options take one, e.g. --tensorboard false).
TRAIN_FLAGS = ("resume", "overwrite", "random_teachers")


def _field_comments() -> dict:
    """The comment after each TrainConfig field, for --help."""
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def add_train_options(s) -> None:
    """One option per TrainConfig field; absent options keep the config file's or the default value."""
    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%")
        if f.name in TRAIN_FLAGS:
            s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=True,
                           default=None, help=help_text)
            continue
        s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                       help=help_text)
    s.add_argument("--config", default=None, help="JSON or YAML file of the same options (command line wins)")


def train(sub) -> None:
    s = add_command(sub, "merge", "train:cmd_merge", help="initialise the merged model from a SAM and a CLIP teacher")
    s.add_argument("--sam-checkpoint", required=True, help="official SAM .pth (e.g. sam_vit_b_01ec64.pth)")
    s.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h")
    s.add_argument("--clip-model", required=True, help="open_clip model name, or local-dir:/folder")
    s.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file")
    s.add_argument("--head-hidden", type=int, default=None, help="CLIP head MLP width (default: backbone width)")
    s.add_argument("--random-teachers", action="store_true",
                   help="allow a CLIP model without weights (a randomly initialised tower): smoke tests only")
    s.add_argument("--out", required=True, help="merged .safetensors file to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    s = add_command(sub, "distill", "train:cmd_distill",
                    help="train the merged model: the paper's three stages (torchrun for many GPUs)")
    add_train_options(s)

    s = add_command(sub, "cache-teachers", "train:cmd_cache_teachers",
                    help="run the teachers once over the data and store their outputs (train with --teacher-cache "
                         "FOLDER); torchrun splits the work over GPUs and nodes, a rerun continues an interrupted "
                         "build",
                    description="Run the teachers once over the data and store their outputs. Under torchrun the "
                                "pieces (one per shard) are split over the ranks; each is written when complete, so "
                                "a rerun with the same settings continues where a killed build stopped. --overwrite "
                                "replaces a cache built with other settings.")
    add_train_options(s)
    s.add_argument("--cache-out", default=None, help="cache folder (default: --teacher-cache, else OUT/teacher-cache)")
    s.add_argument("--batch-size", type=int, default=32, help="images per teacher forward pass (>= 1)")


# ------------------------------------------------------------------------------------- predict
def predict(sub) -> None:
    s = add_command(sub, "predict", "predict:cmd_predict",
                    help="masks for point/box prompts, every mask with its name, every instance of a phrase, "
                         "zero-shot labels and semantic maps with a merged checkpoint")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--checkpoint", required=True, help="merged .safetensors (from `fastsamclip merge` or distill)")
    s.add_argument("--labels", default=None, help='comma-separated class names, e.g. "cat,dog,grass"; with '
                   "--everything they name every mask, else zero-shot classification and a semantic map")
    s.add_argument("--points", nargs="*", default=None, metavar="X,Y[,L][;X,Y[,L]...]",
                   help="each value is one prompt of one or more points in image pixels, label L 1 foreground "
                        "(default) or 0 background, e.g. \"120,80,1;200,90,0\"")
    s.add_argument("--boxes", nargs="*", default=None, metavar="X0,Y0,X1,Y1[;X,Y,L...]",
                   help="each value is one prompt: a box in image pixels, optionally with points of the same "
                        "prompt, e.g. \"10,10,200,150;120,80,1\"")
    s.add_argument("--mode", choices=("clip", "composed"), default="clip",
                   help="semantic segmentation: CLIP head only, or CLIP maps prompting the SAM head")
    s.add_argument("--resolution", type=int, default=448, help="CLIP-head resolution of --mode clip")
    s.add_argument("--threshold", type=float, default=0.5, help="class score that prompts the SAM head (composed)")
    e = s.add_argument_group("segment everything (SAM's automatic mask generator, with its defaults; masks as COCO "
                             "RLE in the JSON)")
    e.add_argument("--everything", action="store_true", help="every mask of the image, named with --labels")
    e.add_argument("--points-per-side", type=int, default=None)
    e.add_argument("--points-per-batch", type=int, default=None)
    e.add_argument("--pred-iou-thresh", type=float, default=None)
    e.add_argument("--stability-score-thresh", type=float, default=None)
    e.add_argument("--box-nms-thresh", type=float, default=None)
    e.add_argument("--crop-n-layers", type=int, default=None)
    e.add_argument("--min-mask-region-area", type=int, default=None)
    e.add_argument("--label-threshold", type=float, default=0.0,
                   help="a mask whose best label probability is below this stays unnamed (label null)")
    c = s.add_argument_group("segment by text (every instance of each phrase, segment_text with its defaults; COCO "
                             "RLE in the JSON)")
    c.add_argument("--text", action="append", default=None, metavar="PHRASE",
                   help='a phrase whose every instance to find, e.g. --text "a cat" --text "a dog"')
    c.add_argument("--text-threshold", type=float, default=None,
                   help="probability at which a patch, and a whole mask, is the phrase (softmax over the phrases "
                        "and --background; default 0.5)")
    c.add_argument("--text-score-threshold", type=float, default=None,
                   help="keep instances whose score, sqrt(predicted IoU x phrase probability), reaches this "
                        "(default 0.5)")
    c.add_argument("--background", default=None,
                   help='comma-separated texts that take what no phrase matches (default "background")')
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="precision of the backbone and CLIP head; auto: bf16 on CUDA and on a CPU with native "
                        "bf16 (AMX-BF16, AVX512-BF16, Arm BF16; `fastsamclip info` says), else fp32")
    s.add_argument("--clip-token-pool", type=int, default=1, metavar="K",
                   help="run the CLIP head on the backbone's tokens pooled K x K (2: a fifth less work at 1024 px, "
                        "trained in stage 3); 1: all tokens, the paper's path")
    s.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an --out folder of earlier predictions whole (never a mix of two runs)")


# ---------------------------------------------------------------------------------------- eval
EVAL_TASKS = {
    "classify": "zero-shot classification: top-1/top-5 on ImageNet, ImageNet-v2, Places365, an image folder or a CSV",
    "semantic": "zero-shot semantic segmentation: mIoU on VOC, Pascal Context, ADE20K, COCO-Stuff, COCO-Panoptic",
    "instances": "instance segmentation, box-prompted or named by class (--prompts): COCOeval mask AP on COCO or LVIS",
    "retrieval": "image-text retrieval: recall@1/5/10 on the Karpathy splits of Flickr30k and COCO",
}
EVAL_DATASETS = {
    "classify": ("imagenet", "imagenet-v2", "places365", "folder", "csv"),
    # fastsamclip.eval.datasets.SEMANTIC_DATASETS' names
    "semantic": ("voc", "pascal-context", "ade20k", "coco-stuff", "coco-panoptic"),
    "instances": ("coco", "lvis"),
    "retrieval": ("flickr30k", "coco"),
}
EVAL_DEFAULT_SPLIT = {"classify": "val", "semantic": "val", "instances": "val", "retrieval": "test"}


def _eval_common(p: argparse.ArgumentParser, task: str) -> None:
    m = p.add_argument_group("model (one of --checkpoint or --teacher)")
    m.add_argument("--checkpoint", default=None, help="merged .safetensors (from `fastsamclip merge` or `distill`)")
    m.add_argument("--teacher", choices=("sam", "clip"), default=None, help="evaluate a teacher through the same code")
    m.add_argument("--sam-checkpoint", default=None, help="official SAM .pth (--teacher sam)")
    m.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h (--teacher sam)")
    m.add_argument("--clip-model", default=None, help="open_clip model name, or local-dir:/folder (--teacher clip)")
    m.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file (--teacher clip)")
    d = p.add_argument_group("data")
    d.add_argument("--data-root", required=True, help="the dataset's folder, as downloaded")
    d.add_argument("--dataset", required=True, choices=EVAL_DATASETS[task])
    d.add_argument("--split", default=None, help=f"default {EVAL_DEFAULT_SPLIT[task]}")
    d.add_argument("--limit", type=int, default=None, help="evaluate the first N images of the split only")
    o = p.add_argument_group("run and output")
    o.add_argument("--out", default=None, help="results JSON to write (model, checkpoint hash, dataset, metrics)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    o.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    o.add_argument("--workers", type=int, default=2, help="image-decoding worker processes per rank")
    o.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    o.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="merged model's backbone and CLIP head precision (recorded in the results); auto: bf16 on "
                        "CUDA and on a CPU with native bf16, else fp32")
    o.add_argument("--clip-token-pool", type=int, default=1, metavar="K",
                   help="merged model: the CLIP head on the backbone's tokens pooled K x K; 1: all tokens")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def evaluate(sub) -> None:
    """``eval`` with its four tasks."""
    p = sub.add_parser("eval", help="the paper's evaluations on the datasets' own layouts (results JSON + Markdown "
                                    "table with the paper's numbers)",
                       description="Evaluate a merged checkpoint or a teacher; " + "; ".join(
                           f"{k}: {v}" for k, v in EVAL_TASKS.items()))
    tasks = p.add_subparsers(dest="eval_task", required=True)

    s = add_command(tasks, "classify", "evaluate:cmd_eval", help=EVAL_TASKS["classify"])
    _eval_common(s, "classify")
    s.add_argument("--resolution", type=int, default=None,
                   help="input side (224, 336, 448, 1024; default 224, a CLIP teacher's own size)")
    s.add_argument("--templates", choices=("openai", "simple"), default="openai",
                   help="prompt templates: the CLIP paper's 80 (default) or open_clip's 7")
    s.add_argument("--class-names", default=None, help="file of class names, one per line (line i = class i)")
    s.add_argument("--csv", default=None, help="--dataset csv: the file,label CSV (default <data-root>/<split>.csv)")
    s.add_argument("--save-predictions", default=None, metavar="DIR", help="write a CSV of file, label, prediction")

    s = add_command(tasks, "semantic", "evaluate:cmd_eval", help=EVAL_TASKS["semantic"])
    _eval_common(s, "semantic")
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

    s = add_command(tasks, "instances", "evaluate:cmd_eval", help=EVAL_TASKS["instances"])
    _eval_common(s, "instances")
    s.add_argument("--detections", default=None,
                   help="COCO results json of boxes to prompt with (the paper: ViTDet-B's); default the ground-truth boxes")
    s.add_argument("--annotations", default=None,
                   help="instances json (default annotations/instances_<split>2017.json, or lvis_v1_<split>.json)")
    s.add_argument("--prompts", choices=("boxes", "text", "everything"), default="boxes",
                   help="boxes: each box prompts one mask; text: segment_text with every category name as a phrase; "
                        "everything: every mask of a generator named with the category names (the merged model's "
                        "generate, or with --teacher sam and --clip-model SAM's generator + the CLIP teacher on crops)")
    s.add_argument("--background", default="background",
                   help="--prompts text|everything: comma-separated texts that take what no category matches")
    s.add_argument("--templates", choices=("openai", "simple"), default="openai",
                   help="--prompts text|everything: the category names' prompt templates")
    s.add_argument("--points-per-side", type=int, default=32,
                   help="--prompts everything: the generator's grid (SamAutomaticMaskGenerator's default 32)")
    s.add_argument("--text-params", default=None, metavar="JSON",
                   help="--prompts text: more of segment_text's parameters as a JSON object, e.g. "
                        "'{\"threshold\": 0.3, \"box_prompts\": false}'")
    s.add_argument("--everything-params", default=None, metavar="JSON",
                   help="--prompts everything: the mask generator's parameters (SamAutomaticMaskGenerator's, its "
                        "defaults otherwise) as a JSON object, e.g. '{\"pred_iou_thresh\": 0.5, "
                        "\"stability_score_thresh\": 0.5}'")
    s.add_argument("--save-predictions", default=None, metavar="DIR", help="write the masks as a COCO results json")

    s = add_command(tasks, "retrieval", "evaluate:cmd_eval", help=EVAL_TASKS["retrieval"])
    _eval_common(s, "retrieval")
    s.add_argument("--resolution", type=int, default=None, help="image side (default 224, a CLIP teacher's own size)")
    s.add_argument("--karpathy", default=None, help="Karpathy-split json (default <data-root>/dataset_<name>.json)")
    s.add_argument("--images", default=None, help="image folder (default flickr30k-images/, or <data-root> for COCO)")
    s.add_argument("--captions-per-image", type=int, default=5, help="first N captions of each image (0: all)")


# -------------------------------------------------------------------------------- export, serve
def export(sub) -> None:
    s = add_command(sub, "export", "export:cmd_export", help="ONNX / AOTInductor exports and label embeddings for "
                                                               "deployment",
                    description="Export a merged checkpoint: ONNX files, AOTInductor packages and label embeddings.")
    s.add_argument("--checkpoint", required=True, help="merged .safetensors checkpoint")
    s.add_argument("--format", choices=("onnx", "aoti"), help="onnx: encoder.onnx + decoder.onnx; aoti: "
                   "encoder_<R>.pt2 per resolution (compiled for this machine's device)")
    s.add_argument("--resolution", type=int, nargs="+", help="input side(s), multiples of 16 (default: the model's "
                   "native size, 1024 for ViT-B; onnx takes one)")
    s.add_argument("--out", required=True, help="output folder: new, empty, or an export of the same checkpoint "
                   "that lacks these files (see --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace the --out folder whole")
    s.add_argument("--labels", help="comma-separated class names: their text embeddings to text_embeddings.npz")
    s.add_argument("--templates", default="openai", choices=("openai", "simple"),
                   help="prompt templates for --labels (openai: the 80 of the CLIP paper)")
    s.add_argument("--device", help="aoti: the device to compile for (default: cuda when available); onnx: cpu")
    s.add_argument("--multimask", action="store_true",
                   help="onnx decoder returns all 4 masks (default: one, chosen as SAM's ONNX export does)")
    s.add_argument("--no-check", action="store_true", help="skip running the exports against the torch model")


def serve(sub) -> None:
    s = add_command(sub, "serve", "serve:cmd_serve",
                    help="HTTP API with dynamic batching: embeddings, labels, masks, semantic maps, segment everything",
                    description="The merged model behind an HTTP API with dynamic batching (LitServe).")
    s.add_argument("--checkpoint", required=True, help="merged .safetensors checkpoint")
    s.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                   help="address to listen on (default 127.0.0.1: this machine only; others need an API key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require this key in every request's X-API-Key header (default: $FASTSAMCLIP_API_KEY, "
                        "then $LIT_SERVER_API_KEY; the variable keeps the key out of the process list)")
    s.add_argument("--insecure", action="store_true",
                   help="allow --host 0.0.0.0 / :: without an API key (anyone on the network may call the model)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    s.add_argument("--devices", type=int, default=1,
                   help="GPUs to serve on (0..N-1), each with --workers-per-device model workers (default 1)")
    s.add_argument("--workers-per-device", type=int, default=1,
                   help="model workers per device, each its own model copy and batches (default 1; on the CPU "
                        "they share the cores)")
    s.add_argument("--image-cache", type=int, default=16,
                   help="images each worker keeps after POST /v1/image, for the page (default 16)")
    s.add_argument("--max-batch-size", type=int, default=8, help="requests that may share one batch (default 8)")
    s.add_argument("--batch-timeout-ms", type=float, default=10.0,
                   help="how long the worker waits to fill a batch (default 10 ms)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone per shape (batches padded to powers of two, all compiled at start)")
    s.add_argument("--max-request-mb", type=int, default=64, help="largest request body (MiB)")
    s.add_argument("--max-image-mp", type=float, default=40.0, help="largest decoded image (megapixels)")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a request may wait for its answer before a 504 (default 60)")
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


# ---------------------------------------------------------------------------------------- bench
BENCHMARKS = {
    "e2e": "the merged model against SAM + CLIP run separately, end to end (img/s, latency, memory, energy)",
    "train": "one training step of each distillation stage: plain torch vs fused vs fused + compiled",
    "attention": "the relative-position attention kernels against every alternative",
    "losses": "the fused distillation losses against eager and compiled torch",
    "inference": "single-request latency and time to first result, cold and warm",
    "everything": "segment everything + name every mask: SAM's generator + CLIP on box crops vs one merged pass",
    "text": "every instance of 1, 5, 20 phrases: segment_text vs generate+filter vs SAM's generator + CLIP crops",
    "report": "the latest e2e run as Markdown, with the product's claims checked",
    "serve": "the HTTP server under concurrent load against the predictor in-process (throughput, p50/p99)",
    "gpu": "the measurements that matter on a freshly lent GPU in at most 6 minutes, compiles included: --out DIR "
           "(CSVs, summary.md, one archive of every file); --dry-run prints the plan",
    "data": "the input pipeline: D_CLIP and SA-1B img/s per worker count, and the share of a step spent waiting",
    "cache": "the teacher cache at scale: build, resume and a rank's memory at 10k / 100k / 1M entries",
}
# `bench all`: every benchmark that needs no input, in this order.
BENCH_ALL = ("attention", "losses", "train", "inference", "everything", "text", "serve", "e2e", "data")


def bench(sub) -> None:
    s = add_command(sub, "bench", "bench:cmd_bench", help="benchmarks: results appended to bench/results/*.csv, with plots",
                    description="Run a benchmark; arguments after its name go to it (e.g. `fastsamclip bench e2e "
                                "--quick`, `fastsamclip bench train --help`).\n\n"
                                + "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items())
                                + "\n  all        " + ", ".join(BENCH_ALL) + " in turn (optionally --quick)",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("benchmark", nargs="?", default="e2e", choices=list(BENCHMARKS) + ["all"],
                   help="which one (default e2e)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")


# ------------------------------------------------------------------------------------ miniature
def miniature(sub) -> None:
    p = sub.add_parser("miniature", help="SAM-CLIP in miniature: a world where both teachers have real skills, the "
                                         "teachers, their skills, and the paper's ablations on them")
    m = p.add_subparsers(dest="miniature_command", required=True)

    s = add_command(m, "world", "miniature:cmd_world", help="write the miniature world in the real layouts "
                                                              "(deterministic)")
    s.add_argument("out")
    s.add_argument("--train", type=int, default=4000, help="training canvases (D_CLIP shards, SA-1B)")
    s.add_argument("--heldout", type=int, default=300, help="held-out canvases (crops folder, VOC, COCO, retrieval)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a world of other settings in OUT")

    s = add_command(m, "teachers", "miniature:cmd_teachers",
                    help="train the CLIP and SAM teachers of the world (official formats)")
    s.add_argument("--out", required=True, help="folder for clip/ (open_clip model folder) and sam_vit_mini.pth")
    s.add_argument("--clip-steps", type=int, default=None)
    s.add_argument("--sam-steps", type=int, default=None)
    s.add_argument("--clip-batch", type=int, default=None, help="object crops per CLIP step")
    s.add_argument("--sam-batch", type=int, default=None, help="canvases per SAM step")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); results depend on it")
    s.add_argument("--world", default=None, help="a written world: measure the teachers on its held-out split after")
    s.add_argument("--overwrite", action="store_true", help="train again into an --out that holds teachers")

    s = add_command(m, "skills", "miniature:cmd_skills",
                    help="held-out skills of the teachers (default: the shipped ones) or a merged model")
    s.add_argument("--world", required=True, help="a folder written by `fastsamclip miniature world`")
    s.add_argument("--teachers", default=None, help="a folder written by `fastsamclip miniature teachers`")
    s.add_argument("--checkpoint", default=None, help="a merged .safetensors: the student's skills instead")
    s.add_argument("--limit", type=int, default=None, help="the first N held-out canvases (VOC, COCO); the crops are all used")

    s = add_command(m, "ablations", "miniature:cmd_ablations",
                    help="the paper's findings over seeds (resumes; writes ablations.md/.json)")
    s.add_argument("--out", required=True)
    s.add_argument("--world", default=None, help="a written world (default: OUT/world, written first)")
    s.add_argument("--train", type=int, default=1500, help="training canvases of the world written into OUT")
    s.add_argument("--heldout", type=int, default=150, help="held-out canvases of the world written into OUT")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--teachers", default=None, help="teachers folder (default: the shipped ones)")
    s.add_argument("--limit", type=int, default=None, help="the first N held-out canvases (VOC, COCO); the crops are all used")
    s.add_argument("--steps", default=None, metavar="S1,S2,S3",
                   help="optimizer steps of stages 1, 2, 3 (default: the demo's recipe)")
    s.add_argument("--quick", action="store_true", help="two steps a stage: checks every path, measures nothing")


# In the order `fastsamclip --help` lists them.
COMMANDS = (info, demo, train, predict, evaluate, export, serve, bench, miniature)
