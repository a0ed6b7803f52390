"""Image geometry and pixel conventions: the one home of every image size, resize and statistic.

As ``segment_anything/utils/transforms.py`` is upstream, this module is what the data pipeline,
the training loop, the predictor and the benchmarks import to read an image, resize it, map
prompts into the model's frame and map masks back. Nothing else re-derives an image size.

One pixel convention: images travel as uint8 pixels (0..255), (3, H, W) tensors or (H, W, 3)
arrays; each model normalises its own input with its own statistics (the student through
``SAMCLIP.preprocess``, the CLIP teacher through ``CLIPTeacher.preprocess``, the SAM teacher
with its ``pixel_mean``/``pixel_std``), all through :func:`normalize`.

Geometry (segment_anything's and open_clip's, reproduced exactly):

* SAM: resize the longest side to ``L`` (new side ``int(side * L / long + 0.5)``, PIL bilinear on
  the uint8 image, as ``ResizeLongestSide.apply_image``), pad bottom/right to ``L x L``; the padding
  is zero AFTER normalisation (``Sam.preprocess``), which :func:`normalize` applies through
  ``valid_hw``. Prompts map with :func:`apply_coords` / :func:`apply_boxes`; masks map back with
  :func:`postprocess_masks` (``Sam.postprocess_masks``).
* CLIP: resize the shortest side to ``r`` (bicubic, longest ``int(r * long / short)``), centre crop
  ``r x r`` (torchvision ``Resize`` + ``CenterCrop``, open_clip's eval transform).
* Low-resolution masks: the mask decoder's logits cover the padded input at a quarter of its side;
  :func:`masks_to_lowres` puts ground-truth masks in that frame.

Image reading (:func:`to_rgb_uint8`), applied to every image a user hands in:

- a path is decoded with PIL; a PIL image is converted to an array first (16-bit modes kept 16-bit);
- an EXIF orientation (a phone's portrait JPEG) is applied as ``PIL.ImageOps.exif_transpose`` does,
  so the pixels, their size and every prompt coordinate are those of the picture as viewed;
- (H, W) and (H, W, 1) grayscale are replicated to 3 channels; (H, W, 2) is grayscale + alpha;
- an alpha channel is dropped (not composited), as ``PIL.Image.convert("RGB")`` does;
- uint8 is used as is; uint16 (and PIL's 16-bit modes) is scaled by its full range
  (``round(v / 257)``); other integer types are taken as 8-bit when all values fit in 0..255,
  as 16-bit when they fit in 0..65535, and refused otherwise; floats are taken as 0..1 when
  their maximum is <= 1, else as 0..255, and clipped; bool is 0 / 255.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from fastsamclip.errors import InputError
from fastsamclip.kernels import postprocess_masks as _postprocess_masks_op

# ------------------------------------------------------------------------------------ statistics
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixels, as segment_anything's Sam
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # on 0..1 pixels, OpenAI CLIP / open_clip
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ------------------------------------------------------------------------------------ sizes
SAM_IMAGE_SIZE = 1024  # SAM's input side (ResizeLongestSide target and pad size)
LOWRES_DIVISOR = 4  # the mask decoder's logits have a quarter of the input's side (256 at 1024 px)
MASK_THRESHOLD = 0.0  # SAM's binarisation threshold on mask logits (``Sam.mask_threshold``)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

ImageLike = Union[np.ndarray, torch.Tensor, "os.PathLike", str, Image.Image]


class ImageReadError(InputError):
    """An image file that cannot be opened or decoded."""


# Decoding failures: PIL raises OSError (truncated, unidentified), ValueError / SyntaxError for
# malformed headers and DecompressionBombError for absurd sizes.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------ reading
def decode_rgb(data: Union[bytes, str, os.PathLike]) -> Image.Image:
    """Decode fully (so truncation surfaces here, not later in a worker) and convert to RGB."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im.load()  # raises OSError on a truncated file; PIL's LOAD_TRUNCATED_IMAGES stays False
        return im.convert("RGB")


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = stored upright


def upright(image: Image.Image) -> Image.Image:
    """The image as viewed: its EXIF orientation applied (``ImageOps.exif_transpose``), or the
    image itself when it has none."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _scale_to_uint8(a.astype(np.uint16))
        raise ValueError(f"integer image of dtype {a.dtype} with values {lo}..{hi}: expected 0..255 (8-bit) "
                         "or 0..65535 (16-bit)")
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a.astype(np.float32), nan=0.0)
        scale = 255.0 if (a.size == 0 or float(a.max()) <= 1.0) else 1.0
        return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {a.dtype}")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image -> uint8 (H, W, 3) RGB (the rule is in the module docstring).

    Raises ImageReadError for a file that cannot be decoded, ValueError for an array of an
    unsupported shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here with its name
                image = im.copy()
        except FileNotFoundError as e:
            raise ImageReadError(f"cannot read image {path}: no such file") from e
        except DECODE_ERRORS as e:
            raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if isinstance(image, Image.Image):
        image = upright(image)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
            image = image.convert("RGB")
        a = np.asarray(image)
        if image.mode.startswith("I;16"):
            a = a.astype(np.uint16)
    elif isinstance(image, torch.Tensor):
        a = image.detach().cpu().numpy()
    else:
        a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image (channels last), "
                         f"got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {tuple(a.shape)}")
    a = a[..., :1] if a.shape[2] == 2 else a[..., :3]  # drop alpha
    a = _scale_to_uint8(a)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def to_pil(image) -> Image.Image:
    """A uint8 (H, W, 3) RGB array or tensor, or a PIL image, as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {a.dtype} {a.shape}")
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------ SAM geometry
def get_preprocess_shape(h: int, w: int, long_side: int = SAM_IMAGE_SIZE) -> Tuple[int, int]:
    """(h, w) after resizing the longest side to ``long_side``: ``int(side * scale + 0.5)``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def apply_coords(coords, original_size: Tuple[int, int], long_side: int = SAM_IMAGE_SIZE):
    """(..., 2) (x, y) in original pixels -> the resized frame; numpy or torch, returns float.

    Equals ``ResizeLongestSide(long_side).apply_coords`` / ``apply_coords_torch``.
    """
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    if isinstance(coords, torch.Tensor):
        out = coords.to(torch.float32).clone()  # SAM's torch path uses torch.float
    else:
        out = np.array(coords, dtype=np.float64)  # SAM's numpy path uses float64
    out[..., 0] = out[..., 0] * (new_w / old_w)
    out[..., 1] = out[..., 1] * (new_h / old_h)
    return out


def apply_boxes(boxes, original_size: Tuple[int, int], long_side: int = SAM_IMAGE_SIZE):
    """(..., 4) XYXY boxes in original pixels -> the resized frame (see :func:`apply_coords`)."""
    shape = boxes.shape
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(shape)


def sam_pixels(image, long_side: int = SAM_IMAGE_SIZE) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """SAM's geometry: uint8 (H, W, 3) (numpy, torch or PIL) -> (uint8 (3, L, L), (h, w)).

    The longest side resized to ``L`` with PIL bilinear on uint8 (exactly
    ``ResizeLongestSide.apply_image``), zero-padded bottom/right to L x L; ``(h, w)`` is the
    resized size before padding (SAM's ``input_size``), what :func:`normalize` needs to zero the
    padding after normalising.
    """
    pil = to_pil(image)
    h, w = get_preprocess_shape(pil.height, pil.width, long_side)
    if h < 1 or w < 1:
        raise ValueError(f"image of {pil.width}x{pil.height} (WxH) is too elongated: its short side would "
                         f"resize to 0 pixels at {long_side}")
    resized = torch.from_numpy(np.asarray(pil.resize((w, h), Image.BILINEAR)).copy()).permute(2, 0, 1)
    return F.pad(resized, (0, long_side - w, 0, long_side - h)), (h, w)


# ------------------------------------------------------------------------------------ CLIP geometry
def clip_resize_shape(h: int, w: int, resolution: int) -> Tuple[int, int]:
    """(h, w) of an ``h x w`` image after CLIP's resize: the shortest side to ``r``, the longest to
    ``int(r * long / short)`` (torchvision ``Resize(r)``)."""
    if w <= h:
        return int(resolution * h / w), resolution
    return resolution, int(resolution * w / h)


def clip_pixels(image, resolution: int) -> torch.Tensor:
    """CLIP's geometry: uint8 (H, W, 3) (numpy, torch or PIL) -> uint8 (3, r, r).

    Resize the shortest side to ``r`` (bicubic on the PIL image, :func:`clip_resize_shape`),
    centre crop r x r: open_clip's / OpenAI CLIP's eval transform (torchvision
    ``Resize(r, BICUBIC)``, ``CenterCrop(r)``) before ``ToTensor``.
    """
    pil = TF.center_crop(TF.resize(to_pil(image), resolution, TF.InterpolationMode.BICUBIC), resolution)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def clip_pixels_tensor(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """CLIP's geometry on uint8 (3, H, W) or (B, 3, H, W) tensors, on their own device (a
    GPU-decoded image stays there): the same size rule and centre crop as :func:`clip_pixels`,
    the resize through ``F.interpolate`` (bicubic, antialiased, as PIL's), rounded back to uint8.
    Against :func:`clip_pixels` on the same pixels it differs by rounding and filter taps: mean
    absolute difference ~0.15 levels, a few levels at most (``tests/data/test_decode.py``)."""
    h, w = clip_resize_shape(images.shape[-2], images.shape[-1], resolution)
    x = images
    if (h, w) != tuple(images.shape[-2:]):
        batched = x if x.dim() == 4 else x[None]
        y = F.interpolate(batched.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
        x = y if x.dim() == 4 else y[0]
    return TF.center_crop(x, resolution)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, r, r) float -> (B, C, size, size), bicubic with antialias; identity at ``size``.

    How a fixed-size model (the CLIP teacher, whose position table has one size) sees a view
    taken at another resolution.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


# ------------------------------------------------------------------------------------ normalisation
def normalize(pixels: torch.Tensor, mean: Union[Sequence[float], torch.Tensor],
              std: Union[Sequence[float], torch.Tensor], valid_hw=None, scale: float = 1.0) -> torch.Tensor:
    """``(pixels * scale - mean) / std`` in float32 on the pixels' device, zero outside ``valid_hw``.

    pixels: (3, H, W) or (B, 3, H, W), uint8 or float on 0..255. mean/std: 3 values (or
    broadcastable tensors) in the units of ``pixels * scale`` (SAM's on 0..255 with scale 1;
    CLIP's on 0..1 with scale 1/255). ``valid_hw``: the (h, w) of the image inside a padded
    input, one pair or (B, 2), after which the padding is set to zero, as ``Sam.preprocess``
    pads the normalised image.
    """
    x = pixels.to(torch.float32)
    if scale != 1.0:
        x = x * scale
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(shape)
    x = (x - m) / s
    if valid_hw is None:
        return x
    hw = torch.as_tensor(valid_hw, device=x.device).reshape(-1, 2)
    rows = torch.arange(x.shape[-2], device=x.device)
    cols = torch.arange(x.shape[-1], device=x.device)
    keep = (rows[None, :, None] < hw[:, :1, None]) & (cols[None, None, :] < hw[:, 1:, None])  # (B, H, W)
    return torch.where(keep[:, None] if x.dim() == 4 else keep, x, x.new_zeros(()))


# ------------------------------------------------------------------------------------ masks
def masks_to_lowres(masks, lowres: int, chunk: int = 8) -> torch.Tensor:
    """(M, H, W) bool masks -> (M, lowres, lowres) float32 in {0, 1} on SAM's low-res grid.

    Longest side to ``lowres`` (:func:`get_preprocess_shape` rounding), antialiased bilinear
    on the 0/1 mask, thresholded at 0.5, zero-padded bottom/right: the frame of the mask
    decoder's logits, which cover the padded input at 4 pixels per cell, so the valid region is
    the top-left ``get_preprocess_shape(H, W, lowres)`` block (within one cell of
    ``input_size / 4``), and :func:`postprocess_masks` inverts it. ``chunk`` masks are resized
    at a time to bound the float copy (32 full-size SA-1B masks in float32 would be ~1 GB).
    """
    m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    n, h, w = m.shape
    nh, nw = get_preprocess_shape(h, w, lowres)
    out = torch.zeros(n, lowres, lowres)
    for s in range(0, n, chunk):
        part = m[s:s + chunk].to(torch.float32)[:, None]
        small = F.interpolate(part, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        out[s:s + chunk, :nh, :nw] = (small >= 0.5).float()
    return out


def postprocess_masks(low_res: torch.Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int],
                      img_size: int, threshold: Optional[float] = None):
    """``Sam.postprocess_masks``: (P, K, 4gh, 4gw) low-res logits -> (P, K, H, W) float32 logits.

    Upscale to the padded input (img_size x img_size), crop the padding away (``input_size``, the
    resized image before padding), resize to the original (H, W); bilinear, align_corners=False.
    With ``threshold`` the result is the bool masks ``logits > threshold`` instead. Runs the fused
    CUDA kernel on GPU tensors when it is built (one launch, no padded intermediate), plain torch
    otherwise (``fastsamclip.kernels.postprocess_masks``).
    """
    logits, masks = _postprocess_masks_op(low_res, tuple(input_size), img_size, tuple(original_size),
                                          MASK_THRESHOLD if threshold is None else threshold,
                                          return_logits=threshold is None)
    return logits if threshold is None else masks
