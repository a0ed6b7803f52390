"""``fastsamclip merge``, ``distill`` and ``cache-teachers``: from two teachers to one model.

``distill`` and ``cache-teachers`` take one option per ``TrainConfig`` field (``--stage2-lr``,
``--clip-resolutions 224,448``, ...), over a ``--config`` file, over the defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys

from fastsamclip.checkpoint import save_merged
from fastsamclip.cli.common import log_to_stderr, one_line_errors
from fastsamclip.errors import OutputError, check_range
from fastsamclip.files import writable_dir
from fastsamclip.modeling import (
    CLIPHeadConfig,
    load_clip_teacher,
    load_sam_teacher,
    samclip_from_teachers,
)
from fastsamclip.train import (
    TrainConfig,
    TrainingStopped,
    cache_teachers,
    config_from_dict,
    dist_from_env,
    load_config_file,
    train,
)

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Switches given without a value (the other options take one, e.g. --tensorboard false).
FLAGS = ("resume", "overwrite", "random_teachers")


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
        if f.name in FLAGS:
            s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=True,
                           default=None, help=help_text)
            continue
        s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                       help=help_text)
    s.add_argument("--config", default=None, help="JSON or YAML file of the same options (command line wins)")


def train_config_from_args(args) -> TrainConfig:
    """Defaults < --config file < options given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in TRAIN_FIELDS and v is not None}
    base = load_config_file(args.config) if args.config else {}
    return config_from_dict({**base, **given})


@one_line_errors("distill")
def cmd_distill(args) -> int:
    log_to_stderr()
    cfg = train_config_from_args(args)
    try:
        report = train(cfg)
    except TrainingStopped as e:
        print(f"distill: {e}", file=sys.stderr)
        return 2
    if "eval" in report:
        ev = report["eval"]
        print("held-out agreement with the teachers: CLIP cosine "
              + ", ".join(f"{r}px {v:.4f}" for r, v in ev["clip_cosine"].items())
              + "".join(f"; on {k}x{k}-pooled tokens " + ", ".join(f"{r}px {v:.4f}" for r, v in cos.items())
                        for k, cos in ev["clip_cosine_pooled"].items())
              + f"; mask IoU {ev['mask_iou']:.4f}; merged model {report['merged']}")
    return 0


@one_line_errors("cache-teachers")
def cmd_cache_teachers(args) -> int:
    log_to_stderr()
    cfg = train_config_from_args(args)
    path = cache_teachers(cfg, out=args.cache_out, batch_size=args.batch_size)
    if dist_from_env().main:
        print(f"teacher cache written to {path}; train with --teacher-cache {path}")
    return 0


@one_line_errors("merge")
def cmd_merge(args) -> int:
    # Everything that can be refused, before a teacher loads: the output, the numbers, the weights.
    if os.path.isdir(args.out):
        raise OutputError(f"--out {args.out} is a folder: give the .safetensors file to write")
    if os.path.exists(args.out) and not args.overwrite:
        raise OutputError(f"--out {args.out} exists already: pass --overwrite to replace it, or choose another file")
    writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out", create=False)
    if args.head_hidden is not None:
        check_range("--head-hidden", args.head_hidden, 1, integer=True)
    # distill's rule: a CLIP model without weights is a random tower, built only when asked for.
    teachers = TrainConfig(sam_checkpoint=args.sam_checkpoint, clip_model=args.clip_model,
                           clip_pretrained=args.clip_pretrained, random_teachers=args.random_teachers,
                           ).teacher_weights()
    sam = load_sam_teacher(args.sam_checkpoint, args.sam_type)
    clip = load_clip_teacher(args.clip_model, args.clip_pretrained)
    head = CLIPHeadConfig(out_dim=clip.embed_dim, hidden_dim=args.head_hidden)
    model = samclip_from_teachers(sam, clip, clip_head=head, sam_config=args.sam_type)
    save_merged(model, args.out, teachers={**teachers, "random_teachers": bool(args.random_teachers)})
    print(f"wrote {args.out}: {model.num_parameters() / 1e6:.1f}M parameters "
          f"(backbone {model.num_parameters('image_encoder') / 1e6:.1f}M, CLIP head "
          f"{model.num_parameters('clip_head') / 1e6:.1f}M, text {model.num_parameters('text') / 1e6:.1f}M)")
    return 0


def register(sub) -> None:
    s = sub.add_parser("merge", help="initialise the merged model from a SAM and a CLIP teacher")
    s.add_argument("--sam-checkpoint", required=True, help="official SAM .pth (e.g. sam_vit_b_01ec64.pth)")
    s.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h")
    s.add_argument("--clip-model", required=True, help="open_clip model name, or local-dir:/folder")
    s.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file")
    s.add_argument("--head-hidden", type=int, default=None, help="CLIP head MLP width (default: backbone width)")
    s.add_argument("--random-teachers", action="store_true",
                   help="allow a CLIP model without weights (a randomly initialised tower): smoke tests only")
    s.add_argument("--out", required=True, help="merged .safetensors file to write")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("distill", help="train the merged model: the paper's three stages (torchrun for many GPUs)")
    add_train_options(s)
    s.set_defaults(fn=cmd_distill)

    s = sub.add_parser("cache-teachers", help="run the teachers once over the data and store their outputs "
                                              "(train with --teacher-cache FOLDER); torchrun splits the work "
                                              "over GPUs and nodes, a rerun continues an interrupted build",
                       description="Run the teachers once over the data and store their outputs. Under torchrun "
                                   "the pieces (one per shard) are split over the ranks; each is written when "
                                   "complete, so a rerun with the same settings continues where a killed build "
                                   "stopped. --overwrite replaces a cache built with other settings.")
    add_train_options(s)
    s.add_argument("--cache-out", default=None, help="cache folder (default: --teacher-cache, else OUT/teacher-cache)")
    s.add_argument("--batch-size", type=int, default=32, help="images per teacher forward pass (>= 1)")
    s.set_defaults(fn=cmd_cache_teachers)
