"""The teacher cache at scale: the same pieces whatever the number of ranks, a killed build that
resumes to the same cache, settings that never mix, memory that does not grow with the entries,
and cache-teachers' bad input answered with one line."""

import filecmp
import json
import os
import tracemalloc

import pytest
import torch

from fastsamclip.cli import main
from fastsamclip.data import decode_views, open_clip_source
from fastsamclip.errors import DataError
from fastsamclip.train import Dist, TeacherCache, TeacherCacheWriter, cache_teachers
from fastsamclip.train import cache_build
from fastsamclip.train import teacher_cache as TC
from fastsamclip.train.targets import TeacherTargets

from ..test_campaign_cli import read_only_disk
from .conftest import make_cfg
from .test_safety import base_args, one_line


def build(env, out, rank=0, world=1, **kw):
    return cache_teachers(make_cfg(env, out), out=str(out), batch_size=3, sam_teacher=env["sam"],
                          clip_teacher=env["clip"], dist=Dist(rank, world), sam_piece=4, **kw)


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def same_tree(a, b):
    files = tree(a)
    assert files == tree(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@pytest.fixture(scope="module")
def one(env, tmp_path_factory):
    """The cache built by one process: 3 shard pieces and 2 SA-1B pieces (4 + 2 images)."""
    return build(env, tmp_path_factory.mktemp("one") / "cache")


def test_one_cache_whatever_the_ranks_and_a_killed_build_resumes_to_it(env, one, tmp_path, monkeypatch):
    cache = TeacherCache(one)
    assert len(tree(os.path.join(one, "pieces"))) == 5 and cache.count("clip") == 12 and cache.count("sam") == 6
    assert len(cache) == 12 * 3 + 6  # the three stage resolutions, 64 / 96 / 128
    two = tmp_path / "two"
    build(env, two, rank=1, world=2)  # rank 1 builds its pieces and leaves the index to rank 0
    assert not os.path.exists(two / "index.json") and len(tree(two / "pieces")) == 2
    build(env, two, rank=0, world=2)
    same_tree(one, two)

    killed, writes = tmp_path / "killed", []
    real = TC.save_file

    def dies_on_the_third_piece(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 3:
            real(tensors, path, metadata=metadata)  # half written: the temporary file exists ...
            raise KeyboardInterrupt  # ... and the process stops before the rename
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(TC, "save_file", dies_on_the_third_piece)
    with pytest.raises(KeyboardInterrupt):
        build(env, killed)
    assert len(tree(killed / "pieces")) == 2 and not os.path.exists(killed / "index.json")
    open(killed / "pieces" / ".tmp-sam-x.safetensors", "wb").write(b"\0" * 10)  # what a SIGKILL leaves
    with pytest.raises(FileNotFoundError, match="is not finished.*rerun `fastsamclip cache-teachers` with the same"):
        TeacherCache(str(killed))
    monkeypatch.setattr(TC, "save_file", real)
    writes.clear()
    real_write = TC.atomic_write
    monkeypatch.setattr(TC, "atomic_write", lambda path, fn: (writes.append(path), real_write(path, fn)))
    build(env, killed)
    assert sum("pieces" in p for p in writes) == 3  # only the three missing pieces
    same_tree(one, killed)  # the stray temporary file is gone too
    writes.clear()
    build(env, killed)  # finished: nothing is rebuilt
    assert writes == []


def test_cached_rows_are_the_live_teachers_on_the_same_views(env, one):
    cache = TeacherCache(one)
    names = list(cache.names("clip"))
    source = open_clip_source(env["spec"], shuffle=False)
    views = {k: decode_views(d, (64, 96)) for s in source.shards[1:] for k, d in source.shard_records(s)}
    live = TeacherTargets(env["sam"], env["clip"], None, lambda: torch.autocast("cpu", enabled=False))
    ordered = sorted(views)
    keys = [k for pair in zip(ordered[4:][::-1], ordered[:4]) for k in pair]  # two pieces, interleaved
    for r in (64, 96):
        torch.testing.assert_close(cache.clip_batch(keys, r), live.live_clip(torch.stack([views[k][r] for k in keys])),
                                   atol=1e-5, rtol=1e-5)
    assert cache.clip_batch(keys + ["clip/nothing-here"], 64) is None and cache.clip_batch(keys, 80) is None
    assert cache.clip(names[0], 128).shape == (32,) and cache.sam("sa_1").dim() == 3


def test_other_settings_are_refused_unless_overwrite_replaces_the_whole_cache(env, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["cache-teachers", *base_args(env, tmp_path / "run"), "--cache-out", str(out)]
    assert main(args) == 0
    assert main(args) == 0  # the same settings: complete already, nothing to do
    capsys.readouterr()
    one_line(capsys, main([*args, "--clip-resolutions", "96", "--stage3-resolutions", "96"]), "cache-teachers",
             "holds a teacher cache built with other settings (resolutions); pass --overwrite")
    assert main([*args, "--clip-resolutions", "96", "--stage3-resolutions", "96", "--overwrite"]) == 0
    cache = TeacherCache(str(out))
    assert cache.meta["resolutions"] == [96] and len(tree(out / "pieces")) == 3 + 1  # 3 shards, 6 SA-1B images
    assert cache.clip_batch(list(cache.names("clip")), 96) is not None
    # A cache of the previous format in the folder: refused, then replaced whole.
    old = tmp_path / "old"
    os.makedirs(old)
    (old / "index.json").write_text(json.dumps({"format": TC.FORMAT, "version": 3, "entries": {}}))
    (old / "clip-00000.safetensors").write_bytes(b"x")
    (old / "notes.txt").write_text("mine")
    old_args = ["cache-teachers", *base_args(env, tmp_path / "run"), "--cache-out", str(old)]
    capsys.readouterr()
    one_line(capsys, main(old_args), "cache-teachers", "(an older cache format)")
    assert main([*old_args, "--overwrite"]) == 0
    assert not (old / "clip-00000.safetensors").exists() and (old / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "-3"], "batch_size (--batch-size) -3: must be an integer in [1, inf)"),
    (["--batch-size", "0"], "batch_size (--batch-size) 0: must be an integer in [1, inf)"),
    (["--num-workers", "-2"], "num_workers (--num-workers) -2: must be a number in [-1, inf)"),
    (["--prefetch-batches", "0"], "prefetch_batches (--prefetch-batches) 0: must be a number in [1, inf)"),
    (["--clip-decode", "gpu"], "clip_decode must be one of auto, cpu, cuda, got 'gpu'"),
])
def test_numeric_flags_are_checked_before_anything_runs(env, tmp_path, capsys, monkeypatch, flags, match):
    monkeypatch.setattr(cache_build, "load_sam_teacher", lambda *a: pytest.fail("a teacher loaded before the check"))
    out = tmp_path / "cache"
    one_line(capsys, main(["cache-teachers", *base_args(env, tmp_path / "run"), "--cache-out", str(out), *flags]),
             "cache-teachers", match)
    assert not out.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--cache-out", "--out"])
def test_a_read_only_cache_folder_is_one_line_before_any_teacher_loads(env, tmp_path, capsys, monkeypatch, flag):
    read_only_disk(monkeypatch, tmp_path / "ro")
    monkeypatch.setattr(cache_build, "load_sam_teacher", lambda *a: pytest.fail("a teacher loaded before the check"))
    where = ["--cache-out", str(tmp_path / "ro" / "cache")] if flag == "--cache-out" else []
    run = tmp_path / ("run" if where else "ro/run")
    expect = f"{flag} {tmp_path / 'ro' / ('cache' if where else 'run/teacher-cache')}: cannot write there: the disk"
    one_line(capsys, main(["cache-teachers", *base_args(env, run), *where]), "cache-teachers", expect)


# ------------------------------------------------------------------------------- the reader at scale
def synthetic(root, shards, per_shard, dim=4):
    """A cache of ``shards`` pieces of ``per_shard`` entries at one resolution, row = f(name)."""
    writer = TeacherCacheWriter(str(root), {"dtype": "float32", "resolutions": [64]})
    units = [TC.Unit("clip", f"cc/{s:05d}.tar", f"/d/cc/{s:05d}.tar") for s in range(shards)]
    for s, u in enumerate(units):
        names = [f"cc/{s:05d}.tar/{j:09d}" for j in range(per_shard)][::-1]  # any order: stored sorted
        rows = torch.tensor([[s, j, s * j, 1.0] for j in range(per_shard)][::-1])[:, :dim]
        writer.write_piece(u, names, {"clip@64": rows})
    writer.finish(units)
    return str(root)


def python_memory_after_reading_everything(root, shards, per_shard):
    tracemalloc.start()
    cache = TeacherCache(root, open_pieces=4)
    for s in range(shards):  # a batch from every piece: all of the index and every piece touched
        keys = [f"cc/{s:05d}.tar/{j:09d}" for j in range(0, per_shard, 7)]
        got = cache.clip_batch(keys, 64)
        assert got is not None and got[:, 0].eq(s).all() and got[:, 1].tolist() == list(range(0, per_shard, 7))
        assert len(cache._open) <= 4  # the last pieces read, no more
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return used, cache


def test_reader_memory_does_not_grow_with_the_entries(tmp_path):
    small = python_memory_after_reading_everything(synthetic(tmp_path / "s", 4, 500), 4, 500)[0]
    large, cache = python_memory_after_reading_everything(synthetic(tmp_path / "l", 40, 1000), 40, 1000)
    # 20x the entries: the index grows by a row per piece (36 rows), nothing per entry. The
    # previous format's one dict of every name held ~100 bytes per entry here (4 MB).
    assert large - small < 150_000, (small, large)
    assert cache.clip("cc/00003.tar/000000999", 64).tolist() == [3.0, 999.0, 2997.0, 1.0]
    assert cache.clip("cc/00003.tar/000001000", 64) is None  # past the piece's last name
    assert cache.clip("cc/00003.tar/000000500x", 64) is None  # inside its range, not in it
    assert cache.clip("cc/00003.tar/", 64) is None and cache.clip("a", 64) is None and cache.clip("zz", 64) is None


def test_pieces_whose_names_overlap_are_refused(tmp_path):
    writer = TeacherCacheWriter(str(tmp_path), {"dtype": "float32"})
    units = [TC.Unit("clip", f"u{i}", "") for i in range(2)]
    writer.write_piece(units[0], ["a/1", "a/3"], {"clip@64": torch.ones(2, 2)})
    writer.write_piece(units[1], ["a/2"], {"clip@64": torch.ones(1, 2)})
    with pytest.raises(DataError, match="hold overlapping names"):
        writer.finish(units)
    with pytest.raises(DataError, match="the entry 'a/1' came twice in u0"):
        writer.write_piece(units[0], ["a/1", "a/1"], {"clip@64": torch.ones(2, 2)})


def test_bfloat16_pieces_read_back_as_written(tmp_path):
    writer = TeacherCacheWriter(str(tmp_path), {"dtype": "bfloat16"})
    unit = TC.Unit("clip", "u", "")
    rows = torch.randn(50, 3)
    writer.write_piece(unit, [f"a/{i:02d}" for i in range(50)], {"clip@64": rows})
    writer.finish([unit])
    keys = ["a/07", "a/41", "a/07", "a/08"]  # any order, one twice
    got = TeacherCache(str(tmp_path)).clip_batch(keys, 64)
    assert got.dtype == torch.float32 and torch.equal(got, rows[[7, 41, 7, 8]].bfloat16().float())
