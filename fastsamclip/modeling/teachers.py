"""The two frozen teachers, loaded through their own libraries from their official formats.

- SAM: ``segment_anything`` modules, from an official ``.pth`` state dict (``sam_vit_b_01ec64.pth``
  and friends), configs ``vit_b`` / ``vit_l`` / ``vit_h`` (and small ones for tests).
- CLIP: ``open_clip``, any model name with ``pretrained`` as a tag (``datacomp_xl_s13b_b90k``) or a
  local checkpoint file, or a ``local-dir:`` / ``hf-hub:`` model folder; with its tokenizer and
  text tower.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import open_clip
import torch
import torch.nn as nn
from safetensors.torch import load_file
from segment_anything.modeling import Sam

from fastsamclip.errors import ConfigError, InputError
from fastsamclip.modeling.build import SamConfig, build_sam, infer_sam_type
from fastsamclip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalize,
    resize_square,
)


class CheckpointError(InputError):
    """A checkpoint file that is not what the caller asked for; the message says what to do."""


def _read_state_dict(path: str, what: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path} could not be read as a torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # training checkpoints that wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors (got {type(sd).__name__})")
    return sd


def check_finite(state_dict: Dict[str, torch.Tensor], what: str, path: str = "") -> None:
    """Refuse weights holding NaN or Infinity (a damaged file of the right size loads without a
    complaint and then gives NaN everywhere), naming the first bad tensor. One pass over the
    weights, once per load."""
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{what} checkpoint {path}: tensor {name} holds {bad} NaN/Infinity value(s) of "
                                  f"{t.numel()}; the file is damaged: download or export it again")


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str, path: str = "") -> None:
    """Raise a ``CheckpointError`` listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if not (missing or extra or wrong):
        return

    def listing(keys: List[str]) -> str:
        shown = ", ".join(keys[:12])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

    parts = [f"{what} checkpoint {path} does not match the model:"]
    if missing:
        parts.append(f"  missing keys: {listing(missing)}")
    if extra:
        parts.append(f"  unexpected keys: {listing(extra)}")
    if wrong:
        parts.append("  shape mismatches: " + listing(
            [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]))
    raise CheckpointError("\n".join(parts))


def sam_preprocess(sam: Sam, pixels: torch.Tensor, valid_hw=None) -> torch.Tensor:
    """The SAM teacher's own normalisation of uint8 / 0..255 pixels (B, 3, H, W), padding zeroed
    (``Sam.preprocess`` for a batch already padded to its input size)."""
    return normalize(pixels.to(sam.pixel_mean.device), sam.pixel_mean, sam.pixel_std, valid_hw)


def load_sam_teacher(checkpoint: Optional[str], model_type: Union[str, SamConfig] = "vit_b") -> Sam:
    """The frozen SAM teacher from an official ``.pth`` file (``None``: random weights).

    Errors name the problem: a file that is not a SAM checkpoint, one of another size (with the
    size it is), missing or extra keys.
    """
    sam = build_sam(model_type)
    if checkpoint is not None:
        sd = _read_state_dict(checkpoint, "SAM")
        if not any(k.startswith("image_encoder.") for k in sd):
            raise CheckpointError(
                f"{checkpoint} is not a SAM checkpoint: it has no 'image_encoder.*' weights "
                f"(first keys: {', '.join(list(sd)[:5])}). Official files are sam_vit_b_01ec64.pth, "
                "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth."
            )
        actual = infer_sam_type(sd)
        wanted = model_type if isinstance(model_type, str) else None
        if actual is not None and wanted is not None and actual != wanted:
            raise CheckpointError(
                f"{checkpoint} is a SAM {actual} checkpoint but model type {wanted!r} was asked for; "
                f"pass --sam-type {actual} (or model_type='{actual}')"
            )
        check_state_dict(sam, sd, "SAM", checkpoint)
        check_finite(sd, "SAM", checkpoint)
        sam.load_state_dict(sd)
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam.eval()


# --------------------------------------------------------------------------------------------
# CLIP teacher
# --------------------------------------------------------------------------------------------
class CLIPTeacher(nn.Module):
    """An open_clip model with its tokenizer and preprocessing constants.

    ``encode_image`` takes images normalised with ``image_mean``/``image_std`` at
    ``image_size``; ``encode_text`` takes token ids from ``tokenize``.
    """

    def __init__(self, model: nn.Module, tokenizer, model_name: str, model_cfg: dict):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_cfg = model_cfg
        pp = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.image_mean = tuple(pp.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(pp.get("std", OPENAI_CLIP_STD))
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.embed_dim = int(model_cfg["embed_dim"])

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 / 0..255 views (B, 3, r, r) -> the teacher's input: its normalisation, then resized
        (bicubic, antialiased) to its input size when r differs (its position table has one size)."""
        x = normalize(pixels, self.image_mean, self.image_std, scale=1.0 / 255.0)
        return resize_square(x, self.image_size)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)


def clip_model_config(model_name: str) -> dict:
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"unknown open_clip model {model_name!r}: not a built-in name (open_clip.list_models()), "
            "nor a 'local-dir:' folder with open_clip_config.json; register a JSON config with "
            "open_clip.add_model_config(path) for custom models"
        )
    return cfg


def load_clip_teacher(model_name: str, pretrained: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
    """The frozen CLIP teacher through ``open_clip.create_model``.

    ``pretrained``: an open_clip tag (``datacomp_xl_s13b_b90k``; needs the weights in the hub
    cache, since no download is attempted offline), a local checkpoint file, or None for random
    weights. ``model_name`` may be ``local-dir:/folder`` (open_clip_config.json + weights).
    """
    cfg = clip_model_config(model_name)
    if pretrained is not None and not os.path.isfile(pretrained) and os.path.sep in pretrained:
        raise FileNotFoundError(f"CLIP pretrained file not found: {pretrained}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                       require_pretrained=pretrained is not None)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"CLIP weights {pretrained!r} for {model_name} could not be loaded ({first}); a "
                              "tag needs its weights in the local hub cache (nothing is downloaded here): give "
                              "--clip-pretrained a local weights file instead") from e
    check_finite(model.state_dict(), "CLIP", pretrained or model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return CLIPTeacher(model, tokenizer, model_name, cfg)


__all__ = ["CLIPTeacher", "CheckpointError", "check_finite", "check_state_dict", "load_clip_teacher",
           "load_sam_teacher", "sam_preprocess"]
