"""Image preprocessing on the GPU: SAM's and CLIP's inputs from one uint8 image in one launch.

CUDA C++ in ``csrc/preprocess.cu`` (loaded by ``_cuda_library.py``); backends ``cuda`` (CUDA
tensors, when the library is built) and ``reference`` (plain torch, any device).

Conventions (both backends share them; sizes and pixel statistics are the caller's arguments):

- Resizes are ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` on float
  values. SAM's own ``ResizeLongestSide.apply_image`` resizes the uint8 image with PIL (bilinear,
  antialiased when shrinking, rounded to uint8), and CLIP's eval transform resizes with bicubic;
  the difference after normalisation is measured in ``tests/test_transforms_vs_kernels.py``.
  :func:`preprocess_reference` also takes ``antialias=True``, which matches
  ``ResizeLongestSide.apply_image_torch`` exactly (the CUDA kernel has no antialias).
- SAM: resize to ``sam_hw`` (the caller's longest-side-to-``sam_side`` size, SAM's rounding),
  ``(x - mean) / std`` in 0..255 units, zero padding bottom/right to ``sam_side`` squared.
- CLIP: shortest side to ``clip_side`` (longest ``int(clip_side * long / short)``, torchvision's
  ``Resize``), torchvision's ``CenterCrop`` offsets, ``(x / 255 - mean) / std`` (0..1 statistics).
- Grayscale (C = 1) is replicated to RGB; RGBA's alpha is dropped.

The CUDA op is a ``torch.library.custom_op`` with a fake implementation, so it runs inside
``torch.compile(fullgraph=True)`` on CUDA tensors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _cuda_library as cuda_lib
from ._checks import check_positive_int
from .dispatch import Backend, Op, Probe, register_op

__all__ = ["OP", "preprocess", "preprocess_reference"]

NAME = "preprocess"


# ---------------------------------------------------------------------------------------------
# Input checks and the geometry both backends share
# ---------------------------------------------------------------------------------------------


def _check_image(image) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"expected a uint8 (H, W, C) tensor or numpy array, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image (0..255), got dtype {image.dtype}; "
                        "convert with (x * 255).round().to(torch.uint8) if it is 0..1 float")
    if image.ndim == 2:
        raise ValueError(f"expected an (H, W, C) image, got shape {tuple(image.shape)}; "
                         "for grayscale pass image[..., None]")
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {tuple(image.shape)}")
    if image.shape[2] not in (1, 3, 4):
        hint = (" (looks like CHW: pass image.permute(1, 2, 0))" if image.shape[0] in (1, 3, 4)
                else "")
        raise ValueError(f"expected 1, 3 or 4 channels last (HWC), got shape "
                         f"{tuple(image.shape)}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image: shape {tuple(image.shape)}")
    return image


def _check_norm(name: str, values: Sequence[float], positive: bool = False) -> List[float]:
    out = [float(v) for v in values]
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 values (RGB), got {len(out)}")
    if positive and min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {out}")
    return out


def _check_sam_hw(sam_hw, sam_side: int, image: torch.Tensor) -> Tuple[int, int]:
    sh, sw = (int(v) for v in sam_hw)
    if sh == 0 or sw == 0:
        # SAM's own rounding gives 0 for e.g. a 1 x 3000 strip at 1024; PIL and F.interpolate
        # both refuse a zero-sized resize, so say so here.
        raise ValueError(f"image {image.shape[0]}x{image.shape[1]} resizes to {sh}x{sw} at longest side "
                         f"{sam_side}: too elongated for SAM's input")
    if not (0 < sh <= sam_side and 0 < sw <= sam_side):
        raise ValueError(f"sam_hw {(sh, sw)} must be positive and fit in sam_side {sam_side}")
    return sh, sw


def _validate(image, sam_side, sam_hw, sam_mean, sam_std, clip_side, clip_mean, clip_std) -> tuple:
    """The checked arguments: (image, sam_side, (h, w), mean, std, clip_side, mean, std)."""
    image = _check_image(image)
    sam_side = check_positive_int("sam_side", sam_side)
    clip_side = check_positive_int("clip_side", clip_side)
    return (image, sam_side, _check_sam_hw(sam_hw, sam_side, image), _check_norm("sam_mean", sam_mean),
            _check_norm("sam_std", sam_std, True), clip_side, _check_norm("clip_mean", clip_mean),
            _check_norm("clip_std", clip_std, True))


def _clip_geometry(h: int, w: int, side: int) -> Tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left): torchvision ``Resize(side)`` +
    ``CenterCrop(side)`` (``int(round((size - side) / 2.0))``, Python's half-to-even)."""
    short, long = min(h, w), max(h, w)
    new_long = int(side * long / short)
    rh, rw = (new_long, side) if h >= w else (side, new_long)
    return rh, rw, int(round((rh - side) / 2.0)), int(round((rw - side) / 2.0))


def _rgb_float(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) uint8 -> (1, 3, H, W) float32: grayscale replicated, alpha dropped."""
    x = image[..., :3] if image.shape[2] == 4 else image.expand(-1, -1, 3) if image.shape[2] == 1 else image
    return x.permute(2, 0, 1)[None].to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Plain-torch reference
# ---------------------------------------------------------------------------------------------


def preprocess_reference(image, *, sam_side: int, sam_hw: Tuple[int, int], sam_mean: Sequence[float],
                         sam_std: Sequence[float], clip_side: int, clip_mean: Sequence[float],
                         clip_std: Sequence[float], antialias: bool = False
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch of :func:`preprocess` (any device), the reference the CUDA kernel must equal.

    (H, W, C) uint8 -> ((3, sam_side, sam_side) float32, (3, clip_side, clip_side) float32)::

        x = image[..., :3] (or replicated grayscale) as (1, 3, H, W) float
        sam = F.interpolate(x, sam_hw, mode="bilinear", align_corners=False, antialias=antialias)
        sam = F.pad((sam - sam_mean) / sam_std, (0, S - w, 0, S - h))
        clip = F.interpolate(x, (rh, rw), ...)[..., top:top + c, left:left + c]
        clip = (clip / 255 - clip_mean) / clip_std

    ``antialias=True`` (this reference only) matches ``ResizeLongestSide.apply_image_torch``.
    """
    image, sam_side, (sh, sw), sam_mean, sam_std, clip_side, clip_mean, clip_std = _validate(
        image, sam_side, sam_hw, sam_mean, sam_std, clip_side, clip_mean, clip_std)
    H, W = image.shape[:2]
    x = _rgb_float(image)
    mean = torch.tensor(sam_mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(sam_std, device=x.device).view(3, 1, 1)
    sam = F.interpolate(x, (sh, sw), mode="bilinear", align_corners=False, antialias=antialias)[0]
    sam = F.pad((sam - mean) / std, (0, sam_side - sw, 0, sam_side - sh))

    rh, rw, top, left = _clip_geometry(H, W, clip_side)
    clip = F.interpolate(x, (rh, rw), mode="bilinear", align_corners=False, antialias=antialias)[0]
    clip = clip[:, top:top + clip_side, left:left + clip_side].div(255.0)
    mean = torch.tensor(clip_mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(clip_std, device=x.device).view(3, 1, 1)
    return sam.contiguous(), ((clip - mean) / std).contiguous()


# ---------------------------------------------------------------------------------------------
# The CUDA kernel (CUDA tensors only; the op sends everything else to the reference)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsamclip::preprocess_u8", mutates_args=(), device_types="cuda")
def _preprocess_op(image: torch.Tensor, sam_side: int, sam_h: int, sam_w: int,
                   sam_mean: list[float], sam_std: list[float], clip_side: int,
                   clip_mean: list[float], clip_std: list[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    lib = cuda_lib.require()
    image = image.contiguous()
    sam = torch.empty((3, sam_side, sam_side), dtype=torch.float32, device=image.device)
    clip = torch.empty((3, clip_side, clip_side), dtype=torch.float32, device=image.device)
    H, W, C = image.shape
    f3 = cuda_lib.floats3
    with torch.cuda.device(image.device):
        stream = torch.cuda.current_stream(image.device).cuda_stream
        rc = lib.fsc_preprocess_u8(image.data_ptr(), H, W, C, sam.data_ptr(), sam_side, sam_h,
                                   sam_w, f3(sam_mean), f3(sam_std), clip.data_ptr(),
                                   clip_side, f3(clip_mean), f3(clip_std), stream)
    try:
        cuda_lib.check_rc(rc, "fsc_preprocess_u8")
    except cuda_lib.LibraryUnusable:
        # The library cannot run here after all (now marked so): this call takes the backend the
        # dispatch picks without it, which logs the fallback once; later calls go there directly.
        return OP.select(image).fn(image, sam_side=sam_side, sam_hw=(sam_h, sam_w), sam_mean=sam_mean,
                                   sam_std=sam_std, clip_side=clip_side, clip_mean=clip_mean, clip_std=clip_std)
    return sam, clip


@_preprocess_op.register_fake
def _(image, sam_side, sam_h, sam_w, sam_mean, sam_std, clip_side, clip_mean, clip_std):
    return (image.new_empty((3, sam_side, sam_side), dtype=torch.float32),
            image.new_empty((3, clip_side, clip_side), dtype=torch.float32))


def _preprocess_cuda(image, *, sam_side, sam_hw, sam_mean, sam_std, clip_side, clip_mean, clip_std):
    return _preprocess_op(image, sam_side, sam_hw[0], sam_hw[1], sam_mean, sam_std, clip_side, clip_mean,
                          clip_std)


# ---------------------------------------------------------------------------------------------
# The op and its public function
# ---------------------------------------------------------------------------------------------


def _probes(device: str) -> List[Probe]:
    return [Probe("uint8 8x8x3 image", (torch.zeros(8, 8, 3, dtype=torch.uint8, device=device),), {})]


OP = register_op(Op(NAME, probes=_probes))
OP.register(Backend(
    name="cuda",
    fn=_preprocess_cuda,
    description="one CUDA C++ launch: resize, normalise and pad for SAM, resize and crop for CLIP",
    check=cuda_lib.tensor_refusals,
    is_available=cuda_lib.unavailable,
))
OP.register(Backend(
    name="reference",
    fn=preprocess_reference,
    description="plain torch, F.interpolate bilinear + normalise + pad / crop",
))


def preprocess(image, *, sam_side: int, sam_hw: Tuple[int, int], sam_mean: Sequence[float],
               sam_std: Sequence[float], clip_side: int, clip_mean: Sequence[float],
               clip_std: Sequence[float], backend: Optional[str] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's and CLIP's inputs from one uint8 image.

    Args:
        image: (H, W, C) uint8 tensor (or numpy array), C in {1, 3, 4}; on a CUDA device for the
            kernel.
        sam_side: SAM's square input side (1024), the padded size.
        sam_hw: the resized (h, w) before padding (SAM's ``input_size``; the caller computes it
            with SAM's longest-side rounding).
        sam_mean, sam_std: 3 values each, in 0..255 units.
        clip_side: CLIP's input side; the image's short side is resized to it, then centre-cropped.
        clip_mean, clip_std: 3 values each, in 0..1 units.
        backend: "cuda" or "reference" to force one; default: the kernel for CUDA tensors when
            the library is built, else plain torch (logged once).

    Returns ``(sam (3, sam_side, sam_side) float32, clip (3, clip_side, clip_side) float32)`` on
    the image's device. Plain torch: :func:`preprocess_reference`.
    """
    image, sam_side, sam_hw, sam_mean, sam_std, clip_side, clip_mean, clip_std = _validate(
        image, sam_side, sam_hw, sam_mean, sam_std, clip_side, clip_mean, clip_std)
    be = OP.select(image, backend=backend)
    return be.fn(image, sam_side=sam_side, sam_hw=sam_hw, sam_mean=sam_mean, sam_std=sam_std,
                 clip_side=clip_side, clip_mean=clip_mean, clip_std=clip_std)
