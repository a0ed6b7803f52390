"""Image preprocessing and mask postprocessing on the GPU (CUDA C++ in ``csrc/preprocess.cu``).

``preprocess(image)`` turns one uint8 (H, W, C) image into SAM's input and CLIP's input in one
kernel launch; ``postprocess_masks(lowres, ...)`` turns the mask decoder's low-res logits into
original-size logits and masks in one launch (SAM's two resizes composed per pixel, no
(pad x pad) intermediate). Each has a plain-torch reference (``*_reference``) used on CPU
tensors and when the compiled library is missing; which one runs is logged once.

Conventions (the CUDA path and the torch path share them):

- Resizes are ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` on float
  values. SAM's own ``ResizeLongestSide.apply_image`` resizes the uint8 image with PIL (bilinear,
  antialiased when shrinking, rounded to uint8), and CLIP's eval transform resizes with bicubic;
  the difference after normalisation is measured in ``tests/test_preprocess.py``. The torch path
  also takes ``antialias=True``, which matches ``ResizeLongestSide.apply_image_torch`` exactly
  (the CUDA path has no antialias).
- SAM: longest side to ``sam_side`` with :func:`fastsamclip.data.get_preprocess_shape`'s
  rounding, ``(x - mean) / std`` in 0..255 units, zero padding bottom/right to sam_side^2.
- CLIP: shortest side to ``clip_side`` (longest ``int(clip_side * long / short)``, torchvision's
  ``Resize``), torchvision's ``CenterCrop`` offsets, ``(x / 255 - mean) / std``.
- Grayscale (C = 1) is replicated to RGB; RGBA's alpha is dropped.

The library is torch-free (C functions taking raw pointers and a stream) and loaded with ctypes;
both functions are ``torch.library.custom_op``s with fake implementations, so they run inside
``torch.compile(fullgraph=True)`` on CUDA tensors.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def get_preprocess_shape(h, w, long_side):
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)

__all__ = [
    "Availability",
    "is_available",
    "library_path",
    "postprocess_masks",
    "postprocess_masks_reference",
    "preprocess",
    "preprocess_reference",
]

_log = logging.getLogger(__name__)

LIBRARY_NAME = "libfastsamclip_cuda.so"
_SYMBOLS = ("fsc_preprocess_u8", "fsc_postprocess_masks")
_BACKENDS = ("cuda", "torch")


# ---------------------------------------------------------------------------------------------
# Input checks and the conventions both paths share
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


def _check_norm(name: str, values: Sequence[float], positive: bool = False) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 values (RGB), got {len(out)}")
    if positive and min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {out}")
    return out


def _check_side(name: str, side: int) -> int:
    if int(side) != side or side <= 0:
        raise ValueError(f"{name} must be a positive int, got {side!r}")
    return int(side)


def _sam_shape(h: int, w: int, sam_side: int) -> tuple[int, int]:
    sh, sw = get_preprocess_shape(h, w, sam_side)
    if sh == 0 or sw == 0:
        # SAM's own rounding gives 0 for e.g. a 1 x 3000 strip at 1024; PIL and F.interpolate
        # both refuse a zero-sized resize, so say so here.
        raise ValueError(f"image {h}x{w} resizes to {sh}x{sw} at longest side {sam_side}: "
                         "too elongated for SAM's input")
    return sh, sw


def _clip_geometry(h: int, w: int, side: int) -> tuple[int, int, int, int]:
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
# Plain-torch references
# ---------------------------------------------------------------------------------------------


def preprocess_reference(image: torch.Tensor, sam_side: int = 1024, clip_side: int = 224,
                         sam_mean: Sequence[float] = SAM_PIXEL_MEAN,
                         sam_std: Sequence[float] = SAM_PIXEL_STD,
                         clip_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                         clip_std: Sequence[float] = OPENAI_CLIP_STD, antialias: bool = False
                         ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """Plain torch of :func:`preprocess` (any device), the reference the CUDA kernel must equal.

    (H, W, C) uint8 -> ((3, sam_side, sam_side) float32, (h, w), (3, clip_side, clip_side) float32)::

        x = image[..., :3] (or replicated grayscale) as (1, 3, H, W) float
        sam = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=antialias)
        sam = F.pad((sam - sam_mean) / sam_std, (0, S - w, 0, S - h))
        clip = F.interpolate(x, (rh, rw), ...)[..., top:top + c, left:left + c]
        clip = (clip / 255 - clip_mean) / clip_std
    """
    image = _check_image(image)
    sam_side, clip_side = _check_side("sam_side", sam_side), _check_side("clip_side", clip_side)
    H, W = image.shape[:2]
    x = _rgb_float(image)
    sh, sw = _sam_shape(H, W, sam_side)
    mean = torch.tensor(_check_norm("sam_mean", sam_mean), device=x.device).view(3, 1, 1)
    std = torch.tensor(_check_norm("sam_std", sam_std, True), device=x.device).view(3, 1, 1)
    sam = F.interpolate(x, (sh, sw), mode="bilinear", align_corners=False, antialias=antialias)[0]
    sam = F.pad((sam - mean) / std, (0, sam_side - sw, 0, sam_side - sh))

    rh, rw, top, left = _clip_geometry(H, W, clip_side)
    clip = F.interpolate(x, (rh, rw), mode="bilinear", align_corners=False, antialias=antialias)[0]
    clip = clip[:, top:top + clip_side, left:left + clip_side].div(255.0)
    mean = torch.tensor(_check_norm("clip_mean", clip_mean), device=x.device).view(3, 1, 1)
    std = torch.tensor(_check_norm("clip_std", clip_std, True), device=x.device).view(3, 1, 1)
    return sam.contiguous(), (sh, sw), ((clip - mean) / std).contiguous()


def _check_postprocess(lowres, input_hw, pad_side, original_hw):
    if not isinstance(lowres, torch.Tensor) or not lowres.is_floating_point():
        raise TypeError(f"lowres must be a floating-point tensor, got "
                        f"{getattr(lowres, 'dtype', type(lowres).__name__)}")
    if lowres.ndim != 4 or lowres.numel() == 0:
        raise ValueError(f"lowres must be a non-empty (P, K, lh, lw) tensor, got shape "
                         f"{tuple(lowres.shape)}")
    pad_side = _check_side("pad_side", pad_side)
    h, w = (_check_side("input_hw", int(v)) for v in input_hw)
    if h > pad_side or w > pad_side:
        raise ValueError(f"input_hw {(h, w)} exceeds pad_side {pad_side}")
    oh, ow = (_check_side("original_hw", int(v)) for v in original_hw)
    return (h, w), pad_side, (oh, ow)


def postprocess_masks_reference(lowres: torch.Tensor, input_hw: tuple[int, int], pad_side: int,
                                original_hw: tuple[int, int], threshold: float = 0.0,
                                return_logits: bool = True
                                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Plain torch of :func:`postprocess_masks`: exactly ``Sam.postprocess_masks`` + threshold.

    (P, K, lh, lw) -> ((P, K, H, W) float32 logits or None, (P, K, H, W) bool masks)::

        x = F.interpolate(lowres, (pad_side, pad_side), mode="bilinear", align_corners=False)
        x = F.interpolate(x[..., :h, :w], original_hw, mode="bilinear", align_corners=False)
        masks = x > threshold
    """
    x = postprocess_logits_reference(lowres, input_hw, pad_side, original_hw)
    return (x if return_logits else None), x > threshold


def postprocess_logits_reference(lowres: torch.Tensor, input_hw: tuple[int, int], pad_side: int,
                                 original_hw: tuple[int, int]) -> torch.Tensor:
    """``Sam.postprocess_masks`` in plain torch: (P, K, lh, lw) -> (P, K, H, W) float32 logits."""
    (h, w), pad_side, (oh, ow) = _check_postprocess(lowres, input_hw, pad_side, original_hw)
    x = F.interpolate(lowres.to(torch.float32), (pad_side, pad_side), mode="bilinear",
                      align_corners=False)
    return F.interpolate(x[..., :h, :w], (oh, ow), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# The compiled library
# ---------------------------------------------------------------------------------------------


def library_path() -> str:
    """Where the library is looked for: ``lib/`` next to this module (CMake writes it there,
    for editable installs in the source tree)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", LIBRARY_NAME)


_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None


def _load_library() -> Optional[ctypes.CDLL]:
    """Load once; on failure remember why (reported by :func:`is_available`)."""
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    path = library_path()
    if not os.path.exists(path):
        _LIB_ERROR = (f"{path} is not built (needs nvcc and cmake at install time: "
                      "pip install -e ., or cmake -S . -B build/cmake && cmake --build build/cmake)")
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        _LIB_ERROR = f"cannot load {path}: {e}"
        return None
    missing = [s for s in _SYMBOLS if not hasattr(lib, s)]
    if missing:
        _LIB_ERROR = f"{path} lacks {', '.join(missing)} (stale build? rebuild it)"
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fsc_preprocess_u8.argtypes = [p, i, i, i, p, i, i, i, p, p, p, i, p, p, p]
    lib.fsc_preprocess_u8.restype = i
    lib.fsc_postprocess_masks.argtypes = [p, i, i, i, i, i, i, i, i, i, f, p, p, p]
    lib.fsc_postprocess_masks.restype = i
    _LIB = lib
    return lib


@dataclass(frozen=True)
class Availability:
    """Whether the CUDA path can run; falsy with ``reason`` when it cannot."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def is_available() -> Availability:
    """``bool(is_available())``: the CUDA path can run; ``.reason`` says why not."""
    if _load_library() is None:
        return Availability(False, _LIB_ERROR or "library not loaded")
    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU visible to torch")
    return Availability(True)


def _floats3(values: Sequence[float]):
    return (ctypes.c_float * 3)(*values)


def _check_rc(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{name} failed with cudaError_t {rc}"
                           + (" (invalid argument)" if rc == 1 else ""))


# Custom ops: CUDA tensors only (the public functions send everything else to the references).
@torch.library.custom_op("fastsamclip::preprocess_u8", mutates_args=(), device_types="cuda")
def _preprocess_op(image: torch.Tensor, sam_side: int, sam_h: int, sam_w: int,
                   sam_mean: list[float], sam_std: list[float], clip_side: int,
                   clip_mean: list[float], clip_std: list[float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _load_library()
    if lib is None:
        raise RuntimeError(f"fastsamclip CUDA preprocessing unavailable: {_LIB_ERROR}")
    image = image.contiguous()
    sam = torch.empty((3, sam_side, sam_side), dtype=torch.float32, device=image.device)
    clip = torch.empty((3, clip_side, clip_side), dtype=torch.float32, device=image.device)
    H, W, C = image.shape
    with torch.cuda.device(image.device):
        stream = torch.cuda.current_stream(image.device).cuda_stream
        rc = lib.fsc_preprocess_u8(image.data_ptr(), H, W, C, sam.data_ptr(), sam_side, sam_h,
                                   sam_w, _floats3(sam_mean), _floats3(sam_std), clip.data_ptr(),
                                   clip_side, _floats3(clip_mean), _floats3(clip_std), stream)
    _check_rc(rc, "fsc_preprocess_u8")
    return sam, clip


@_preprocess_op.register_fake
def _(image, sam_side, sam_h, sam_w, sam_mean, sam_std, clip_side, clip_mean, clip_std):
    return (image.new_empty((3, sam_side, sam_side), dtype=torch.float32),
            image.new_empty((3, clip_side, clip_side), dtype=torch.float32))


@torch.library.custom_op("fastsamclip::postprocess_masks", mutates_args=(), device_types="cuda")
def _postprocess_op(lowres: torch.Tensor, input_h: int, input_w: int, pad_side: int, out_h: int,
                    out_w: int, threshold: float, return_logits: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    lib = _load_library()
    if lib is None:
        raise RuntimeError(f"fastsamclip CUDA mask postprocessing unavailable: {_LIB_ERROR}")
    lowres = lowres.to(torch.float32).contiguous()
    P, K, lh, lw = lowres.shape
    shape = (P, K, out_h, out_w) if return_logits else (0,)
    logits = torch.empty(shape, dtype=torch.float32, device=lowres.device)
    masks = torch.empty((P, K, out_h, out_w), dtype=torch.uint8, device=lowres.device)
    with torch.cuda.device(lowres.device):
        stream = torch.cuda.current_stream(lowres.device).cuda_stream
        rc = lib.fsc_postprocess_masks(lowres.data_ptr(), P, K, lh, lw, input_h, input_w,
                                       pad_side, out_h, out_w, threshold,
                                       logits.data_ptr() if return_logits else None,
                                       masks.data_ptr(), stream)
    _check_rc(rc, "fsc_postprocess_masks")
    return logits, masks


@_postprocess_op.register_fake
def _(lowres, input_h, input_w, pad_side, out_h, out_w, threshold, return_logits):
    P, K = lowres.shape[:2]
    shape = (P, K, out_h, out_w) if return_logits else (0,)
    return (lowres.new_empty(shape, dtype=torch.float32),
            lowres.new_empty((P, K, out_h, out_w), dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------

_LOGGED: set[str] = set()


def _choose_backend(name: str, tensor: torch.Tensor, backend: Optional[str]) -> str:
    """'cuda' when asked or possible, else 'torch'; an unasked fallback is logged once."""
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "torch":
        return "torch"
    avail = is_available()
    if backend == "cuda":
        if not avail:
            raise RuntimeError(f"{name}: CUDA backend unavailable: {avail.reason}")
        if not tensor.is_cuda:
            raise ValueError(f"{name}: CUDA backend needs a CUDA tensor, got device {tensor.device}")
        return "cuda"
    if avail and tensor.is_cuda:
        choice, why = "cuda", "CUDA kernel"
    else:
        choice = "torch"
        why = (f"plain torch on {tensor.device}" if avail or not tensor.is_cuda
               else f"plain torch on {tensor.device} ({avail.reason})")
    key = f"{name}:{choice}:{tensor.device.type}"
    if key not in _LOGGED:
        _LOGGED.add(key)
        (_log.warning if choice == "torch" and tensor.is_cuda else _log.info)("%s: %s", name, why)
    return choice


def preprocess(image, sam_side: int = 1024, clip_side: int = 224,
               sam_mean: Sequence[float] = SAM_PIXEL_MEAN, sam_std: Sequence[float] = SAM_PIXEL_STD,
               clip_mean: Sequence[float] = OPENAI_CLIP_MEAN,
               clip_std: Sequence[float] = OPENAI_CLIP_STD, backend: Optional[str] = None,
               antialias: bool = False) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
    """SAM's and CLIP's inputs from one uint8 image.

    image: (H, W, C) uint8 tensor (or numpy array), C in {1, 3, 4}; on a CUDA device for the
    kernel. Returns ``(sam_input (3, sam_side, sam_side) float32, (h, w) the resized size before
    padding (SAM's input_size), clip_input (3, clip_side, clip_side) float32)`` on the image's
    device. ``backend``: None (the kernel for CUDA tensors when built, else plain torch; logged
    once), "cuda" or "torch". ``antialias=True`` (torch path only) matches
    ``ResizeLongestSide.apply_image_torch``. Plain torch: :func:`preprocess_reference`.
    """
    image = _check_image(image)
    sam_side, clip_side = _check_side("sam_side", sam_side), _check_side("clip_side", clip_side)
    if antialias:
        if backend == "cuda":
            raise ValueError("antialias=True is only implemented by the torch backend")
        backend = "torch"
    if _choose_backend("preprocess", image, backend) == "torch":
        return preprocess_reference(image, sam_side, clip_side, sam_mean, sam_std, clip_mean,
                                    clip_std, antialias)
    sh, sw = _sam_shape(image.shape[0], image.shape[1], sam_side)
    sam, clip = _preprocess_op(image, sam_side, sh, sw, _check_norm("sam_mean", sam_mean),
                               _check_norm("sam_std", sam_std, True), clip_side,
                               _check_norm("clip_mean", clip_mean),
                               _check_norm("clip_std", clip_std, True))
    return sam, (sh, sw), clip


def postprocess_masks(lowres: torch.Tensor, input_hw: tuple[int, int], pad_side: int,
                      original_hw: tuple[int, int], threshold: float = 0.0,
                      backend: Optional[str] = None, return_logits: bool = True
                      ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """SAM's ``postprocess_masks`` and the threshold, fused.

    lowres: (P, K, lh, lw) float logits (the mask decoder's 256x256). ``input_hw``: the valid
    (h, w) in the (pad_side x pad_side) model input; ``original_hw``: (H, W) of the image.
    Returns ``(logits (P, K, H, W) float32 or None when return_logits=False, masks (P, K, H, W)
    bool = logits > threshold)``. The CUDA path writes no (pad_side x pad_side) intermediate.
    Plain torch: :func:`postprocess_masks_reference` (= ``Sam.postprocess_masks`` + ``>``).
    """
    (h, w), pad_side, (oh, ow) = _check_postprocess(lowres, input_hw, pad_side, original_hw)
    if _choose_backend("postprocess_masks", lowres, backend) == "torch":
        return postprocess_masks_reference(lowres, (h, w), pad_side, (oh, ow), threshold,
                                           return_logits)
    logits, masks = _postprocess_op(lowres, h, w, pad_side, oh, ow, float(threshold),
                                    return_logits)
    # uint8 0/1 and bool share a byte layout: a view, no copy.
    return (logits if return_logits else None), masks.view(torch.bool)
