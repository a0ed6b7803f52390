"""Data for SAM-CLIP distillation: readers, prompts, multi-resolution sampling, streams, sample data.

Two streams feed stage-2 training (DESIGN: the recipe):

* D_CLIP: images only (captions are not needed), from img2dataset WebDataset shards
  (:class:`ClipWebDataset`) or a plain image folder (:class:`ClipImageFolder`), in CLIP's geometry
  at a per-batch resolution drawn from a 224/448 mix (:class:`MultiResolutionBatchSampler` for
  folders, :class:`MultiResolutionBatcher` for shards), through :class:`ClipStream`.
* D_SAM: SA-1B images with COCO-RLE masks (:class:`SA1BDataset`); up to 32 masks per image become
  box / point prompts (:func:`sample_prompts`), through :class:`SamStream`.

Every stream yields uint8 pixels; each model normalises its own input (``fastsamclip.transforms``).
"""

from fastsamclip.data.clip import (
    ClipImageFolder,
    ClipWebDataset,
    count_shard_samples,
    expand_shard_spec,
    is_shard_spec,
)
from fastsamclip.data.common import SkipCounter
from fastsamclip.data.prompts import PromptConfig, Prompts, masks_to_boxes, sample_prompts, select_masks
from fastsamclip.data.sa1b import SA1BDataset, SamRawSample, decode_rle, rle_run_lengths
from fastsamclip.data.sampling import (
    ClipBatch,
    MultiResolutionBatcher,
    MultiResolutionBatchSampler,
    MultiResolutionConfig,
    collate_clip,
)
from fastsamclip.data.streams import ClipStream, SamStream

__all__ = [
    "ClipBatch", "ClipImageFolder", "ClipStream", "ClipWebDataset", "MultiResolutionBatchSampler",
    "MultiResolutionBatcher", "MultiResolutionConfig", "PromptConfig", "Prompts", "SA1BDataset", "SamRawSample",
    "SamStream", "SkipCounter", "collate_clip", "count_shard_samples", "decode_rle", "expand_shard_spec",
    "is_shard_spec", "masks_to_boxes", "rle_run_lengths", "sample_prompts", "select_masks",
]
