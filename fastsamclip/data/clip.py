"""D_CLIP readers: img2dataset WebDataset shards and plain image folders (captions unused).

Both yield ``(key, PIL RGB image)``; unreadable samples are counted in ``skipped``
(:class:`~fastsamclip.data.common.SkipCounter`), and a data path with no readable sample at all
fails at construction (``validate``). Keys are sample identities (:func:`source_name`): the
shard's folder and file name with the WebDataset ``__key__``, or the image folder's name with the
file's path in it, the same wherever the data is mounted or moved.
"""

from __future__ import annotations

import itertools
import json
import os
import tarfile
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from fastsamclip.data.common import SkipCounter, _worker, logger
from fastsamclip.data.decode import decode_view
from fastsamclip.data.holdout import check_split, in_split
from fastsamclip.errors import DataError
from fastsamclip.transforms import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_rgb

# Member suffixes img2dataset may use for the image, in order of preference.
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def is_shard_spec(path: str) -> bool:
    """A WebDataset shard spec (``.tar``, braces, ``::`` lists, URLs) rather than an image folder."""
    return ".tar" in path or "{" in path or "::" in path or "://" in path


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
    urls = [os.path.abspath(u.removeprefix("file://")) if _is_local(u) else u for u in urls]
    kept = [u for u in urls if not _is_local(u) or os.path.isfile(u)]
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


def source_name(url: str) -> str:
    """How a shard is named in its samples' identities: a local shard by its folder's name and its
    file name (``cc3m/00000.tar`` for ``/data/cc3m/00000.tar``), the same wherever the data is
    mounted or moved; a remote URL whole."""
    if not _is_local(url):
        return url
    path = os.path.abspath(url.removeprefix("file://"))
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"


class ClipImageFolder(Dataset):
    """A folder of images, searched recursively; yields ``(key, PIL RGB image)``.

    ``key`` is the sample's identity: the folder's name joined with the file's path in it,
    without extension (``photos/a/b`` for ``/data/photos/a/b.jpg``). ``split`` keeps the "train" or "held_out" files of a hash split at
    ``holdout`` (:mod:`fastsamclip.data.holdout`), or "all" of them. ``dataset[i]`` returns ``None``
    for an unreadable file (counted in ``skipped``); :func:`collate_clip` drops those.
    ``dataset[(i, r)]`` returns ``(key, view, r)``, the CLIP view uint8 (3, r, r) decoded for
    that side (:meth:`view`): the form :class:`MultiResolutionBatchSampler` asks for, so the
    collate knows the batch's resolution; an unreadable file then gives ``(key, None, r)``, so
    that even a batch of only unreadable files still names its resolution.
    """

    def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 validate: bool = True, probe_samples: int = 8, holdout: float = 0.0, split: str = "all"):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a folder")
        exts = tuple(e.lower() for e in extensions)
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(self.root, followlinks=True) for f in fs
            if f.lower().endswith(exts))
        if not files:
            raise FileNotFoundError(
                f"image folder {self.root!r} holds no file with an image extension {exts} "
                "(searched recursively)")
        self.holdout, self.split = holdout, check_split(split)
        self.files = [f for f in files if in_split(self._identity(f), self.split, holdout)]
        if not self.files:
            raise DataError(f"image folder {self.root!r}: none of its {len(files)} images falls in the "
                            f"{self.split!r} split at held-out fraction {holdout}")
        self.skipped = SkipCounter(self.root)
        if validate:
            self.validate(probe_samples)

    def __len__(self) -> int:
        return len(self.files)

    def _identity(self, path: str) -> str:
        rel = os.path.splitext(os.path.relpath(path, self.root))[0].replace(os.sep, "/")
        return f"{os.path.basename(self.root)}/{rel}"

    def key(self, index: int) -> str:
        return self._identity(self.files[index])

    def load(self, index: int, skipped: SkipCounter | None = None) -> Image.Image | None:
        skipped = self.skipped if skipped is None else skipped
        path = self.files[index]
        try:
            return decode_rgb(path)
        except DECODE_ERRORS as e:
            skipped.record("decode_error", path, repr(e))
            return None

    def view(self, index: int, resolution: int, skipped: SkipCounter | None = None) -> torch.Tensor | None:
        """File ``index`` as a CLIP view uint8 (3, r, r) (:func:`~fastsamclip.data.decode.decode_view`:
        JPEG draft mode where it applies), or None when unreadable (counted)."""
        skipped = self.skipped if skipped is None else skipped
        path = self.files[index]
        try:
            return decode_view(path, resolution)
        except DECODE_ERRORS as e:
            skipped.record("decode_error", path, repr(e))
            return None

    def __getitem__(self, index):
        if isinstance(index, tuple):
            index, res = index
            return self.key(index), self.view(index, res), res
        image = self.load(index)
        return None if image is None else (self.key(index), image)

    def validate(self, probe_samples: int = 8) -> int:
        """Decode the first ``probe_samples`` files; raise if none is readable. Returns the count read."""
        probe = SkipCounter(self.root + " (probe)", quiet=True)
        ok = sum(self.load(i, probe) is not None for i in range(min(probe_samples, len(self))))
        if ok == 0:
            raise DataError(
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

    ``key`` is the sample's identity: its shard's name (:func:`source_name`) joined with its
    ``__key__`` (:meth:`identity`), unique over every source of a ``::``-joined spec although
    each img2dataset run numbers its keys from ``000000000``; two shards of one name, or two
    samples with one key inside a shard, are a DataError naming them. ``split`` keeps the "train" or "held_out" records of
    a hash split at ``holdout`` (:mod:`fastsamclip.data.holdout`), or "all" of them.
    """

    def __init__(self, shards: str | Sequence[str], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_shards: bool = True, shuffle_buffer: int = 0,
                 validate: bool = True, probe_samples: int = 8, holdout: float = 0.0, split: str = "all"):
        self.spec = shards if isinstance(shards, str) else ",".join(shards)
        self.shards = expand_shard_spec(shards)
        self.names = {u: source_name(u) for u in self.shards}
        first: dict = {}
        for u, name in self.names.items():
            if name in first:
                raise DataError(f"shards {first[name]} and {u} are both named {name!r} in sample identities "
                                "(a shard's folder and file name, so that the held-out split and the teacher "
                                "cache follow the data wherever it is mounted): put each source in a folder "
                                "of its own name")
            first[name] = u
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if len(self.shards) < world_size:
            raise DataError(
                f"shard spec {self.spec!r} has {len(self.shards)} shard(s) for {world_size} ranks; "
                "every rank needs at least one shard (write smaller shards or use fewer ranks)")
        self.rank, self.world_size = rank, world_size
        self.seed = seed  # seeds the per-epoch shard order and the shuffle buffer
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.holdout, self.split = holdout, check_split(split)
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

    def identity(self, sample: dict) -> str:
        """A record's identity: ``{source_name(shard)}/{__key__}``."""
        url = sample.get("__url__", "?")
        return f"{self.names.get(url, url)}/{sample.get('__key__', '?')}"

    def _raw_samples(self, shards: list[str], skipped: SkipCounter, split: str | None = None) -> Iterator[dict]:
        """The records of ``shards`` in this reader's split (or ``split``), undecoded; a key seen
        twice in one shard is a DataError (its two samples would share one identity, and one target)."""
        from webdataset import tarfile_samples  # optional dependency (extra "train")

        split = self.split if split is None else split

        def handler(exn: Exception) -> bool:  # a broken tar stream: count it, go to the next shard
            skipped.record("tar_error", str(exn.args[-1]) if exn.args else "?", repr(exn)[:200])
            return True

        seen: set = set()
        url = None
        for sample in tarfile_samples([dict(url=u) for u in shards], handler=handler):
            if sample.get("__url__") != url:
                url, seen = sample.get("__url__"), set()
            key = sample.get("__key__", "?")
            if key in seen:
                raise DataError(f"shard {url} holds two samples with the key {key!r}; every sample of a shard "
                                "needs its own key (img2dataset numbers them), rewrite or drop the shard")
            seen.add(key)
            if in_split(self.identity(sample), split, self.holdout):
                yield sample

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

    def _image_bytes(self, sample: dict, skipped: SkipCounter) -> bytes | None:
        """The record's encoded image (the first member of ``WDS_IMAGE_SUFFIXES``), or None (counted)."""
        suffix = next((s for s in WDS_IMAGE_SUFFIXES if s in sample), None)
        if suffix is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            skipped.record("missing_image", where, f"members: {members}")
            return None
        return sample[suffix]

    def _decode(self, sample: dict, skipped: SkipCounter) -> Image.Image | None:
        data = self._image_bytes(sample, skipped)
        return None if data is None else self.decode(data, self.identity(sample), skipped)

    def decode(self, data: bytes, where: str, skipped: SkipCounter | None = None) -> Image.Image | None:
        """Encoded bytes -> PIL RGB image at full size, or None when unreadable (counted)."""
        try:
            return decode_rgb(data)
        except DECODE_ERRORS as e:
            (self.skipped if skipped is None else skipped).record("decode_error", where, repr(e))
            return None

    def view(self, data: bytes, resolution: int, where: str, skipped: SkipCounter | None = None
             ) -> torch.Tensor | None:
        """Encoded bytes -> CLIP view uint8 (3, r, r) (:func:`~fastsamclip.data.decode.decode_view`:
        JPEG draft mode where it applies), or None when unreadable (counted)."""
        try:
            return decode_view(data, resolution)
        except DECODE_ERRORS as e:
            (self.skipped if skipped is None else skipped).record("decode_error", where, repr(e))
            return None

    def records(self, start: int = 0, skipped: SkipCounter | None = None, repeat: bool = False,
                worker: tuple[int, int] | None = None, raw: bool = False) -> Iterator[tuple[str, object]]:
        """Every record of this process's stream for the epoch, from record ``start`` on.

        Yields ``(identity, PIL image or None)``, or with ``raw`` ``(identity, encoded bytes or
        None)`` without decoding (the caller decodes: :meth:`view`, or on a GPU). ``repeat``:
        after the last record start another pass over the same shards (shuffle buffer reseeded
        per pass), endlessly; ``start`` then counts across passes. A process whose shards hold no
        record at all ends after one pass even so. ``worker``: as in :meth:`shards_for_process`.
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
                yield self.identity(sample), (self._image_bytes(sample, skipped) if raw
                                              else self._decode(sample, skipped))
            if not repeat or in_pass == 0:
                return

    def shard_records(self, shard: str, skipped: SkipCounter | None = None) -> Iterator[tuple[str, bytes | None]]:
        """``(identity, encoded bytes or None)`` of every record of one shard, in file order, of
        every split (what the teacher cache stores)."""
        skipped = self.skipped if skipped is None else skipped
        for sample in self._raw_samples([shard], skipped, split="all"):
            yield self.identity(sample), self._image_bytes(sample, skipped)

    def sample_bytes(self, n: int) -> list[bytes]:
        """The encoded images of the first ``n`` readable-looking records of this rank's shards
        (what a start-up measurement decodes)."""
        out = []
        for _, data in self.records(skipped=SkipCounter(quiet=True), worker=(0, 1), raw=True):
            if data is not None:
                out.append(data)
            if len(out) == n:
                break
        return out

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
            raise DataError(
                f"shard spec {self.spec!r}: none of the first {seen} samples could be read "
                f"({dict(probe) or 'no samples at all'}); check that the shards are img2dataset "
                "WebDataset tars with .jpg/.png/.webp members")
        return ok



def open_clip_source(path: str, *, split: str = "all", holdout: float = 0.0, rank: int = 0, world_size: int = 1,
                     seed: int = 0, shuffle: bool = True, validate: bool = True):
    """D_CLIP at ``path``: a :class:`ClipWebDataset` for a shard spec, else a :class:`ClipImageFolder`."""
    if is_shard_spec(path):
        return ClipWebDataset(path, rank=rank, world_size=world_size, seed=seed, shuffle_shards=shuffle,
                              validate=validate, holdout=holdout, split=split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"D_CLIP path {path!r} does not exist (give a shard spec "
                                "'/data/{00000..00099}.tar' or an image folder)")
    return ClipImageFolder(path, validate=validate, holdout=holdout, split=split)


def held_out_images(path: str, holdout: float, limit: int = 0) -> list:
    """The first ``limit`` (0: all) readable held-out D_CLIP images as ``(identity, PIL image)``,
    in shard / file order: the same images on every rank and every run."""
    source = open_clip_source(path, split="held_out", holdout=holdout, shuffle=False, validate=False)
    out = []
    if isinstance(source, ClipImageFolder):
        for i in range(len(source)):
            image = source.load(i)
            if image is not None:
                out.append((source.key(i), image))
            if limit and len(out) == limit:
                break
        return out
    for identity, image in source.records():
        if image is not None:
            out.append((identity, image))
        if limit and len(out) == limit:
            break
    return out


def count_shard_samples(shards: Sequence[str]) -> int:
    """Samples in img2dataset shards: the ``*_stats.json`` 'successes' next to each shard when
    present (img2dataset writes them), else one pass over the tar headers (no decoding)."""
    total = 0
    for s in shards:
        stats = s[:-4] + "_stats.json" if s.endswith(".tar") else None
        if stats and os.path.isfile(stats):
            with open(stats) as f:
                total += int(json.load(f).get("successes", 0))
            continue
        with tarfile.open(s) as t:
            total += len({os.path.basename(n).split(".", 1)[0] for n in t.getnames()
                          if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))})
    return total

