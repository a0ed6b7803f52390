"""The two teachers of the miniature world, trained here and saved in their official formats.

- CLIP: an open_clip ``CLIP`` (``CLIP_MODEL_CFG``: a small ModifiedResNet of 64 px inputs, a
  transformer text tower on open_clip's own tokenizer) trained contrastively on object crops and
  whole canvases of the world's training split with their captions; saved as an open_clip model
  folder (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``), loaded as ``local-dir:``.
- SAM: a ``segment_anything`` ``Sam`` of the ``vit_mini`` config trained from scratch for box and
  single-point prompts on the canvases; saved as an official ``.pth`` state dict.

Choices (none is the paper's: these are the teachers the paper takes as given):
- Training batches are rendered fresh from the world's training split at every step (a canvas
  takes under a millisecond), so the teachers never see a held-out digit or background.
- CLIP's contrastive loss has one positive per matching caption, not one per row: a batch of
  object crops holds each of the 16 classes several times, and plain InfoNCE would push apart
  a "three" and another caption naming a three. The targets of a row are the columns whose
  captions name the same objects, uniformly (both directions). Crops are captioned with one of
  the 80 OpenAI templates (those ``eval classify`` averages) filled with the class name, canvases
  with the world's captions.
- SAM's loss is SAM's: focal (20) + dice (1) on the mask logits at the canvas size, the IoU head
  on the mean squared error to the true IoU; a point prompt gives three masks and only the best
  one is trained (SAM's ambiguity rule), a box (jittered by up to 10% of its side) gives one.
- Each teacher's text and float weights are stored in fp16 (the shipped files are a few MB);
  every number of the miniature world is measured on the teachers as loaded from those files.

``train_teachers(out, ...)`` is deterministic given its seed on one machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from fastsamclip.eval.classnames import templates as eval_templates
from fastsamclip.files import write_json
from fastsamclip.kernels import focal_dice_loss
from fastsamclip.miniature.world import CLASSES, WorldConfig, caption, object_crop, render_canvas
from fastsamclip.modeling import build_sam
from fastsamclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD

SAM_TYPE = "vit_mini"
CLIP_MODEL_CFG = {
    "embed_dim": 64,
    # A ModifiedResNet image tower (open_clip's RN50 family at a sixteenth of its width): from
    # scratch on this world it leaves the contrastive loss's plateau within ~50 steps where a
    # 4-block ViT of the same cost had not moved after 150 (64 crops a step, lr 1e-3).
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "teachers")
SAM_FILE = "sam_vit_mini.pth"
CLIP_DIR = "clip"


@dataclass
class TeacherConfig:
    seed: int = 0
    clip_steps: int = 1000
    clip_batch: int = 96  # object crops per step (plus about an eighth as many whole canvases)
    clip_lr: float = 1e-3
    sam_steps: int = 1600
    sam_batch: int = 8  # canvases per step; every object of each is a prompt, all boxes or all points
    sam_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05


def shipped_paths(folder: str = SHIPPED) -> Dict[str, str]:
    """{"sam": .pth, "clip": "local-dir:<folder>", "sam_type": "vit_mini"} of a teachers folder."""
    return {"sam": os.path.join(folder, SAM_FILE), "clip": "local-dir:" + os.path.join(folder, CLIP_DIR),
            "sam_type": SAM_TYPE}


def _schedule(step: int, total: int, warmup: float) -> float:
    w = max(1, int(total * warmup))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr)


def _step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One AdamW step on ``loss``, the gradient's global norm clipped at 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _to_tensor(images: List[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------ CLIP
def clip_batch(world: WorldConfig, rng: np.random.Generator, n_crops: int, step: int, side: int = 64
               ) -> Tuple[torch.Tensor, List[str], List[tuple]]:
    """Crops of objects (jittered) and whole canvases of fresh training canvases, their captions
    and the key of what each caption names (sorted class indices)."""
    images, texts, keys = [], [], []
    k = 0
    while len(images) < n_crops:
        c = render_canvas(world, "train", int(rng.integers(2**31)))
        for m, cls in zip(c.masks, c.classes):
            images.append(object_crop(c.image, m, side, world.crop_margin, jitter=rng))
            tmpl = OPENAI_IMAGENET_TEMPLATES[int(rng.integers(len(OPENAI_IMAGENET_TEMPLATES)))]
            texts.append(tmpl(CLASSES[cls]))
            keys.append((cls,))
        if k % 4 == 0:  # every fourth canvas whole (about one image in eight), with its multi-object caption
            images.append(np.asarray(torch.nn.functional.interpolate(
                torch.from_numpy(c.image).permute(2, 0, 1)[None].float(), size=(side, side), mode="bilinear",
                antialias=True, align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255).byte()))
            texts.append(caption(c.names, rng))
            keys.append(tuple(sorted(c.classes)))
        k += 1
    return _to_tensor(images), texts, keys


def _clip_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, keys: List[tuple]
                             ) -> torch.Tensor:
    """Symmetric cross-entropy of the scaled cosine logits against uniform targets over the
    columns whose captions name the same objects as the row's."""
    logits = scale * img @ txt.T
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    lab = torch.tensor([ids[k] for k in keys])
    pos = (lab[:, None] == lab[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())


def train_clip(cfg: TeacherConfig, world: WorldConfig, log: Callable[[str], None] = print) -> CLIP:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 11])
    model = CLIP(**json.loads(json.dumps(CLIP_MODEL_CFG)))
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_MODEL_CFG["text_cfg"]["context_length"])
    opt = _optimizer(model, cfg.clip_lr, cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.clip_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.clip_lr * _schedule(step, cfg.clip_steps, cfg.warmup)
        x, texts, keys = clip_batch(world, rng, cfg.clip_batch, step)
        img = model.encode_image(_clip_normalise(x), normalize=True)
        txt = model.encode_text(tok(texts), normalize=True)
        loss = multi_positive_clip_loss(img, txt, model.logit_scale.exp().clamp(max=100), keys)
        _step(opt, model, loss)
        if step % 50 == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step + 1}/{cfg.clip_steps} loss {loss.item():.4f} scale "
                f"{model.logit_scale.exp().item():.1f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


# ------------------------------------------------------------------------------------ SAM
def sam_prompts(masks: np.ndarray, rng: np.random.Generator, kind: str, box_jitter: float = 0.1) -> List[np.ndarray]:
    """Per mask, its box (XYXY, each side moved by up to ``box_jitter`` of the box's size) or one
    foreground point drawn uniformly inside it (x, y at the pixel's centre)."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        if kind == "box":
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            w, h = x1 - x0, y1 - y0
            j = rng.uniform(-box_jitter, box_jitter, 4) * np.array([w, h, w, h])
            out.append((np.array([x0, y0, x1, y1], np.float64) + j).astype(np.float32))
        else:
            k = int(rng.integers(len(xs)))
            out.append(np.array([xs[k] + 0.5, ys[k] + 0.5], np.float32))
    return out


def _sam_normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)


def sam_masks(sam, emb: torch.Tensor, kind: str, prompts: torch.Tensor, size: int):
    """Masks of one image's prompts of one kind: (n, k, size, size) logits and (n, k) IoU
    predictions (k = 3 for points, 1 for boxes), in the canvas frame (the input is the canvas)."""
    if kind == "box":
        sparse, dense = sam.prompt_encoder(points=None, boxes=prompts, masks=None)
    else:
        pts = (prompts[:, None, :], torch.ones(prompts.shape[0], 1, dtype=torch.int))
        sparse, dense = sam.prompt_encoder(points=pts, boxes=None, masks=None)
    low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=kind == "point")
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False), iou


def train_sam(cfg: TeacherConfig, world: WorldConfig, log: Callable[[str], None] = print):
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 12])
    sam = build_sam(SAM_TYPE).train()
    size = sam.image_encoder.img_size
    assert size == world.side, "the SAM teacher's input is the canvas"
    opt = _optimizer(sam, cfg.sam_lr, cfg.weight_decay)
    t0 = time.perf_counter()
    for step in range(cfg.sam_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.sam_lr * _schedule(step, cfg.sam_steps, cfg.warmup)
        canvases = [render_canvas(world, "train", int(rng.integers(2**31))) for _ in range(cfg.sam_batch)]
        emb = sam.image_encoder(_sam_normalise(_to_tensor([c.image for c in canvases])))
        logits, gts, iou_pred = [], [], []
        for i, c in enumerate(canvases):
            # One kind of prompt per canvas and step: one decoder call per image.
            kind = "box" if rng.uniform() < 0.5 else "point"
            prompts = sam_prompts(c.masks, rng, kind)
            low, iou = sam_masks(sam, emb[i:i + 1], kind, torch.from_numpy(np.stack(prompts)), size)
            gt = torch.from_numpy(c.masks).float()
            with torch.no_grad():
                pred, truth = low > 0, gt[:, None] > 0
                true_iou = (pred & truth).flatten(2).sum(-1).float() / (pred | truth).flatten(2).sum(-1).float().clamp(min=1)
                # Only the best of a point's three masks is trained (SAM's ambiguity rule).
                best = F.binary_cross_entropy_with_logits(low, gt[:, None].expand_as(low), reduction="none"
                                                          ).mean((2, 3)).argmin(1)
            logits.append(low[torch.arange(len(prompts)), best])
            gts.append(gt)
            iou_pred.append((iou, true_iou))  # the IoU head learns every output's IoU
        lo, gt = torch.cat(logits)[None], torch.cat(gts)[None]
        mask_loss = focal_dice_loss(lo, gt, 20.0, 1.0, 0.25, 2.0)
        iou_loss = torch.cat([((p - t) ** 2).flatten() for p, t in iou_pred]).mean()
        _step(opt, sam, mask_loss + iou_loss)
        if step % 50 == 0 or step == cfg.sam_steps - 1:
            log(f"sam step {step + 1}/{cfg.sam_steps} mask loss {mask_loss.item():.4f} iou loss {iou_loss.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return sam.eval()


# ------------------------------------------------------------------------------------ files
def save_teachers(folder: str, clip_model: CLIP, sam) -> Dict[str, str]:
    """The official formats: an open_clip model folder and a SAM ``.pth``, floats stored in fp16."""
    os.makedirs(os.path.join(folder, CLIP_DIR), exist_ok=True)
    half = lambda sd: {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}  # noqa: E731
    with open(os.path.join(folder, CLIP_DIR, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": CLIP_MODEL_CFG,
                   "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                                      "size": CLIP_MODEL_CFG["vision_cfg"]["image_size"]}}, f, indent=2)
    torch.save(half(clip_model.state_dict()), os.path.join(folder, CLIP_DIR, "open_clip_pytorch_model.bin"))
    torch.save(half(sam.state_dict()), os.path.join(folder, SAM_FILE))
    return shipped_paths(folder)


def train_teachers(out: str, cfg: TeacherConfig = TeacherConfig(), world: WorldConfig = WorldConfig(),
                   log: Callable[[str], None] = print) -> Dict[str, object]:
    """Train both teachers and write them into ``out`` (see ``save_teachers``); returns the paths
    and the training settings (also written to ``out/training.json``)."""
    t0 = time.perf_counter()
    clip_model = train_clip(cfg, world, log)
    t_clip = time.perf_counter() - t0
    sam = train_sam(cfg, world, log)
    paths = save_teachers(out, clip_model, sam)
    info = {"paths": paths, "config": asdict(cfg), "world": asdict(world),
            "seconds": {"clip": round(t_clip, 1), "sam": round(time.perf_counter() - t0 - t_clip, 1)},
            "torch_threads": torch.get_num_threads(), "templates": len(eval_templates("openai"))}
    write_json(os.path.join(out, "training.json"), info)
    return info
