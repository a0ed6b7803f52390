"""Sample data in the real formats, written from pictures that ship offline, and small teachers.

Pretrained SAM and CLIP weights and the real datasets cannot be fetched without a network, so the
demo, the tests and the benchmarks write them the way they are distributed and read them back
through the real loaders:

- D_CLIP: img2dataset WebDataset shards (:func:`write_clip_shards`) or an image folder.
- D_SAM: the SA-1B layout with COCO RLE masks (:func:`write_sa1b`); object-like masks of real
  pictures from SLIC superpixels (:func:`synthetic_masks`).
- SAM: ``torch.save(sam.state_dict(), "sam_<type>.pth")``, as ``sam_vit_b_01ec64.pth`` is
  (:func:`write_sam_checkpoint`).
- CLIP: an open_clip model folder as on the hub (``open_clip_config.json`` with ``model_cfg`` and
  ``preprocess_cfg``, plus ``open_clip_pytorch_model.bin``), loaded as ``local-dir:<folder>``
  (:func:`write_clip_local_dir`); or a bare checkpoint file for ``pretrained=<file>`` with a
  registered model config (:func:`write_clip_checkpoint`).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from typing import Any, Iterable, Optional, Sequence, Tuple

import numpy as np
import open_clip
import skimage.data
import torch
from open_clip.model import CLIP
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.segmentation import slic

from fastsamclip.modeling.build import build_sam
from fastsamclip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    get_preprocess_shape,
    to_pil,
)

# skimage.data pictures that ship inside the package (no download needed).
SAMPLE_IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera", "cat",
                      "immunohistochemistry", "colorwheel", "clock", "page", "text")


def load_sample_images(names: Sequence[str] = SAMPLE_IMAGE_NAMES, max_side: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Real pictures from ``skimage.data`` as uint8 (H, W, 3) RGB, optionally downscaled.

    Greyscale is stacked to 3 channels and alpha dropped. ``max_side`` shrinks the longest
    side (bilinear, aspect kept) to keep tests fast.
    """
    out = {}
    for name in names:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        a = np.ascontiguousarray(a[:, :, :3].astype(np.uint8))
        if max_side is not None and max(a.shape[:2]) > max_side:
            h, w = get_preprocess_shape(*a.shape[:2], max_side)
            a = np.array(Image.fromarray(a).resize((w, h), Image.BILINEAR))  # writable copy
        out[name] = a
    return out


def synthetic_masks(image: np.ndarray, n_segments: Sequence[int] = (12, 40),
                    min_area_frac: float = 0.002) -> np.ndarray:
    """Plausible object-like masks for a real image: (N, H, W) bool.

    SLIC superpixels at several granularities (coarse ones play SA-1B's whole objects, fine
    ones its parts) plus the connected components of an Otsu threshold of the grey image.
    Masks below ``min_area_frac`` of the image and duplicates are dropped.
    """
    h, w = image.shape[:2]
    masks = []
    for n in n_segments:
        seg = slic(image, n_segments=n, compactness=10, start_label=0)
        masks += [seg == v for v in np.unique(seg)]
    grey = rgb2gray(image)
    if grey.max() > grey.min():
        comps = label(grey > threshold_otsu(grey))
        masks += [comps == v for v in range(1, comps.max() + 1)]
    min_area = min_area_frac * h * w
    out, seen = [], set()
    for m in masks:
        sig = m.tobytes()
        if m.sum() >= max(min_area, 1) and sig not in seen:
            seen.add(sig)
            out.append(m)
    return np.stack(out) if out else np.zeros((0, h, w), bool)


def _encode_jpeg(image, quality: int = 95) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)  # written as given: lets tests store corrupt files
    buf = io.BytesIO()
    to_pil(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_clip_shards(out_dir: str | os.PathLike, images: Iterable, shard_size: int = 10000,
                      captions: Sequence[str] | None = None) -> list[str]:
    """Write img2dataset-style WebDataset shards ``{shard:05d}.tar``; returns their paths.

    Each sample has ``{key}.jpg``, ``{key}.txt`` (caption) and ``{key}.json`` (img2dataset's
    metadata fields). Keys are img2dataset's: 5-digit shard id then the in-shard index padded to
    ``ceil(log10(shard_size))`` digits (``000000000`` for shard_size 10000). An item may be an
    image (uint8 HWC, torch or PIL), raw ``bytes`` (stored as the .jpg as is, e.g. a corrupt
    file) or ``None`` (no image member, as when a download failed mid-write).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    digits = max(1, math.ceil(math.log10(shard_size)))
    paths, tar, shard, n_in_shard = [], None, -1, shard_size
    mtime = time.time()
    for i, image in enumerate(images):
        if n_in_shard == shard_size:
            if tar is not None:
                tar.close()
            shard, n_in_shard = shard + 1, 0
            paths.append(os.path.join(out_dir, f"{shard:05d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        key = f"{shard:05d}{n_in_shard:0{digits}d}"
        caption = captions[i] if captions is not None else f"a picture, sample {i}"
        meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success",
                "error_message": None, "caption": caption}
        if image is not None:
            data = _encode_jpeg(image)
            if not isinstance(image, (bytes, bytearray)):
                a = np.asarray(to_pil(image))
                meta.update(width=a.shape[1], height=a.shape[0], original_width=a.shape[1],
                            original_height=a.shape[0])
            _add_member(tar, f"{key}.jpg", data, mtime)
        _add_member(tar, f"{key}.txt", caption.encode(), mtime)
        _add_member(tar, f"{key}.json", json.dumps(meta).encode(), mtime)
        n_in_shard += 1
    if tar is not None:
        tar.close()
    return paths


def write_image_folder(out_dir: str | os.PathLike, images: Iterable, per_subfolder: int | None = None,
                       ext: str = ".jpg") -> list[str]:
    """Write images as ``{i:06d}{ext}`` (in ``part_{i // per_subfolder}/`` when given); returns paths.

    Items as in :func:`write_clip_shards` (``bytes`` are written as is, whatever ``ext``).
    """
    out_dir = os.fspath(out_dir)
    paths = []
    for i, image in enumerate(images):
        sub = out_dir if per_subfolder is None else os.path.join(out_dir, f"part_{i // per_subfolder}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{i:06d}{ext}")
        if isinstance(image, (bytes, bytearray)):
            with open(path, "wb") as f:
                f.write(image)
        else:
            to_pil(image).save(path)
        paths.append(path)
    return paths


def write_sa1b(out_dir: str | os.PathLike, images_and_masks: Iterable[tuple[Any, np.ndarray]],
               start_index: int = 1, seed: int = 0) -> list[str]:
    """Write SA-1B-layout ``sa_N.jpg`` + ``sa_N.json`` pairs; returns the stems (``sa_N``).

    Per (image (H, W, 3) uint8, masks (N, H, W) bool): real COCO RLE (``pycocotools`` encode of
    the Fortran-order uint8 mask, counts as str), ``bbox`` XYWH and ``area`` from pycocotools,
    ``point_coords`` a pixel centre inside the mask, ``predicted_iou`` / ``stability_score``
    plausible values, ``crop_box`` the whole image (XYWH), as SA-1B's files have them.
    """
    from pycocotools import (
        mask as mask_utils,  # optional dependency (extras "train", "test")
    )

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems, ann_id = [], 0
    for n, (image, masks) in enumerate(images_and_masks, start=start_index):
        stem = f"sa_{n}"
        a = np.asarray(to_pil(image))
        h, w = a.shape[:2]
        with open(os.path.join(out_dir, stem + ".jpg"), "wb") as f:
            f.write(_encode_jpeg(a))
        anns = []
        for m in np.asarray(masks, bool):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            flat = np.flatnonzero(m)
            pick = int(flat[rng.integers(flat.size)])
            anns.append({
                "id": ann_id,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(mask_utils.area(rle)),
                "point_coords": [[pick % w + 0.5, pick // w + 0.5]],
                "predicted_iou": float(rng.uniform(0.88, 1.0)),
                "stability_score": float(rng.uniform(0.92, 1.0)),
                "crop_box": [0.0, 0.0, float(w), float(h)],
            })
            ann_id += 1
        meta = {"image": {"image_id": n, "width": w, "height": h, "file_name": stem + ".jpg"},
                "annotations": anns}
        with open(os.path.join(out_dir, stem + ".json"), "w") as f:
            json.dump(meta, f)
        stems.append(stem)
    return stems



TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def randomise_zero_tables(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised tables (SAM's pos_embed and rel-pos) random values, so a test that
    compares two implementations exercises them too."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 0 and torch.count_nonzero(p) == 0 and ("pos" in name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def random_sam(model_type: str = "vit_tiny", seed: int = 0):
    """A randomly initialised ``segment_anything.Sam`` of ``model_type``, its zero-initialised
    position tables given random values too."""
    torch.manual_seed(seed)
    sam = build_sam(model_type)
    randomise_zero_tables(sam, torch.Generator().manual_seed(seed))
    return sam


def write_sam_checkpoint(path: str, model_type: str = "vit_tiny", seed: int = 0) -> str:
    """A randomly initialised SAM of ``model_type`` saved as an official ``.pth`` state dict."""
    sam = random_sam(model_type, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


def write_clip_local_dir(folder: str, model_cfg: Optional[dict] = None, seed: int = 0) -> str:
    """A randomly initialised open_clip model folder in the hub layout; returns its model name
    (``local-dir:<folder>``) for ``open_clip.create_model`` / ``load_clip_teacher``."""
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
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)

