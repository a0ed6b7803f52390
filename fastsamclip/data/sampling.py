"""Multi-resolution batching of the CLIP stream (the paper's 224/448 mix, variable batch size).

Randomness is seeded per item from (seed, epoch, batch index), so a result never depends on
which worker produced it, and a resumed run reproduces the batches of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from fastsamclip.data.clip import ClipWebDataset
from fastsamclip.data.common import _worker, logger
from fastsamclip.errors import ConfigError
from fastsamclip.transforms import clip_pixels


@dataclass
class MultiResolutionConfig:
    resolutions: tuple[int, ...] = (224, 448)  # CLIP-stream input sides drawn per batch
    base_batch: int = 256  # GLOBAL batch size (all ranks together) at base_res
    base_res: int = 224  # resolution at which the batch is base_batch
    weights: tuple[float, ...] | None = None  # probability of each resolution (None: uniform)
    seed: int = 0  # with the epoch (and batch index), seeds shuffling and resolution draws
    drop_last: bool = True  # drop an epoch's last incomplete batch (keeps DDP ranks in step)

    def batch_size(self, resolution: int) -> int:
        """The global batch at ``r``: ``floor(base_batch * (base_res / r)^2)``, at least 1 (about
        constant pixels per batch). Ranks split it with :func:`rank_share`, so N ranks see the
        images one process would."""
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


def rank_share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, count) of ``rank``'s part of ``total`` items: ``total // world_size`` each, the
    first ``total % world_size`` ranks one more (a rank may get none; the loss weights by count)."""
    base, extra = divmod(total, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class MultiResolutionBatchSampler(torch.utils.data.Sampler):
    """Variable-size batches of ``(index, resolution)`` for a map-style dataset, DDP-sharded.

    Per epoch: the indices are permuted with a generator seeded by (seed, epoch); batch k
    draws its resolution r (:meth:`MultiResolutionConfig.draw_resolution`, the same on every
    rank) and takes the next ``batch_size(r)`` indices of the permutation (the global batch),
    rank ``rank`` keeping its :func:`rank_share`. All ranks therefore run the same number of
    steps at the same resolution on disjoint samples, whose union is what one process would take.
    The last short batch is dropped (``drop_last``) or split across ranks as it is.

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
        """The epoch's batches as (resolution, start, global size) over the permutation."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        plan, pos, k = [], 0, 0
        while pos < self.num_samples:
            res = self.config.draw_resolution(self.epoch, k)
            bs = self.config.batch_size(res)
            left = self.num_samples - pos
            if left < bs:
                if self.config.drop_last:
                    break
                bs = left
            plan.append((res, pos, bs))
            pos += bs
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
            offset, count = rank_share(bs, self.rank, self.world_size)
            self._position = k + 1
            yield [(int(i), res) for i in perm[pos + offset:pos + offset + count]]

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
                raise ConfigError(
                    f"cannot resume exactly: the saved sampler had {name}={state[name]}, this one "
                    f"has {value}; resume with the same dataset, world size and seed, or start a "
                    "fresh epoch")
        self.epoch, self._start, self._position = state["epoch"], state["batch_index"], state["batch_index"]


@dataclass
class ClipBatch:
    """A batch from :class:`MultiResolutionBatcher`."""

    images: torch.Tensor  # (B, 3, r, r) uint8 pixels; B = 0 when no record was readable
    keys: list[str]  # sample keys, B of them
    resolution: int  # r
    batch_index: int  # global index of this batch in the epoch (r was drawn for it)
    worker: int = 0  # stream that made it: batch indices worker, worker + num_workers, ... (0 in-process)
    num_workers: int = 1  # DataLoader workers sharing this rank's stream (1 in-process)
    records_end: int = 0  # records of that stream read once this batch was taken
    worker_batches: int = 0  # batch indices that stream had used once this batch was taken
    encoded: list[torch.Tensor] | None = None  # decode "none": the B encoded images (uint8), images is empty

    def pin_memory(self) -> "ClipBatch":
        """Page-locked copies of the tensors (what a DataLoader's ``pin_memory=True`` calls)."""
        return dataclasses.replace(self, images=self.images.pin_memory(),
                                   encoded=None if self.encoded is None else [t.pin_memory() for t in self.encoded])


class MultiResolutionBatcher(IterableDataset):
    """Groups a :class:`ClipWebDataset` stream into variable-size batches at per-batch resolutions.

    The stream counterpart of :class:`MultiResolutionBatchSampler`, with the same contract:
    deterministic given (seed, epoch), disjoint across DDP ranks (the source splits shards by
    rank), the same resolution for batch k on every rank, and an exact resume.

    Batch k draws r (:meth:`MultiResolutionConfig.draw_resolution`), takes this rank's
    :func:`rank_share` of the global ``batch_size(r)`` from its process's stream and collates the
    readable ones (:func:`collate_clip`) into a :class:`ClipBatch`; a batch whose records are all
    unreadable (or a rank's empty share) is still yielded, with B = 0, so every rank stays at the
    same batch index. Under a DataLoader with W workers,
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
                 batches_per_epoch: int | None = None, decode: str = "cpu"):
        if batches_per_epoch is not None and batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be positive or None, got {batches_per_epoch}")
        if decode not in ("cpu", "none"):
            raise ValueError(f"decode must be 'cpu' or 'none', got {decode!r}")
        self.source = source
        # "cpu": views made here, in the worker (PIL, JPEG draft mode); "none": the encoded images
        # are passed on (ClipBatch.encoded) for the consumer to decode, e.g. on a GPU.
        self.decode = decode
        self.config = config or MultiResolutionConfig()
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
            raise ConfigError(
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
            raise ConfigError(
                f"rank {self.source.rank}, DataLoader worker {w} of {num_workers} has no shard "
                f"of {len(self.source.shards)} to read, so it cannot make its share of the "
                f"{self.batches_per_epoch} batches; use fewer workers or more, smaller shards")
        stream = self.source.records(start=consumed, repeat=repeat, worker=(w, num_workers), raw=True)
        while limit is None or local < limit:
            k = local * num_workers + w  # global batch index (round-robin over workers)
            res = self.config.draw_resolution(self.epoch, k)
            # This rank's share of the global batch (it may be none: the loss weights by count).
            want = rank_share(self.config.batch_size(res), self.source.rank, self.source.world_size)[1]
            got = list(itertools.islice(stream, want)) if want else []
            if want and (not got or (len(got) < want and self.config.drop_last)):
                if limit is not None:  # only an empty stream ends a repeating one
                    logger.warning("%s: rank %d worker %d ran out of records after %d of its %d "
                                   "batches; this rank's epoch is short", self.source.spec,
                                   self.source.rank, w, local, limit)
                return
            consumed, local = consumed + len(got), local + 1
            self._advance(w, num_workers, consumed, local)
            # Yielded even when every record was unreadable (B = 0): a DataLoader's round-robin
            # over workers stays in batch-index order only if every index yields once.
            encoded = None
            if self.decode == "cpu":
                got = [(key, self.source.view(data, res, key)) for key, data in got if data is not None]
                good = [(key, v) for key, v in got if v is not None]
            else:
                good = [(key, torch.frombuffer(bytearray(data), dtype=torch.uint8)) for key, data in got
                        if data is not None]
                encoded, good = [t for _, t in good], [(key, None) for key, _ in good]
            yield ClipBatch(images=collate_clip(good, res), keys=[key for key, _ in good], resolution=res,
                            batch_index=k, worker=w, num_workers=num_workers, records_end=consumed,
                            worker_batches=local, encoded=encoded)

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
                raise ConfigError(
                    f"cannot resume exactly: the saved batcher had {name}={state[name]}, this one "
                    f"has {value}; resume with the same settings, or start a fresh epoch")
        self.epoch, self._num_workers = state["epoch"], state["num_workers"]
        self._positions = [(int(r), int(b)) for r, b in state["positions"]]


def collate_clip(samples: Sequence, resolution: int | None = None) -> torch.Tensor:
    """List of ``(key, image)`` or ``(key, image, r)`` -> (B, 3, r, r) uint8 in CLIP's geometry
    (:func:`fastsamclip.transforms.clip_pixels`; each model normalises it). An image that is
    already a view (a uint8 (3, r, r) tensor, what the readers decode for a side) is taken as is.

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
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    return torch.stack([s[1] if _is_view(s[1], resolution) else clip_pixels(s[1], resolution) for s in good])


def _is_view(image, resolution: int) -> bool:
    return isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and tuple(image.shape) == (
        3, resolution, resolution)

