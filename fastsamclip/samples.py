"""Small teachers written in exactly the official formats, and sample images that ship offline.

Pretrained SAM and CLIP weights cannot be fetched without a model hub, so the demo and the tests
write randomly initialised teachers the way the real ones are distributed, and then load them
through the real loading paths:

- SAM: ``torch.save(sam.state_dict(), "sam_<type>.pth")``, as ``sam_vit_b_01ec64.pth`` is.
- CLIP: an open_clip model folder as on the hub (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, plus ``open_clip_pytorch_model.bin``), loaded as ``local-dir:<folder>``; or a
  bare checkpoint file for ``pretrained=<file>`` with a registered model config.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np
import torch

from fastsamclip.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_sam

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _randomise_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised tables (SAM's pos_embed and rel-pos) random values, so a test that
    compares two implementations exercises them too."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 0 and torch.count_nonzero(p) == 0 and ("pos" in name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def write_sam_checkpoint(path: str, model_type: str = "vit_tiny", seed: int = 0) -> str:
    """A randomly initialised SAM of ``model_type`` saved as an official ``.pth`` state dict."""
    torch.manual_seed(seed)
    sam = build_sam(model_type)
    _randomise_(sam, torch.Generator().manual_seed(seed))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


def write_clip_local_dir(folder: str, model_cfg: Optional[dict] = None, seed: int = 0) -> str:
    """A randomly initialised open_clip model folder in the hub layout; returns its model name
    (``local-dir:<folder>``) for ``open_clip.create_model`` / ``load_clip_teacher``."""
    from open_clip.model import CLIP

    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))
    torch.manual_seed(seed)
    model = CLIP(**json.loads(json.dumps(cfg)))
    os.makedirs(folder, exist_ok=True)
    size = cfg["vision_cfg"]["image_size"]
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                                                        "size": size}}, f, indent=2)
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return f"local-dir:{os.path.abspath(folder)}"


def write_clip_checkpoint(path: str, model_name: str, model_cfg: Optional[dict] = None, seed: int = 0) -> Tuple[str, str]:
    """A bare open_clip checkpoint file plus a registered config named ``model_name``;
    returns (model_name, path) for ``load_clip_teacher(model_name, pretrained=path)``."""
    import open_clip
    from open_clip.model import CLIP

    cfg = json.loads(json.dumps(model_cfg or TINY_CLIP_CFG))
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), f"{model_name}.json")
    os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    torch.save(CLIP(**json.loads(json.dumps(cfg))).state_dict(), path)
    return model_name, path


def sample_image(name: str = "chelsea") -> np.ndarray:
    """An RGB uint8 (H, W, 3) picture that ships with scikit-image (no download)."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)
