"""Mask postprocessing on the GPU: the mask decoder's low-res logits to original-size masks.

SAM's ``postprocess_masks`` is two bilinear resizes (low-res -> padded input, crop, -> original
size) and a threshold. The CUDA kernel (``csrc/preprocess.cu``, loaded by ``_cuda_library.py``)
composes the two resizes per output pixel in one launch (16 taps, no ``pad x pad``
intermediate) and writes the masks beside the logits. Backends: ``cuda`` (CUDA tensors, when
the library is built) and ``reference`` (plain torch, exactly ``Sam.postprocess_masks``).

The CUDA op is a ``torch.library.custom_op`` with a fake implementation, so it runs inside
``torch.compile(fullgraph=True)`` on CUDA tensors.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _cuda_library as cuda_lib
from ._checks import check_positive_int
from .dispatch import Backend, Op, Probe, register_op

__all__ = ["OP", "postprocess_masks", "postprocess_masks_reference"]

NAME = "postprocess_masks"


def _validate(lowres, input_hw, pad_side, original_hw):
    if not isinstance(lowres, torch.Tensor) or not lowres.is_floating_point():
        raise TypeError(f"lowres must be a floating-point tensor, got "
                        f"{getattr(lowres, 'dtype', type(lowres).__name__)}")
    if lowres.ndim != 4 or lowres.numel() == 0:
        raise ValueError(f"lowres must be a non-empty (P, K, lh, lw) tensor, got shape "
                         f"{tuple(lowres.shape)}")
    pad_side = check_positive_int("pad_side", pad_side)
    h, w = (check_positive_int("input_hw", int(v)) for v in input_hw)
    if h > pad_side or w > pad_side:
        raise ValueError(f"input_hw {(h, w)} exceeds pad_side {pad_side}")
    oh, ow = (check_positive_int("original_hw", int(v)) for v in original_hw)
    return (h, w), pad_side, (oh, ow)


# ---------------------------------------------------------------------------------------------
# Plain-torch reference
# ---------------------------------------------------------------------------------------------


def _logits_reference(lowres: torch.Tensor, input_hw: Tuple[int, int], pad_side: int,
                      original_hw: Tuple[int, int]) -> torch.Tensor:
    """``Sam.postprocess_masks`` in plain torch: (P, K, lh, lw) -> (P, K, H, W) float32 logits."""
    x = F.interpolate(lowres.to(torch.float32), (pad_side, pad_side), mode="bilinear",
                      align_corners=False)
    return F.interpolate(x[..., :input_hw[0], :input_hw[1]], original_hw, mode="bilinear",
                         align_corners=False)


def postprocess_masks_reference(lowres: torch.Tensor, input_hw: Tuple[int, int], pad_side: int,
                                original_hw: Tuple[int, int], threshold: float = 0.0, *,
                                return_logits: bool = True
                                ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Plain torch of :func:`postprocess_masks`: exactly ``Sam.postprocess_masks`` + threshold.

    (P, K, lh, lw) -> ((P, K, H, W) float32 logits or None, (P, K, H, W) bool masks)::

        x = F.interpolate(lowres, (pad_side, pad_side), mode="bilinear", align_corners=False)
        x = F.interpolate(x[..., :h, :w], original_hw, mode="bilinear", align_corners=False)
        masks = x > threshold
    """
    input_hw, pad_side, original_hw = _validate(lowres, input_hw, pad_side, original_hw)
    return _reference(lowres, input_hw, pad_side, original_hw, threshold, return_logits)


def _reference(lowres, input_hw, pad_side, original_hw, threshold, return_logits):
    x = _logits_reference(lowres, input_hw, pad_side, original_hw)
    return (x if return_logits else None), x > threshold


# ---------------------------------------------------------------------------------------------
# The CUDA kernel (CUDA tensors only; the op sends everything else to the reference)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastsamclip::postprocess_masks", mutates_args=(), device_types="cuda")
def _postprocess_op(lowres: torch.Tensor, input_h: int, input_w: int, pad_side: int, out_h: int,
                    out_w: int, threshold: float, return_logits: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    lib = cuda_lib.require()
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
    try:
        cuda_lib.check_rc(rc, "fsc_postprocess_masks")
    except cuda_lib.LibraryUnusable:
        # The library cannot run here after all (now marked so): this call takes the backend the
        # dispatch picks without it, which logs the fallback once; later calls go there directly.
        x, m = OP.select(lowres).fn(lowres, (input_h, input_w), pad_side, (out_h, out_w), threshold, return_logits)
        return (x if return_logits else logits), m.to(torch.uint8)
    return logits, masks


@_postprocess_op.register_fake
def _(lowres, input_h, input_w, pad_side, out_h, out_w, threshold, return_logits):
    P, K = lowres.shape[:2]
    shape = (P, K, out_h, out_w) if return_logits else (0,)
    return (lowres.new_empty(shape, dtype=torch.float32),
            lowres.new_empty((P, K, out_h, out_w), dtype=torch.uint8))


def _postprocess_cuda(lowres, input_hw, pad_side, original_hw, threshold, return_logits):
    logits, masks = _postprocess_op(lowres, input_hw[0], input_hw[1], pad_side, original_hw[0],
                                    original_hw[1], float(threshold), return_logits)
    # uint8 0/1 and bool share a byte layout: a view, no copy.
    return (logits if return_logits else None), masks.view(torch.bool)


# ---------------------------------------------------------------------------------------------
# The op and its public function
# ---------------------------------------------------------------------------------------------


def _probes(device: str) -> List[Probe]:
    return [Probe("float32 1x1x8x8 logits", (torch.zeros(1, 1, 8, 8, device=device),), {})]


OP = register_op(Op(NAME, probes=_probes))
OP.register(Backend(
    name="cuda",
    fn=_postprocess_cuda,
    description="one CUDA C++ launch: both resizes composed per pixel, threshold fused",
    check=cuda_lib.tensor_refusals,
    is_available=cuda_lib.unavailable,
))
OP.register(Backend(
    name="reference",
    fn=_reference,
    description="plain torch, Sam.postprocess_masks + threshold",
))


def postprocess_masks(lowres: torch.Tensor, input_hw: Tuple[int, int], pad_side: int,
                      original_hw: Tuple[int, int], threshold: float = 0.0, *,
                      backend: Optional[str] = None, return_logits: bool = True
                      ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """SAM's ``postprocess_masks`` and the threshold, fused.

    lowres: (P, K, lh, lw) float logits (the mask decoder's 256x256). ``input_hw``: the valid
    (h, w) in the (pad_side x pad_side) model input; ``original_hw``: (H, W) of the image.
    Returns ``(logits (P, K, H, W) float32 or None when return_logits=False, masks (P, K, H, W)
    bool = logits > threshold)``. ``backend``: "cuda" or "reference" to force one; default: the
    kernel for CUDA tensors when the library is built, else plain torch (logged once).
    Plain torch: :func:`postprocess_masks_reference` (= ``Sam.postprocess_masks`` + ``>``).
    """
    input_hw, pad_side, original_hw = _validate(lowres, input_hw, pad_side, original_hw)
    be = OP.select(lowres, backend=backend)
    return be.fn(lowres, input_hw, pad_side, original_hw, threshold, return_logits)
