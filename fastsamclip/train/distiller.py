"""The trainer: the paper's three stages (DESIGN: the recipe) on one or many processes.

    stage 1  head probing          backbone frozen; CLIP head on L_CLIP; AdamW lr 8e-4
    stage 2  multi-task distill    per step: D_CLIP batch fwd+bwd on L_CLIP, then D_SAM batch
                                   fwd+bwd on lambda * L_SAM (lambda 10), ONE optimizer step;
                                   lr 4e-5 CLIP head, 0.1x backbone and mask decoder
    stage 3  resolution adaptation backbone frozen; CLIP head at 224/448/1024; lr 8e-4; and on
                                   the trunk tokens pooled 2 x 2 (``stage3_token_pools``)

    L_CLIP = mean(1 - cos(student pooled CLIP embedding, CLIP teacher image embedding))
    L_SAM  = focal + dice of the student's low-res mask logits against sigmoid(SAM teacher's
             low-res logits) for the same box / point prompts drawn from the SA-1B masks

Choices where the paper is silent (all overridable, see :class:`~fastsamclip.train.config.TrainConfig`):
- The CLIP teacher sees exactly the student's view: the r x r centre crop of the CLIP stream,
  resized (bicubic, antialiased) to the teacher's input size when r differs from it.
- Every stream yields uint8 pixels and each model normalises its own input (the student with
  SAM's statistics, the CLIP teacher with its own), so student and teacher see one crop.
- Prompts: half of an image's drawn masks get their (jittered) box, the other half one point;
  single-output decoding (``multimask_output=False``) for both, for student and teacher alike.
- The final projection of the CLIP head and the cosine run as one fused op
  (``linear_cosine_distill_loss``), in fp32.
- Stage 3 also trains the CLIP head on the trunk tokens average-pooled k x k (default k = 2,
  ``stage3_token_pools``), L_CLIP averaged over the full and the pooled paths, so one checkpoint
  serves both: at 1024 px the pooled head costs a fifth of the full one. The backbone is frozen
  there, so the extra path adds only a head pass.
- A skipped (non-finite) step still advances the schedule and the data, so a resumed or skipping
  run stays aligned with the data order.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.data import (
    PATHS,
    ClipStream,
    MultiResolutionConfig,
    PromptConfig,
    SA1BDataset,
    SamStream,
    auto_workers,
    held_out_images,
    log_choice,
    select_decoder,
)
from fastsamclip.errors import ConfigError
from fastsamclip.files import writable_dir, write_json
from fastsamclip.kernels import focal_dice_loss, linear_cosine_distill_loss
from fastsamclip.modeling import (
    SAMCLIP,
    CLIPHeadConfig,
    get_sam_config,
    load_clip_teacher,
    load_sam_teacher,
    pool_tokens,
    samclip_from_teachers,
)
from fastsamclip.train.agreement import evaluate_agreement
from fastsamclip.train.checkpoints import (
    load_training_checkpoint,
    restore_rng,
    rng_state,
    save_training_checkpoint,
)
from fastsamclip.train.config import STAGES, TrainConfig
from fastsamclip.train.distributed import all_reduce_mean_, all_reduce_sum_, broadcast_index, setup_distributed
from fastsamclip.train.metrics import MetricsLog
from fastsamclip.train.optim import lr_lambda, param_groups, set_trainable
from fastsamclip.train.targets import TeacherTargets, split_prompts, student_masks
from fastsamclip.train.teacher_cache import TeacherCache, cache_meta

logger = logging.getLogger("fastsamclip.train")

# What a run writes into its output folder: present means a run is there.
RUN_FILES = ("checkpoints", "metrics.jsonl", "report.json", "merged.safetensors", "tb")


class TrainingStopped(RuntimeError):
    """The run stopped on its own (too many non-finite steps); the message says why and what to do."""


class Distiller:
    """Builds everything from a :class:`TrainConfig`, validates it before any step, and runs.

    ``Distiller(cfg).run()`` -> the final report (dict). Teachers may be passed in already loaded
    (tests, notebooks); otherwise they are loaded from the config through the official loaders.
    """

    def __init__(self, cfg: TrainConfig, sam_teacher=None, clip_teacher=None):
        cfg.validate()
        self.cfg = cfg
        self.d, self.device = setup_distributed(cfg.device)
        self._seed_everything(cfg.seed + self.d.rank)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.out = cfg.out
        self.ckpt_dir = os.path.join(cfg.out, "checkpoints")
        self.metrics = MetricsLog(cfg.out, cfg.log_every, cfg.tensorboard, enabled=self.d.main)
        self.history: List[dict] = []
        self.nan_skips = 0
        self.empty_skips = 0
        self._clip_eval_images: Optional[list] = None  # held-out D_CLIP (identity, image), read once

        # Settings first, then the output folder and the data: each refused before any teacher
        # loads (seconds for ViT-L/14), with a message naming what to change.
        self.sam_cfg = get_sam_config(cfg.sam_type)
        b = self.sam_cfg.backbone
        self.patch = b.patch_size
        self.sam_size = cfg.sam_image_size or b.img_size
        for name, rs in (("clip_resolutions", cfg.clip_resolutions), ("stage3_resolutions", cfg.stage3_resolutions),
                         ("sam_image_size", (self.sam_size,))):
            bad = [r for r in rs if r <= 0 or r % self.patch]
            if bad or not rs:
                raise ConfigError(f"{name} {tuple(rs)}: every side must be a positive multiple of the patch size "
                                  f"{self.patch}")
        self.teacher_sources = self._teacher_sources(sam_teacher, clip_teacher)
        if self.d.main:
            writable_dir(cfg.out, "--out", create=False)  # a read-only or full disk: one line, before any work
        self._prepare_out()
        if not cfg.clip_data:
            raise ConfigError("no D_CLIP data: pass --clip-data (a WebDataset shard spec or an image folder)")
        if not cfg.sam_data:
            raise ConfigError("no D_SAM data: pass --sam-data (an SA-1B folder of sa_N.jpg + sa_N.json)")
        self._clip_streams: Dict[int, ClipStream] = {}
        # The cache's index is read now (its teachers are checked once they load): its decode path
        # is the one "auto" follows.
        self.cache = TeacherCache(cfg.teacher_cache) if cfg.teacher_cache else None
        choice = select_decoder(cfg.clip_decode, cfg.clip_data, self.device, cfg.num_workers, cfg.clip_base_res,
                                self.d.rank, self.d.world_size, self.d.local_world_size,
                                cached=self.cache.meta.get("clip_decode") if self.cache else None)
        self.clip_decoder = PATHS[broadcast_index(PATHS.index(choice.name), self.d, self.device)]  # rank 0's
        if self.d.main:
            log_choice(choice, self.device)
        self._clip_stream(1)  # opens and validates D_CLIP now
        if not held_out_images(cfg.clip_data, cfg.clip_holdout, limit=1):
            raise ConfigError(f"no readable D_CLIP image falls in the held-out {cfg.clip_holdout:.0%} of "
                              f"{cfg.clip_data!r}; raise --clip-holdout or add images")
        prompts = PromptConfig(masks_per_image=cfg.masks_per_image, use_boxes="box" in cfg.prompt_types,
                               points_per_mask=1)
        self.sam_data = SA1BDataset(cfg.sam_data, prompts, seed=cfg.seed, long_side=self.sam_size)
        n = len(self.sam_data)
        n_eval = cfg.eval_images or max(1, round(0.01 * n))
        if n_eval >= n:
            raise ConfigError(f"D_SAM has {n} images; holding out {n_eval} for the report leaves none to train "
                              "on; lower --eval-images or add images")
        self.eval_indices = list(range(n - n_eval, n))  # the last stems: a fixed, reproducible split
        per_rank = cfg.sam_batch // self.d.world_size
        if per_rank < 1 or cfg.sam_batch % self.d.world_size:
            raise ConfigError(f"sam_batch {cfg.sam_batch} does not split over {self.d.world_size} ranks; give a "
                              "multiple of the number of processes")
        self.sam_stream = SamStream(self.sam_data, range(n - n_eval), per_rank, cfg.seed, self.d.rank,
                                    self.d.world_size, self._workers(), self.device.type == "cuda",
                                    cfg.prefetch_batches)

        # Teachers (frozen).
        self.sam = sam_teacher if sam_teacher is not None else load_sam_teacher(cfg.sam_checkpoint, cfg.sam_type)
        self.clip = (clip_teacher if clip_teacher is not None
                     else load_clip_teacher(cfg.clip_model, cfg.clip_pretrained))
        self.sam.to(self.device).eval()
        self.clip.to(self.device).eval()
        for p in list(self.sam.parameters()) + list(self.clip.parameters()):
            p.requires_grad_(False)

        # Student: fresh from the teachers, or a merged checkpoint checked against them.
        self.student = self._build_student().to(self.device)

        # Teacher targets, from the cache (checked against these teachers and sizes) when given.
        if self.cache is not None:
            self.cache.check_compatible(cache_meta(self.sam, self.clip, self.sam_size))
        self.targets = TeacherTargets(self.sam, self.clip, self.cache, self._autocast, sam_size=self.sam_size)

        self.stage_steps = {s: self._steps_for(s) for s in STAGES}
        self._apply_engineering()
        if self.d.enabled:  # identical start on every rank
            for t in self.student.state_dict().values():
                dist.broadcast(t, 0)

    def _teacher_sources(self, sam_teacher, clip_teacher) -> Dict[str, str]:
        """Where each teacher comes from (the run's report records it); refuses a teacher without
        weights unless ``random_teachers``, and a weights file that is not there."""
        cfg = self.cfg
        sources = {"sam": "given in-process", "clip": "given in-process"}
        if sam_teacher is None or clip_teacher is None:
            configured = cfg.teacher_weights()
            for kind, given in (("sam", sam_teacher), ("clip", clip_teacher)):
                if given is None:
                    sources[kind] = configured[kind]
        for kind, path in (("SAM", cfg.sam_checkpoint if sam_teacher is None else None),
                           ("CLIP", cfg.clip_pretrained if clip_teacher is None else None)):
            if path and (os.sep in path or path.endswith((".pth", ".pt", ".bin", ".safetensors"))) \
                    and not os.path.isfile(path):
                raise FileNotFoundError(f"{kind} teacher weights not found: {path}")
        return sources

    def _prepare_out(self) -> None:
        """Refuse an output folder that holds a run unless resuming it or starting it over."""
        existing = [f for f in RUN_FILES if os.path.exists(os.path.join(self.out, f))]
        if existing and not (self.cfg.resume or self.cfg.overwrite):
            raise ConfigError(f"--out {self.out} holds a run already ({', '.join(existing)}): pass --resume to "
                              "continue it, or --overwrite to start over (its checkpoints, metrics and report go)")
        if self.cfg.overwrite and existing and self.d.main:
            for f in existing:
                path = os.path.join(self.out, f)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if self.d.enabled:
            dist.barrier()  # no rank reads the folder while rank 0 cleans it

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_student(self) -> SAMCLIP:
        cfg = self.cfg
        if cfg.init_from:
            student = load_merged(cfg.init_from)
            sc = student.config
            if sc.sam != self.sam_cfg:
                raise ConfigError(
                    f"student {cfg.init_from} has a SAM part of another size than the SAM teacher "
                    f"({cfg.sam_type}: width {self.sam_cfg.backbone.embed_dim}, depth {self.sam_cfg.backbone.depth}; "
                    f"student: width {sc.sam.backbone.embed_dim}, depth {sc.sam.backbone.depth}); use the "
                    "teacher it was merged from, or drop --init-from")
            if sc.clip_head.out_dim != self.clip.embed_dim:
                raise ConfigError(
                    f"student {cfg.init_from} predicts {sc.clip_head.out_dim}-d CLIP embeddings but the CLIP "
                    f"teacher {cfg.clip_model} gives {self.clip.embed_dim}-d ones; use the teacher it was merged "
                    "from, or drop --init-from")
            return student.train()
        head = CLIPHeadConfig(out_dim=self.clip.embed_dim, hidden_dim=cfg.head_hidden)
        return samclip_from_teachers(self.sam, self.clip, clip_head=head, sam_config=self.sam_cfg).train()

    def _clip_stream(self, stage: int) -> ClipStream:
        if stage not in self._clip_streams:
            cfg = self.cfg
            res = cfg.stage3_resolutions if stage == 3 else cfg.clip_resolutions
            # The global batch: ranks split it (rank_share), so N ranks see what one process would.
            mr = MultiResolutionConfig(resolutions=tuple(res), base_batch=cfg.clip_batch,
                                       base_res=cfg.clip_base_res, seed=cfg.seed * 10 + stage)
            self._clip_streams = {stage: ClipStream(
                cfg.clip_data, mr, self.d.rank, self.d.world_size, cfg.num_workers, holdout=cfg.clip_holdout,
                pin_memory=self.device.type == "cuda", prefetch=cfg.prefetch_batches, decoder=self.clip_decoder,
                device=self.device, local_ranks=self.d.local_world_size)}
        return self._clip_streams[stage]

    def _workers(self) -> int:
        """DataLoader workers per rank (``num_workers``; -1: :func:`~fastsamclip.data.auto_workers`)."""
        n = self.cfg.num_workers
        return auto_workers(self.device.type, self.d.local_world_size) if n < 0 else n

    def _steps_for(self, stage: int) -> int:
        cfg = self.cfg
        steps = getattr(cfg, f"stage{stage}_steps")
        if steps > 0:
            return steps
        epochs = getattr(cfg, f"stage{stage}_epochs")
        if epochs <= 0:
            return 0
        stream = self._clip_stream(1)
        mr = stream.mr
        res = cfg.stage3_resolutions if stage == 3 else cfg.clip_resolutions
        mean_batch = float(np.mean([mr.batch_size(r) for r in res]))  # global
        return max(1, math.ceil(epochs * stream.samples() / mean_batch))

    def _apply_engineering(self) -> None:
        cfg = self.cfg
        if cfg.activation_checkpointing:
            for blk in self.student.image_encoder.blocks:
                fwd = blk.forward
                # Instance attribute, so the state_dict keys stay those of segment_anything.
                blk.forward = (lambda f: (lambda x: checkpoint(f, x, use_reentrant=False)
                                          if torch.is_grad_enabled() else f(x)))(fwd)
        if cfg.compile:
            # In place (nn.Module.compile) keeps parameter names; one graph per input resolution.
            self.student.image_encoder.compile(dynamic=False, backend=cfg.compile_backend)
            self.student.clip_head.compile(dynamic=False, backend=cfg.compile_backend)

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # ---------------------------------------------------------------- losses (fwd + bwd)
    def clip_step(self, stage: int, keys, pixels, res, denominator: float) -> Tuple[float, int]:
        """L_CLIP on this rank's share of a batch of uint8 views, backward (in micro-batches).

        The gradient of ``sum over the rank's images of the per-image loss / denominator``
        (``denominator`` = global images / ranks, so the ranks' averaged gradients are those of the
        global mean). Returns (the sum of the per-image losses, images)."""
        pixels = pixels.to(self.device, non_blocking=True)
        n = pixels.shape[0]
        mb = self.cfg.clip_micro_batch or max(n, 1)
        total = 0.0
        frozen_backbone = stage in (1, 3)
        pools = (1,) + tuple(self.cfg.stage3_token_pools) if stage == 3 else (1,)
        head = self.student.clip_head
        proj = head.projection
        for s in range(0, n, mb):
            x, ks = pixels[s:s + mb], keys[s:s + mb]
            target = self.targets.clip_embeddings(ks, x, res)
            with self._autocast():
                if frozen_backbone:  # nothing to train below the head: keep no activations
                    with torch.no_grad():
                        feats = self.student.forward_features(self.student.preprocess(x))
                else:
                    feats = self.student.forward_features(self.student.preprocess(x))
            loss = 0.0
            for pool in pools:  # the full path, then each pooled one: the mean of their L_CLIP
                with self._autocast():
                    hidden = head.pooled_features(head.tokens(pool_tokens(feats, pool)))
                loss = loss + linear_cosine_distill_loss(hidden.float(), proj.weight, proj.bias, target,
                                                         backend=self.cfg.loss_backend) / len(pools)
            (loss * (x.shape[0] / denominator)).backward()
            total += loss.item() * x.shape[0]
        return total, n

    def sam_step(self, items: List[dict], denominator: float) -> Tuple[float, int]:
        """lambda * L_SAM on this rank's SA-1B items, backward: the gradient of ``lambda * sum over
        the rank's masks of the per-mask loss / denominator`` (``denominator`` = global masks /
        ranks). Returns (the sum of the per-mask losses, masks)."""
        cfg = self.cfg
        n = len(items)
        mb = cfg.sam_micro_batch or max(n, 1)
        total, masks = 0.0, 0
        size = (self.sam_size, self.sam_size)
        for s in range(0, n, mb):
            part = items[s:s + mb]
            pixels = torch.stack([it["image"] for it in part]).to(self.device, non_blocking=True)
            hw = [it["input_size"] for it in part]
            t_emb = self.targets.sam_embeddings([it["key"] for it in part], pixels, hw)
            with self._autocast():
                emb = self.student.sam_embeddings(self.student.forward_features(self.student.preprocess(pixels, hw)))
                s_logits, t_logits = [], []
                for i, it in enumerate(part):
                    prompts = split_prompts(it, cfg.prompt_types, self.device)
                    s_logits.append(student_masks(self.student, emb[i], prompts, size))
                    t_logits.append(self.targets.masks(t_emb[i], prompts))
            s_all = torch.cat(s_logits)[None, :, 0]  # (1, m, h, w)
            t_all = torch.sigmoid(torch.cat(t_logits)[None, :, 0])
            # focal is a mean over all pixels of the m masks, dice a mean over them: a per-mask mean.
            loss = focal_dice_loss(s_all, t_all, cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha,
                                   cfg.focal_gamma, backend=cfg.loss_backend)
            m = s_all.shape[1]
            (cfg.sam_loss_weight * loss * (m / denominator)).backward()
            total += loss.item() * m
            masks += m
        return total, masks

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_path(self, name: str = "last.pt") -> str:
        return os.path.join(self.ckpt_dir, name)

    def save_checkpoint(self, stage: int, step: int, opt, sched, names: Sequence[str] = ("last.pt",)) -> None:
        if not self.d.main:
            return
        save_training_checkpoint([self._ckpt_path(n) for n in names], {
            "config": self.cfg.to_dict(), "model_config": self.student.config.to_dict(), "stage": stage,
            "step": step, "stage_steps": self.stage_steps, "world_size": self.d.world_size,
            "model": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "clip_stream": self._clip_stream(stage).state_dict(), "sam_stream": self.sam_stream.state_dict(),
            "rng": rng_state(), "nan_skips": self.nan_skips, "history": self.history,
        })

    def load_checkpoint(self) -> dict:
        """The newest intact checkpoint's state (``last.pt``, or the fallback it names), loaded;
        ``metrics.jsonl`` is cut back to the checkpoint's step, so the replayed steps are logged once."""
        state = load_training_checkpoint(self.ckpt_dir, self.student, self.d.world_size, self.stage_steps)
        self.nan_skips, self.history = state["nan_skips"], list(state["history"])
        done = sum(self.stage_steps[s] for s in STAGES if s < state["stage"]) + state["step"]
        self.metrics.resume_at(done)
        return state

    # ---------------------------------------------------------------- the loop
    def make_optimizer(self, stage: int):
        set_trainable(self.student, stage)
        opt = torch.optim.AdamW(param_groups(self.student, stage, self.cfg), betas=tuple(self.cfg.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.stage_steps[stage], self.cfg.warmup_fraction, self.cfg.min_lr_ratio))
        return opt, sched

    def train_step(self, stage: int, opt, sched, clip_batch: Optional[tuple] = None,
                   sam_items: Optional[List[dict]] = None) -> dict:
        """One optimizer step of a stage; returns its record (losses, lr, skipped).

        The batches come from the data streams, or are given: ``clip_batch`` as the stream's
        ``(keys, pixels, resolution)`` and ``sam_items`` as a list of ``SA1BDataset`` items
        (how the training-step benchmark feeds fixed batches)."""
        opt.zero_grad(set_to_none=True)
        keys, pixels, res = clip_batch if clip_batch is not None else self._clip_stream(stage).next()
        items = (sam_items if sam_items is not None else self.sam_stream.next()) if stage == 2 else []
        # Global counts first: each rank weighs its share by them, so the averaged gradient is the
        # gradient of one process over the whole global batch, whatever each rank holds.
        counts = torch.tensor([pixels.shape[0], sum(it["gt_masks"].shape[0] for it in items), len(items)],
                              dtype=torch.float64, device=self.device)
        all_reduce_sum_([counts], self.d)
        n_clip, n_masks, n_sam = (int(v) for v in counts.tolist())
        lr = opt.param_groups[0]["lr"]
        if n_clip == 0 or (stage == 2 and n_masks == 0):  # every image of the batch unreadable, on every rank
            self.empty_skips += 1
            logger.warning("stage %d step %d: no readable %s in the batch on any rank; step skipped (%d so far)",
                           stage, sched.last_epoch + 1, "D_CLIP image" if n_clip == 0 else "SA-1B mask",
                           self.empty_skips)
            sched.step()
            return {"stage": stage, "step": sched.last_epoch, "loss_clip": float("nan"), "lr": lr,
                    "grad_norm": float("nan"), "resolution": res, "skipped": True, "empty": True, "images": 0}
        w = self.d.world_size
        sum_clip, _ = self.clip_step(stage, keys, pixels, res, n_clip / w)
        sum_sam = self.sam_step(items, n_masks / w)[0] if stage == 2 else 0.0
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:  # every rank all-reduces the same list, so absent grads become zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        all_reduce_mean_([p.grad for p in params], self.d)
        sums = torch.tensor([sum_clip, sum_sam], dtype=torch.float64, device=self.device)
        all_reduce_sum_([sums], self.d)
        loss_clip = float(sums[0]) / n_clip
        loss_sam = float(sums[1]) / n_masks if stage == 2 else None
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        finite = math.isfinite(loss_clip) and (loss_sam is None or math.isfinite(loss_sam)) and bool(torch.isfinite(gnorm))
        if finite:
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
            self.nan_skips += 1
            logger.warning("stage %d step %d: non-finite loss or gradient (L_CLIP %s, L_SAM %s, grad norm %s); step "
                           "skipped (%d of at most %d)", stage, sched.last_epoch + 1, loss_clip, loss_sam,
                           float(gnorm), self.nan_skips, self.cfg.max_nan_skips)
        sched.step()
        rec = {"stage": stage, "step": sched.last_epoch, "loss_clip": loss_clip, "lr": lr,
               "grad_norm": float(gnorm), "resolution": res, "skipped": not finite, "images": n_clip + n_sam}
        rec["loss"] = loss_clip  # what the step minimised: L_CLIP (+ lambda * L_SAM in stage 2)
        if loss_sam is not None:
            rec["loss_sam"] = loss_sam
            rec["loss"] = loss_clip + self.cfg.sam_loss_weight * loss_sam
        return rec

    def run(self, stop_after: Optional[int] = None) -> dict:
        """Train all stages (from the checkpoint with ``resume``); ``stop_after``: return after that
        many global steps (a checkpoint is written there), as a killed run would have stopped."""
        cfg = self.cfg
        os.makedirs(self.out, exist_ok=True)
        start_stage, start_step, state = 1, 0, None
        if cfg.resume:
            state = self.load_checkpoint()
            start_stage, start_step = state["stage"], state["step"]
            if start_step >= self.stage_steps[start_stage]:
                start_stage, start_step, state = start_stage + 1, 0, None if start_stage < 3 else state
            logger.info("resuming at stage %d step %d", start_stage, start_step)
        global_step = sum(self.stage_steps[s] for s in STAGES if s < start_stage) + start_step
        for stage in STAGES:
            if stage < start_stage or self.stage_steps[stage] == 0:
                continue
            opt, sched = self.make_optimizer(stage)
            stream = self._clip_stream(stage)
            step = 0
            if state is not None and stage == start_stage:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                stream.load_state_dict(state["clip_stream"])
                self.sam_stream.load_state_dict(state["sam_stream"])
                restore_rng(state["rng"])
                step = start_step
            total = self.stage_steps[stage]
            bar = (tqdm(total=total, initial=step, desc=f"stage {stage}", dynamic_ncols=True, leave=True)
                   if cfg.progress and self.d.main else None)
            self.student.train()
            t0, imgs = time.perf_counter(), 0
            while step < total:
                rec = self.train_step(stage, opt, sched)
                step += 1
                global_step += 1
                rec["global_step"] = global_step
                self.history.append(rec)
                self.metrics.log(rec, last_of_stage=step == total)
                imgs += rec["images"]
                if bar is not None:
                    post = {"img/s": f"{imgs / max(1e-9, time.perf_counter() - t0):.1f}",
                            "L_clip": f"{rec['loss_clip']:.4f}"}
                    if "loss_sam" in rec:
                        post["L_sam"] = f"{rec['loss_sam']:.4f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if rec.get("empty") and self.empty_skips >= cfg.max_nan_skips:
                    raise TrainingStopped(
                        f"stopped at stage {stage} step {step}: {self.empty_skips} batches had no readable image on "
                        f"any rank (limit --max-nan-skips {cfg.max_nan_skips}); check the data (see the warnings "
                        f"above); resume from {self._ckpt_path()} with --resume")
                if rec["skipped"] and not rec.get("empty") and self.nan_skips >= cfg.max_nan_skips:
                    raise TrainingStopped(
                        f"stopped at stage {stage} step {step}: {self.nan_skips} steps had a non-finite loss or "
                        f"gradient (limit --max-nan-skips {cfg.max_nan_skips}); the weights are those of the last "
                        f"good step. Lower the learning rate, use --amp off, or check the data; resume from "
                        f"{self._ckpt_path()} with --resume")
                end = step == total
                if end or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or global_step == stop_after:
                    names = ["last.pt"] + ([f"stage{stage}.pt"] if end and cfg.keep_stage_checkpoints else [])
                    self.save_checkpoint(stage, step, opt, sched, names)
                if stop_after is not None and global_step >= stop_after:
                    if bar is not None:
                        bar.close()
                    return {"stopped_at": global_step}
            if bar is not None:
                bar.close()
            state = None
        return self.finish()

    def finish(self) -> dict:
        """Held-out agreement report, merged checkpoint, report.json (rank 0)."""
        report = {"nan_skips": self.nan_skips, "empty_skips": self.empty_skips, "stage_steps": self.stage_steps,
                  "cache_misses": self.targets.misses, "teachers": self.teacher_sources,
                  "random_teachers": self.cfg.random_teachers, "clip_holdout": self.cfg.clip_holdout}
        if self.d.main:
            report["eval"] = self.evaluate()
            path = os.path.join(self.out, "merged.safetensors")
            save_merged(self.student, path, teachers={**self.teacher_sources,
                                                      "random_teachers": self.cfg.random_teachers})
            report["merged"] = path
            write_json(os.path.join(self.out, "report.json"), report)
            ev = report["eval"]
            logger.info("held-out agreement with the teachers: CLIP cosine %s on %d D_CLIP images, mask IoU %.4f",
                        {r: round(v, 4) for r, v in ev["clip_cosine"].items()}, ev["clip_images"], ev["mask_iou"])
            for k, cos in ev["clip_cosine_pooled"].items():
                logger.info("CLIP cosine of the head on %dx%d-pooled tokens: %s", k, k,
                            {r: round(v, 4) for r, v in cos.items()})
        self.metrics.close()
        return report

    @torch.no_grad()
    def evaluate(self, indices: Optional[Sequence[int]] = None) -> dict:
        """Student vs teachers on held-out data (:func:`evaluate_agreement`): the CLIP cosine on the
        held-out D_CLIP images, the mask IoU on the held-out SA-1B images."""
        if self._clip_eval_images is None:
            self._clip_eval_images = held_out_images(self.cfg.clip_data, self.cfg.clip_holdout,
                                                     self.cfg.eval_clip_images)
        return evaluate_agreement(self.student, self.targets, self._clip_eval_images, self.sam_data,
                                  self.eval_indices if indices is None else indices,
                                  self.cfg.eval_resolutions or self.cfg.stage3_resolutions, self.sam_size,
                                  self.cfg.eval_masks_per_image, self.device, self._autocast,
                                  token_pools=self.cfg.stage3_token_pools)


def train(cfg: TrainConfig, **teachers) -> dict:
    """Run the three stages; the report dict (held-out agreement, merged checkpoint path)."""
    return Distiller(cfg, **teachers).run()
