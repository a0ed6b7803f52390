"""Teacher outputs computed once and read back during training.

The two teachers are frozen, so their outputs for a given input never change. Per step they cost
about as much as the student's forward pass (the CLIP teacher is a ViT-L/14 in the paper, the SAM
teacher's image encoder a ViT-B at 1024 px); reading them from disk removes that cost. What is
stored:

- CLIP: the teacher's image embedding (E,) per (sample identity, CLIP-stream resolution r). The
  identity names the sample's source too (shard folder / file / key, or folder name / file; see
  ``fastsamclip.data.clip.source_name``), so two sources whose keys collide (every img2dataset
  run numbers its keys from 000000000) keep one entry each, and a moved dataset still finds them;
  an entry name written twice is an error, never an overwrite. The teacher
  sees exactly what the student sees at resolution r (the r x r crop, resized to the teacher's own
  input size when r differs), so one entry per resolution.
- SAM: the teacher's image embedding (C, g, g) per SA-1B image at the student's SAM input size.
  Teacher masks for any prompt then come from the teacher's mask decoder on that embedding, which
  is cheap next to the image encoder (and prompts change every epoch, so masks are not stored).

Layout of a cache folder: chunk files ``clip-00000.safetensors``, ``sam-00000.safetensors`` (each
up to ``chunk_size`` entries, tensor name = entry name) and ``index.json`` (which file holds which
entry, plus the teachers' fingerprints and the preprocessing it was made with). Every file is
written atomically and ``index.json`` last, so an interrupted run leaves either the previous cache
or none, never a cache that points at missing data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsamclip.data import ClipWebDataset, SA1BDataset, open_clip_source
from fastsamclip.errors import ConfigError, DataError
from fastsamclip.files import atomic_write, write_json
from fastsamclip.modeling import get_sam_config, load_clip_teacher, load_sam_teacher
from fastsamclip.train.config import TrainConfig
from fastsamclip.train.targets import TeacherTargets
from fastsamclip.transforms import clip_pixels, sam_pixels

logger = logging.getLogger("fastsamclip.train")

FORMAT = "fastsamclip.teacher_cache"
# 3: CLIP entries keyed by identity (the shard's folder and file name + key, or the image
# folder's name + the file's path in it). Version 2 named the source by its absolute path (a
# moved dataset missed every entry); version 1 keyed entries by the WebDataset key alone, so the
# sources of a "::" spec overwrote each other's entries.
FORMAT_VERSION = 3
INDEX = "index.json"


def clip_entry(key: str, resolution: int) -> str:
    return f"{key}@{int(resolution)}"


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


class TeacherCacheWriter:
    """Accumulates entries and writes them in chunk files; :meth:`close` writes the index."""

    def __init__(self, root: str, meta: dict, chunk_size: int = 4096, dtype: torch.dtype = torch.float32):
        self.root = root
        self.meta = dict(meta)
        self.chunk_size = chunk_size  # entries per chunk file (SAM ViT-B entries are 4 MB each in fp32)
        self.dtype = dtype  # float32 keeps cached training identical to live; bfloat16 halves the disk
        self.entries: Dict[str, Dict[str, str]] = {"clip": {}, "sam": {}}
        self._pending: Dict[str, Dict[str, torch.Tensor]] = {"clip": {}, "sam": {}}
        self._chunks = {"clip": 0, "sam": 0}
        os.makedirs(root, exist_ok=True)

    def add(self, kind: str, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending[kind] or name in self.entries[kind]:
            raise DataError(f"teacher cache: the {kind} entry {name!r} came twice; every sample needs its own "
                            "identity (a shard holding one key twice, or the same image folder given twice)")
        self._pending[kind][name] = tensor.detach().to("cpu", self.dtype).contiguous().clone()
        if len(self._pending[kind]) >= self.chunk_size:
            self._flush(kind)

    def _flush(self, kind: str) -> None:
        pending = self._pending[kind]
        if not pending:
            return
        fname = f"{kind}-{self._chunks[kind]:05d}.safetensors"
        atomic_write(os.path.join(self.root, fname), lambda tmp: save_file(pending, tmp))
        for name in pending:
            self.entries[kind][name] = fname
        self._chunks[kind] += 1
        self._pending[kind] = {}

    def close(self) -> str:
        for kind in self._pending:
            self._flush(kind)
        index = {"format": FORMAT, "version": FORMAT_VERSION, **self.meta, "entries": self.entries}
        path = os.path.join(self.root, INDEX)
        write_json(path, index, indent=None)
        return path


class TeacherCache:
    """Read side: ``clip(key, r)`` and ``sam(key)`` give the stored tensor or None when absent."""

    def __init__(self, root: str):
        path = os.path.join(root, INDEX)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"teacher cache {root!r} has no {INDEX}; build it with `fastsamclip cache-teachers` "
                "(an interrupted build leaves no index) or drop --teacher-cache to use live teachers")
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a fastsamclip teacher cache (format {index.get('format')!r}); "
                              "build one with `fastsamclip cache-teachers`")
        if index.get("version") == 1:
            raise ConfigError(f"teacher cache {root!r} is of version 1, whose CLIP entries were keyed without "
                              "their source (the shards of a '::' spec overwrote each other's targets); rebuild "
                              "it with `fastsamclip cache-teachers`")
        if index.get("version") != FORMAT_VERSION:
            raise ConfigError(f"teacher cache {root!r} is of version {index.get('version')!r}; this fastsamclip "
                              f"reads version {FORMAT_VERSION}: rebuild it with `fastsamclip cache-teachers`")
        self.root = root
        self.meta = {k: v for k, v in index.items() if k != "entries"}
        self.entries: Dict[str, Dict[str, str]] = index["entries"]
        self._handles: Dict[str, object] = {}

    def check_compatible(self, expected: dict) -> None:
        """Raise naming every field where the cache differs from this run (teachers, sizes)."""
        bad = [f"{k}: cache has {self.meta.get(k)!r}, this run {v!r}" for k, v in expected.items()
               if self.meta.get(k) != v]
        if bad:
            raise ConfigError(f"teacher cache {self.root!r} was built for another set-up ("
                             + "; ".join(bad) + "); rebuild it with `fastsamclip cache-teachers` "
                             "for these teachers and sizes, or drop --teacher-cache")

    def _get(self, kind: str, name: str) -> Optional[torch.Tensor]:
        fname = self.entries[kind].get(name)
        if fname is None:
            return None
        h = self._handles.get(fname)
        if h is None:
            # safe_open maps the file and reads only the asked tensor: chunk files stay on disk.
            h = self._handles[fname] = safe_open(os.path.join(self.root, fname), framework="pt")
        return h.get_tensor(name).float()

    def clip(self, key: str, resolution: int) -> Optional[torch.Tensor]:
        return self._get("clip", clip_entry(key, resolution))

    def sam(self, key: str) -> Optional[torch.Tensor]:
        return self._get("sam", key)

    def clip_batch(self, keys: Iterable[str], resolution: int) -> Optional[torch.Tensor]:
        """(B, E) for all keys, or None if any is missing (the caller then runs the teacher)."""
        out = [self.clip(k, resolution) for k in keys]
        return None if any(t is None for t in out) else torch.stack(out)

    def sam_batch(self, keys: Iterable[str]) -> Optional[torch.Tensor]:
        out = [self.sam(k) for k in keys]
        return None if any(t is None for t in out) else torch.stack(out)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


def cache_meta(sam, clip, sam_size: int) -> dict:
    """What a cache was made with; a run with other teachers or sizes must not use it."""
    return {"sam_teacher": fingerprint(sam.image_encoder), "clip_teacher": fingerprint(clip.model.visual),
            "sam_image_size": int(sam_size), "clip_image_size": int(clip.image_size),
            "clip_mean": list(clip.image_mean), "clip_std": list(clip.image_std)}


@torch.no_grad()
def cache_teachers(cfg: TrainConfig, out: Optional[str] = None, batch_size: int = 32, sam_teacher=None,
                   clip_teacher=None, dtype: torch.dtype = torch.float32) -> str:
    """Run the teachers once over D_CLIP (every image at every CLIP resolution of the three stages)
    and D_SAM (every image at the SAM input size) and write the cache; returns its folder.

    The teachers run through the same functions as in training (``TeacherTargets.live_clip`` /
    ``live_sam`` on the same uint8 views), so cached targets equal live ones."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if sam_teacher is None or clip_teacher is None:
        cfg.teacher_weights()  # a teacher without weights is refused before anything is read
    b = get_sam_config(cfg.sam_type).backbone
    sam_size = cfg.sam_image_size or b.img_size
    clip_source = open_clip_source(cfg.clip_data, shuffle=False)  # both validated before the teachers load
    ds = SA1BDataset(cfg.sam_data, seed=cfg.seed, long_side=sam_size)
    sam = sam_teacher if sam_teacher is not None else load_sam_teacher(cfg.sam_checkpoint, cfg.sam_type)
    clip = clip_teacher if clip_teacher is not None else load_clip_teacher(cfg.clip_model, cfg.clip_pretrained)
    sam.to(device).eval()
    clip.to(device).eval()
    out = out or cfg.teacher_cache or os.path.join(cfg.out, "teacher-cache")
    writer = TeacherCacheWriter(out, cache_meta(sam, clip, sam_size), dtype=dtype)
    use_amp = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else (
        lambda: torch.autocast(device.type, enabled=False))
    live = TeacherTargets(sam, clip, None, ac)
    resolutions = sorted(set(cfg.clip_resolutions) | set(cfg.stage3_resolutions))

    def clip_images():  # every image, held-out ones too: the cache does not depend on the split
        if isinstance(clip_source, ClipWebDataset):
            yield from clip_source
            return
        for i in range(len(clip_source)):
            item = clip_source[i]
            if item is not None:
                yield item

    pending: List[Tuple[str, object]] = []

    def flush_clip():
        for r in resolutions:
            emb = live.live_clip(torch.stack([clip_pixels(im, r) for _, im in pending]).to(device))
            for (k, _), e in zip(pending, emb):
                writer.add("clip", clip_entry(k, r), e)
        pending.clear()

    n_clip = 0
    for key, image in clip_images():
        pending.append((key, image))
        n_clip += 1
        if len(pending) == batch_size:
            flush_clip()
    if pending:
        flush_clip()
    n_sam = 0
    for s in range(0, len(ds), batch_size):
        raws = [(ds.stems[i], ds.load_raw(i)) for i in range(s, min(len(ds), s + batch_size))]
        raws = [(k, r) for k, r in raws if r is not None]
        if not raws:
            continue
        views = [sam_pixels(r.image, sam_size) for _, r in raws]
        emb = live.live_sam(torch.stack([v for v, _ in views]).to(device), [hw for _, hw in views])
        for (k, _), e in zip(raws, emb):
            writer.add("sam", k, e)
        n_sam += len(raws)
    path = writer.close()
    logger.info("teacher cache %s: %d D_CLIP images x %d resolutions, %d SA-1B images", out, n_clip,
                len(resolutions), n_sam)
    return os.path.dirname(path)
