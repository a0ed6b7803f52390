"""Teacher outputs computed once and read back during training, at the paper's scale.

The two teachers are frozen, so their outputs for a given input never change. Per step they cost
about as much as the student's forward pass (the CLIP teacher is a ViT-L/14 in the paper, the SAM
teacher's image encoder a ViT-B at 1024 px); reading them from disk removes that cost. What is
stored:

- CLIP: the teacher's image embedding (E,) per sample identity and CLIP-stream resolution r. The
  identity names the sample's source too (shard folder / file / key, or folder name / file; see
  ``fastsamclip.data.clip.source_name``), so two sources whose keys collide (every img2dataset
  run numbers its keys from 000000000) keep one entry each, and a moved dataset still finds them.
  The teacher sees exactly the view the student sees at r (decoded by the run's decode path,
  ``fastsamclip.data.decode``, the r x r crop resized to the teacher's own input size).
- SAM: the teacher's image embedding (C, g, g) per SA-1B image at the student's SAM input size.
  Teacher masks for any prompt then come from the teacher's mask decoder on that embedding, which
  is cheap next to the image encoder (and prompts change every epoch, so masks are not stored).

Layout (format 4), made for 40M images x 3 resolutions on 32 GPUs:

    cache.json                    what the cache is built with (teachers, sizes, resolutions,
                                  decode path, dtype, the plan of pieces); written first
    pieces/clip-<hash>.safetensors  one per D_CLIP shard (or 4096 images of an image folder):
                                  "names" (n, w) uint8, the sorted identities; "clip@<r>" (n, E)
    pieces/sam-<hash>.safetensors   one per 64 SA-1B images: "names"; "sam" (n, C, g, g)
    index.json                    each piece's first and last name, count and file; written last

Pieces hold disjoint ranges of sorted names, so a reader keeps only the index (one row per
piece: ~4k rows for the paper's D_CLIP) and opens a piece, its names and a memory map of its
file, when a batch needs it (the last ``OPEN_PIECES`` stay open): memory per rank does not grow
with the number of entries, and a batch reads its rows without opening a file per entry.

Building (:mod:`fastsamclip.train.cache_build`, one process or ``torchrun``): the pieces are
split over the ranks (and nodes); each is written atomically when complete, so a killed build
resumes where it stopped (pieces present are never rebuilt), and a finished one (``index.json``
present) returns at once. A piece depends only on its data, the teachers and the settings, so
the cache is the same whatever the number of ranks.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from fastsamclip.errors import ConfigError, DataError
from fastsamclip.files import atomic_write, write_json

FORMAT = "fastsamclip.teacher_cache"
# 4: pieces of sorted names with a range index (memory per rank independent of the entries),
# built per piece and resumable. 3: one index.json of every entry, CLIP entries keyed by identity;
# 2 named the source by its absolute path (a moved dataset missed every entry); 1 keyed entries
# by the WebDataset key alone, so the sources of a "::" spec overwrote each other's entries.
FORMAT_VERSION = 4
SETTINGS = "cache.json"
INDEX = "index.json"
PIECES = "pieces"
FOLDER_PIECE_IMAGES = 4096  # images of an image folder per piece (a shard is one piece)
SAM_PIECE_IMAGES = 64  # SA-1B images per piece (ViT-B: 4 MB each in fp32, 256 MB per file)
OPEN_PIECES = 64  # pieces a reader keeps open: a rank's DataLoader workers each read their own shard
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def clip_tensor(resolution: int) -> str:
    return f"clip@{int(resolution)}"


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's weights: a cache made with other teacher weights must not be used.

    Hashes every tensor's bytes (a ViT-L/14 CLIP teacher is ~1.7 GB: a few seconds, once per run).
    """
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_meta(sam, clip, sam_size: int) -> dict:
    """What a cache was made with; a run with other teachers or sizes must not use it."""
    return {"sam_teacher": fingerprint(sam.image_encoder), "clip_teacher": fingerprint(clip.model.visual),
            "sam_image_size": int(sam_size), "clip_image_size": int(clip.image_size),
            "clip_mean": list(clip.image_mean), "clip_std": list(clip.image_std)}


def _names_array(names: Sequence[str]) -> torch.Tensor:
    """Sorted names as a (n, width) uint8 tensor of fixed-width UTF-8 (numpy "S" order = str order)."""
    a = np.array([n.encode() for n in names], dtype=bytes) if names else np.zeros(0, "S1")
    return torch.from_numpy(a.view(np.uint8).reshape(len(names), max(a.dtype.itemsize, 1)).copy())


class Piece:
    """A piece file read by rows: its names held in memory, the rows a batch asks for read with
    ``os.pread`` (adjacent rows in one read), nothing else kept.

    The file is safetensors (8-byte header length, JSON header of dtypes, shapes and offsets, then
    the data). Not through safetensors' ``get_slice``, which keeps ~30 bytes of Python memory per
    call for good (tracemalloc, safetensors 0.8.0: +40 kB every 1,428 single-row slices), i.e.
    gigabytes over a run that reads rows by the billion; and not through memory maps, whose pages
    stay in the process's RSS once read (a whole paper-size piece, 10k images x 3 sides x 768
    floats, is 92 MB).
    """

    NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8}  # BF16: bits, viewed by torch

    def __init__(self, path: str):
        self.file = open(path, "rb", buffering=0)  # closed with the piece
        n = int.from_bytes(self.file.read(8), "little")
        header = json.loads(self.file.read(n))
        self.path, self.base = path, 8 + n
        self.tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shape = self.tensors["names"]["shape"]
        names = self.read("names", 0, shape[0])
        self.names = names.reshape(shape[0], -1).view(f"S{max(shape[1], 1)}").ravel()

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name``."""
        info = self.tensors[name]
        dtype, shape = np.dtype(self.NUMPY[info["dtype"]]), tuple(info["shape"])
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        data = os.pread(self.file.fileno(), (stop - start) * row, self.base + info["data_offsets"][0] + start * row)
        return np.frombuffer(data, dtype).reshape((stop - start, *shape[1:]))

    def rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name``, in that order."""
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        cuts = np.flatnonzero(np.diff(sorted_rows) > 1) + 1  # runs of adjacent rows: one read each
        blocks = []
        for run in np.split(sorted_rows, cuts):
            block = self.read(name, int(run[0]), int(run[-1]) + 1)
            blocks.append(block[run - run[0]])
        got = np.empty_like(np.concatenate(blocks))
        got[order] = np.concatenate(blocks)
        t = torch.from_numpy(got)
        return t.view(torch.bfloat16) if self.tensors[name]["dtype"] == "BF16" else t


# ------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class Unit:
    """One piece of the plan: what it covers and how to read it."""

    kind: str  # "clip" | "sam"
    name: str  # a shard's source name, or "<folder>#<n>" for a chunk of an image folder or SA-1B
    source: str  # the shard's URL; or "" for a chunk (its items say which images)
    items: Tuple[int, ...] = ()  # a chunk's image indices (folder files / SA-1B stems)
    digest: str = ""  # a chunk's identities hashed: a folder that changed is another plan

    @property
    def file(self) -> str:
        return f"{self.kind}-{hashlib.sha1(self.name.encode()).hexdigest()[:16]}.safetensors"


class TeacherCacheWriter:
    """Writes pieces (each atomically, complete or absent) and, once all are there, the index."""

    def __init__(self, root: str, settings: dict):
        self.root, self.settings = root, dict(settings)
        self.dir = os.path.join(root, PIECES)
        os.makedirs(self.dir, exist_ok=True)

    def has(self, unit: Unit) -> bool:
        return os.path.isfile(os.path.join(self.dir, unit.file))

    def write_piece(self, unit: Unit, names: Sequence[str], tensors: Dict[str, torch.Tensor]) -> str:
        """Rows of ``tensors`` belong to ``names`` (in the same order); stored sorted by name."""
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError(f"teacher cache: the entry {dup!r} came twice in {unit.name}; every sample needs its own "
                            "identity (a shard holding one key twice, or the same image folder given twice)")
        order = sorted(range(len(names)), key=names.__getitem__)
        dtype = DTYPES[self.settings["dtype"]]
        out = {"names": _names_array([names[i] for i in order])}
        for k, t in tensors.items():
            out[k] = t[order].to("cpu", dtype).contiguous() if len(order) else t.to("cpu", dtype)
        path = os.path.join(self.dir, unit.file)
        meta = {"piece": json.dumps({"kind": unit.kind, "unit": unit.name, "format": FORMAT_VERSION})}
        atomic_write(path, lambda tmp: save_file(out, tmp, metadata=meta))
        return path

    def finish(self, units: Sequence[Unit]) -> str:
        """Write ``index.json`` from the pieces of ``units`` (all must be present); returns its path."""
        missing = [u for u in units if not self.has(u)]
        if missing:
            raise DataError(f"teacher cache {self.root!r}: {len(missing)} of {len(units)} pieces are not built "
                            f"(first: {missing[0].name}); rerun `fastsamclip cache-teachers` with the same settings "
                            "to finish it")
        pieces: Dict[str, list] = {"clip": [], "sam": []}
        for u in units:
            names = Piece(os.path.join(self.dir, u.file)).names
            if len(names):
                pieces[u.kind].append([names[0].decode(), names[-1].decode(), len(names), u.file])
        for kind, rows in pieces.items():
            rows.sort()
            for a, b in zip(rows, rows[1:]):
                if b[0] <= a[1]:
                    raise DataError(f"teacher cache {self.root!r}: pieces {a[3]} and {b[3]} hold overlapping names "
                                    f"({b[0]!r} <= {a[1]!r}); two sources name their samples alike")
        for tmp in glob.glob(os.path.join(self.dir, ".tmp-*")):  # left by a killed build
            os.remove(tmp)
        path = os.path.join(self.root, INDEX)
        write_json(path, {"format": FORMAT, "version": FORMAT_VERSION, **self.settings, "pieces": pieces}, indent=None)
        return path


# ------------------------------------------------------------------------------------------ reading
class TeacherCache:
    """Read side: ``clip_batch(keys, r)`` / ``sam_batch(keys)`` give the stored tensors, or None when
    any entry is absent (the caller then runs the teacher); ``clip(key, r)`` / ``sam(key)`` one."""

    def __init__(self, root: str, open_pieces: int = OPEN_PIECES):
        path = os.path.join(root, INDEX)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(root, SETTINGS)):
                raise FileNotFoundError(f"teacher cache {root!r} is not finished (no {INDEX}); rerun `fastsamclip "
                                        "cache-teachers` with the same settings: it continues where it stopped")
            raise FileNotFoundError(f"teacher cache {root!r} has no {INDEX}; build it with `fastsamclip "
                                    "cache-teachers`, or drop --teacher-cache to use live teachers")
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a fastsamclip teacher cache (format {index.get('format')!r}); "
                              "build one with `fastsamclip cache-teachers`")
        check_version(root, index.get("version"))
        self.root = root
        self.meta = {k: v for k, v in index.items() if k != "pieces"}
        self._pieces: Dict[str, list] = index["pieces"]
        self._firsts = {k: [p[0] for p in v] for k, v in self._pieces.items()}
        self._open: "OrderedDict[str, Piece]" = OrderedDict()  # the pieces read last, oldest first
        self.open_pieces = open_pieces

    def check_compatible(self, expected: dict) -> None:
        """Raise naming every field where the cache differs from this run (teachers, sizes)."""
        bad = [f"{k}: cache has {self.meta.get(k)!r}, this run {v!r}" for k, v in expected.items()
               if self.meta.get(k) != v]
        if bad:
            raise ConfigError(f"teacher cache {self.root!r} was built for another set-up ("
                              + "; ".join(bad) + "); rebuild it with `fastsamclip cache-teachers` "
                              "for these teachers and sizes, or drop --teacher-cache")

    def _piece(self, file: str) -> Piece:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        piece = self._open[file] = Piece(os.path.join(self.root, PIECES, file))
        if len(self._open) > self.open_pieces:
            self._open.popitem(last=False)  # its memory maps go with it
        return piece

    def _locate(self, kind: str, name: str) -> Optional[Tuple[str, int]]:
        """(piece file, row) of an entry, or None."""
        p = bisect.bisect_right(self._firsts[kind], name) - 1
        if p < 0 or name > self._pieces[kind][p][1]:
            return None
        file = self._pieces[kind][p][3]
        names = self._piece(file).names
        key = name.encode()
        row = int(np.searchsorted(names, key))
        return (file, row) if row < len(names) and names[row] == key else None

    def _batch(self, kind: str, keys: Sequence[str], tensor: str) -> Optional[torch.Tensor]:
        where = [self._locate(kind, k) for k in keys]
        if not keys or any(w is None for w in where):
            return None
        by_file: Dict[str, List[Tuple[int, int]]] = {}
        for i, (file, row) in enumerate(where):
            by_file.setdefault(file, []).append((i, row))
        out: Optional[torch.Tensor] = None
        for file, items in by_file.items():
            piece = self._piece(file)
            if tensor not in piece.tensors:
                return None
            got = piece.rows(tensor, np.array([r for _, r in items]))
            if out is None:
                out = torch.empty((len(keys), *got.shape[1:]), dtype=got.dtype)
            out[torch.tensor([i for i, _ in items])] = got
        return out.float()

    def clip_batch(self, keys: Sequence[str], resolution: int) -> Optional[torch.Tensor]:
        """(B, E) for all keys at side r, or None if any is missing."""
        return self._batch("clip", list(keys), clip_tensor(resolution))

    def sam_batch(self, keys: Sequence[str]) -> Optional[torch.Tensor]:
        """(B, C, g, g) for all SA-1B keys, or None if any is missing."""
        return self._batch("sam", list(keys), "sam")

    def clip(self, key: str, resolution: int) -> Optional[torch.Tensor]:
        t = self.clip_batch([key], resolution)
        return None if t is None else t[0]

    def sam(self, key: str) -> Optional[torch.Tensor]:
        t = self.sam_batch([key])
        return None if t is None else t[0]

    def names(self, kind: str) -> Iterator[str]:
        """Every entry name of ``kind`` in sorted order (reads each piece's names)."""
        for p in self._pieces[kind]:
            for n in self._piece(p[3]).names:
                yield n.decode()

    def count(self, kind: str) -> int:
        """Images (CLIP: each with one embedding per resolution) or SA-1B images stored."""
        return sum(p[2] for p in self._pieces[kind])

    def __len__(self) -> int:
        """Stored embeddings: CLIP images x resolutions + SA-1B images."""
        return self.count("clip") * len(self.meta.get("resolutions", [])) + self.count("sam")


def check_version(root: str, version) -> None:
    if version == FORMAT_VERSION:
        return
    if version == 1:
        raise ConfigError(f"teacher cache {root!r} is of version 1, whose CLIP entries were keyed without "
                          "their source (the shards of a '::' spec overwrote each other's targets); rebuild "
                          "it with `fastsamclip cache-teachers`")
    raise ConfigError(f"teacher cache {root!r} is of version {version!r}; this fastsamclip reads version "
                      f"{FORMAT_VERSION} (pieces with a range index, whose memory does not grow with the data): "
                      "rebuild it with `fastsamclip cache-teachers`")


def remove_cache(root: str) -> None:
    """Delete a cache's own files in ``root`` (any version), nothing else."""
    for name in (SETTINGS, INDEX):
        if os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
    if os.path.isdir(os.path.join(root, PIECES)):
        shutil.rmtree(os.path.join(root, PIECES))
    for old in glob.glob(os.path.join(root, "clip-*.safetensors")) + glob.glob(os.path.join(root, "sam-*.safetensors")):
        os.remove(old)  # version 3's chunk files
