"""What every export of the image side shares: the module exported, its names, and the check.

:class:`ImageEncoder` is the merged model's one backbone pass with both heads, as
``SAMCLIP.forward(image, clip=True, sam=True, clip_patches=True)`` computes it, holding only the
modules that pass uses (the image encoder and the CLIP head: the text tower, ~120M parameters
for ViT-L/14, stays out of the exported files)::

    image (B, 3, R, R) float32, SAM-normalised (SAMCLIP.preprocess: SAM mean/std on 0..255,
          the image resized longest side to R, padded bottom/right, padding zero)
      -> sam_embedding  (B, C, R/16, R/16)   SAM image embeddings (the decoder's input)
         clip_embedding (B, E)               pooled CLIP embedding, NOT normalised
         clip_patches   (B, R/16, R/16, E)   per-patch CLIP embeddings, NOT normalised
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from fastsamclip.files import write_json
from fastsamclip.modeling import SAMCLIP

INPUT_NAME = "image"
OUTPUT_NAMES = ("sam_embedding", "clip_embedding", "clip_patches")
# The batch dimension of every export is dynamic in 1..MAX_BATCH (torch.export needs a bound).
MAX_BATCH = 1024
# The one metadata file of an export folder (every format adds its section).
METADATA_FILE = "export.json"


class ImageEncoder(nn.Module):
    """image (B, 3, R, R) -> (sam_embedding, clip_embedding, clip_patches); see the module docstring."""

    def __init__(self, model: SAMCLIP) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.clip_head = model.clip_head

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # SAMCLIP.forward's arithmetic (forward_features, clip_embeddings(patches=True), neck).
        features = self.image_encoder.forward_features(image)
        tokens = self.clip_head.tokens(features)
        return (self.image_encoder.forward_neck(features), self.clip_head.pooled(tokens),
                self.clip_head.per_patch(tokens))


def check_resolution(model: SAMCLIP, resolution: int) -> int:
    patch = int(model.config.sam.backbone.patch_size)
    if resolution <= 0 or resolution % patch:
        raise ValueError(f"--resolution {resolution}: must be a positive multiple of the patch size {patch}")
    return int(resolution)


def example_image(resolution: int, batch: int = 2, seed: int = 0, device="cpu") -> torch.Tensor:
    """A SAM-normalised-looking input (standard normal), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, resolution, resolution, generator=g).to(device)


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the output's scale (an
    element-wise ratio is meaningless where the expected value crosses zero)."""
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).double().cpu()
    e = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected).double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    scale = e.abs().max().item()
    return float((a - e).abs().max().item() / (scale if scale > 0 else 1.0))


def errors_by_name(actual: Sequence, expected: Sequence, names: Sequence[str]) -> Dict[str, float]:
    return {n: max_rel_err(a, e) for n, a, e in zip(names, actual, expected)}


def encoder_errors(run: Callable[[torch.Tensor], Sequence], model: SAMCLIP, resolution: int, device,
                   batch_sizes: Sequence[int] = (1, 2)) -> Dict[str, float]:
    """An exported encoder (``run``: (B, 3, R, R) input on ``device`` -> outputs in ``OUTPUT_NAMES``
    order) against the eager one on the same :func:`example_image` inputs: the max relative error
    of each output over ``batch_sizes``."""
    encoder = ImageEncoder(model).eval()
    errors: Dict[str, float] = {}
    for b in batch_sizes:
        x = example_image(resolution, batch=b, seed=b, device=device)
        with torch.no_grad():
            ref = encoder(x)
            got = run(x)
        for name, e in errors_by_name(got, ref, OUTPUT_NAMES).items():
            errors[name] = max(errors.get(name, 0.0), e)
    return errors


def model_metadata(model: SAMCLIP, resolution: int) -> dict:
    """What a runtime needs to feed the exported encoder and read its outputs."""
    cfg = model.config
    bb = cfg.sam.backbone
    grid = resolution // int(bb.patch_size)
    return {
        "resolution": resolution,
        "native_resolution": int(bb.img_size),
        "patch_size": int(bb.patch_size),
        "grid": grid,
        "pixel_mean": list(model.pixel_mean),
        "pixel_std": list(model.pixel_std),
        "preprocess": "RGB 0..255; resize the longest side to `resolution` (new side int(side * scale + 0.5), "
                      "bilinear), (x - pixel_mean) / pixel_std, pad bottom/right with zeros to resolution x "
                      "resolution, NCHW float32",
        "inputs": {INPUT_NAME: ["batch", 3, resolution, resolution]},
        "outputs": {"sam_embedding": ["batch", int(model.mask_decoder.transformer_dim), grid, grid],
                    "clip_embedding": ["batch", int(model.clip_head.projection.out_features)],
                    "clip_patches": ["batch", grid, grid, int(model.clip_head.projection.out_features)]},
        "clip_embedding_normalised": False,
    }


def update_metadata(out_dir: str, section: str, value) -> str:
    """Set ``section`` of ``out_dir/export.json`` (other sections kept; the ``aoti`` section
    gathers one entry per resolution); returns the path."""
    path = os.path.join(out_dir, METADATA_FILE)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    if isinstance(value, dict) and isinstance(data.get(section), dict) and section == "aoti":
        data[section].update(value)
    else:
        data[section] = value
    write_json(path, data)
    return path
