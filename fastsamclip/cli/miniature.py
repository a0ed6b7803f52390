"""``fastsamclip miniature``: the world, its teachers, their skills and the paper's ablations.

    fastsamclip miniature world DIR [--train 4000 --heldout 300]     write the world in the real layouts
    fastsamclip miniature teachers --out DIR                         train both teachers (~45 min, 2 cores)
    fastsamclip miniature skills --world DIR [--checkpoint M]        held-out skills of the teachers (or a model)
    fastsamclip miniature ablations --out DIR [--seeds 0,1,2]        the findings table (resumes)
"""

from __future__ import annotations

import os

import torch

from fastsamclip.cli.common import one_line_errors
from fastsamclip.errors import ConfigError
from fastsamclip.files import write_json
from fastsamclip.miniature import Limits, Recipe, TeacherConfig, shipped_paths, student_skills, teacher_skills
from fastsamclip.miniature import train_teachers, write_world
from fastsamclip.miniature.ablations import run_ablations
from fastsamclip.miniature.world import WorldConfig


def _teachers(folder):
    if folder is None:
        return shipped_paths()
    paths = shipped_paths(folder)
    if not os.path.isfile(paths["sam"]):
        raise FileNotFoundError(f"--teachers {folder}: no {os.path.basename(paths['sam'])} there (a folder written by "
                                "`fastsamclip miniature teachers --out`)")
    return paths


def _world(args) -> str:
    if not os.path.isfile(os.path.join(args.world, "world.json")):
        raise FileNotFoundError(f"--world {args.world}: no world.json there; write one with `fastsamclip miniature "
                                "world DIR`")
    return args.world


def _limits(n):
    """--limit N: the first N held-out canvases of each canvas layout. The crops are never cut
    (their folder lists classes in name order: the first N would be a few classes only)."""
    if n is not None:
        _positive("limit", n)
    return Limits(crops=None, canvases=n, semantic=n, everything=n)


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"--{name} must be at least 1, got {value}")
    return value


@one_line_errors("miniature world")
def cmd_world(args) -> int:
    _positive("train", args.train)
    _positive("heldout", args.heldout)
    meta = write_world(args.out, args.train, args.heldout, WorldConfig(seed=args.seed), overwrite=args.overwrite)
    for k, v in meta["paths"].items():
        print(f"{k:16s} {v}")
    return 0


@one_line_errors("miniature teachers")
def cmd_teachers(args) -> int:
    given = {k: getattr(args, k) for k in ("clip_steps", "sam_steps", "clip_batch", "sam_batch")
             if getattr(args, k) is not None}  # the others: TeacherConfig's defaults
    for name, value in given.items():
        _positive(name.replace("_", "-"), value)
    world = _world(args) if args.world else None  # checked before hours of training, not after
    if os.path.exists(os.path.join(args.out, "training.json")) and not args.overwrite:
        raise ConfigError(f"--out {args.out} holds trained teachers already: pass --overwrite to train them again")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TeacherConfig(seed=args.seed, **given)
    info = train_teachers(args.out, cfg, log=print)
    print(f"teachers written: {info['paths']['clip']} and {info['paths']['sam']}")
    if world:
        sk = teacher_skills(world, info["paths"], everything=False)
        write_json(os.path.join(args.out, "skills.json"), sk)
        print(f"held-out skills: CLIP zero-shot top-1 {sk['top1']:.1f}%, SAM point mIoU {sk['point']:.3f}, box "
              f"mIoU {sk['box']:.3f} (in {os.path.join(args.out, 'skills.json')})")
    return 0


@one_line_errors("miniature skills")
def cmd_skills(args) -> int:
    world = _world(args)
    limits = _limits(args.limit)
    if args.checkpoint:
        sk = student_skills(args.checkpoint, world, limits)
    else:
        sk = teacher_skills(world, _teachers(args.teachers), limits)
    for k, v in sk.items():
        print(f"{k:20s} {v:.4f}")
    return 0


@one_line_errors("miniature ablations")
def cmd_ablations(args) -> int:
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    world = args.world or os.path.join(args.out, "world")
    if not args.world:
        write_world(world, args.train, args.heldout)
    base = Recipe()
    if args.quick:  # CI's size: every path once, the numbers mean nothing
        base = base.with_(stage_steps=(2, 2, 1), clip_batch=8, sam_batch=2)
    limits = _limits(args.limit)
    run_ablations(world, args.out, seeds, base, limits, teachers=_teachers(args.teachers))
    return 0
