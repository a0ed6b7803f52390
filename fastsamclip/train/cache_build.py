"""Building the teacher cache (``fastsamclip cache-teachers``): over GPUs and nodes, resumable.

The plan (:func:`plan_units`) cuts the data into pieces: one per D_CLIP shard, 4096 images of an
image folder or 64 SA-1B images each. Rank r of N builds pieces r, r + N, ... of the plan (fixed
by the plan, not by what is on disk when it starts, so ranks that start at different times still
build every piece once), skipping those already there; each piece is written atomically when its
images are all through the teachers. Rank 0 writes ``index.json`` once every piece exists. The
ranks share nothing but the folder: no process group, so no collective can time out while one
rank has more left to do.

What a cache is built with (``cache.json``: the teachers' fingerprints, sizes, resolutions,
decode path, dtype and the plan's digest) is written by the first rank to get there; a rerun with
the same settings continues (or returns at once when the index is there), and other settings are
refused unless ``overwrite``, which removes the previous cache whole before anything is written.
With ``--clip-decode auto`` every rank, and every resumed run, follows the decode path written
there, so a cache never mixes views of two paths. The batch size of the teacher passes is not a
setting: it changes nothing but the rounding of a forward pass.

Work inside a rank: DataLoader workers (``num_workers``) read and decode the pieces' images, each
worker its own pieces, and hand them over in chunks of ``batch_size``; the training process runs
the teachers (the same ``TeacherTargets.live_clip`` / ``live_sam`` as training, on the same views)
and writes each piece when its last chunk is through. A tqdm bar with img/s and an ETA (rank 0).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from fastsamclip.data import (
    ClipWebDataset,
    DecoderChoice,
    SA1BDataset,
    SkipCounter,
    auto_workers,
    decode_all_views_on,
    decode_views,
    log_choice,
    open_clip_source,
    select_decoder,
)
from fastsamclip.errors import ConfigError, DataError, check_range
from fastsamclip.files import writable_dir, write_json
from fastsamclip.modeling import get_sam_config, load_clip_teacher, load_sam_teacher
from fastsamclip.train.config import TrainConfig
from fastsamclip.train.distributed import Dist, dist_from_env
from fastsamclip.train.targets import TeacherTargets
from fastsamclip.train.teacher_cache import (
    DTYPES,
    FOLDER_PIECE_IMAGES,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    PIECES,
    SAM_PIECE_IMAGES,
    SETTINGS,
    TeacherCacheWriter,
    Unit,
    cache_meta,
    clip_tensor,
    remove_cache,
)
from fastsamclip.transforms import DECODE_ERRORS, sam_pixels

logger = logging.getLogger("fastsamclip.train")


def _chunks(kind: str, label: str, names: List[str], size: int) -> List[Unit]:
    order = sorted(range(len(names)), key=names.__getitem__)
    out = []
    for n, s in enumerate(range(0, len(order), size)):
        idx = tuple(order[s:s + size])
        digest = hashlib.sha1("\n".join(names[i] for i in idx).encode()).hexdigest()
        out.append(Unit(kind, f"{label}#{n:06d}", "", idx, digest))
    return out


def plan_units(clip_source, sam_data: SA1BDataset, folder_piece: int = FOLDER_PIECE_IMAGES,
               sam_piece: int = SAM_PIECE_IMAGES) -> List[Unit]:
    """The pieces of a cache of these data: one per shard, chunks of an image folder and of SA-1B."""
    if isinstance(clip_source, ClipWebDataset):
        units = [Unit("clip", clip_source.names[u], u) for u in clip_source.shards]
    else:
        label = os.path.basename(clip_source.root)
        units = _chunks("clip", label, [clip_source.key(i) for i in range(len(clip_source))], folder_piece)
    return units + _chunks("sam", os.path.basename(os.path.normpath(sam_data.root)), list(sam_data.stems), sam_piece)


def plan_digest(units: Sequence[Unit]) -> str:
    return hashlib.sha1("\n".join(f"{u.kind}\t{u.name}\t{u.digest}" for u in units).encode()).hexdigest()



class _UnitImages(IterableDataset):
    """The images of a list of units, in chunks of ``batch`` readable ones, each DataLoader worker
    taking every W-th unit: ``(unit index, names, payload, skipped, last)``.

    CLIP payload: ``{r: uint8 (n, 3, r, r)}`` views (decoded here, ``decode == "cpu"``) or the
    list of encoded images (``"none"``: decoded on the device by the consumer); SAM payload:
    ``(uint8 (n, 3, L, L), [(h, w)] * n)`` in SAM's geometry.
    """

    def __init__(self, units: Sequence[Unit], clip_source, sam_data: SA1BDataset, resolutions: Sequence[int],
                 sam_size: int, batch: int, decode: str):
        self.units, self.clip_source, self.sam_data = list(units), clip_source, sam_data
        self.resolutions, self.sam_size, self.batch, self.decode = tuple(resolutions), sam_size, batch, decode

    def _records(self, u: Unit, skipped: SkipCounter) -> Iterator[Tuple[str, object]]:
        if u.kind == "sam":
            for i in u.items:
                image = self.sam_data.load_image(i, skipped)
                yield self.sam_data.stems[i], None if image is None else sam_pixels(image, self.sam_size)
            return
        records = (self.clip_source.shard_records(u.source, skipped) if u.source else
                   ((self.clip_source.key(i), self.clip_source.files[i]) for i in u.items))
        for name, data in records:
            if data is not None and self.decode == "none":
                yield name, torch.frombuffer(bytearray(_read(data)), dtype=torch.uint8)
                continue
            if data is None:
                continue
            try:
                yield name, decode_views(data, self.resolutions)
            except DECODE_ERRORS as e:
                skipped.record("decode_error", name, repr(e))
                yield name, None

    def _chunk(self, u: Unit, got: list):
        names = [n for n, _ in got]
        if u.kind == "sam":
            return names, (torch.stack([p for _, (p, _) in got]) if got else None, [hw for _, (_, hw) in got])
        if self.decode == "none":
            return names, [d for _, d in got]
        return names, {r: torch.stack([v[r] for _, v in got]) for r in self.resolutions} if got else {}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for ui in range(w, len(self.units), n_workers):
            u, got, skipped = self.units[ui], [], SkipCounter(self.units[ui].name, quiet=True)
            for name, payload in self._records(u, skipped):
                if payload is None:
                    continue
                got.append((name, payload))
                if len(got) == self.batch:
                    yield (ui, *self._chunk(u, got), 0, False)
                    got = []
            yield (ui, *self._chunk(u, got), sum(skipped.values()), True)


def _read(data) -> bytes:
    """Encoded bytes, or a file's bytes for a path."""
    if isinstance(data, (bytes, bytearray)):
        return data
    with open(data, "rb") as f:
        return f.read()


def _settings(meta: dict, resolutions, decoder: str, dtype: torch.dtype, units: Sequence[Unit]) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, **meta, "resolutions": sorted(resolutions),
            "clip_decode": decoder, "dtype": {v: k for k, v in DTYPES.items()}[dtype], "plan": plan_digest(units),
            "pieces_planned": {k: sum(u.kind == k for u in units) for k in ("clip", "sam")}}


def _differences(old: dict, new: dict) -> List[str]:
    keys = [k for k in new if k != "pieces_planned"] + [k for k in old if k not in new and k != "pieces_planned"]
    return [k for k in keys if old.get(k) != new.get(k)]


def _read_settings(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, SETTINGS)) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent, or being written by another rank
        return None


def _create_settings(root: str, settings: dict) -> None:
    """Write the settings file unless one exists (the first rank to get there wins, atomically)."""
    tmp = os.path.join(root, f".tmp-{SETTINGS}-{os.getpid()}")
    write_json(tmp, settings)
    try:
        os.link(tmp, os.path.join(root, SETTINGS))
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)


def _other_than(root: str, old: Optional[dict], settings: dict, adopt_decode: bool) -> Optional[str]:
    """What differs between the cache in ``root`` and ``settings`` (None: nothing, or no cache)."""
    if old is not None:
        diff = [k for k in _differences(old, settings) if not (adopt_decode and k == "clip_decode")]
        return ", ".join(diff) or None
    if os.path.isfile(os.path.join(root, INDEX)) or glob.glob(os.path.join(root, "clip-*.safetensors")):
        return "an older cache format"
    pieces = os.path.join(root, PIECES)
    if os.path.isdir(pieces) and any(not f.startswith(".tmp-") for f in os.listdir(pieces)):
        return f"pieces without {SETTINGS}"
    return None


def _prepare(root: str, settings: dict, d: Dist, overwrite: bool, adopt_decode: bool) -> dict:
    """Settle what ``root`` holds against ``settings``; returns the settings the build follows.

    The same settings: resume (or nothing to do when finished). Other settings, or another
    format's cache: refused unless ``overwrite``, then rank 0 removes the old cache whole while
    the other ranks wait for the new settings. Ranks need no process group: the first to find no
    settings writes them, and with ``adopt_decode`` (``--clip-decode auto``) every rank follows
    the decode path written there, so a cache never mixes two paths."""
    old = _read_settings(root)
    other = _other_than(root, old, settings, adopt_decode)
    if other and not overwrite:
        raise ConfigError(f"--cache-out {root} holds a teacher cache built with other settings ({other}); pass "
                          "--overwrite to replace it whole, or give another --cache-out")
    if other and d.main:
        remove_cache(root)
        logger.info("teacher cache %s: the cache built with other settings (%s) is removed", root, other)
    waited = time.monotonic()
    while True:
        old = _read_settings(root)
        if old is not None and not _other_than(root, old, settings, adopt_decode):
            return {**settings, "clip_decode": old["clip_decode"]}
        if old is None and not _other_than(root, None, settings, adopt_decode):
            _create_settings(root, settings)
            continue
        time.sleep(0.5)  # rank 0 is removing the old cache
        if time.monotonic() - waited > 60:
            logger.info("rank %d: waiting for rank 0 to replace the cache in %s", d.rank, root)
            waited = time.monotonic()


@torch.no_grad()
def cache_teachers(cfg: TrainConfig, out: Optional[str] = None, batch_size: int = 32, sam_teacher=None,
                   clip_teacher=None, dtype: torch.dtype = torch.float32, dist: Optional[Dist] = None,
                   folder_piece: int = FOLDER_PIECE_IMAGES, sam_piece: int = SAM_PIECE_IMAGES) -> str:
    """Run the teachers once over D_CLIP (every image, held-out ones too, at every CLIP resolution of
    the three stages) and D_SAM (every image at the SAM input size); returns the cache folder.

    On this rank's share of the pieces (``dist``: from torchrun's environment by default; ranks
    coordinate through the folder, with no process group); rank 0 writes the index once every
    piece is there. The teachers run through the same functions as in training
    (``TeacherTargets.live_clip`` / ``live_sam`` on the same uint8 views), so cached targets equal
    live ones."""
    for name, v in (("batch_size (--batch-size)", batch_size), ("folder_piece", folder_piece),
                    ("sam_piece", sam_piece)):
        check_range(name, v, 1, integer=True, error=ConfigError)
    d = dist or dist_from_env()
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() and cfg.device in ("auto", "cuda")
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    if sam_teacher is None or clip_teacher is None:
        cfg.teacher_weights()  # a teacher without weights is refused before anything is read
    flag = "--cache-out" if out else "--teacher-cache" if cfg.teacher_cache else "--out"
    out = out or cfg.teacher_cache or os.path.join(cfg.out, "teacher-cache")
    writable_dir(out, flag)  # a read-only or full disk: one line now, not hours later
    b = get_sam_config(cfg.sam_type).backbone
    sam_size = cfg.sam_image_size or b.img_size
    clip_source = open_clip_source(cfg.clip_data, shuffle=False)  # both validated before the teachers load
    ds = SA1BDataset(cfg.sam_data, seed=cfg.seed, long_side=sam_size)
    units = plan_units(clip_source, ds, folder_piece, sam_piece)
    resolutions = sorted(set(cfg.clip_resolutions) | set(cfg.stage3_resolutions))
    workers = auto_workers(device.type, d.local_world_size) if cfg.num_workers < 0 else cfg.num_workers
    # "auto" keeps the path an unfinished cache was started with: a resumed build never mixes two.
    previous = (_read_settings(out) or {}).get("clip_decode") if cfg.clip_decode == "auto" and not cfg.overwrite \
        else None
    choice = select_decoder(cfg.clip_decode, cfg.clip_data, device, workers, min(resolutions), cached=previous)
    if previous is not None and choice.name == previous:
        choice = DecoderChoice(previous, "the path this cache was started with")
    sam = sam_teacher if sam_teacher is not None else load_sam_teacher(cfg.sam_checkpoint, cfg.sam_type)
    clip = clip_teacher if clip_teacher is not None else load_clip_teacher(cfg.clip_model, cfg.clip_pretrained)
    sam.to(device).eval()
    clip.to(device).eval()
    settings = _prepare(out, _settings(cache_meta(sam, clip, sam_size), resolutions, choice.name, dtype, units), d,
                        cfg.overwrite, adopt_decode=cfg.clip_decode == "auto")
    if os.path.isfile(os.path.join(out, INDEX)):
        logger.info("teacher cache %s is complete already (%d pieces); nothing to do", out, len(units))
        return out
    if d.main:
        log_choice(choice if choice.name == settings["clip_decode"] else
                   DecoderChoice(settings["clip_decode"], "the path this cache was started with, by another rank"),
                   device)
    writer = TeacherCacheWriter(out, settings)
    # Rank r's pieces are fixed by the plan alone (not by what is on disk when it starts), so
    # ranks that start at different times still build every piece once.
    mine = [u for u in units[d.rank::d.world_size] if not writer.has(u)]
    logger.info("teacher cache %s: %d pieces, %d built before, rank %d of %d builds %d", out, len(units),
                sum(writer.has(u) for u in units), d.rank, d.world_size, len(mine))
    use_amp = device.type == "cuda" and cfg.amp in ("auto", "bf16")
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else (
        lambda: torch.autocast(device.type, enabled=False))
    live = TeacherTargets(sam, clip, None, ac)
    _build(writer, mine, _UnitImages(mine, clip_source, ds, resolutions, sam_size, batch_size,
                                     "none" if settings["clip_decode"] == "cuda" else "cpu"),
           live, device, workers, cfg, d)
    if d.main:
        _wait_for(writer, units)
        path = writer.finish(units)
        logger.info("teacher cache %s: index written (%s)", out, path)
    return out


def _build(writer: TeacherCacheWriter, units: List[Unit], images: _UnitImages, live: TeacherTargets,
           device: torch.device, workers: int, cfg: TrainConfig, d: Dist) -> None:
    loader = images if workers == 0 or not units else torch.utils.data.DataLoader(
        images, batch_size=None, num_workers=min(workers, len(units)), pin_memory=device.type == "cuda",
        prefetch_factor=cfg.prefetch_batches, persistent_workers=False)
    bar = tqdm(total=len(units), desc=f"teacher cache (rank {d.rank})", unit="piece", dynamic_ncols=True,
               disable=not (cfg.progress and d.main))
    partial: Dict[int, Tuple[List[str], Dict[str, List[torch.Tensor]]]] = {}
    t0, done_images, skipped = time.perf_counter(), 0, 0
    for ui, names, payload, n_skipped, last in loader:
        u = units[ui]
        got_names, got = partial.setdefault(ui, ([], {}))
        if names:
            for key, t in _teacher_outputs(u, names, payload, live, device, images.resolutions, cfg).items():
                got.setdefault(key, []).append(t.to("cpu"))
            got_names.extend(names)
        if last:
            partial.pop(ui)
            tensors = {k: torch.cat(v) for k, v in got.items()}
            writer.write_piece(u, got_names, tensors)
            done_images += len(got_names)
            skipped += n_skipped
            bar.update(1)
            bar.set_postfix({"img/s": f"{done_images / max(1e-9, time.perf_counter() - t0):.1f}"})
    bar.close()
    logger.info("rank %d: %d pieces, %d images in %.1f s (%d unreadable, skipped)", d.rank, len(units), done_images,
                time.perf_counter() - t0, skipped)


def _teacher_outputs(u: Unit, names, payload, live: TeacherTargets, device, resolutions,
                     cfg: TrainConfig) -> Dict[str, torch.Tensor]:
    if u.kind == "sam":
        pixels, hw = payload
        return {"sam": live.live_sam(pixels.to(device), hw)}
    if isinstance(payload, list):  # encoded: decode on the device
        views = decode_all_views_on(payload, resolutions, device)
        if any(v is None for v in views):
            bad = [n for n, v in zip(names, views) if v is None]
            raise DataError(f"teacher cache: {bad[0]} decodes on the CPU but not on {device}; build with "
                            "--clip-decode cpu")
        payload = {r: torch.stack([v[r] for v in views]) for r in resolutions}
    return {clip_tensor(r): live.live_clip(payload[r].to(device)) for r in resolutions}


def _wait_for(writer: TeacherCacheWriter, units: Sequence[Unit]) -> None:
    """Rank 0: until every rank's pieces are there (ranks share nothing but the folder)."""
    last_log = time.monotonic()
    while True:
        missing = sum(not writer.has(u) for u in units)
        if not missing:
            return
        if time.monotonic() - last_log > 60:
            logger.info("waiting for %d pieces from the other ranks", missing)
            last_log = time.monotonic()
        time.sleep(1.0)
