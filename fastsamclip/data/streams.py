"""The two training streams, endless, resumable and sharded by rank.

- :class:`ClipStream`: D_CLIP batches ``(keys, pixels (B, 3, r, r) uint8, r)`` epoch after epoch.
- :class:`SamStream`: D_SAM batches, lists of :class:`~fastsamclip.data.sa1b.SA1BDataset` items.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from fastsamclip.data.clip import ClipWebDataset, count_shard_samples, is_shard_spec, open_clip_source
from fastsamclip.data.common import auto_workers
from fastsamclip.data.decode import DecoderChoice, choose_decoder, decode_views_on, measure_decoders
from fastsamclip.data.sampling import (
    MultiResolutionBatcher,
    MultiResolutionBatchSampler,
    collate_clip,
)
from fastsamclip.errors import ConfigError, DataError, InputError


class ClipStream:
    """D_CLIP batches ``(keys, pixels (B, 3, r, r) uint8, r)`` epoch after epoch, for ``rank`` of
    ``world_size`` data-parallel processes.

    Shards go through ``MultiResolutionBatcher`` (resumable by record count), image folders
    through ``MultiResolutionBatchSampler``; either way with ``num_workers`` DataLoader workers
    decoding in parallel (0: in the training process), ``prefetch`` batches ahead per worker, in
    page-locked memory with ``pin_memory``. The state counts the batches the loop consumed, not
    what the workers prefetched, so a resume is exact with workers too (with the same number of
    them: each worker of a shard stream reads its own shards).

    ``decoder``: ``"cpu"`` (the workers decode: PIL, JPEG draft mode) or ``"cuda"`` (shards only:
    the workers read the encoded images and this process decodes each batch on ``device``,
    :func:`~fastsamclip.data.decode.decode_views_on`); see :mod:`fastsamclip.data.decode`."""

    def __init__(self, path: str, mr_config, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 validate: bool = True, holdout: float = 0.0, pin_memory: bool = False, prefetch: int = 2,
                 decoder: str = "cpu", device: str | torch.device | None = None, local_ranks: int = 1):
        if num_workers < -1 or prefetch < 1:
            raise ConfigError(f"num_workers {num_workers} and prefetch {prefetch}: give workers >= 0 (-1: auto) "
                              "and prefetch >= 1")
        self.mr = mr_config
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.epoch = 0
        self._consumed = 0  # batches of this epoch consumed by the training loop
        self._it = None
        self.kind = "shards" if is_shard_spec(path) else "folder"
        self.decoder = decoder
        self.device = torch.device(device) if device is not None else None
        if decoder == "cuda" and (self.kind != "shards" or self.device is None):
            raise ConfigError("the CUDA decode path reads WebDataset shards onto a device: give shards and a device, "
                              "or decode on the CPU")
        self.source = open_clip_source(path, split="train", holdout=holdout, rank=rank, world_size=world_size,
                                       seed=mr_config.seed, validate=validate)
        auto = num_workers == -1
        if auto:
            num_workers = auto_workers(self.device.type if self.device is not None else "cpu", local_ranks)
        if self.kind == "shards":
            self.num_samples = None  # counted lazily (only needed to turn epochs into steps)
            per_epoch = None
            mine = len(self.source.shards) // world_size  # the fewest shards a rank reads
            if auto:
                num_workers = min(num_workers, mine)
            elif num_workers > mine:
                raise ConfigError(f"--num-workers {num_workers}: each DataLoader worker reads its own shards and "
                                  f"rank {rank} of {world_size} reads {mine}; use at most {mine} workers, or more, "
                                  "smaller shards")
            if world_size > 1:
                # Ranks read different shards, whose sizes differ: a fixed number of batches per
                # rank and epoch keeps every rank in the same epoch, so batch k has the same
                # resolution on all of them (a rank whose shards run out re-reads them).
                mean_batch = float(np.mean([mr_config.batch_size(r) for r in mr_config.resolutions]))  # global
                per_epoch = max(1, int(self.samples() // mean_batch))
            self.batcher = MultiResolutionBatcher(self.source, mr_config, batches_per_epoch=per_epoch,
                                                  decode="none" if decoder == "cuda" else "cpu")
        else:
            self.sampler = MultiResolutionBatchSampler(len(self.source), mr_config, rank, world_size)
            self.num_samples = len(self.source)
        self.num_workers = num_workers

    def _loader(self, dataset, **kw):
        """``dataset`` through DataLoader workers, or itself (in-process) without workers."""
        if self.num_workers == 0:
            return None
        return torch.utils.data.DataLoader(dataset, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                           prefetch_factor=self.prefetch, persistent_workers=False, **kw)

    def samples(self) -> int:
        """Training samples of D_CLIP (for shards: the records counted, less the held-out fraction)."""
        if self.num_samples is None:
            total = count_shard_samples(self.source.shards)
            self.num_samples = max(1, round(total * (1.0 - self.source.holdout)))
        return self.num_samples

    def _epoch_iter(self):
        # The generators below hold no reference to the stream: a stream dropped mid-epoch is
        # freed at once, and its DataLoader workers told to stop (found by the garbage collector
        # instead, the workers' queues may be gone first, and each worker waits out its timeout).
        if self.kind == "shards":
            self.batcher.set_epoch(self.epoch)
            return _shard_batches(self.batcher, self._loader(self.batcher, batch_size=None), self.device,
                                  self.source.skipped)
        self.sampler.set_epoch(self.epoch)
        return _folder_batches(self.source, self.sampler,
                               self._loader(self.source, batch_sampler=self.sampler, collate_fn=_collate_views))

    def next(self):
        """The next batch ``(keys, pixels, r)``; B may be 0 (every image of this rank's share
        unreadable, or no share): it is returned all the same, so every rank stays at the same
        batch index and resolution, and the step weighs it by its count."""
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            for keys, images, res in self._it:
                self._consumed += 1
                return keys, images, res
            self._it, self.epoch, self._consumed = None, self.epoch + 1, 0
        raise DataError("the D_CLIP stream gave no batch over a whole epoch: there are fewer samples "
                        "than one batch (lower --clip-batch or add images)")

    def state_dict(self) -> dict:
        if self.kind == "shards":
            return {"kind": "shards", "batcher": self.batcher.state_dict(), "epoch": self.epoch}
        return {"kind": "folder", "sampler": self.sampler.state_dict(batches_done=self._consumed), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ConfigError(f"cannot resume: the checkpoint read D_CLIP as {state['kind']}, this run as {self.kind}")
        self.epoch, self._it = state["epoch"], None
        if self.kind == "shards":
            saved, mine = state["batcher"]["num_workers"], max(1, self.num_workers)
            if saved not in (None, mine):  # each worker reads its own shards: another count, other batches
                raise ConfigError(f"cannot resume exactly: the checkpoint's D_CLIP position is for {saved} DataLoader "
                                  f"worker(s), this run has {mine}; pass --num-workers {saved}")
            self.batcher.load_state_dict(state["batcher"])
            self._consumed = 0
        else:
            self.sampler.load_state_dict(state["sampler"])
            self._consumed = state["sampler"]["batch_index"]


def _collate_views(items):
    """``(key, view or None, r)`` items of one batch -> ``(keys, pixels (B, 3, r, r), r)``."""
    res = items[0][2]
    good = [(k, im) for k, im, _ in items if im is not None]
    return [k for k, _ in good], collate_clip(good, res), res


def _through(loader):
    """The batches of a DataLoader; an input error raised in a worker comes out with its own
    message (the DataLoader's copy starts with "Caught DataError in DataLoader worker process 0.",
    which is all a one-line report would show)."""
    try:
        yield from loader
    except InputError as e:
        text = str(e)
        if text.startswith("Caught ") and f"{type(e).__name__}: " in text:
            raise type(e)(text.rsplit(f"{type(e).__name__}: ", 1)[1].strip()) from None
        raise


def _folder_batches(source, sampler, loader):
    if loader is not None:
        yield from _through(loader)
        return
    for idx in sampler:
        yield _collate_views([source[i] for i in idx])


def _shard_batches(batcher: MultiResolutionBatcher, loader, device, skipped):
    for b in batcher if loader is None else _through(loader):
        # Handed to the loop now: the position a checkpoint after this step must save.
        batcher.mark_consumed(b)
        if b.encoded is None:
            yield b.keys, b.images, b.resolution
            continue
        views = decode_views_on(b.encoded, b.resolution, device,
                                on_error=lambda i, e: skipped.record("decode_error", b.keys[i], repr(e)))
        good = [(k, v) for k, v in zip(b.keys, views) if v is not None]
        r = b.resolution
        pixels = (torch.stack([v for _, v in good]) if good
                  else torch.zeros(0, 3, r, r, dtype=torch.uint8, device=device))
        yield [k for k, _ in good], pixels, r


def select_decoder(requested: str, path: str, device, num_workers: int, resolution: int, rank: int = 0,
                   world_size: int = 1, local_ranks: int = 1, cached: str | None = None,
                   samples: int = 64) -> DecoderChoice:
    """The path that decodes D_CLIP at ``path`` for this rank (:mod:`fastsamclip.data.decode`).

    ``auto`` follows ``cached`` (the path a teacher cache was built with, so that its targets are
    those of the views the student sees) when given; else, on CUDA with shards, it measures both
    paths on the first ``samples`` images of this rank's shards at ``resolution``, the CPU path
    counted once per DataLoader worker (``num_workers``, -1 for what :class:`ClipStream` picks).
    """
    device = torch.device(device)
    if requested == "auto" and cached is not None:
        if cached == "cuda" and device.type != "cuda":
            return DecoderChoice("cpu", "the teacher cache was built from GPU-decoded views, this run has no GPU: "
                                        "its targets differ from the student's CPU views by the resize tolerance")
        return DecoderChoice(cached, "the teacher cache's own, so its targets are of the student's views")

    def measure() -> DecoderChoice:
        if not is_shard_spec(path):
            return DecoderChoice("cpu", "an image folder decodes on the CPU (the CUDA path reads shards)")
        source = ClipWebDataset(path, rank=rank, world_size=world_size, validate=False)
        workers = num_workers if num_workers >= 0 else min(auto_workers(device.type, local_ranks),
                                                          len(source.shards) // world_size)
        return measure_decoders(source.sample_bytes(samples), resolution, device, workers)

    return choose_decoder(requested, device, measure)


class SamStream:
    """D_SAM batches: lists of ``SA1BDataset`` items, a per-epoch permutation of the training
    indices seeded by (seed, epoch), each global batch split across ranks; resumable."""

    def __init__(self, dataset, indices: Sequence[int], batch_per_rank: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        self.dataset, self.indices = dataset, list(indices)
        self.bs, self.seed, self.num_workers = batch_per_rank, seed, num_workers
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self.rank, self.world_size = rank, world_size
        if len(self.indices) < batch_per_rank * world_size:
            raise ConfigError(f"D_SAM has {len(self.indices)} training images, fewer than one global batch "
                             f"({batch_per_rank * world_size}); lower --sam-batch or add images")
        self.epoch, self.position, self._it = 0, 0, None

    def _plan(self) -> List[List[int]]:
        perm = np.random.default_rng([self.seed, self.epoch, 7]).permutation(len(self.indices))
        g = self.bs * self.world_size
        batches = [perm[i:i + g] for i in range(0, len(perm) - g + 1, g)]
        r = self.rank
        return [[self.indices[j] for j in b[r * self.bs:(r + 1) * self.bs]] for b in batches]

    def _epoch_iter(self):
        self.dataset.set_epoch(self.epoch)
        plan = self._plan()[self.position:]
        if self.num_workers > 0:  # an iterator that holds no reference to the stream (see ClipStream)
            return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=self.num_workers,
                                                    collate_fn=list, pin_memory=self.pin_memory,
                                                    prefetch_factor=self.prefetch, persistent_workers=False))
        return ([self.dataset[i] for i in idx] for idx in plan)

    def next(self) -> List[dict]:
        """The readable items of the next batch; the list may be empty (all skipped): it is
        returned all the same, so every rank stays at the same batch index."""
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            for items in self._it:
                self.position += 1
                return [s for s in items if s is not None]
            self._it, self.epoch, self.position = None, self.epoch + 1, 0
        raise DataError("the D_SAM stream gave no batch over a whole epoch (see the warnings above)")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": len(self.indices), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.indices) or state["seed"] != self.seed:
            raise ConfigError(f"cannot resume exactly: the checkpoint's D_SAM had {state['n']} training images "
                             f"(seed {state['seed']}), this run {len(self.indices)} (seed {self.seed})")
        self.epoch, self.position, self._it = state["epoch"], state["position"], None

