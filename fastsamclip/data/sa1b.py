"""D_SAM: the SA-1B layout (``sa_N.jpg`` + ``sa_N.json``, masks in COCO RLE), read into model inputs.

Prompts are drawn in ORIGINAL image coordinates (:mod:`fastsamclip.data.prompts`) and mapped to
the model's frame with :func:`fastsamclip.transforms.apply_coords` / ``apply_boxes``; images go
through SAM's geometry (:func:`fastsamclip.transforms.sam_pixels`, uint8, normalised by each
model) and masks to the decoder's low-resolution frame (:func:`fastsamclip.transforms.masks_to_lowres`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fastsamclip.data.common import SkipCounter
from fastsamclip.data.prompts import PromptConfig, Prompts, sample_prompts
from fastsamclip.errors import DataError
from fastsamclip.transforms import (
    DECODE_ERRORS,
    LOWRES_DIVISOR,
    SAM_IMAGE_SIZE,
    apply_boxes,
    apply_coords,
    decode_rgb,
    masks_to_lowres,
    sam_pixels,
)


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

    * ``key``: str; ``image``: (3, 1024, 1024) uint8, the resized picture zero-padded
      (:func:`fastsamclip.transforms.sam_pixels`; each model normalises it, padding zeroed after)
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
                 seed: int = 0, long_side: int = SAM_IMAGE_SIZE, lowres: int | None = None,
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
        self.long_side = long_side
        self.lowres = lowres or long_side // LOWRES_DIVISOR  # the mask decoder's low-res frame
        self.epoch = 0
        self.skipped = SkipCounter(self.root)
        if validate:
            self.validate(probe_samples)

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])

    def _meta(self, index: int, skipped: SkipCounter) -> tuple[str, dict] | None:
        """(json path, content) of sample ``index``; None when unreadable (counted as bad_json)."""
        jpath = os.path.join(self.root, self.stems[index] + ".json")
        try:
            with open(jpath, "rb") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("the json is not an object")
            if not isinstance(meta.get("annotations") or [], list):
                raise ValueError("'annotations' is not a list")
        except (OSError, ValueError) as e:
            skipped.record("bad_json", jpath, repr(e)[:200])
            return None
        return jpath, meta

    def _image(self, index: int, meta: dict, skipped: SkipCounter) -> np.ndarray | None:
        """The picture named by the json's ``file_name`` (default ``sa_N.jpg``); None when missing
        or undecodable (counted)."""
        info = meta.get("image") if isinstance(meta.get("image"), dict) else {}
        ipath = os.path.join(self.root, info.get("file_name") or self.stems[index] + ".jpg")
        if not os.path.isfile(ipath):
            skipped.record("missing_image", ipath, "no image file next to the json")
            return None
        try:
            return np.asarray(decode_rgb(ipath))
        except DECODE_ERRORS as e:
            skipped.record("decode_error", ipath, repr(e))
            return None

    def load_image(self, index: int, skipped: SkipCounter | None = None) -> np.ndarray | None:
        """Image ``index`` alone, uint8 (H, W, 3) as :meth:`load_raw` reads it, without decoding a
        mask; None when the json or the image is unreadable (counted). What the teacher cache runs
        the SAM teacher on."""
        skipped = self.skipped if skipped is None else skipped
        got = self._meta(index, skipped)
        return None if got is None else self._image(index, got[1], skipped)

    def load_raw(self, index: int, skipped: SkipCounter | None = None, epoch: int | None = None
                 ) -> SamRawSample | None:
        """The draw of ``epoch`` (default: the dataset's current one); a fixed ``epoch`` gives the
        same masks and prompts whatever the training stream has reached (held-out evaluation)."""
        skipped = self.skipped if skipped is None else skipped
        stem = self.stems[index]
        got = self._meta(index, skipped)
        if got is None:
            return None
        jpath, meta = got
        anns = meta.get("annotations") or []
        if not anns:
            skipped.record("no_masks", jpath, "no annotations")
            return None
        image = self._image(index, meta, skipped)
        if image is None:
            return None
        shape = image.shape[:2]
        rng = self.rng(index, epoch)
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
        image, input_size = sam_pixels(raw.image, self.long_side)
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
        raise DataError(
            f"SA-1B folder {self.root!r}: none of the first {n} samples has a readable image with "
            f"at least one decodable mask ({dict(probe)}); check the sa_N.json files' "
            "'annotations[*].segmentation' (COCO RLE) and the sa_N.jpg files")

