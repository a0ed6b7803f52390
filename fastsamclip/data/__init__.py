"""Data for SAM-CLIP distillation: readers, prompts, multi-resolution sampling, streams, sample data.

Two streams feed stage-2 training (DESIGN: the recipe):

* D_CLIP: images only (captions are not needed), from img2dataset WebDataset shards
  (:class:`ClipWebDataset`) or a plain image folder (:class:`ClipImageFolder`), in CLIP's geometry
  at a per-batch resolution drawn from a 224/448 mix (:class:`MultiResolutionBatchSampler` for
  folders, :class:`MultiResolutionBatcher` for shards), through :class:`ClipStream`.
* D_SAM: SA-1B images with COCO-RLE masks (:class:`SA1BDataset`); up to 32 masks per image become
  box / point prompts (:func:`sample_prompts`), through :class:`SamStream`.

Both streams decode in DataLoader workers (``num_workers``, pinned memory, prefetch); D_CLIP views
are decoded for their side (JPEG draft mode on the CPU) or, on CUDA, on the GPU
(:mod:`fastsamclip.data.decode`).

Every stream yields uint8 pixels; each model normalises its own input (``fastsamclip.transforms``).
"""

from fastsamclip.data.clip import (
    ClipImageFolder,
    ClipWebDataset,
    count_shard_samples,
    expand_shard_spec,
    held_out_images,
    is_shard_spec,
    open_clip_source,
)
from fastsamclip.data.common import SkipCounter, auto_workers
from fastsamclip.data.decode import (
    DECODERS,
    PATHS,
    DecoderChoice,
    decode_all_views_on,
    decode_view,
    decode_views,
    decode_views_on,
    log_choice,
)
from fastsamclip.data.holdout import holdout_score, in_split
from fastsamclip.data.prompts import (
    PromptConfig,
    Prompts,
    masks_to_boxes,
    sample_prompts,
    select_masks,
)
from fastsamclip.data.sa1b import SA1BDataset, SamRawSample, decode_rle, rle_run_lengths
from fastsamclip.data.sampling import (
    ClipBatch,
    MultiResolutionBatcher,
    MultiResolutionBatchSampler,
    MultiResolutionConfig,
    collate_clip,
    rank_share,
)
from fastsamclip.data.streams import ClipStream, SamStream, select_decoder
from fastsamclip.errors import DataError

__all__ = [
    "DECODERS", "PATHS", "DecoderChoice", "auto_workers", "decode_all_views_on", "decode_view", "decode_views",
    "decode_views_on", "log_choice",
    "select_decoder", "ClipBatch", "ClipImageFolder", "ClipStream", "ClipWebDataset", "MultiResolutionBatchSampler",
    "MultiResolutionBatcher", "MultiResolutionConfig", "PromptConfig", "Prompts", "SA1BDataset", "SamRawSample",
    "SamStream", "SkipCounter", "DataError", "collate_clip", "count_shard_samples", "decode_rle", "expand_shard_spec",
    "held_out_images", "holdout_score", "in_split", "is_shard_spec", "masks_to_boxes", "open_clip_source", "rank_share",
    "rle_run_lengths", "sample_prompts", "select_masks",
]
