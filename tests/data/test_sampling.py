"""The multi-resolution sampler (map-style) and batcher (streams): determinism, DDP, exact resume."""

import json

import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("pycocotools")

from fastsamclip import data as D  # noqa: E402
from fastsamclip.data import samples as S  # noqa: E402

# pycocotools' own decode trips numpy 2's copy-keyword deprecation on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# Multi-resolution sampler (map-style) and batcher (streams)
# ---------------------------------------------------------------------------------------------


def test_batch_sizes_keep_pixels_per_batch_constant():
    cfg = D.MultiResolutionConfig(base_batch=256)
    assert (cfg.batch_size(224), cfg.batch_size(448)) == (256, 64)
    odd = D.MultiResolutionConfig(base_batch=10, base_res=224)
    assert odd.batch_size(336) == 4 and odd.batch_size(300) == 5  # floor(4.44), floor(5.58)
    assert odd.batch_size(4480) == 1  # at least 1


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


def test_sampler_batches_resolutions_and_determinism():
    cfg = D.MultiResolutionConfig(resolutions=(224, 448), base_batch=16, seed=3)
    s = D.MultiResolutionBatchSampler(1000, cfg)
    e0 = _epoch(s, 0)
    assert len(e0) == len(s)
    res = [b[0][1] for b in e0]
    assert {224, 448} == set(res)
    for b in e0:
        assert len({r for _, r in b}) == 1 and len(b) == cfg.batch_size(b[0][1])
    flat = [i for b in e0 for i, _ in b]
    assert len(flat) == len(set(flat)) and max(flat) < 1000  # no repeats within an epoch
    assert _epoch(D.MultiResolutionBatchSampler(1000, cfg), 0) == e0
    assert _epoch(s, 1) != e0
    other_seed = D.MultiResolutionConfig(resolutions=(224, 448), base_batch=16, seed=4)
    assert _epoch(D.MultiResolutionBatchSampler(1000, other_seed), 0) != e0


def test_sampler_ddp_ranks_disjoint_and_in_step():
    cfg = D.MultiResolutionConfig(base_batch=12, seed=1)
    world = 3
    ranks = [_epoch(D.MultiResolutionBatchSampler(500, cfg, rank=r, world_size=world), 2)
             for r in range(world)]
    assert len({len(r) for r in ranks}) == 1
    seen = set()
    for step in zip(*ranks):
        assert len({b[0][1] for b in step}) == 1  # same resolution on every rank
        assert len({len(b) for b in step}) == 1
        for b in step:
            idx = {i for i, _ in b}
            assert not idx & seen
            seen |= idx
    # Without drop_last every sample is seen once (plus wrap-around padding on the last step).
    cfg2 = D.MultiResolutionConfig(base_batch=12, seed=1, drop_last=False)
    allr = [_epoch(D.MultiResolutionBatchSampler(500, cfg2, rank=r, world_size=world), 0)
            for r in range(world)]
    covered = {i for r in allr for b in r for i, _ in b}
    assert covered == set(range(500))


def test_sampler_exact_resume_mid_epoch():
    cfg = D.MultiResolutionConfig(base_batch=8, seed=11)
    full = _epoch(D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2), 4)
    s = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    s.set_epoch(4)
    it = iter(s)
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 4 and state["batch_index"] == 5
    r = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    r.load_state_dict(state)
    r.set_epoch(4)  # the training loop's set_epoch on the same epoch keeps the position
    assert head + list(r) == full
    # A position given by the training loop (the DataLoader prefetches ahead of it).
    r2 = D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2)
    r2.load_state_dict(s.state_dict(batches_done=3))
    assert list(r2) == full[3:]
    # The next epoch starts from its beginning.
    r.set_epoch(5)
    assert list(r) == _epoch(D.MultiResolutionBatchSampler(300, cfg, rank=1, world_size=2), 5)
    with pytest.raises(ValueError, match="world_size"):
        D.MultiResolutionBatchSampler(300, cfg, rank=0, world_size=4).load_state_dict(state)


def test_sampler_drives_dataloader_with_folder(tmp_path, images):
    S.write_image_folder(tmp_path, list(images.values()) * 2)
    ds = D.ClipImageFolder(tmp_path)
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=D.MultiResolutionBatchSampler(len(ds), cfg),
                                         collate_fn=D.collate_clip)
    shapes = [tuple(x.shape) for x in loader]
    assert shapes and all(s in {(8, 3, 32, 32), (2, 3, 64, 64)} for s in shapes)


@pytest.fixture()
def stream_shards(tmp_path, images, corrupt):
    # Small pictures: the batcher's cost is in decoding and resizing, not what is tested here.
    pics = list(S.load_sample_images(max_side=48).values()) * 4
    pics[5] = corrupt["garbage"]
    S.write_clip_shards(tmp_path, pics, shard_size=8)  # 48 samples, 6 shards
    return str(tmp_path / "{00000..00005}.tar")


def _run(batcher, limit=None):
    out = []
    for b in batcher:
        out.append((b.batch_index, b.resolution, tuple(b.keys), b.images.sum().item()))
        assert b.images.shape == (len(b.keys), 3, b.resolution, b.resolution)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("buffer", [0, 10])
def test_batcher_variable_batches_and_exact_resume(stream_shards, buffer):
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=2, drop_last=False)
    make = lambda: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(stream_shards, seed=9, shuffle_buffer=buffer), cfg)
    b = make()
    b.set_epoch(1)
    full = _run(b)
    assert {r for _, r, _, _ in full} == {32, 64}
    sizes = {r: {len(k) for _, rr, k, _ in full[:-1] if rr == r} for r in (32, 64)}
    assert sizes[64] == {2} and sizes[32] <= {7, 8}  # 7: the batch that held the corrupt sample
    keys = [k for _, _, ks, _ in full for k in ks]
    assert len(keys) == 47 and len(set(keys)) == 47 and b.source.skipped == {"decode_error": 1}
    # Interrupt after 4 batches, checkpoint, resume in a fresh object.
    first = make()
    first.set_epoch(1)
    head = _run(first, limit=4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert head + _run(resumed) == full
    # A different epoch is a different order.
    other = make()
    other.set_epoch(2)
    assert [k for _, _, k, _ in _run(other)] != [k for _, _, k, _ in full]


def _loader_run(batcher, limit=None, mark=False):
    """Batches through a 2-worker DataLoader, as (index, r, keys, pixel sum) rows."""
    loader = torch.utils.data.DataLoader(batcher, batch_size=None, num_workers=2)
    out = []
    for b in loader:
        out.append((b.batch_index, b.resolution, tuple(b.keys), b.images.sum().item()))
        if mark:
            batcher.mark_consumed(b)
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("per_epoch", [None, 9])
def test_batcher_with_dataloader_workers_resumes_exactly(stream_shards, per_epoch):
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=4, drop_last=False)
    make = lambda: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(stream_shards, seed=1), cfg, batches_per_epoch=per_epoch)
    # Without batches_per_epoch the order of the batches after the first worker's stream ends
    # follows the DataLoader's scheduling: compare in batch-index order then.
    canon = (lambda rows: rows) if per_epoch else sorted  # noqa: E731
    full = canon(_loader_run(make()))
    if per_epoch is None:
        assert len({k for k, _, _, _ in full}) == len(full)  # every batch index once
        keys = [k for _, _, ks, _ in full for k in ks]
        assert len(keys) == 47 and len(set(keys)) == 47  # the two workers read disjoint shards
    else:
        assert [k for k, _, _, _ in full] == list(range(per_epoch))  # in batch-index order
    # Batch k's resolution is the one drawn for k, whichever worker made it.
    assert all(r == cfg.draw_resolution(0, k) and len(ks) <= cfg.batch_size(r) for k, r, ks, _ in full)
    assert canon(_loader_run(make())) == canon(full)  # same workers, same batches
    first = make()
    head = _loader_run(first, limit=5, mark=True)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["num_workers"] == 2 and state["positions"][0][1] == 3 and state["positions"][1][1] == 2
    resumed = make()
    resumed.load_state_dict(state)
    assert canon(head + _loader_run(resumed)) == full
    # The shard split depends on the worker count: resuming with another one is refused.
    other = make()
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved position is for 2 DataLoader worker"):
        next(iter(other))


def test_batcher_batches_per_epoch_keeps_ddp_ranks_in_step(tmp_path):
    pics = list(S.load_sample_images(max_side=40).values())
    S.write_clip_shards(tmp_path, pics * 2, shard_size=5)  # 24 samples: shards of 5, 5, 5, 5, 4
    spec = str(tmp_path / "{00000..00004}.tar")
    cfg = D.MultiResolutionConfig(resolutions=(32, 64), base_batch=8, base_res=32, seed=6)  # 4 per rank
    make = lambda rank: D.MultiResolutionBatcher(  # noqa: E731
        D.ClipWebDataset(spec, rank=rank, world_size=2, seed=2, shuffle_buffer=4), cfg, batches_per_epoch=9)
    runs = [_run(make(r)) for r in range(2)]
    # Rank 0 has 3 shards, rank 1 two, yet both run 9 steps at the same resolutions: their
    # streams start another pass over their own shards when they run out.
    assert [len(r) for r in runs] == [9, 9]
    drawn = [(k, cfg.draw_resolution(0, k)) for k in range(9)]
    assert [x[:2] for x in runs[0]] == [x[:2] for x in runs[1]] == drawn
    keys = [{k for _, _, ks, _ in r for k in ks} for r in runs]
    assert not keys[0] & keys[1]
    assert sum(len(x[2]) for x in runs[1]) > 10  # rank 1 (10 samples) wrapped around
    # Resume across the wrap-around point.
    first = make(1)
    head = _run(first, limit=6)
    resumed = make(1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + _run(resumed) == runs[1]
    with pytest.raises(ValueError, match="batches_per_epoch"):
        D.MultiResolutionBatcher(make(1).source, cfg).load_state_dict(first.state_dict())


