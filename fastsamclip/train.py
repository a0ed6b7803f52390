"""SAM-CLIP training: the paper's three stages (DESIGN.md section 2) on one or many GPUs.

    stage 1  head probing          backbone frozen; CLIP head on L_CLIP; AdamW lr 8e-4
    stage 2  multi-task distill    per step: D_CLIP batch fwd+bwd on L_CLIP, then D_SAM batch
                                   fwd+bwd on lambda * L_SAM (lambda 10), ONE optimizer step;
                                   lr 4e-5 CLIP head, 0.1x backbone and mask decoder
    stage 3  resolution adaptation backbone frozen; CLIP head at 224/448/1024; lr 8e-4

    L_CLIP = mean(1 - cos(student pooled CLIP embedding, CLIP teacher image embedding))
    L_SAM  = focal + dice of the student's low-res mask logits against sigmoid(SAM teacher's
             low-res logits) for the same box / point prompts drawn from the SA-1B masks

Choices where the paper is silent (all overridable, see :class:`TrainConfig`):
- The CLIP teacher sees exactly the student's view: the r x r centre crop of the CLIP stream,
  resized (bicubic, antialiased) to the teacher's input size when r differs from it.
- Every stream feeds the student SAM-normalised pixels; CLIP-normalised batches are converted
  exactly (x * std + mean -> 0..255 -> SAM's mean/std), so student and teacher see one crop.
- Prompts: half of an image's drawn masks get their (jittered) box, the other half one point;
  single-output decoding (``multimask_output=False``) for both, for student and teacher alike.
- Weight decay 0.05 on matrices (none on norms, biases, position tables); linear warm-up over 5%
  of a stage, then cosine to 0; gradient clipping at norm 1.0.
- A skipped (non-finite) step still advances the schedule and the data, so a resumed or skipping
  run stays aligned with the data order.
- Data parallel by hand: stage 2 runs two backward passes over different parameter subsets per
  step, so gradients are all-reduced once after both (what DDP's ``no_sync`` +
  ``find_unused_parameters`` would do), which also keeps activation checkpointing and
  ``torch.compile`` free of DDP hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fastsamclip.checkpoint import atomic_write, load_merged, save_merged
from fastsamclip.modeling.samclip import SAMCLIP, CLIPHeadConfig
from fastsamclip.teachers import SAM_PIXEL_MEAN, SAM_PIXEL_STD, get_sam_config

logger = logging.getLogger("fastsamclip.train")

CHECKPOINT_FORMAT = "fastsamclip.train"
CHECKPOINT_VERSION = 1
STAGES = (1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    # --- teachers and data
    sam_checkpoint: Optional[str] = None  # official SAM .pth (sam_vit_b_01ec64.pth); None: random weights
    sam_type: str = "vit_b"  # vit_b | vit_l | vit_h (vit_tiny / vit_micro for tests and the demo)
    clip_model: str = "ViT-L-14"  # open_clip model name or local-dir:/folder (paper: OpenCLIP ViT-L/14)
    clip_pretrained: Optional[str] = "datacomp_xl_s13b_b90k"  # open_clip tag or a local file; None: random
    clip_data: str = ""  # D_CLIP: WebDataset shard spec ('/d/{00000..00099}.tar') or an image folder
    sam_data: str = ""  # D_SAM: SA-1B folder of sa_N.jpg + sa_N.json
    out: str = "samclip-out"  # output folder: checkpoints, metrics, report, merged model
    init_from: Optional[str] = None  # start from a merged checkpoint instead of fresh from the teachers
    teacher_cache: Optional[str] = None  # folder made by cache_teachers; None: live teachers only
    head_hidden: Optional[int] = None  # CLIP head MLP width; None: the backbone width
    # --- stage lengths: epochs over D_CLIP (paper 20 / 16 / 3); a positive *_steps overrides
    stage1_epochs: float = 20.0  # head probing
    stage2_epochs: float = 16.0  # multi-task distillation (paper early-stopped at 16)
    stage3_epochs: float = 3.0  # resolution adaptation
    stage1_steps: int = 0  # optimizer steps of stage 1; 0: from stage1_epochs
    stage2_steps: int = 0
    stage3_steps: int = 0
    # --- batches (global over all ranks; each rank takes 1/world_size)
    clip_batch: int = 2048  # D_CLIP images per step at clip_base_res (paper: 2048)
    clip_base_res: int = 224  # resolution at which the CLIP batch is clip_batch; ~constant pixels otherwise
    clip_resolutions: Tuple[int, ...] = (224, 448)  # CLIP-stream sides drawn per batch in stages 1-2
    stage3_resolutions: Tuple[int, ...] = (224, 448, 1024)  # CLIP-stream sides in stage 3
    sam_batch: int = 32  # SA-1B images per step (paper: 32)
    masks_per_image: int = 32  # masks (prompts) per SA-1B image (paper: 32)
    prompt_types: Tuple[str, ...] = ("box", "point")  # prompts used; with both, half the masks each
    clip_micro_batch: int = 0  # per-rank images per fwd/bwd pass (gradient accumulation); 0: all at once
    sam_micro_batch: int = 0  # per-rank SA-1B images per fwd/bwd pass; 0: all at once
    sam_image_size: int = 0  # SAM-stream input side; 0: the backbone's native size (1024 for vit_b)
    # --- optimisation
    stage1_lr: float = 8e-4  # AdamW lr of the CLIP head in stage 1 (paper)
    stage2_lr: float = 4e-5  # CLIP head lr in stage 2 (paper)
    stage2_lr_scale: float = 0.1  # backbone and mask decoder lr = stage2_lr * this (paper: 4e-6)
    stage3_lr: float = 8e-4  # CLIP head lr in stage 3 (paper)
    weight_decay: float = 0.05  # on weight matrices only (paper: not stated)
    betas: Tuple[float, float] = (0.9, 0.999)  # AdamW betas (paper: not stated; torch defaults)
    warmup_fraction: float = 0.05  # linear warm-up over this fraction of each stage (paper: not stated)
    min_lr_ratio: float = 0.0  # cosine decays to lr * this
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    sam_loss_weight: float = 10.0  # lambda of L_CLIP + lambda * L_SAM (paper: 10)
    focal_weight: float = 20.0  # focal : dice = 20 : 1, SAM's own mask loss weights
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_backend: Optional[str] = None  # force the loss kernels: "triton" | "reference"; None: automatic
    # --- engineering
    seed: int = 0  # seeds data order, prompt draws, resolution draws and the global RNGs
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    amp: str = "auto"  # bf16 | off | auto (bf16 autocast on CUDA, off on CPU)
    compile: bool = False  # torch.compile the image encoder and CLIP head (per-resolution graphs)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" to debug a compiled run)
    activation_checkpointing: bool = False  # recompute backbone blocks in backward (1024 px batches)
    num_workers: int = 0  # DataLoader workers for image folders and SA-1B (0: in-process)
    checkpoint_every: int = 1000  # write out/checkpoints/last.pt every K optimizer steps (and at stage ends)
    keep_stage_checkpoints: bool = True  # also keep stage{N}.pt at the end of each stage
    resume: bool = False  # continue from out/checkpoints/last.pt
    max_nan_skips: int = 20  # stop the run after this many skipped non-finite steps
    log_every: int = 10  # metrics.jsonl / TensorBoard every N steps
    progress: bool = True  # tqdm bar with img/s and losses (rank 0)
    tensorboard: bool = True  # TensorBoard scalars in out/tb when tensorboard is installed
    eval_images: int = 0  # held-out SA-1B images for the final report; 0: 1% (at least 1)
    eval_resolutions: Tuple[int, ...] = ()  # CLIP cosine reported at these sides; (): stage-3 ones
    eval_masks_per_image: int = 8  # prompts per held-out image for the mask IoU

    def validate(self) -> None:
        for name in ("clip_batch", "sam_batch", "masks_per_image", "clip_base_res"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not set(self.prompt_types) <= {"box", "point"} or not self.prompt_types:
            raise ValueError(f"prompt_types must be a non-empty subset of ('box', 'point'), got {self.prompt_types}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.max_nan_skips < 0:
            raise ValueError("max_nan_skips must be >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(f: dataclasses.Field, value):
    """A value from JSON/YAML or the command line into the field's type (annotations are strings)."""
    t = str(f.type)
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("none", "null") and t.startswith("Optional"):
        return None
    if t.startswith("Tuple"):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        inner = float if "float" in t else int if "int" in t else str
        return tuple(inner(v) for v in value)
    if t == "bool":
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{f.name}: expected true/false, got {value!r}")
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if "int" in t:
        return int(value)
    if "float" in t:
        return float(value)
    return str(value)


def config_from_dict(d: dict, base: Optional[TrainConfig] = None) -> TrainConfig:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {', '.join(fields)}")
    cfg = dataclasses.replace(base or TrainConfig(), **{k: _coerce(fields[k], v) for k, v in d.items()})
    cfg.validate()
    return cfg


def load_config_file(path: str) -> dict:
    """A JSON or YAML file of TrainConfig fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("reading a YAML config needs PyYAML (pip install pyyaml), or write it as JSON") from e
        d = yaml.safe_load(text) or {}
    else:
        d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return d


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str = "auto") -> Tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; with WORLD_SIZE > 1 join the process group.

    The same command runs on one process (no env) or under ``torchrun --nproc-per-node N``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu") if device_pref in ("auto", "cuda") else torch.device(device_pref)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def _all_reduce_mean_(tensors: List[torch.Tensor], d: Dist) -> None:
    if not d.enabled or not tensors:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= d.world_size
    for t, r in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


# ---------------------------------------------------------------------------------------------
# Data streams (endless, resumable, sharded by rank)
# ---------------------------------------------------------------------------------------------
def _is_shard_spec(path: str) -> bool:
    return ".tar" in path or "{" in path or "::" in path or "://" in path


def count_shard_samples(shards: Sequence[str]) -> int:
    """Samples in img2dataset shards: the ``*_stats.json`` 'successes' next to each shard when
    present (img2dataset writes them), else one pass over the tar headers (no decoding)."""
    import tarfile

    total = 0
    for s in shards:
        stats = s[:-4] + "_stats.json" if s.endswith(".tar") else None
        if stats and os.path.isfile(stats):
            with open(stats) as f:
                total += int(json.load(f).get("successes", 0))
            continue
        with tarfile.open(s) as t:
            total += len({os.path.basename(n).split(".", 1)[0] for n in t.getnames()
                          if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))})
    return total


class ClipStream:
    """D_CLIP batches ``(keys, images (B, 3, r, r) CLIP-normalised, r)`` epoch after epoch.

    Shards go through ``MultiResolutionBatcher`` (in-process, resumable by record count); image
    folders through ``MultiResolutionBatchSampler`` (optionally with DataLoader workers; the
    state counts batches the loop consumed, not what workers prefetched)."""

    def __init__(self, path: str, mr_config, d: Dist, mean, std, num_workers: int = 0, validate: bool = True):
        from fastsamclip import data

        self.mr = mr_config
        self.mean, self.std = mean, std
        self.num_workers = num_workers
        self.epoch = 0
        self._consumed = 0  # batches of this epoch consumed by the training loop
        self._it = None
        self.kind = "shards" if _is_shard_spec(path) else "folder"
        if self.kind == "shards":
            self.source = data.ClipWebDataset(path, rank=d.rank, world_size=d.world_size, seed=mr_config.seed,
                                              validate=validate)
            self.num_samples = None  # counted lazily (only needed to turn epochs into steps)
            per_epoch = None
            if d.world_size > 1:
                # Ranks read different shards, whose sizes differ: a fixed number of batches per
                # rank and epoch keeps every rank in the same epoch, so batch k has the same
                # resolution on all of them (a rank whose shards run out re-reads them).
                per_rank = self.samples() / d.world_size
                mean_batch = float(np.mean([mr_config.batch_size(r) for r in mr_config.resolutions]))
                per_epoch = max(1, int(per_rank // mean_batch))
            self.batcher = data.MultiResolutionBatcher(self.source, mr_config, mean, std, batches_per_epoch=per_epoch)
        else:
            if not os.path.exists(path):
                raise FileNotFoundError(f"D_CLIP path {path!r} does not exist (give a shard spec "
                                        "'/data/{00000..00099}.tar' or an image folder)")
            self.source = data.ClipImageFolder(path, validate=validate)
            self.sampler = data.MultiResolutionBatchSampler(len(self.source), mr_config, d.rank, d.world_size)
            self.num_samples = len(self.source)

    def samples(self) -> int:
        if self.num_samples is None:
            self.num_samples = count_shard_samples(self.source.shards)
        return self.num_samples

    def _collate(self, items):
        from fastsamclip.data import collate_clip

        res = items[0][2]
        good = [(k, im) for k, im, _ in items if im is not None]
        return [k for k, _ in good], collate_clip(good, res, self.mean, self.std), res

    def _epoch_iter(self):
        if self.kind == "shards":
            self.batcher.set_epoch(self.epoch)
            for b in self.batcher:
                yield b.keys, b.images, b.resolution
            return
        self.sampler.set_epoch(self.epoch)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(self.source, batch_sampler=self.sampler, num_workers=self.num_workers,
                                                 collate_fn=self._collate)
            yield from loader
        else:
            for idx in self.sampler:
                yield self._collate([self.source[i] for i in idx])

    def next(self):
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            for keys, images, res in self._it:
                self._consumed += 1
                if images.shape[0] > 0:
                    return keys, images, res
            self._it, self.epoch, self._consumed = None, self.epoch + 1, 0
        raise RuntimeError("the D_CLIP stream gave no readable batch over a whole epoch; every sample "
                           "was skipped (see the warnings above), or there are fewer samples than one batch")

    def state_dict(self) -> dict:
        if self.kind == "shards":
            return {"kind": "shards", "batcher": self.batcher.state_dict(), "epoch": self.epoch}
        return {"kind": "folder", "sampler": self.sampler.state_dict(batches_done=self._consumed), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"cannot resume: the checkpoint read D_CLIP as {state['kind']}, this run as {self.kind}")
        self.epoch, self._it = state["epoch"], None
        if self.kind == "shards":
            self.batcher.load_state_dict(state["batcher"])
            self._consumed = 0
        else:
            self.sampler.load_state_dict(state["sampler"])
            self._consumed = state["sampler"]["batch_index"]


class SamStream:
    """D_SAM batches: lists of ``SA1BDataset`` items, a per-epoch permutation of the training
    indices seeded by (seed, epoch), each global batch split across ranks; resumable."""

    def __init__(self, dataset, indices: Sequence[int], batch_per_rank: int, d: Dist, seed: int,
                 num_workers: int = 0):
        self.dataset, self.indices = dataset, list(indices)
        self.bs, self.d, self.seed, self.num_workers = batch_per_rank, d, seed, num_workers
        if len(self.indices) < batch_per_rank * d.world_size:
            raise ValueError(f"D_SAM has {len(self.indices)} training images, fewer than one global batch "
                             f"({batch_per_rank * d.world_size}); lower --sam-batch or add images")
        self.epoch, self.position, self._it = 0, 0, None

    def _plan(self) -> List[List[int]]:
        perm = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(self.indices))
        g = self.bs * self.d.world_size
        batches = [perm[i:i + g] for i in range(0, len(perm) - g + 1, g)]
        r = self.d.rank
        return [[self.indices[j] for j in b[r * self.bs:(r + 1) * self.bs]] for b in batches]

    def _epoch_iter(self):
        self.dataset.set_epoch(self.epoch)
        plan = self._plan()[self.position:]
        if self.num_workers > 0:
            yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=self.num_workers,
                                                   collate_fn=list)
        else:
            for idx in plan:
                yield [self.dataset[i] for i in idx]

    def next(self) -> List[dict]:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            for items in self._it:
                self.position += 1
                good = [s for s in items if s is not None]
                if good:
                    return good
            self._it, self.epoch, self.position = None, self.epoch + 1, 0
        raise RuntimeError("the D_SAM stream gave no readable image over a whole epoch (see the warnings above)")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": len(self.indices), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.indices) or state["seed"] != self.seed:
            raise ValueError(f"cannot resume exactly: the checkpoint's D_SAM had {state['n']} training images "
                             f"(seed {state['seed']}), this run {len(self.indices)} (seed {self.seed})")
        self.epoch, self.position, self._it = state["epoch"], state["position"], None


# ---------------------------------------------------------------------------------------------
# Pixel conversions
# ---------------------------------------------------------------------------------------------
def clip_to_sam_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """CLIP-normalised (B, 3, r, r) -> SAM-normalised, exactly the same pixels."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    pix = (x * s + m) * 255.0
    return (pix - torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
        SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)


def clip_teacher_input(x: torch.Tensor, teacher_size: int) -> torch.Tensor:
    """The student's r x r view at the teacher's input size (the teacher has fixed position tables)."""
    if x.shape[-1] == teacher_size and x.shape[-2] == teacher_size:
        return x
    return F.interpolate(x, size=(teacher_size, teacher_size), mode="bicubic", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------------------------
# Parameter groups and schedule
# ---------------------------------------------------------------------------------------------
def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or "pos" in name or "norm" in name


def stage_trainable(stage: int) -> Tuple[str, ...]:
    """Which of SAMCLIP.trainable_parameters()'s groups train in a stage."""
    return ("clip_head",) if stage in (1, 3) else ("clip_head", "backbone", "sam_head")


def set_trainable(student: SAMCLIP, stage: int) -> None:
    """Freeze everything, then unfreeze the stage's groups (prompt encoder and text never train)."""
    for p in student.parameters():
        p.requires_grad_(False)
    groups = student.trainable_parameters()
    for g in stage_trainable(stage):
        for p in groups[g]:
            p.requires_grad_(True)


def param_groups(student: SAMCLIP, stage: int, cfg: TrainConfig) -> List[dict]:
    """AdamW groups named ``{part}`` / ``{part}_no_decay`` with the stage's learning rates."""
    lr_head = {1: cfg.stage1_lr, 2: cfg.stage2_lr, 3: cfg.stage3_lr}[stage]
    lrs = {"clip_head": lr_head, "backbone": cfg.stage2_lr * cfg.stage2_lr_scale,
           "sam_head": cfg.stage2_lr * cfg.stage2_lr_scale}
    modules = {"clip_head": student.clip_head, "backbone": student.image_encoder, "sam_head": student.mask_decoder}
    groups = []
    for part in stage_trainable(stage):
        named = list(modules[part].named_parameters())
        decay = [p for n, p in named if not _no_decay(n, p)]
        no_decay = [p for n, p in named if _no_decay(n, p)]
        groups.append({"name": part, "params": decay, "lr": lrs[part], "weight_decay": cfg.weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lrs[part], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_lambda(total: int, warmup_fraction: float, min_ratio: float):
    warm = int(round(total * warmup_fraction))

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
class TrainingStopped(RuntimeError):
    """The run stopped on its own (too many non-finite steps); the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------
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
        self._tb = None
        self.history: List[dict] = []
        self.nan_skips = 0

        # Teachers (frozen).
        from fastsamclip.teachers import load_clip_teacher, load_sam_teacher

        self.sam = (sam_teacher if sam_teacher is not None else load_sam_teacher(cfg.sam_checkpoint, cfg.sam_type))
        self.clip = (clip_teacher if clip_teacher is not None else load_clip_teacher(cfg.clip_model, cfg.clip_pretrained))
        self.sam.to(self.device).eval()
        self.clip.to(self.device).eval()
        for p in list(self.sam.parameters()) + list(self.clip.parameters()):
            p.requires_grad_(False)
        self.sam_cfg = get_sam_config(cfg.sam_type)

        # Student: fresh from the teachers, or a merged checkpoint checked against them.
        self.student = self._build_student().to(self.device)
        b = self.student.config.sam.backbone
        self.patch = b.patch_size
        self.sam_size = cfg.sam_image_size or b.img_size
        for name, rs in (("clip_resolutions", cfg.clip_resolutions), ("stage3_resolutions", cfg.stage3_resolutions),
                         ("sam_image_size", (self.sam_size,))):
            bad = [r for r in rs if r <= 0 or r % self.patch]
            if bad or not rs:
                raise ValueError(f"{name} {tuple(rs)}: every side must be a positive multiple of the patch size "
                                 f"{self.patch}")

        # Data, validated before any step: each reader raises naming the path when nothing is readable.
        if not cfg.clip_data:
            raise ValueError("no D_CLIP data: pass --clip-data (a WebDataset shard spec or an image folder)")
        if not cfg.sam_data:
            raise ValueError("no D_SAM data: pass --sam-data (an SA-1B folder of sa_N.jpg + sa_N.json)")
        from fastsamclip import data

        self.clip_mean, self.clip_std = tuple(self.clip.image_mean), tuple(self.clip.image_std)
        self._clip_streams: Dict[int, ClipStream] = {}
        self._clip_stream(1)  # opens and validates D_CLIP now
        prompts = data.PromptConfig(masks_per_image=cfg.masks_per_image, use_boxes="box" in cfg.prompt_types,
                                    points_per_mask=1)
        grid = self.sam_size // self.patch
        self.sam_data = data.SA1BDataset(cfg.sam_data, prompts, seed=cfg.seed, long_side=self.sam_size,
                                         lowres=4 * grid)
        n = len(self.sam_data)
        n_eval = cfg.eval_images or max(1, round(0.01 * n))
        if n_eval >= n:
            raise ValueError(f"D_SAM has {n} images; holding out {n_eval} for the report leaves none to train "
                             "on; lower --eval-images or add images")
        self.eval_indices = list(range(n - n_eval, n))  # the last stems: a fixed, reproducible split
        per_rank = cfg.sam_batch // self.d.world_size
        if per_rank < 1:
            raise ValueError(f"sam_batch {cfg.sam_batch} is smaller than the world size {self.d.world_size}")
        self.sam_stream = SamStream(self.sam_data, range(n - n_eval), per_rank, self.d, cfg.seed, cfg.num_workers)

        # Teacher cache (optional): checked against these teachers and sizes.
        self.cache = None
        if cfg.teacher_cache:
            from fastsamclip.teacher_cache import TeacherCache

            self.cache = TeacherCache(cfg.teacher_cache)
            self.cache.check_compatible(cache_meta(self.sam, self.clip, self.sam_size))
        self.cache_misses = 0

        self.stage_steps = {s: self._steps_for(s) for s in STAGES}
        self._apply_engineering()
        if self.d.enabled:  # identical start on every rank
            import torch.distributed as dist

            for t in self.student.state_dict().values():
                dist.broadcast(t, 0)

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
                raise ValueError(
                    f"student {cfg.init_from} has a SAM part of another size than the SAM teacher "
                    f"({cfg.sam_type}: width {self.sam_cfg.backbone.embed_dim}, depth {self.sam_cfg.backbone.depth}; "
                    f"student: width {sc.sam.backbone.embed_dim}, depth {sc.sam.backbone.depth}); use the "
                    "teacher it was merged from, or drop --init-from")
            if sc.clip_head.out_dim != self.clip.embed_dim:
                raise ValueError(
                    f"student {cfg.init_from} predicts {sc.clip_head.out_dim}-d CLIP embeddings but the CLIP "
                    f"teacher {cfg.clip_model} gives {self.clip.embed_dim}-d ones; use the teacher it was merged "
                    "from, or drop --init-from")
            return student.train()
        head = CLIPHeadConfig(out_dim=self.clip.embed_dim, hidden_dim=cfg.head_hidden)
        return SAMCLIP.from_teachers(self.sam, self.clip, clip_head=head, sam_config=self.sam_cfg).train()

    def _clip_stream(self, stage: int) -> ClipStream:
        from fastsamclip.data import MultiResolutionConfig

        if stage not in self._clip_streams:
            cfg = self.cfg
            res = cfg.stage3_resolutions if stage == 3 else cfg.clip_resolutions
            mr = MultiResolutionConfig(resolutions=tuple(res), base_batch=max(1, cfg.clip_batch // self.d.world_size),
                                       base_res=cfg.clip_base_res, seed=cfg.seed * 10 + stage)
            self._clip_streams = {stage: ClipStream(cfg.clip_data, mr, self.d, self.clip_mean, self.clip_std,
                                                    cfg.num_workers)}
        return self._clip_streams[stage]

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
        mean_batch = float(np.mean([mr.batch_size(r) for r in res])) * self.d.world_size
        return max(1, math.ceil(epochs * stream.samples() / mean_batch))

    def _apply_engineering(self) -> None:
        cfg = self.cfg
        if cfg.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint

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
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.amp:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    # ---------------------------------------------------------------- teacher targets
    @torch.no_grad()
    def clip_targets(self, keys: List[str], images: torch.Tensor, res: int) -> torch.Tensor:
        """(B, E) teacher embeddings for a CLIP batch (CLIP-normalised, on device)."""
        if self.cache is not None:
            t = self.cache.clip_batch(keys, res)
            if t is not None:
                return t.to(self.device)
            self.cache_misses += 1
        with self._autocast():
            return self.clip.encode_image(clip_teacher_input(images, self.clip.image_size)).float()

    @torch.no_grad()
    def sam_teacher_embeddings(self, keys: List[str], images: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            t = self.cache.sam_batch(keys)
            if t is not None:
                return t.to(self.device)
            self.cache_misses += 1
        with self._autocast():
            return self.sam.image_encoder(images).float()

    @torch.no_grad()
    def teacher_masks(self, emb: torch.Tensor, prompts: dict) -> torch.Tensor:
        """Teacher low-res logits (M, 1, h, w) for one image's prompts, via segment_anything."""
        pe = self.sam.prompt_encoder
        outs = []
        for kind, value in prompts.items():
            sp, de = pe(points=value if kind == "points" else None, boxes=value if kind == "boxes" else None, masks=None)
            logits, _ = self.sam.mask_decoder(image_embeddings=emb[None], image_pe=pe.get_dense_pe(),
                                              sparse_prompt_embeddings=sp, dense_prompt_embeddings=de,
                                              multimask_output=False)
            outs.append(logits)
        return torch.cat(outs).float()

    def student_masks(self, emb: torch.Tensor, prompts: dict) -> torch.Tensor:
        outs = []
        for kind, value in prompts.items():
            logits, _ = self.student.predict_masks(
                emb, (self.sam_size, self.sam_size), points=value if kind == "points" else None,
                boxes=value if kind == "boxes" else None, multimask_output=False)
            outs.append(logits)
        return torch.cat(outs).float()

    def split_prompts(self, item: dict) -> dict:
        """Half the masks prompted by their box, half by their point (alternating in draw order)."""
        m = item["gt_masks"].shape[0]
        kinds = list(self.cfg.prompt_types)
        out = {}
        for j, kind in enumerate(kinds):
            sel = torch.arange(j, m, len(kinds))
            if len(sel) == 0:
                continue
            if kind == "box":
                out["boxes"] = item["boxes"][sel].to(self.device)
            else:
                out["points"] = (item["points"][sel].to(self.device), item["point_labels"][sel].to(self.device))
        return out

    # ---------------------------------------------------------------- losses (fwd + bwd)
    def clip_step(self, stage: int, keys, images, res) -> Tuple[float, int]:
        """L_CLIP on one batch, backward (in micro-batches). Returns (loss, images)."""
        from fastsamclip.kernels import cosine_distill_loss

        images = images.to(self.device, non_blocking=True)
        n = images.shape[0]
        mb = self.cfg.clip_micro_batch or n
        total = 0.0
        frozen_backbone = stage in (1, 3)
        for s in range(0, n, mb):
            x, k = images[s:s + mb], keys[s:s + mb]
            target = self.clip_targets(k, x, res)
            x_sam = clip_to_sam_pixels(x, self.clip_mean, self.clip_std)
            with self._autocast():
                if frozen_backbone:  # nothing to train below the head: keep no activations
                    with torch.no_grad():
                        feats = self.student.forward_features(x_sam)
                else:
                    feats = self.student.forward_features(x_sam)
                pred = self.student.clip_embeddings(feats)
            loss = cosine_distill_loss(pred.float(), target, backend=self.cfg.loss_backend)
            (loss * (x.shape[0] / n)).backward()
            total += loss.item() * x.shape[0] / n
        return total, n

    def sam_step(self, items: List[dict]) -> Tuple[float, int]:
        """lambda * L_SAM on one SA-1B batch, backward. Returns (L_SAM, images)."""
        from fastsamclip.kernels import focal_dice_loss

        cfg = self.cfg
        n = len(items)
        mb = cfg.sam_micro_batch or n
        n_masks = sum(it["gt_masks"].shape[0] for it in items)
        total = 0.0
        for s in range(0, n, mb):
            part = items[s:s + mb]
            images = torch.stack([it["image"] for it in part]).to(self.device, non_blocking=True)
            t_emb = self.sam_teacher_embeddings([it["key"] for it in part], images)
            with self._autocast():
                emb = self.student.sam_embeddings(self.student.forward_features(images))
                s_logits, t_logits = [], []
                for i, it in enumerate(part):
                    prompts = self.split_prompts(it)
                    s_logits.append(self.student_masks(emb[i], prompts))
                    t_logits.append(self.teacher_masks(t_emb[i], prompts))
            s_all = torch.cat(s_logits)[None, :, 0]  # (1, M, h, w)
            t_all = torch.sigmoid(torch.cat(t_logits)[None, :, 0])
            loss = focal_dice_loss(s_all, t_all, cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha,
                                   cfg.focal_gamma, backend=cfg.loss_backend)
            w = s_all.shape[1] / n_masks
            (cfg.sam_loss_weight * loss * w).backward()
            total += loss.item() * w
        return total, n

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_path(self, name: str = "last.pt") -> str:
        return os.path.join(self.ckpt_dir, name)

    def save_checkpoint(self, stage: int, step: int, opt, sched, names: Sequence[str] = ("last.pt",)) -> None:
        if not self.d.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(),
            "model_config": self.student.config.to_dict(), "stage": stage, "step": step,
            "stage_steps": self.stage_steps, "world_size": self.d.world_size,
            "model": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "clip_stream": self._clip_stream(stage).state_dict(), "sam_stream": self.sam_stream.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "nan_skips": self.nan_skips, "history": self.history,
        }
        for name in names:
            atomic_write(self._ckpt_path(name), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> Optional[dict]:
        path = self._ckpt_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start, "
                                    "or point --out at the run's folder")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path} is not a fastsamclip training checkpoint of version {CHECKPOINT_VERSION}")
        if state["world_size"] != self.d.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                             f"{self.d.world_size}; exact resume needs the same number (the data are sharded by rank)")
        if {int(k): v for k, v in state["stage_steps"].items()} != self.stage_steps:
            raise ValueError(f"{path} planned stage lengths {state['stage_steps']}, this config gives "
                             f"{self.stage_steps}; resume with the same config")
        from fastsamclip.teachers import check_state_dict

        check_state_dict(self.student, state["model"], "training", path)
        self.student.load_state_dict(state["model"])
        self.nan_skips, self.history = state["nan_skips"], list(state["history"])
        return state

    # ---------------------------------------------------------------- logging
    def _tensorboard(self):
        if self._tb is None and self.cfg.tensorboard and self.d.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
                self._tb = False
            else:
                self._tb = SummaryWriter(os.path.join(self.out, "tb"))
        return self._tb or None

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if not self.d.main:
            return
        if rec["global_step"] % max(1, self.cfg.log_every) == 0 or rec["step"] == self.stage_steps[rec["stage"]]:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            tb = self._tensorboard()
            if tb is not None:
                for k, v in rec.items():
                    if isinstance(v, float):
                        tb.add_scalar(f"stage{rec['stage']}/{k}", v, rec["global_step"])

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
        ``(keys, images, resolution)`` and ``sam_items`` as a list of ``SA1BDataset`` items
        (how the training-step benchmark feeds fixed batches)."""
        opt.zero_grad(set_to_none=True)
        keys, images, res = clip_batch if clip_batch is not None else self._clip_stream(stage).next()
        loss_clip, n_clip = self.clip_step(stage, keys, images, res)
        loss_sam, n_sam = float("nan"), 0
        if stage == 2:
            loss_sam, n_sam = self.sam_step(sam_items if sam_items is not None else self.sam_stream.next())
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:  # every rank all-reduces the same list, so absent grads become zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        losses = torch.tensor([loss_clip, loss_sam if stage == 2 else 0.0], device=self.device)
        _all_reduce_mean_([p.grad for p in params] + [losses], self.d)
        loss_clip, loss_sam = float(losses[0]), (float(losses[1]) if stage == 2 else None)
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
        lr = opt.param_groups[0]["lr"]
        sched.step()
        rec = {"stage": stage, "step": sched.last_epoch, "loss_clip": loss_clip, "lr": lr,
               "grad_norm": float(gnorm), "resolution": res, "skipped": not finite,
               "images": (n_clip + n_sam) * self.d.world_size}
        if loss_sam is not None:
            rec["loss_sam"] = loss_sam
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
                rng = state["rng"]
                torch.set_rng_state(rng["torch"])
                np.random.set_state(rng["numpy"])
                random.setstate(rng["python"])
                if rng.get("cuda") is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(rng["cuda"])
                step = start_step
            total = self.stage_steps[stage]
            bar = None
            if cfg.progress and self.d.main:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=step, desc=f"stage {stage}", dynamic_ncols=True, leave=True)
            self.student.train()
            t0, imgs = time.perf_counter(), 0
            while step < total:
                rec = self.train_step(stage, opt, sched)
                step += 1
                global_step += 1
                rec["global_step"] = global_step
                self._log(rec)
                imgs += rec["images"]
                if bar is not None:
                    post = {"img/s": f"{imgs / max(1e-9, time.perf_counter() - t0):.1f}",
                            "L_clip": f"{rec['loss_clip']:.4f}"}
                    if "loss_sam" in rec:
                        post["L_sam"] = f"{rec['loss_sam']:.4f}"
                    bar.set_postfix(post)
                    bar.update(1)
                if rec["skipped"] and self.nan_skips >= cfg.max_nan_skips:
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
        report = {"nan_skips": self.nan_skips, "stage_steps": self.stage_steps, "cache_misses": self.cache_misses}
        if self.d.main:
            report["eval"] = self.evaluate()
            path = os.path.join(self.out, "merged.safetensors")
            save_merged(self.student, path)
            report["merged"] = path
            with open(os.path.join(self.out, "report.json"), "w") as f:
                json.dump(report, f, indent=2)
            ev = report["eval"]
            logger.info("held-out agreement with the teachers: CLIP cosine %s, mask IoU %.4f",
                        {r: round(v, 4) for r, v in ev["clip_cosine"].items()}, ev["mask_iou"])
        if self._tb:
            self._tb.close()
        return report

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, indices: Optional[Sequence[int]] = None) -> dict:
        """Student vs teachers on held-out SA-1B images: CLIP cosine per resolution, and the mean
        IoU of student masks vs SAM teacher masks (both logits thresholded at 0)."""
        return evaluate_agreement(self.student, self.sam, self.clip, self.sam_data,
                                  self.eval_indices if indices is None else indices,
                                  self.cfg.eval_resolutions or self.cfg.stage3_resolutions, self.sam_size,
                                  self.cfg.eval_masks_per_image, self.device, self._autocast)


@torch.no_grad()
def evaluate_agreement(student: SAMCLIP, sam, clip, sam_data, indices, resolutions, sam_size: int,
                       masks_per_image: int, device, autocast=None) -> dict:
    from fastsamclip.data import apply_boxes, apply_coords, preprocess_clip_image, preprocess_sam_image

    autocast = autocast or (lambda: torch.autocast(device.type, enabled=False))
    was_training = student.training
    student.eval()
    cos = {int(r): [] for r in resolutions}
    ious = []
    for idx in indices:
        raw = sam_data.load_raw(idx)
        if raw is None:
            continue
        for r in cos:
            x = preprocess_clip_image(raw.image, r, clip.image_mean, clip.image_std)[None].to(device)
            with autocast():
                t = clip.encode_image(clip_teacher_input(x, clip.image_size)).float()
                s = student(clip_to_sam_pixels(x, clip.image_mean, clip.image_std), sam=False)["clip"].float()
            cos[r].append(F.cosine_similarity(s, t, dim=-1).item())
        x, _ = preprocess_sam_image(raw.image, sam_size)
        x = x[None].to(device)
        with autocast():
            s_emb = student(x, clip=False, sam=True)["sam"]
            t_emb = sam.image_encoder(x)
        p = raw.prompts
        k = min(masks_per_image, len(p.indices))
        size = raw.image.shape[:2]
        pe = sam.prompt_encoder
        for kind in ("boxes", "points"):
            if kind == "boxes" and p.boxes is not None:
                boxes = apply_boxes(torch.from_numpy(p.boxes[:k]), size, sam_size).to(device)
                s_l, _ = student.predict_masks(s_emb, (sam_size, sam_size), boxes=boxes, multimask_output=False)
                sp, de = pe(points=None, boxes=boxes, masks=None)
            elif kind == "points" and p.points is not None:
                pts = (apply_coords(torch.from_numpy(p.points[:k]), size, sam_size).to(device),
                       torch.from_numpy(p.point_labels[:k]).to(device))
                s_l, _ = student.predict_masks(s_emb, (sam_size, sam_size), points=pts, multimask_output=False)
                sp, de = pe(points=pts, boxes=None, masks=None)
            else:
                continue
            t_l, _ = sam.mask_decoder(image_embeddings=t_emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sp,
                                      dense_prompt_embeddings=de, multimask_output=False)
            a, b = s_l[:, 0] > 0, t_l[:, 0] > 0
            inter = (a & b).flatten(1).sum(1).float()
            union = (a | b).flatten(1).sum(1).float()
            ious += torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist()
    student.train(was_training)
    if not ious:
        raise RuntimeError("no held-out SA-1B image could be read for the report")
    return {"clip_cosine": {r: float(np.mean(v)) for r, v in cos.items()}, "mask_iou": float(np.mean(ious)),
            "images": len(indices), "masks": len(ious)}


# ---------------------------------------------------------------------------------------------
# Teacher cache
# ---------------------------------------------------------------------------------------------
def cache_meta(sam, clip, sam_size: int) -> dict:
    from fastsamclip.teacher_cache import fingerprint

    return {"sam_teacher": fingerprint(sam.image_encoder), "clip_teacher": fingerprint(clip.model.visual),
            "sam_image_size": int(sam_size), "clip_image_size": int(clip.image_size),
            "clip_mean": list(clip.image_mean), "clip_std": list(clip.image_std)}


@torch.no_grad()
def cache_teachers(cfg: TrainConfig, out: Optional[str] = None, batch_size: int = 32, sam_teacher=None,
                   clip_teacher=None, dtype: torch.dtype = torch.float32) -> str:
    """Run the teachers once over D_CLIP (every image at every CLIP resolution of the three stages)
    and D_SAM (every image at the SAM input size) and write the cache; returns its folder.

    The CLIP teacher gets what training gives it (the r x r view resized to its input size) and the
    SAM teacher what ``SA1BDataset`` gives it, so cached targets equal live ones."""
    from fastsamclip import data
    from fastsamclip.teacher_cache import TeacherCacheWriter, clip_entry
    from fastsamclip.teachers import load_clip_teacher, load_sam_teacher

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    sam = sam_teacher if sam_teacher is not None else load_sam_teacher(cfg.sam_checkpoint, cfg.sam_type)
    clip = clip_teacher if clip_teacher is not None else load_clip_teacher(cfg.clip_model, cfg.clip_pretrained)
    sam.to(device).eval()
    clip.to(device).eval()
    b = get_sam_config(cfg.sam_type).backbone
    sam_size = cfg.sam_image_size or b.img_size
    out = out or cfg.teacher_cache or os.path.join(cfg.out, "teacher-cache")
    writer = TeacherCacheWriter(out, cache_meta(sam, clip, sam_size), dtype=dtype)
    use_amp = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else (
        lambda: torch.autocast(device.type, enabled=False))
    resolutions = sorted(set(cfg.clip_resolutions) | set(cfg.stage3_resolutions))
    mean, std = tuple(clip.image_mean), tuple(clip.image_std)

    def clip_images():
        if _is_shard_spec(cfg.clip_data):
            src = data.ClipWebDataset(cfg.clip_data, shuffle_shards=False)
            yield from src
        else:
            folder = data.ClipImageFolder(cfg.clip_data)
            for i in range(len(folder)):
                item = folder[i]
                if item is not None:
                    yield item

    pending: List[Tuple[str, object]] = []

    def flush_clip():
        for r in resolutions:
            x = torch.stack([data.preprocess_clip_image(im, r, mean, std) for _, im in pending]).to(device)
            with ac():
                emb = clip.encode_image(clip_teacher_input(x, clip.image_size)).float()
            for (k, _), e in zip(pending, emb):
                writer.add("clip", clip_entry(k, r), e)
        pending.clear()

    n_clip = 0
    for key, image in clip_images():
        pending.append((key, image))
        n_clip += 1
        if len(pending) == batch_size:
            flush_clip()
    if pending:
        flush_clip()
    grid = sam_size // b.patch_size
    ds = data.SA1BDataset(cfg.sam_data, seed=cfg.seed, long_side=sam_size, lowres=4 * grid)
    n_sam = 0
    for s in range(0, len(ds), batch_size):
        raws = [(ds.stems[i], ds.load_raw(i)) for i in range(s, min(len(ds), s + batch_size))]
        raws = [(k, r) for k, r in raws if r is not None]
        if not raws:
            continue
        x = torch.stack([data.preprocess_sam_image(r.image, sam_size)[0] for _, r in raws]).to(device)
        with ac():
            emb = sam.image_encoder(x).float()
        for (k, _), e in zip(raws, emb):
            writer.add("sam", k, e)
        n_sam += len(raws)
    path = writer.close()
    logger.info("teacher cache %s: %d D_CLIP images x %d resolutions, %d SA-1B images", out, n_clip,
                len(resolutions), n_sam)
    return os.path.dirname(path)


def train(cfg: TrainConfig, **teachers) -> dict:
    """Run the three stages; the report dict (held-out agreement, merged checkpoint path)."""
    return Distiller(cfg, **teachers).run()


__all__ = ["TrainConfig", "Distiller", "TrainingStopped", "train", "cache_teachers", "config_from_dict",
           "load_config_file", "evaluate_agreement", "param_groups", "set_trainable"]
