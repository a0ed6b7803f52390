"""Data pipeline for SAM-CLIP distillation: readers, prompts, preprocessing, samplers, writers.

Two streams feed stage-2 training (DESIGN.md section 2):

* D_CLIP: images only (captions are not needed). Read from img2dataset WebDataset shards
  (:class:`ClipWebDataset`) or a plain image folder (:class:`ClipImageFolder`), preprocessed
  with CLIP's convention at a per-batch resolution drawn from a 224/448 mix
  (:class:`MultiResolutionBatchSampler` for map-style data, :class:`MultiResolutionBatcher` for
  streams).
* D_SAM: SA-1B images with COCO-RLE masks (:class:`SA1BDataset`); up to 32 masks per image are
  turned into box / point prompts (:func:`sample_prompts`), the image is preprocessed with SAM's
  convention (:func:`preprocess_sam_image`) and the masks are resized to the decoder's 256x256
  low-resolution grid (:func:`masks_to_lowres`).

Conventions (all written down here because the paper is silent on them):

* Coordinates are (x, y) in pixels; a point is the integer index of a pixel (SAM's prompt
  encoder adds 0.5 itself to reach the pixel centre). Boxes are XYXY with the max corner the
  index of the last mask pixel (inclusive), as in ``segment_anything.utils.amg.batched_mask_to_box``.
  Prompts are sampled in ORIGINAL image coordinates and mapped to the model's 1024 frame with
  :func:`apply_coords` / :func:`apply_boxes`, which reproduce SAM's ``ResizeLongestSide``
  (new side = ``int(side * scale + 0.5)``, coordinates scaled by new/old per axis).
* Low-resolution ground-truth masks: resize the longest side to 256 (same rounding rule,
  antialiased bilinear on the 0/1 mask, threshold 0.5) and pad bottom/right with zeros to
  256x256. This is the grid of SAM's decoder logits, which cover the padded 1024x1024 input at
  4 pixels per cell, so the valid region is the top-left ``get_preprocess_shape(H, W, 256)``
  block (within one cell of ``input_size / 4``), and ``postprocess_masks`` inverts it.
* Unreadable data are never fatal: every reader keeps ``skipped`` (a :class:`SkipCounter`, one
  count per reason) and logs ONE warning per reason, with the running count; the rest are
  counted silently. With DataLoader workers each worker process holds its own copy of the
  counter. A data path with no readable sample at all fails at construction (``validate``).
* Randomness is seeded per item from (seed, epoch, index) or (seed, epoch, batch index), so a
  result never depends on which worker produced it, and a resumed run reproduces the batches of
  an uninterrupted one.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

# The normalisation constants live with the teachers they belong to (SAM's in 0..255 units,
# OpenAI CLIP's in 0..1 units); re-exported here as the preprocessing defaults.
from fastsamclip.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SAM_PIXEL_MEAN, SAM_PIXEL_STD

logger = logging.getLogger(__name__)

SAM_IMAGE_SIZE = 1024  # SAM's input side (ResizeLongestSide target and pad size)
SAM_LOWRES_SIZE = 256  # side of the mask decoder's low-resolution logits
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Member suffixes img2dataset may use for the image, in order of preference.
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


# ---------------------------------------------------------------------------------------------
# Skip accounting
# ---------------------------------------------------------------------------------------------


class SkipCounter(Counter):
    """Counts skipped samples per reason; logs one warning per reason, the first time.

    ``counter["decode_error"]`` is the number skipped for that reason so far. Later skips of a
    reason already reported are counted silently (a corrupt shard must not flood the log);
    :meth:`log_summary` reports the totals, e.g. at the end of an epoch.
    """

    def __init__(self, source: str = "", quiet: bool = False):
        super().__init__()
        self.source = source  # the data path, named in the warnings
        self.quiet = quiet  # count without logging (start-up probes report through their error)

    def record(self, reason: str, item: str, detail: str = "") -> None:
        self[reason] += 1
        if self[reason] == 1 and not self.quiet:
            logger.warning(
                "%s: skipped %s (%s%s); running count: %d for this reason, %d in total. "
                "Further '%s' skips are counted in .skipped without a warning.",
                self.source, item, reason, f": {detail}" if detail else "", self[reason],
                sum(self.values()), reason)

    def log_summary(self) -> None:
        if self:
            logger.warning("%s: skipped samples so far: %s", self.source, dict(self))

    def __reduce__(self):  # keep `source` when pickled into DataLoader workers
        return (self.__class__, (self.source, self.quiet), None, None, iter(self.items()))


def _decode_rgb(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode fully (so truncation surfaces here, not later in a worker) and convert to RGB."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im.load()  # raises OSError on a truncated file; PIL's LOAD_TRUNCATED_IMAGES stays False
        return im.convert("RGB")


# Decoding failures counted as "decode_error": PIL raises OSError (truncated, unidentified),
# ValueError / SyntaxError for malformed headers and DecompressionBombError for absurd sizes.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------
# D_CLIP readers
# ---------------------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) outside one."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") or url.startswith("file://")


def expand_shard_spec(spec: str | Sequence[str]) -> list[str]:
    """Expand a brace shard spec (``/data/cc3m/{00000..00099}.tar``) into existing shard paths.

    Uses webdataset's expansion (``::`` separates several specs, braces via braceexpand); a
    list of specs is expanded element by element. Local paths that do not exist are dropped
    with one warning; remote URLs (``s3://``, ``pipe:``) cannot be checked and are kept.
    Raises ``FileNotFoundError`` naming the spec if nothing is left.
    """
    from webdataset.shardlists import expand_urls  # optional dependency (extra "train")

    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in expand_urls(s)]
    kept = [u for u in urls if not _is_local(u) or os.path.isfile(u.removeprefix("file://"))]
    if not kept:
        raise FileNotFoundError(
            f"shard spec {spec!r} expands to {len(urls)} path(s) (first: {urls[:1]}) and none of "
            "them exists; check the directory and the brace range, e.g. "
            "'/data/cc3m/{00000..00099}.tar'")
    if len(kept) < len(urls):
        missing = [u for u in urls if u not in set(kept)]
        logger.warning("shard spec %r: %d of %d shards do not exist and are left out (first: %s)",
                       spec, len(missing), len(urls), missing[0])
    return kept


class ClipImageFolder(Dataset):
    """A folder of images, searched recursively; yields ``(key, PIL RGB image)``.

    ``key`` is the path relative to ``root`` without extension. ``dataset[i]`` returns ``None``
    for an unreadable file (counted in ``skipped``); :func:`collate_clip` drops those.
    ``dataset[(i, r)]`` returns ``(key, image, r)``: the form :class:`MultiResolutionBatchSampler`
    asks for, so the collate knows the batch's resolution; an unreadable file then gives
    ``(key, None, r)``, so that even a batch of only unreadable files still names its resolution.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 validate: bool = True, probe_samples: int = 8):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a folder")
        exts = tuple(e.lower() for e in extensions)
        self.files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(self.root, followlinks=True) for f in fs
            if f.lower().endswith(exts))
        if not self.files:
            raise FileNotFoundError(
                f"image folder {self.root!r} holds no file with an image extension {exts} "
                "(searched recursively)")
        self.skipped = SkipCounter(self.root)
        if validate:
            self.validate(probe_samples)

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return os.path.splitext(os.path.relpath(self.files[index], self.root))[0]

    def load(self, index: int, skipped: SkipCounter | None = None) -> Image.Image | None:
        skipped = self.skipped if skipped is None else skipped
        path = self.files[index]
        try:
            return _decode_rgb(path)
        except _DECODE_ERRORS as e:
            skipped.record("decode_error", path, repr(e))
            return None

    def __getitem__(self, index):
        res = None
        if isinstance(index, tuple):
            index, res = index
        image = self.load(index)
        if res is not None:
            return self.key(index), image, res
        return None if image is None else (self.key(index), image)

    def validate(self, probe_samples: int = 8) -> int:
        """Decode the first ``probe_samples`` files; raise if none is readable. Returns the count read."""
        probe = SkipCounter(self.root + " (probe)", quiet=True)
        ok = sum(self.load(i, probe) is not None for i in range(min(probe_samples, len(self))))
        if ok == 0:
            raise RuntimeError(
                f"image folder {self.root!r}: none of the first {min(probe_samples, len(self))} "
                f"images could be decoded ({dict(probe)}); the files are corrupt or not images")
        return ok


class ClipWebDataset(IterableDataset):
    """img2dataset WebDataset shards (``{key}.jpg`` + ``.txt`` / ``.json``); yields ``(key, image)``.

    Shards are split across DDP ranks (shard ``i`` of the epoch's order goes to rank
    ``i % world_size``) and then across DataLoader workers the same way, so every process reads
    a disjoint set. With ``shuffle_shards`` the shard order is permuted per epoch with
    ``seed`` (identical on every rank before the split); ``shuffle_buffer > 0`` shuffles
    records within a buffer of that many raw (undecoded) samples, also seeded.

    :meth:`records` is the resumable form used by :class:`MultiResolutionBatcher`: it yields
    ``(key, image_or_None)`` for every record, ``None`` marking an unreadable one, and
    ``records(start=n)`` skips the first ``n`` records without decoding them.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_shards: bool = True, shuffle_buffer: int = 0,
                 validate: bool = True, probe_samples: int = 8):
        self.spec = shards if isinstance(shards, str) else ",".join(shards)
        self.shards = expand_shard_spec(shards)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if len(self.shards) < world_size:
            raise ValueError(
                f"shard spec {self.spec!r} has {len(self.shards)} shard(s) for {world_size} ranks; "
                "every rank needs at least one shard (write smaller shards or use fewer ranks)")
        self.rank, self.world_size = rank, world_size
        self.seed = seed  # seeds the per-epoch shard order and the shuffle buffer
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.skipped = SkipCounter(self.spec)
        if validate:
            self.validate(probe_samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for_process(self, worker: tuple[int, int] | None = None) -> list[str]:
        """This epoch's shards for this rank and DataLoader worker.

        ``worker``: (worker id, number of workers) whose share to give; default: the DataLoader
        worker running this code ((0, 1) outside one).
        """
        order = list(self.shards)
        if self.shuffle_shards:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        mine = order[self.rank::self.world_size]
        worker, num_workers = _worker() if worker is None else worker
        return mine[worker::num_workers]

    def _raw_samples(self, shards: list[str], skipped: SkipCounter) -> Iterator[dict]:
        from webdataset import tarfile_samples

        def handler(exn: Exception) -> bool:  # a broken tar stream: count it, go to the next shard
            skipped.record("tar_error", str(exn.args[-1]) if exn.args else "?", repr(exn)[:200])
            return True

        yield from tarfile_samples([dict(url=u) for u in shards], handler=handler)

    def _shuffled(self, samples: Iterator[dict], worker: int, pass_index: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        # Per rank, worker and pass: each process shuffles its own stream, reproducibly.
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, pass_index, 1])
        buf: list[dict] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        order = rng.permutation(len(buf))
        for j in order:
            yield buf[j]

    def _decode(self, sample: dict, skipped: SkipCounter) -> Image.Image | None:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        suffix = next((s for s in WDS_IMAGE_SUFFIXES if s in sample), None)
        if suffix is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            skipped.record("missing_image", where, f"members: {members}")
            return None
        try:
            return _decode_rgb(sample[suffix])
        except _DECODE_ERRORS as e:
            skipped.record("decode_error", where, repr(e))
            return None

    def records(self, start: int = 0, skipped: SkipCounter | None = None, repeat: bool = False,
                worker: tuple[int, int] | None = None) -> Iterator[tuple[str, Image.Image | None]]:
        """Every record of this process's stream for the epoch, from record ``start`` on.

        ``repeat``: after the last record start another pass over the same shards (shuffle
        buffer reseeded per pass), endlessly; ``start`` then counts across passes. A process
        whose shards hold no record at all ends after one pass even so. ``worker``: as in
        :meth:`shards_for_process`.
        """
        skipped = self.skipped if skipped is None else skipped
        worker = _worker() if worker is None else worker
        shards, i = self.shards_for_process(worker), 0
        for pass_index in itertools.count():
            in_pass = 0
            for sample in self._shuffled(self._raw_samples(shards, skipped), worker[0], pass_index):
                in_pass += 1
                i += 1
                if i <= start:  # resume: skip without decoding
                    continue
                yield sample.get("__key__", "?"), self._decode(sample, skipped)
            if not repeat or in_pass == 0:
                return

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        for key, image in self.records():
            if image is not None:
                yield key, image

    def validate(self, probe_samples: int = 8) -> int:
        """Read the first ``probe_samples`` records of the first shard(s); raise if none decodes."""
        probe = SkipCounter(self.spec + " (probe)", quiet=True)
        ok = seen = 0
        samples = self._raw_samples(self.shards, probe)
        for sample in samples:
            seen += 1
            ok += self._decode(sample, probe) is not None
            if seen >= probe_samples:
                break
        if ok == 0:
            raise RuntimeError(
                f"shard spec {self.spec!r}: none of the first {seen} samples could be read "
                f"({dict(probe) or 'no samples at all'}); check that the shards are img2dataset "
                "WebDataset tars with .jpg/.png/.webp members")
        return ok


# ---------------------------------------------------------------------------------------------
# COCO RLE
# ---------------------------------------------------------------------------------------------


def rle_run_lengths(counts: str | bytes) -> np.ndarray:
    """Parse COCO's compressed RLE string into run lengths, validating it.

    Mirrors pycocotools' ``rleFrString`` (6-bit little-endian groups from chr 48, bit 0x20 =
    more, 0x10 = sign, runs from the third on delta-coded against the run two before).
    ``pycocotools.mask.decode`` does not validate: an empty or short string decodes to
    uninitialised memory. Raises ``ValueError`` on a malformed string.
    """
    s = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else bytes(counts),
                      np.uint8).astype(np.int64) - 48
    if s.size == 0:
        raise ValueError("empty RLE counts")
    if s.min() < 0 or s.max() > 63:
        raise ValueError("RLE counts hold characters outside COCO's '0'..'o' alphabet")
    more = (s & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts end inside a number (truncated string)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(len(ends)), ends - starts + 1)
    k = np.arange(s.size) - starts[group]  # position of each char within its number
    if k.max() > 11:
        raise ValueError("RLE counts hold a number too long to be a run length")
    vals = np.zeros(len(ends), np.int64)
    np.add.at(vals, group, (s & 0x1F) << (5 * k))
    neg = (s[ends] & 0x10) != 0
    vals[neg] |= -1 << (5 * (k[ends[neg]] + 1))
    # Delta decoding: x[m] += x[m - 2] for m > 2, i.e. running sums over indices 1,3,5,...
    # and 2,4,6,... (index 0 stands alone).
    vals[1::2] = np.cumsum(vals[1::2])
    vals[2::2] = np.cumsum(vals[2::2])
    return vals


def decode_rle(segmentation: dict, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one COCO RLE (``{"size": [h, w], "counts": str}``) to a (h, w) bool mask.

    Validates first (see :func:`rle_run_lengths`); ``shape`` (the image's (h, w)), when given,
    must equal ``size``. Raises ``ValueError`` on any inconsistency.
    """
    from pycocotools import mask as mask_utils  # optional dependency (extra "train")

    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ValueError("segmentation is not a COCO RLE dict with 'size' and 'counts'")
    h, w = (int(v) for v in segmentation["size"])
    if shape is not None and (h, w) != tuple(shape):
        raise ValueError(f"RLE size {(h, w)} differs from the image size {tuple(shape)}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO stores crowd regions
        runs = np.asarray(counts, np.int64)
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(counts, (str, bytes)):
        runs = rle_run_lengths(counts)
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"RLE counts of type {type(counts).__name__}")
    if runs.min(initial=0) < 0 or runs.sum() != h * w:
        raise ValueError(f"RLE runs sum to {runs.sum()} (negative run: {runs.min(initial=0) < 0}), "
                         f"not h*w = {h * w}")
    return mask_utils.decode(rle).astype(bool)


def encode_rle(mask: np.ndarray) -> dict:
    """(h, w) bool mask -> COCO RLE dict with ``counts`` as str, as SA-1B's json stores it."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------
# Prompts from masks
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptConfig:
    masks_per_image: int = 32  # masks drawn per image (SAM-CLIP: 32; all of them if fewer)
    use_boxes: bool = True  # emit one box prompt per mask
    points_per_mask: int = 1  # foreground points per mask, uniform over mask pixels (0: none)
    box_jitter: float = 0.1  # each box coordinate moves by U(-j, j) x box side (SAM's training noise)
    box_jitter_max_px: float = 20.0  # cap on that move in pixels (SAM: "up to a maximum of 20 pixels")


@dataclass
class Prompts:
    """Prompts for M masks of one image, in ORIGINAL image pixel coordinates."""

    indices: np.ndarray  # (M,) int64: which of the given masks were drawn, in draw order
    boxes: np.ndarray | None  # (M, 4) float32 XYXY, max corner inclusive; None if use_boxes=False
    points: np.ndarray | None  # (M, P, 2) float32 (x, y) pixel indices; None if P == 0
    point_labels: np.ndarray | None  # (M, P) int64, 1 = foreground


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool -> (M, 4) float32 tight XYXY boxes, max corner inclusive; empty mask -> 0s.

    Same convention as ``segment_anything.utils.amg.batched_mask_to_box``.
    """
    m = np.asarray(masks, bool)
    rows, cols = m.any(axis=2), m.any(axis=1)  # (M, H), (M, W)
    h, w = m.shape[1:]
    y0 = rows.argmax(1)
    y1 = h - 1 - rows[:, ::-1].argmax(1)
    x0 = cols.argmax(1)
    x1 = w - 1 - cols[:, ::-1].argmax(1)
    boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
    boxes[~rows.any(1)] = 0
    return boxes


def select_masks(num_masks: int, masks_per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of up to ``masks_per_image`` masks drawn without replacement (all if fewer)."""
    if num_masks <= masks_per_image:
        return np.arange(num_masks)
    return np.sort(rng.choice(num_masks, masks_per_image, replace=False))


def sample_prompts(masks: np.ndarray, config: PromptConfig, rng: np.random.Generator) -> Prompts:
    """Draw masks and prompts for one image.

    ``masks``: (N, H, W) bool, non-empty. Draws up to ``config.masks_per_image`` of them
    (:func:`select_masks`), then per drawn mask a box (tight box, each side jittered by up to
    ``box_jitter`` of the box's width/height and ``box_jitter_max_px`` pixels, clamped to the
    image) and ``points_per_mask`` points chosen uniformly among the mask's pixels.
    Reproducible: same ``rng`` state, same prompts.
    """
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    idx = select_masks(n, config.masks_per_image, rng)
    chosen = masks[idx]
    boxes = points = labels = None
    if config.use_boxes:
        boxes = masks_to_boxes(chosen)
        if config.box_jitter > 0:
            side = np.stack([boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1], 1)
            side = np.tile(side, 2)  # (M, 4): width for x0/x1, height for y0/y1
            move = np.minimum(side * config.box_jitter, config.box_jitter_max_px)
            boxes = boxes + rng.uniform(-1.0, 1.0, boxes.shape) * move
            boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w - 1)
            boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h - 1)
            # Opposite corners may cross on thin masks: keep XYXY ordered.
            boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                                    np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
        boxes = boxes.astype(np.float32)
    p = config.points_per_mask
    if p > 0:
        points = np.zeros((len(idx), p, 2), np.float32)
        for j, m in enumerate(chosen):
            flat = np.flatnonzero(m)
            if flat.size == 0:
                raise ValueError(f"mask {int(idx[j])} is empty: no pixel to put a point on")
            pick = flat[rng.integers(flat.size, size=p)]
            points[j, :, 0], points[j, :, 1] = pick % w, pick // w
        labels = np.ones((len(idx), p), np.int64)
    return Prompts(indices=idx.astype(np.int64), boxes=boxes, points=points, point_labels=labels)


# ---------------------------------------------------------------------------------------------
# Coordinate mapping (SAM's ResizeLongestSide)
# ---------------------------------------------------------------------------------------------


def get_preprocess_shape(h: int, w: int, long_side: int = SAM_IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the longest side to ``long_side``: ``int(side * scale + 0.5)``."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def apply_coords(coords, original_size: tuple[int, int], long_side: int = SAM_IMAGE_SIZE):
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


def apply_boxes(boxes, original_size: tuple[int, int], long_side: int = SAM_IMAGE_SIZE):
    """(..., 4) XYXY boxes in original pixels -> the resized frame (see :func:`apply_coords`)."""
    shape = boxes.shape
    return apply_coords(boxes.reshape(-1, 2, 2), original_size, long_side).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Image preprocessing
# ---------------------------------------------------------------------------------------------


def _to_uint8_hwc(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return image


def _to_pil(image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(_to_uint8_hwc(image))


def preprocess_sam_image(image, long_side: int = SAM_IMAGE_SIZE,
                         pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
                         pixel_std: Sequence[float] = SAM_PIXEL_STD
                         ) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's input convention: uint8 (H, W, 3) (numpy, torch or PIL) -> ((3, L, L) float32, (h, w)).

    Resize the longest side to ``L`` with PIL bilinear on uint8 (exactly
    ``ResizeLongestSide.apply_image``), normalise with SAM's mean/std (0..255 units), pad
    bottom/right with zeros to L x L (``Sam.preprocess``). ``(h, w)`` is the resized size
    before padding (SAM's ``input_size``).
    """
    pil = _to_pil(image)
    h, w = get_preprocess_shape(pil.height, pil.width, long_side)
    resized = np.asarray(pil.resize((w, h), Image.BILINEAR))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float()
    x = (x - torch.tensor(pixel_mean).view(3, 1, 1)) / torch.tensor(pixel_std).view(3, 1, 1)
    return F.pad(x, (0, long_side - w, 0, long_side - h)), (h, w)


def preprocess_clip_image(image, resolution: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                          std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's convention: uint8 (H, W, 3) (numpy, torch or PIL) -> (3, r, r) float32.

    Resize the shortest side to ``r`` (bicubic on the PIL image, longest side
    ``int(r * long / short)``), centre crop r x r, scale to 0..1, normalise. Identical to
    open_clip's / OpenAI CLIP's eval transform (torchvision ``Resize(r, BICUBIC)``,
    ``CenterCrop(r)``, ``ToTensor``, ``Normalize``), so the student sees what the teacher sees.
    """
    import torchvision.transforms.functional as TF

    pil = TF.center_crop(TF.resize(_to_pil(image), resolution, TF.InterpolationMode.BICUBIC),
                         resolution)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255.0)
    return TF.normalize(x, list(mean), list(std))


def masks_to_lowres(masks, lowres: int = SAM_LOWRES_SIZE, chunk: int = 8) -> torch.Tensor:
    """(M, H, W) bool masks -> (M, lowres, lowres) float32 in {0, 1} on SAM's low-res grid.

    Longest side to ``lowres`` (:func:`get_preprocess_shape` rounding), antialiased bilinear
    on the 0/1 mask, thresholded at 0.5, zero-padded bottom/right: the frame of the mask
    decoder's 256x256 logits (see the module docstring). ``chunk`` masks are resized at a time
    to bound the float copy (32 full-size SA-1B masks in float32 would be ~1 GB).
    """
    m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    n, h, w = m.shape
    nh, nw = get_preprocess_shape(h, w, lowres)
    out = torch.zeros(n, lowres, lowres)
    for s in range(0, n, chunk):
        part = m[s:s + chunk].to(torch.float32)[:, None]
        small = F.interpolate(part, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=True)[:, 0]
        out[s:s + chunk, :nh, :nw] = (small >= 0.5).float()
    return out


# ---------------------------------------------------------------------------------------------
# D_SAM reader
# ---------------------------------------------------------------------------------------------


@dataclass
class SamRawSample:
    """One SA-1B image with its drawn masks and prompts, in ORIGINAL coordinates."""

    key: str  # file stem, e.g. "sa_1"
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (M, H, W) bool, the drawn masks (M <= masks_per_image)
    annotation_ids: list[int]  # SA-1B annotation ids of the drawn masks
    prompts: Prompts  # prompts for `masks` (prompts.indices index into `masks`)


class SA1BDataset(Dataset):
    """SA-1B layout: a folder of ``sa_N.jpg`` + ``sa_N.json``; item = a dict of model inputs.

    ``dataset[i]`` -> dict (or ``None`` when the sample is skipped, counted in ``skipped``):

    * ``key``: str; ``image``: (3, 1024, 1024) float32 (:func:`preprocess_sam_image`)
    * ``original_size``: (H, W); ``input_size``: (h, w) after the longest-side resize
    * ``boxes``: (M, 4) float32 XYXY in the 1024 frame, or None
    * ``points``: (M, P, 2) float32 in the 1024 frame, ``point_labels``: (M, P) int64, or None
    * ``gt_masks``: (M, 256, 256) float32 {0, 1} (:func:`masks_to_lowres`)

    Up to ``masks_per_image`` annotations are drawn per image with a generator seeded by
    (seed, epoch, index); only those are decoded. Skip reasons: ``bad_json``, ``no_masks``
    (no annotation, or none decodable), ``decode_error`` / ``missing_image`` (the jpg);
    per-annotation ``bad_rle`` (malformed RLE, or size differing from the image) drops that
    mask only. :meth:`load_raw` gives the same draw in original coordinates.
    """

    def __init__(self, root: str | os.PathLike, prompt_config: PromptConfig | None = None,
                 seed: int = 0, long_side: int = SAM_IMAGE_SIZE, lowres: int = SAM_LOWRES_SIZE,
                 validate: bool = True, probe_samples: int = 16):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"SA-1B folder {self.root!r} does not exist or is not a folder")
        self.stems = sorted(
            (f[:-5] for f in os.listdir(self.root) if f.startswith("sa_") and f.endswith(".json")),
            key=lambda s: (len(s), s))  # sa_2 before sa_10
        if not self.stems:
            raise FileNotFoundError(f"SA-1B folder {self.root!r} holds no sa_*.json annotation file")
        self.config = prompt_config or PromptConfig()
        self.seed = seed  # with epoch and index, seeds the per-image mask and prompt draw
        self.long_side, self.lowres = long_side, lowres
        self.epoch = 0
        self.skipped = SkipCounter(self.root)
        if validate:
            self.validate(probe_samples)

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def load_raw(self, index: int, skipped: SkipCounter | None = None) -> SamRawSample | None:
        skipped = self.skipped if skipped is None else skipped
        stem = self.stems[index]
        jpath = os.path.join(self.root, stem + ".json")
        try:
            with open(jpath, "rb") as f:
                meta = json.load(f)
            anns = meta.get("annotations") or []
            if not isinstance(anns, list):
                raise ValueError("'annotations' is not a list")
        except (OSError, ValueError, AttributeError) as e:
            skipped.record("bad_json", jpath, repr(e)[:200])
            return None
        if not anns:
            skipped.record("no_masks", jpath, "no annotations")
            return None
        info = meta.get("image") if isinstance(meta.get("image"), dict) else {}
        ipath = os.path.join(self.root, info.get("file_name") or stem + ".jpg")
        if not os.path.isfile(ipath):
            skipped.record("missing_image", ipath, "no image file next to the json")
            return None
        try:
            image = np.asarray(_decode_rgb(ipath))
        except _DECODE_ERRORS as e:
            skipped.record("decode_error", ipath, repr(e))
            return None
        shape = image.shape[:2]
        rng = self.rng(index)
        # Walk the annotations in a random order and keep the first masks_per_image that decode,
        # so a bad RLE costs one mask, not the image, and only drawn masks are decoded.
        masks, ids = [], []
        for j in rng.permutation(len(anns)):
            if len(masks) == self.config.masks_per_image:
                break
            ann = anns[j]
            try:
                m = decode_rle(ann["segmentation"], shape)
            except (KeyError, TypeError, ValueError) as e:
                ann_id = ann.get("id", j) if isinstance(ann, dict) else j
                skipped.record("bad_rle", f"{jpath} annotation {ann_id}", repr(e)[:200])
                continue
            if m.any():  # an empty mask has no box and no point to prompt with
                masks.append(m)
                ids.append(int(ann.get("id", j)))
        if not masks:
            skipped.record("no_masks", jpath, f"none of {len(anns)} annotations decodes to a mask")
            return None
        stack = np.stack(masks)
        return SamRawSample(key=stem, image=image, masks=stack, annotation_ids=ids,
                            prompts=sample_prompts(stack, self.config, rng))

    def __getitem__(self, index: int) -> dict | None:
        raw = self.load_raw(index)
        if raw is None:
            return None
        image, input_size = preprocess_sam_image(raw.image, self.long_side)
        size = raw.image.shape[:2]
        p = raw.prompts
        to_t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return {
            "key": raw.key,
            "image": image,
            "original_size": (int(size[0]), int(size[1])),
            "input_size": input_size,
            "boxes": None if p.boxes is None else apply_boxes(to_t(p.boxes), size, self.long_side),
            "points": None if p.points is None else apply_coords(to_t(p.points), size, self.long_side),
            "point_labels": to_t(p.point_labels),
            "gt_masks": masks_to_lowres(raw.masks[p.indices], self.lowres),
        }

    def validate(self, probe_samples: int = 16) -> int:
        """Load up to ``probe_samples`` images until one has masks; raise naming the folder if none."""
        probe = SkipCounter(self.root + " (probe)", quiet=True)
        n = min(probe_samples, len(self))
        for i in range(n):
            if self.load_raw(i, probe) is not None:
                return i + 1
        raise RuntimeError(
            f"SA-1B folder {self.root!r}: none of the first {n} samples has a readable image with "
            f"at least one decodable mask ({dict(probe)}); check the sa_N.json files' "
            "'annotations[*].segmentation' (COCO RLE) and the sa_N.jpg files")


# ---------------------------------------------------------------------------------------------
# Multi-resolution batching for the CLIP stream
# ---------------------------------------------------------------------------------------------


@dataclass
class MultiResolutionConfig:
    resolutions: tuple[int, ...] = (224, 448)  # CLIP-stream input sides drawn per batch
    base_batch: int = 256  # per-rank batch size at base_res
    base_res: int = 224  # resolution at which the batch is base_batch
    weights: tuple[float, ...] | None = None  # probability of each resolution (None: uniform)
    seed: int = 0  # with the epoch (and batch index), seeds shuffling and resolution draws
    drop_last: bool = True  # drop an epoch's last incomplete batch (keeps DDP ranks in step)

    def batch_size(self, resolution: int) -> int:
        """``floor(base_batch * (base_res / r)^2)``, at least 1: about constant pixels per batch."""
        return max(1, int(self.base_batch * (self.base_res / resolution) ** 2))

    def probabilities(self) -> np.ndarray:
        p = np.ones(len(self.resolutions)) if self.weights is None else np.asarray(self.weights, float)
        if len(p) != len(self.resolutions) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"weights {self.weights} do not fit resolutions {self.resolutions}")
        return p / p.sum()

    def draw_resolution(self, epoch: int, batch_index: int) -> int:
        """The resolution of batch ``batch_index`` of ``epoch``: same on every rank and worker."""
        rng = np.random.default_rng([self.seed, epoch, batch_index, 2])
        return int(self.resolutions[rng.choice(len(self.resolutions), p=self.probabilities())])


class MultiResolutionBatchSampler(torch.utils.data.Sampler):
    """Variable-size batches of ``(index, resolution)`` for a map-style dataset, DDP-sharded.

    Per epoch: the indices are permuted with a generator seeded by (seed, epoch); batch k
    draws its resolution r (:meth:`MultiResolutionConfig.draw_resolution`, the same on every
    rank) and takes the next ``world_size * batch_size(r)`` indices of the permutation, rank
    ``rank`` keeping the ``rank``-th slice. All ranks therefore run the same number of steps at
    the same resolution on disjoint samples. The last short batch is dropped (``drop_last``) or
    split evenly across ranks after wrapping around to the permutation's start (so ranks stay
    in step, as ``DistributedSampler`` pads).

    Resume: :meth:`state_dict` gives (epoch, batch index); after :meth:`load_state_dict` the
    next iteration yields exactly the remaining batches of that epoch. Under a DataLoader the
    sampler runs ahead of the training loop (prefetch), so pass the number of batches the loop
    actually consumed: ``state_dict(batches_done=step_in_epoch)``.
    """

    def __init__(self, num_samples: int, config: MultiResolutionConfig | None = None,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_samples = num_samples
        self.config = config or MultiResolutionConfig()
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self._start = 0  # batch index the next iteration starts at (set by load_state_dict)
        self._position = 0  # batches of the current epoch handed out so far
        self._plan_cache: tuple[int, list[tuple[int, int, int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._position = epoch, 0, 0

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.config.seed, self.epoch]).permutation(self.num_samples)

    def _plan(self) -> list[tuple[int, int, int]]:
        """The epoch's batches as (resolution, start, per-rank size) over the permutation."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        plan, pos, k = [], 0, 0
        while pos < self.num_samples:
            res = self.config.draw_resolution(self.epoch, k)
            bs = self.config.batch_size(res)
            left = self.num_samples - pos
            if left < bs * self.world_size:
                if self.config.drop_last:
                    break
                bs = math.ceil(left / self.world_size)
            plan.append((res, pos, bs))
            pos += bs * self.world_size
            k += 1
        self._plan_cache = (self.epoch, plan)
        return plan

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm, plan = self._permutation(), self._plan()
        start, self._start = self._start, 0
        for k in range(start, len(plan)):
            res, pos, bs = plan[k]
            need = bs * self.world_size
            idx = perm[pos:pos + need]
            if len(idx) < need:  # last batch without drop_last: wrap around
                idx = np.concatenate([idx, np.resize(perm, need - len(idx))])
            self._position = k + 1
            yield [(int(i), res) for i in idx[self.rank * bs:(self.rank + 1) * bs]]

    def state_dict(self, batches_done: int | None = None) -> dict:
        return {"epoch": self.epoch,
                "batch_index": self._position if batches_done is None else batches_done,
                "num_samples": self.num_samples, "world_size": self.world_size,
                "seed": self.config.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = {"num_samples": self.num_samples, "world_size": self.world_size,
                "seed": self.config.seed}
        for name, value in mine.items():
            if state[name] != value:  # the plan depends on all three; another one is another run
                raise ValueError(
                    f"cannot resume exactly: the saved sampler had {name}={state[name]}, this one "
                    f"has {value}; resume with the same dataset, world size and seed, or start a "
                    "fresh epoch")
        self.epoch, self._start, self._position = state["epoch"], state["batch_index"], state["batch_index"]


@dataclass
class ClipBatch:
    """A batch from :class:`MultiResolutionBatcher`."""

    images: torch.Tensor  # (B, 3, r, r) float32, CLIP-normalised; B = 0 when no record was readable
    keys: list[str]  # sample keys, B of them
    resolution: int  # r
    batch_index: int  # global index of this batch in the epoch (r was drawn for it)
    worker: int = 0  # stream that made it: batch indices worker, worker + num_workers, ... (0 in-process)
    num_workers: int = 1  # DataLoader workers sharing this rank's stream (1 in-process)
    records_end: int = 0  # records of that stream read once this batch was taken
    worker_batches: int = 0  # batch indices that stream had used once this batch was taken


class MultiResolutionBatcher(IterableDataset):
    """Groups a :class:`ClipWebDataset` stream into variable-size batches at per-batch resolutions.

    The stream counterpart of :class:`MultiResolutionBatchSampler`, with the same contract:
    deterministic given (seed, epoch), disjoint across DDP ranks (the source splits shards by
    rank), the same resolution for batch k on every rank, and an exact resume.

    Batch k draws r (:meth:`MultiResolutionConfig.draw_resolution`), takes the next
    ``batch_size(r)`` records of its process's stream and collates the readable ones
    (:func:`collate_clip`) into a :class:`ClipBatch`; a batch whose records are all unreadable is
    still yielded, with B = 0 (skip it in the training loop). Under a DataLoader with W workers,
    worker w reads its own shards (:meth:`ClipWebDataset.shards_for_process`) and makes the
    global batches w, w + W, w + 2W, ...; the DataLoader hands them out round-robin, i.e. in
    batch-index order. Without ``batches_per_epoch`` the workers' streams end at different
    points, after which the order of the remaining batches follows the DataLoader's scheduling
    (the batches themselves do not change); give ``batches_per_epoch`` for a fixed order.

    Epoch length: by default a process's stream ending ends its epoch (``drop_last`` drops the
    short final batch). Ranks reading different shards then end at different step counts and
    the last DDP collective waits forever; ``batches_per_epoch=N`` instead gives exactly N
    batches per rank and epoch, a stream that runs out starting another pass over its shards
    (webdataset's ``repeat().with_epoch(N)`` idiom).

    Resume: :meth:`state_dict` holds, per worker, the records read and batch indices used;
    after :meth:`load_state_dict` each stream restarts at that record (skipping without
    decoding), so the remaining batches equal the uninterrupted run's. Iterated in the training
    process the position follows the iteration; with DataLoader workers the main process cannot
    see the workers' copies, so call :meth:`mark_consumed` on every batch the loop finishes, and
    resume with the same number of workers (the shard split depends on it). Workers must not be
    persistent (``persistent_workers=False``), or they keep the state of the epoch they started in.
    """

    def __init__(self, source: ClipWebDataset, config: MultiResolutionConfig | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                 batches_per_epoch: int | None = None):
        if batches_per_epoch is not None and batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be positive or None, got {batches_per_epoch}")
        self.source = source
        self.config = config or MultiResolutionConfig()
        self.mean, self.std = mean, std  # CLIP normalisation (0..1 units) of the student's teacher
        # Exact batches per rank and epoch (None: until the stream ends).
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self._num_workers: int | None = None  # workers of the run the positions belong to (None: no progress)
        self._positions: list[tuple[int, int]] = []  # per worker: (records read, batch indices used)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._num_workers, self._positions = epoch, None, []

    def _check_workers(self, num_workers: int) -> None:
        if self._num_workers is not None and self._num_workers != num_workers:
            raise ValueError(
                f"cannot resume exactly: the saved position is for {self._num_workers} DataLoader "
                f"worker(s), this run uses {num_workers}; each worker reads its own shards, so use "
                f"num_workers={self._num_workers if self._num_workers > 1 else 0}, or start a fresh epoch")

    def _advance(self, worker: int, num_workers: int, records: int, batches: int) -> None:
        self._check_workers(num_workers)
        if self._num_workers is None:
            self._num_workers, self._positions = num_workers, [(0, 0)] * num_workers
        self._positions[worker] = (records, batches)

    def _stream_for(self, physical: int, num_workers: int) -> tuple[int, int, int]:
        """(stream, records read, batches used) that DataLoader worker ``physical`` continues.

        Streams are numbered by the batch indices they make (stream w: w, w + W, ...). A fresh
        epoch maps worker p to stream p. On resume the DataLoader again starts with worker 0,
        so worker p takes the stream with the p-th smallest next batch index: the round-robin
        then continues the uninterrupted run's order.
        """
        self._check_workers(num_workers)
        if self._num_workers is None:
            return physical, 0, 0
        pos = self._positions
        order = sorted(range(num_workers), key=lambda w: pos[w][1] * num_workers + w)
        w = order[physical]
        return w, pos[w][0], pos[w][1]

    def __iter__(self) -> Iterator[ClipBatch]:
        physical, num_workers = _worker()
        w, consumed, local = self._stream_for(physical, num_workers)
        self.source.set_epoch(self.epoch)
        repeat = self.batches_per_epoch is not None
        limit = None if not repeat else len(range(w, self.batches_per_epoch, num_workers))
        if repeat and limit and not self.source.shards_for_process((w, num_workers)):
            raise ValueError(
                f"rank {self.source.rank}, DataLoader worker {w} of {num_workers} has no shard "
                f"of {len(self.source.shards)} to read, so it cannot make its share of the "
                f"{self.batches_per_epoch} batches; use fewer workers or more, smaller shards")
        stream = self.source.records(start=consumed, repeat=repeat, worker=(w, num_workers))
        while limit is None or local < limit:
            k = local * num_workers + w  # global batch index (round-robin over workers)
            res = self.config.draw_resolution(self.epoch, k)
            want = self.config.batch_size(res)
            got = list(itertools.islice(stream, want))
            if not got or (len(got) < want and self.config.drop_last):
                if limit is not None:  # only an empty stream ends a repeating one
                    logger.warning("%s: rank %d worker %d ran out of records after %d of its %d "
                                   "batches; this rank's epoch is short", self.source.spec,
                                   self.source.rank, w, local, limit)
                return
            consumed, local = consumed + len(got), local + 1
            self._advance(w, num_workers, consumed, local)
            # Yielded even when every record was unreadable (B = 0): a DataLoader's round-robin
            # over workers stays in batch-index order only if every index yields once.
            good = [(key, im) for key, im in got if im is not None]
            yield ClipBatch(images=collate_clip(good, res, self.mean, self.std),
                            keys=[key for key, _ in good], resolution=res, batch_index=k,
                            worker=w, num_workers=num_workers, records_end=consumed,
                            worker_batches=local)

    def mark_consumed(self, batch: ClipBatch) -> None:
        """Record that the training loop finished ``batch``: the position :meth:`state_dict` saves.

        Needed with DataLoader workers; harmless (a no-op) when iterating in-process.
        """
        self._advance(batch.worker, batch.num_workers, batch.records_end, batch.worker_batches)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.config.seed,
                "batches_per_epoch": self.batches_per_epoch, "num_workers": self._num_workers,
                "positions": [list(p) for p in self._positions]}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.config.seed, "batches_per_epoch": self.batches_per_epoch}
        for name, value in mine.items():
            if state[name] != value:  # both change which records form which batch
                raise ValueError(
                    f"cannot resume exactly: the saved batcher had {name}={state[name]}, this one "
                    f"has {value}; resume with the same settings, or start a fresh epoch")
        self.epoch, self._num_workers = state["epoch"], state["num_workers"]
        self._positions = [(int(r), int(b)) for r, b in state["positions"]]


# ---------------------------------------------------------------------------------------------
# Collates
# ---------------------------------------------------------------------------------------------


def collate_clip(samples: Sequence, resolution: int | None = None,
                 mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """List of ``(key, image)`` or ``(key, image, r)`` -> (B, 3, r, r) float32.

    A sample that is ``None`` or has image ``None`` was unreadable and is dropped, so B counts
    the readable samples only; it is 0 when a whole batch was unreadable (the training loop
    should skip such a batch). ``resolution`` defaults to the ``r`` carried by the samples (what
    :class:`MultiResolutionBatchSampler` gives :class:`ClipImageFolder`).
    """
    if resolution is None:
        rs = {s[2] for s in samples if s is not None and len(s) > 2}
        if len(rs) != 1:
            raise ValueError(f"collate_clip needs one resolution for the batch; samples carry {rs or 'none'}"
                             " (pass resolution= or index the dataset with (index, resolution))")
        resolution = rs.pop()
    good = [s for s in samples if s is not None and s[1] is not None]
    if not good:
        return torch.zeros(0, 3, resolution, resolution)
    return torch.stack([preprocess_clip_image(s[1], resolution, mean, std) for s in good])


def collate_sam(samples: Sequence[dict | None]) -> dict:
    """List of :class:`SA1BDataset` items (``None`` = skipped) -> a batch dict.

    Images have different mask counts M_i; prompts and masks are padded to M = max M_i:

    * ``image``: (B, 3, 1024, 1024); ``original_size``, ``input_size``: (B, 2) int64
    * ``boxes``: (B, M, 4) or None; ``points``: (B, M, P, 2) or None
    * ``point_labels``: (B, M, P), -1 on padding (SAM's "not a point" label)
    * ``gt_masks``: (B, M, 256, 256); ``mask_valid``: (B, M) bool, False on padding
    * ``keys``: list of B str
    """
    good = [s for s in samples if s is not None]
    if not good:
        raise ValueError("collate_sam got no readable sample; every one in the batch was skipped")
    b = len(good)
    m = max(s["gt_masks"].shape[0] for s in good)
    out = {
        "keys": [s["key"] for s in good],
        "image": torch.stack([s["image"] for s in good]),
        "original_size": torch.tensor([s["original_size"] for s in good], dtype=torch.int64),
        "input_size": torch.tensor([s["input_size"] for s in good], dtype=torch.int64),
        "gt_masks": torch.zeros(b, m, *good[0]["gt_masks"].shape[1:]),
        "mask_valid": torch.zeros(b, m, dtype=torch.bool),
        "boxes": None, "points": None, "point_labels": None,
    }
    if good[0]["boxes"] is not None:
        out["boxes"] = torch.zeros(b, m, 4)
    if good[0]["points"] is not None:
        p = good[0]["points"].shape[1]
        out["points"] = torch.zeros(b, m, p, 2)
        out["point_labels"] = torch.full((b, m, p), -1, dtype=torch.int64)
    for i, s in enumerate(good):
        n = s["gt_masks"].shape[0]
        out["gt_masks"][i, :n] = s["gt_masks"]
        out["mask_valid"][i, :n] = True
        if out["boxes"] is not None:
            out["boxes"][i, :n] = s["boxes"]
        if out["points"] is not None:
            out["points"][i, :n] = s["points"]
            out["point_labels"][i, :n] = s["point_labels"]
    return out


# ---------------------------------------------------------------------------------------------
# Writers of real-format test data
# ---------------------------------------------------------------------------------------------

# skimage.data pictures that ship inside the package (no download needed).
SAMPLE_IMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "coins", "camera", "cat",
                      "immunohistochemistry", "colorwheel", "clock", "page", "text")


def load_sample_images(names: Sequence[str] = SAMPLE_IMAGE_NAMES, max_side: int | None = None
                       ) -> dict[str, np.ndarray]:
    """Real pictures from ``skimage.data`` as uint8 (H, W, 3) RGB, optionally downscaled.

    Greyscale is stacked to 3 channels and alpha dropped. ``max_side`` shrinks the longest
    side (bilinear, aspect kept) to keep tests fast.
    """
    import skimage.data

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
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.segmentation import slic

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
    _to_pil(image).save(buf, format="JPEG", quality=quality)
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
                a = _to_uint8_hwc(image)
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
            _to_pil(image).save(path)
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
    from pycocotools import mask as mask_utils

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems, ann_id = [], 0
    for n, (image, masks) in enumerate(images_and_masks, start=start_index):
        stem = f"sa_{n}"
        a = _to_uint8_hwc(image)
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
