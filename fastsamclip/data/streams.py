"""The two training streams, endless, resumable and sharded by rank.

- :class:`ClipStream`: D_CLIP batches ``(keys, pixels (B, 3, r, r) uint8, r)`` epoch after epoch.
- :class:`SamStream`: D_SAM batches, lists of :class:`~fastsamclip.data.sa1b.SA1BDataset` items.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from fastsamclip.data.clip import count_shard_samples, is_shard_spec, open_clip_source
from fastsamclip.data.sampling import (
    MultiResolutionBatcher,
    MultiResolutionBatchSampler,
    collate_clip,
)
from fastsamclip.errors import ConfigError, DataError


class ClipStream:
    """D_CLIP batches ``(keys, pixels (B, 3, r, r) uint8, r)`` epoch after epoch, for ``rank`` of
    ``world_size`` data-parallel processes.

    Shards go through ``MultiResolutionBatcher`` (in-process, resumable by record count); image
    folders through ``MultiResolutionBatchSampler`` (optionally with DataLoader workers; the
    state counts batches the loop consumed, not what workers prefetched)."""

    def __init__(self, path: str, mr_config, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 validate: bool = True, holdout: float = 0.0):
        self.mr = mr_config
        self.num_workers = num_workers
        self.epoch = 0
        self._consumed = 0  # batches of this epoch consumed by the training loop
        self._it = None
        self.kind = "shards" if is_shard_spec(path) else "folder"
        self.source = open_clip_source(path, split="train", holdout=holdout, rank=rank, world_size=world_size,
                                       seed=mr_config.seed, validate=validate)
        if self.kind == "shards":
            self.num_samples = None  # counted lazily (only needed to turn epochs into steps)
            per_epoch = None
            if world_size > 1:
                # Ranks read different shards, whose sizes differ: a fixed number of batches per
                # rank and epoch keeps every rank in the same epoch, so batch k has the same
                # resolution on all of them (a rank whose shards run out re-reads them).
                mean_batch = float(np.mean([mr_config.batch_size(r) for r in mr_config.resolutions]))  # global
                per_epoch = max(1, int(self.samples() // mean_batch))
            self.batcher = MultiResolutionBatcher(self.source, mr_config, batches_per_epoch=per_epoch)
        else:
            self.sampler = MultiResolutionBatchSampler(len(self.source), mr_config, rank, world_size)
            self.num_samples = len(self.source)

    def samples(self) -> int:
        """Training samples of D_CLIP (for shards: the records counted, less the held-out fraction)."""
        if self.num_samples is None:
            total = count_shard_samples(self.source.shards)
            self.num_samples = max(1, round(total * (1.0 - self.source.holdout)))
        return self.num_samples

    def _collate(self, items):
        res = items[0][2]
        good = [(k, im) for k, im, _ in items if im is not None]
        return [k for k, _ in good], collate_clip(good, res), res

    def _epoch_iter(self):
        if self.kind == "shards":
            self.batcher.set_epoch(self.epoch)
            for b in self.batcher:
                yield b.keys, b.images, b.resolution
            return
        self.sampler.set_epoch(self.epoch)
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(self.source, batch_sampler=self.sampler, num_workers=self.num_workers,
                                                 collate_fn=self._collate)
            yield from loader
        else:
            for idx in self.sampler:
                yield self._collate([self.source[i] for i in idx])

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
            self.batcher.load_state_dict(state["batcher"])
            self._consumed = 0
        else:
            self.sampler.load_state_dict(state["sampler"])
            self._consumed = state["sampler"]["batch_index"]


class SamStream:
    """D_SAM batches: lists of ``SA1BDataset`` items, a per-epoch permutation of the training
    indices seeded by (seed, epoch), each global batch split across ranks; resumable."""

    def __init__(self, dataset, indices: Sequence[int], batch_per_rank: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0):
        self.dataset, self.indices = dataset, list(indices)
        self.bs, self.seed, self.num_workers = batch_per_rank, seed, num_workers
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
        if self.num_workers > 0:
            yield from torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, num_workers=self.num_workers,
                                                   collate_fn=list)
        else:
            for idx in plan:
                yield [self.dataset[i] for i in idx]

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

