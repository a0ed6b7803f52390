"""Training step: images per second and peak memory of each distillation stage, plain torch
against the fused kernels, eager and compiled.

    python -m bench.bench_train                  # GPU defaults: SAM vit_b @1024, CLIP ViT-L-14 @224/448
    python -m bench.bench_train --quick          # tiny teachers on the CPU, for CI
    python -m bench.bench_train --compare 1a2b3c4

Each row is one optimizer step of ``Distiller.train_step`` (the training loop's own step: live
teachers, student forward and backward, all-reduce on DDP, clipping, AdamW) on fixed batches
made from real pictures in the training formats (never zeros):

- ``stage1 clip R``: head probing, a CLIP batch at side R (frozen backbone);
- ``stage2 clip R + sam S``: the multi-task step, a CLIP batch at R and an SA-1B batch at the SAM
  side S (1024 for vit_b) with ``--masks`` box and point prompts per image;
- ``stage3 clip R``: resolution adaptation at the largest side.

CLIP batches follow the training sampler's constant-pixel rule: ``--clip-batch`` images at the
first resolution, ``clip_batch * (r0 / r)^2`` at r. Configurations (``impl``):

- ``plain``: attention backend ``reference`` and loss backend ``reference`` (plain torch), eager;
- ``fused``: automatic backends (the fused Triton kernels where they run), eager;
- ``fused-compile``: the same with the image encoder and CLIP head under ``torch.compile``.

All run under the training loop's precision (bf16 autocast on CUDA, fp32 on the CPU). Timing:
CUDA events around each step after warm-up (compile happens in the warm-up), median step time
(``ms``), img/s = images per step / mean step time. ``peak_mem_mb``: the peak memory allocated
during the timed steps, everything included (teachers, student, optimizer state, activations),
i.e. what a GPU must hold. ``loss_vs_plain``: relative difference of the first step's loss from
the plain row of the same case (same weights and batch), so speed never hides a wrong loss.
Rows are appended to ``bench/results/train.csv`` as they are measured, with a plot of img/s and of peak memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from fastsamclip import logs
from fastsamclip.data import MultiResolutionConfig, samples
from fastsamclip.kernels import OPS, use_backend
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher
from fastsamclip.train import Distiller, TrainConfig
from fastsamclip.transforms import clip_pixels

from .harness import (RESULTS_DIR, Result, append_csv, compare, scratch_dir, earlier_rows, environment, format_extras,
                      format_table, full_size_device, percentile, plot_csv, time_calls)

CONFIGS = ("plain", "fused", "fused-compile")


@dataclass
class Case:
    stage: int
    clip_res: int
    clip_batch: int
    sam: bool  # stage 2: an SA-1B batch in the same step

    def name(self, sam_size: int, sam_batch: int, masks: int) -> str:
        s = f"stage{self.stage} clip{self.clip_res} B{self.clip_batch}"
        return s + (f" + sam{sam_size} B{sam_batch}x{masks}" if self.sam else "")


def constant_pixel_batch(batch0: int, res0: int, res: int) -> int:
    """The training sampler's rule (``MultiResolutionConfig.batch_size``)."""
    return MultiResolutionConfig(resolutions=(res,), base_batch=batch0, base_res=res0).batch_size(res)


def cases(clip_res: List[int], stage3_res: int, clip_batch: int, stages: List[int]) -> List[Case]:
    out = []
    for stage in stages:
        sides = [stage3_res] if stage == 3 else clip_res
        for r in sides:
            out.append(Case(stage, r, constant_pixel_batch(clip_batch, clip_res[0], r), stage == 2))
    return out


# ------------------------------------------------------------------------------------ set-up
def write_data(folder: str, n_sam: int, clip_side: int) -> Tuple[str, str]:
    """A small D_CLIP (WebDataset shards) and D_SAM (SA-1B) in the real formats: the trainer
    validates both at construction; the timed steps use fixed batches made from them."""
    pics = samples.load_sample_images(max_side=max(160, clip_side))
    names = list(pics)
    shards = samples.write_clip_shards(os.path.join(folder, "clip"), [pics[n] for n in names], shard_size=16)
    sam_pics = [pics[names[i % len(names)]] for i in range(n_sam)]
    samples.write_sa1b(os.path.join(folder, "sa1b"), [(p, samples.synthetic_masks(p)) for p in sam_pics])
    return os.path.join(folder, "clip", "{00000..%05d}.tar" % (len(shards) - 1)), os.path.join(folder, "sa1b")


def load_teachers(args, tmp: str):
    torch.manual_seed(0)
    if args.quick:
        sam_path = args.sam_checkpoint or samples.write_sam_checkpoint(os.path.join(tmp, "sam.pth"), args.sam_type)
        return (load_sam_teacher(sam_path, args.sam_type),
                load_clip_teacher(samples.write_clip_local_dir(os.path.join(tmp, "clip"))))
    if args.sam_checkpoint:
        sam = load_sam_teacher(args.sam_checkpoint, args.sam_type)
    else:
        sam = samples.random_sam(args.sam_type)
    pre = args.clip_pretrained if args.clip_pretrained not in (None, "", "none") else None
    return sam, load_clip_teacher(args.clip_model, pre)


def make_config(args, config: str, clip_spec: str, sam_dir: str, out: str):
    return TrainConfig(
        sam_checkpoint=args.sam_checkpoint, sam_type=args.sam_type, clip_model=args.clip_model, clip_pretrained=None,
        clip_data=clip_spec, sam_data=sam_dir, out=out,
        stage1_steps=10_000, stage2_steps=10_000, stage3_steps=10_000,  # the schedule only; no stream is read
        clip_batch=args.clip_batch, clip_base_res=args.clip_res[0], clip_resolutions=tuple(args.clip_res),
        stage3_resolutions=tuple(args.clip_res) + (args.stage3_res,), sam_batch=args.sam_batch,
        masks_per_image=args.masks, eval_images=1, device=args.device, progress=False, tensorboard=False,
        clip_holdout=0.25,  # the small D_CLIP written for the benchmark: 1% would hold none out
        checkpoint_every=0, loss_backend="reference" if config == "plain" else None,
        compile=config == "fused-compile", compile_backend=args.compile_backend,
        activation_checkpointing=args.activation_checkpointing)


def clip_batch_for(trainer, res: int, n: int) -> tuple:
    """(keys, pixels, res) as the CLIP stream yields them: real pictures in CLIP's geometry, uint8."""
    pics = list(samples.load_sample_images(max_side=max(160, res)).values())
    images = torch.stack([clip_pixels(pics[i % len(pics)], res) for i in range(n)])
    return [f"bench{i:05d}" for i in range(n)], images, res


def backends_used(trainer, config: str) -> Dict[str, str]:
    """The attention and loss backends this configuration's steps run (probe inputs of the step's
    shapes: a 14 x 14 window at the backbone's head dim, the CLIP loss's fused projection)."""
    if config == "plain":
        return {"attention": "reference", "losses": "reference"}
    dev = trainer.device
    dtype = torch.bfloat16 if trainer.amp and dev.type == "cuda" else torch.float32
    b = trainer.student.config.sam.backbone
    q = torch.empty(1, 1, 196, b.embed_dim // b.num_heads, dtype=dtype, device=dev)
    r = torch.empty(1, 1, 196, 14, dtype=dtype, device=dev)
    x, w = torch.empty(2, 8, device=dev), torch.empty(4, 8, device=dev)
    return {"attention": OPS["relpos_attention"].select(q, q, q, r, r, needs_grad=True).name,
            "losses": OPS["linear_cosine_distill_loss"].select(x, w, None, torch.empty(2, 4, device=dev)).name}


# ------------------------------------------------------------------------------------ measuring
def run_config(args, config: str, case_list: List[Case], teachers, clip_spec: str, sam_dir: str, tmp: str,
               plain_loss: Dict[str, float], sink=None) -> List[Result]:
    """The rows of one configuration; ``sink(row)`` gets each row the moment it is measured."""
    sam_t, clip_t = teachers
    rows: List[Result] = []
    trainer = Distiller(make_config(args, config, clip_spec, sam_dir, os.path.join(tmp, config)),
                        sam_teacher=sam_t, clip_teacher=clip_t)
    device = trainer.device
    used = backends_used(trainer, config)
    sam_items = [trainer.sam_data[i] for i in range(args.sam_batch)]
    if any(it is None for it in sam_items):
        raise RuntimeError("an SA-1B sample written for the benchmark was unreadable")
    # On the host, so the copy adds nothing to the measured device memory.
    initial = {k: v.detach().to("cpu", copy=True) for k, v in trainer.student.state_dict().items()}
    for case in case_list:
        name = case.name(trainer.sam_size, args.sam_batch, args.masks)
        extra = {"dtype": "bf16" if trainer.amp else "fp32", "stage": case.stage, "clip_res": case.clip_res,
                 "clip_batch": case.clip_batch, **used, "compile": config == "fused-compile"}
        if case.sam:
            extra.update(sam_size=trainer.sam_size, sam_batch=args.sam_batch, masks=args.masks)
        r = Result(bench="train", case=name, impl=config, mode="step", extra=extra)
        rows.append(r)
        trainer.student.load_state_dict(initial)  # every case starts from the same weights
        clip_batch = clip_batch_for(trainer, case.clip_res, case.clip_batch)
        images = case.clip_batch + (args.sam_batch if case.sam else 0)
        try:
            with use_backend("reference" if config == "plain" else None):
                opt, sched = trainer.make_optimizer(case.stage)
                step = lambda: trainer.train_step(case.stage, opt, sched, clip_batch=clip_batch,  # noqa: E731
                                                  sam_items=sam_items if case.sam else None)
                first = step()  # the first step's loss: same weights and batch in every configuration
                for _ in range(args.warmup - 1):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                times, total = time_calls(step, args.iters, device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        except torch.cuda.OutOfMemoryError:
            r.status = "failed: out of memory" + ("" if args.activation_checkpointing else
                                                  " (try --activation-checkpointing or a smaller batch)")
            if sink is not None:
                sink(r)
            continue
        except Exception as e:  # a configuration that breaks is a row with its error, not a crash
            r.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if sink is not None:
                sink(r)
            continue
        finally:
            opt = sched = step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        times.sort()
        loss = first["loss_clip"] + (trainer.cfg.sam_loss_weight * first["loss_sam"] if case.sam else 0.0)
        r.ms, r.peak_mem_mb = statistics.median(times), peak
        extra.update(img_s=round(images * len(times) / total, 3), p99_ms=round(percentile(times, 0.99), 3),
                     loss=f"{loss:.6g}")
        if config == "plain":
            plain_loss[name] = loss
        extra["loss_vs_plain"] = (f"{abs(loss - plain_loss[name]) / max(abs(plain_loss[name]), 1e-12):.3g}"
                                  if name in plain_loss else "n/a: no plain row")
        if sink is not None:
            sink(r)
    trainer = None  # free the models before the next configuration
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # one configuration's graphs must not serve (or evict) another's
    return rows


# ------------------------------------------------------------------------------------ main
def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


@logs.quiet()  # backend fallbacks are in the rows
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny teachers on the CPU, few steps")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --quick)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--sam-type", default=None, help="SAM config (default vit_b; quick vit_micro)")
    p.add_argument("--sam-checkpoint", default=None, help="official SAM .pth (default: random weights)")
    p.add_argument("--clip-model", default=None, help="open_clip name (default ViT-L-14) or local-dir:")
    p.add_argument("--clip-pretrained", default=None, help="open_clip tag or file (default: random weights)")
    p.add_argument("--clip-res", default=None, help="CLIP sides of stages 1-2 (default 224,448; quick 32,64)")
    p.add_argument("--stage3-res", type=int, default=None, help="CLIP side of stage 3 (default 1024; quick 64)")
    p.add_argument("--clip-batch", type=int, default=None, help="CLIP images at the first side (default 64; quick 8)")
    p.add_argument("--sam-batch", type=int, default=None, help="SA-1B images per step (default 4; quick 2)")
    p.add_argument("--masks", type=int, default=None, help="prompts per SA-1B image (default 32; quick 4)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile-backend", default=None, help="default inductor; quick aot_eager (fast to trace)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (compile happens there)")
    p.add_argument("--out", default=None, help="CSV to append to (default bench/results/train.csv)")
    p.add_argument("--compare", default=None, metavar="REF",
                   help="print img/s against an earlier run: a results CSV, or a commit id found in --out's CSV")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = args.quick
    args.device = full_size_device(p, args.device, q)
    args.sam_type = args.sam_type or ("vit_micro" if q else "vit_b")
    args.clip_model = args.clip_model or "ViT-L-14"
    args.clip_res = _ints(args.clip_res or ("32,64" if q else "224,448"))
    args.stage3_res = args.stage3_res or (64 if q else 1024)
    args.clip_batch = args.clip_batch or (8 if q else 64)
    args.sam_batch = args.sam_batch or (2 if q else 4)
    args.masks = args.masks or (4 if q else 32)
    args.iters = args.iters or (2 if q else 10)
    args.warmup = max(1, args.warmup or (1 if q else 3))
    args.compile_backend = args.compile_backend or ("aot_eager" if q else "inductor")
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}")
    stages = _ints(args.stages)
    if not stages or any(s not in (1, 2, 3) for s in stages):
        p.error(f"--stages {args.stages!r}: give stage numbers among 1,2,3")
    out_csv = args.out or os.path.join(RESULTS_DIR, "train.csv")
    before = earlier_rows(args.compare, out_csv) if args.compare else None

    tmp = scratch_dir("fastsamclip-bench-train-")
    teachers = load_teachers(args, tmp)
    if q:  # the tiny CLIP is a local folder: the config names it as the trainer would
        args.clip_model = "local-dir:" + os.path.join(tmp, "clip")
    clip_spec, sam_dir = write_data(tmp, args.sam_batch + 1, max(args.clip_res))
    case_list = cases(args.clip_res, args.stage3_res, args.clip_batch, stages)
    results: List[Result] = []
    plain_loss: Dict[str, float] = {}
    # plain first: the other configurations' first-step losses are checked against it.
    env = environment()  # one stamp for the run: each row is appended the moment it is measured
    for config in sorted(configs, key=CONFIGS.index):
        print(f"[{config}] {len(case_list)} cases ...", flush=True)
        results += run_config(args, config, case_list, teachers, clip_spec, sam_dir, tmp, plain_loss,
                              sink=lambda r: append_csv([r], out_csv, env))
    path = out_csv
    plots = [plot_csv(path, metric=m) for m in ("img_s", "peak_mem_mb")]
    print(format_table(results, baseline="plain" if "plain" in configs else None))
    print()
    print(format_extras(results, [("img/s", "img_s"), ("p99 ms", "p99_ms"), ("attention", "attention"),
                                  ("losses", "losses"), ("loss vs plain", "loss_vs_plain")]))
    print(f"appended {len(results)} rows to {path}; plots: {', '.join(x for x in plots if x) or 'none'}")
    if before is not None:
        print()
        print(compare(results, before, metric="img_s", higher_is_better=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
