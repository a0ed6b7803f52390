"""D_CLIP images into CLIP views (uint8 (3, r, r)), decoded on the CPU or on a CUDA device.

Two paths, one geometry (``fastsamclip.transforms``: the shortest side resized to r, bicubic and
antialiased, the centre r x r crop):

- ``"cpu"`` (:func:`decode_view`): PIL, with JPEG draft mode. When the view is at least twice
  smaller than the image, libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (the
  largest scale that keeps the shortest side >= r) and the resize maps the drafted image's
  extent back onto the original frame (PIL ``resize(box=...)``), so the crop is exactly the
  full decode's and only the pixel values move: on 683 x 512 photographs at 224 px, 0.87 levels
  mean absolute difference from the full decode (a few pixels of fine texture move by up to
  ~40 levels), for 2x the rate (183 against 90 img/s on one loaded core of this project's CPU).
  Where no draft applies (the image's short side under 2r, or not a JPEG) the view is exactly
  ``transforms.clip_pixels`` of the fully decoded image.
- ``"cuda"`` (:func:`decode_views_on`): torchvision's batched ``decode_jpeg(device="cuda")``
  (nvJPEG; JPEG only, anything else goes through the CPU path) and
  ``transforms.clip_pixels_tensor`` on the device: full decode, no draft. Against the CPU path
  on the same pixels the resize differs by rounding (mean 0.15 levels, a few levels at most);
  against the drafted CPU path by the draft's difference above. The same function runs on CPU
  tensors, which is how it is tested without a GPU; nvJPEG's IDCT against libjpeg's is left to
  be measured on a GPU.

Which path a run takes (:func:`choose_decoder`): ``cpu`` or ``cuda`` as asked; ``auto`` is the
CPU path off CUDA, and on CUDA whichever of the two decoded a sample of the run's own images
faster at start (the CPU rate multiplied by the DataLoader workers that share the work), logged
once. NVIDIA DALI's WebDataset reader is not one of the candidates: it would read the shards
itself, outside the sample identities, the held-out split and the exact resume of
:class:`~fastsamclip.data.sampling.MultiResolutionBatcher`, and its GPU decode is nvJPEG, which
torchvision already drives.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from fastsamclip.data.common import logger
from fastsamclip.errors import ConfigError
from fastsamclip.transforms import DECODE_ERRORS, clip_pixels, clip_pixels_tensor, clip_resize_shape

PATHS = ("cpu", "cuda")  # the two decode paths
DECODERS = ("auto",) + PATHS  # what a run may ask for
JPEG_MAGIC = b"\xff\xd8\xff"

Encoded = Union[bytes, bytearray, memoryview, torch.Tensor, str, os.PathLike]


def _as_bytes(data: Encoded) -> Union[bytes, str]:
    if isinstance(data, torch.Tensor):
        return data.numpy().tobytes()
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    return os.fspath(data) if isinstance(data, os.PathLike) else data


def is_jpeg(data: Encoded) -> bool:
    """Whether encoded bytes (or a uint8 tensor of them) start like a JPEG file."""
    if isinstance(data, torch.Tensor):
        return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC
    return not isinstance(data, (str, os.PathLike)) and bytes(data[:3]) == JPEG_MAGIC


def _drafted(im: Image.Image, resolution: int):
    """Draft a JPEG for ``resolution`` (libjpeg scales by 1/2, 1/4, 1/8 while the shortest side
    stays >= r); the source box in the drafted image's pixels, or None when nothing was drafted."""
    if im.format != "JPEG":
        return None
    size = im.size
    box = im.draft("RGB", (resolution, resolution))
    if box is None or im.size == size:
        return None
    return box[1]


def decode_view(data: Encoded, resolution: int) -> torch.Tensor:
    """The CPU path: encoded bytes (or a file path) -> CLIP view uint8 (3, r, r).

    Raises one of ``transforms.DECODE_ERRORS`` for bytes that are no readable image.
    """
    return decode_views(data, (resolution,))[resolution]


def decode_views(data: Encoded, resolutions: Sequence[int]) -> Dict[int, torch.Tensor]:
    """The CPU path at several sides: {r: uint8 (3, r, r)}, each exactly what :func:`decode_view`
    gives, decoding once per JPEG draft scale (the teacher cache wants every resolution)."""
    src = _as_bytes(data)
    out: Dict[int, torch.Tensor] = {}
    full = None
    for r in sorted(set(int(x) for x in resolutions)):
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            width, height = im.size
            box = _drafted(im, r)
            if box is None:  # full size: one decode serves every side left
                if full is None:
                    im.load()  # a truncated file fails here
                    full = im.convert("RGB")
                out[r] = clip_pixels(full, r).contiguous()
                continue
            im.load()
            small = im.convert("RGB")
        h, w = clip_resize_shape(height, width, r)  # the original's size rule: the same crop as a full decode
        view = TF.center_crop(small.resize((w, h), Image.BICUBIC, box=box), r)
        out[r] = torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1).contiguous()
    # Contiguous (3, r, r): a batch of them stacks ~10x faster than of channel-last views
    # (256 views at 160 px: 19-31 ms against 486-861 ms on this project's CPU).
    return out


def _decode_jpegs(datas: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """torchvision ``decode_jpeg`` of every tensor in one batched call (per image when one fails)."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one broken file fails the batch: find it
        out: List[Optional[torch.Tensor]] = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_views_on(datas: Sequence[Encoded], resolution: int, device: Union[str, torch.device],
                    on_error: Optional[Callable[[int, BaseException], None]] = None
                    ) -> List[Optional[torch.Tensor]]:
    """The device path: encoded images -> CLIP views uint8 (3, r, r) on ``device`` (None for an
    unreadable one, after ``on_error(index, error)``); see :func:`decode_all_views_on`."""
    return [None if v is None else v[resolution] for v in decode_all_views_on(datas, (resolution,), device, on_error)]


def decode_all_views_on(datas: Sequence[Encoded], resolutions: Sequence[int], device: Union[str, torch.device],
                        on_error: Optional[Callable[[int, BaseException], None]] = None
                        ) -> List[Optional[Dict[int, torch.Tensor]]]:
    """The device path at several sides: per image ``{r: uint8 (3, r, r)}`` on ``device``, or None.

    JPEGs decode once, through torchvision's batched ``decode_jpeg`` on ``device``, and are
    resized there (images of one size in one call per side); other formats, and a JPEG the device
    decoder refuses, go through the CPU path (:func:`decode_views`) and are moved to ``device``.
    """
    device = torch.device(device)
    tensors = [d if isinstance(d, torch.Tensor) else torch.frombuffer(bytearray(_as_bytes(d)), dtype=torch.uint8)
               for d in datas]
    jpeg = [i for i, t in enumerate(tensors) if is_jpeg(t)]
    images: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for i, im in zip(jpeg, _decode_jpegs([tensors[i] for i in jpeg], device)):
        images[i] = im
    out: List[Optional[Dict[int, torch.Tensor]]] = [None] * len(tensors)
    by_size: Dict[tuple, List[int]] = {}
    for i, im in enumerate(images):
        if im is not None:
            by_size.setdefault(tuple(im.shape), []).append(i)
    for idx in by_size.values():
        batch = torch.stack([images[i] for i in idx])
        for r in resolutions:
            for i, v in zip(idx, clip_pixels_tensor(batch, r)):
                out[i] = {**(out[i] or {}), r: v}
    for i, v in enumerate(out):
        if v is None:
            try:
                out[i] = {r: x.to(device) for r, x in decode_views(tensors[i], resolutions).items()}
            except DECODE_ERRORS as e:
                if on_error is not None:
                    on_error(i, e)
    return out


def cuda_decode_available() -> bool:
    """Whether torchvision can decode JPEGs on this machine's CUDA device (nvJPEG)."""
    return torch.cuda.is_available() and torch.backends.cuda.is_built()


@dataclass
class DecoderChoice:
    name: str  # "cpu" or "cuda"
    reason: str  # why, with the measured rates when measured
    cpu_rate: Optional[float] = None  # img/s of the CPU path, all workers together
    cuda_rate: Optional[float] = None  # img/s of the device path


def measure_decoders(samples: Sequence[bytes], resolution: int, device: Union[str, torch.device],
                     workers: int, repeats: int = 2) -> DecoderChoice:
    """Time both paths on ``samples`` (the run's own encoded images) at ``resolution``: the CPU
    path on this process (times ``max(1, workers)``, the processes that share it), the device path
    on ``device`` after one warm-up call; the faster one wins. Best of ``repeats`` each."""
    device = torch.device(device)
    tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in samples]

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def cpu() -> None:
        for s in samples:
            try:
                decode_view(s, resolution)
            except DECODE_ERRORS:
                pass

    gpu = lambda: decode_views_on(tensors, resolution, device)  # noqa: E731
    gpu()  # warm-up: nvJPEG's handle and the resize kernels
    n = len(samples)
    cpu_rate = n / best(cpu) * max(1, workers)
    cuda_rate = n / best(gpu)
    name = "cuda" if cuda_rate > cpu_rate else "cpu"
    reason = (f"measured on {n} of the run's images at {resolution} px: {device.type} decode {cuda_rate:.0f} img/s, "
              f"CPU (PIL, JPEG draft) {cpu_rate:.0f} img/s over {max(1, workers)} process(es)")
    return DecoderChoice(name, reason, cpu_rate, cuda_rate)


def choose_decoder(requested: str, device: torch.device, measure: Callable[[], DecoderChoice]) -> DecoderChoice:
    """Which path decodes D_CLIP (see the module docstring); ``measure`` is called only for
    ``auto`` on CUDA. The choice is logged once by the caller's :func:`log_choice`."""
    if requested not in DECODERS:
        raise ConfigError(f"clip_decode {requested!r}: give one of {', '.join(DECODERS)}")
    device = torch.device(device)
    if requested == "cpu":
        return DecoderChoice("cpu", "asked for (--clip-decode cpu)")
    if requested == "cuda":
        if device.type != "cuda" or not cuda_decode_available():
            raise ConfigError(f"--clip-decode cuda: the run's device is {device} and torchvision has no CUDA JPEG "
                              "decoder there; use --clip-decode cpu or auto")
        return DecoderChoice("cuda", "asked for (--clip-decode cuda)")
    if device.type != "cuda" or not cuda_decode_available():
        return DecoderChoice("cpu", f"no CUDA JPEG decoder on the run's device ({device})")
    return measure()


def log_choice(choice: DecoderChoice, device: torch.device, what: str = "D_CLIP") -> None:
    """Say once which path decodes ``what``: at INFO on CUDA, where there is a choice; at DEBUG on
    the CPU, where there is none."""
    logger.log(logging.INFO if torch.device(device).type == "cuda" else logging.DEBUG, "%s images decode on %s (%s)", what, "the GPU (torchvision nvJPEG)" if choice.name == "cuda"
                else "the CPU (PIL, JPEG draft mode)", choice.reason)
