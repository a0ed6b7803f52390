"""``fastsamclip merge``, ``distill`` and ``cache-teachers``: from two teachers to one model.

``distill`` and ``cache-teachers`` take one option per ``TrainConfig`` field (``--stage2-lr``,
``--clip-resolutions 224,448``, ...), over a ``--config`` file, over the defaults.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from fastsamclip import logs
from fastsamclip.checkpoint import save_merged
from fastsamclip.cli.common import one_line_errors
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


def train_config_from_args(args) -> TrainConfig:
    """Defaults < --config file < options given on the command line."""
    given = {k: v for k, v in vars(args).items() if k in TRAIN_FIELDS and v is not None}
    base = load_config_file(args.config) if args.config else {}
    return config_from_dict({**base, **given})


@one_line_errors("distill")
def cmd_distill(args) -> int:
    cfg = train_config_from_args(args)
    try:
        with logs.showing("fastsamclip.train"):  # the run's progress
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
    cfg = train_config_from_args(args)
    with logs.showing("fastsamclip.train"):  # the run's progress
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
