"""The D_CLIP stream over shards with DataLoader workers (exact resume, worker limits) and with the
device decode path (run on CPU tensors here)."""

import json

import pytest
import torch

from fastsamclip import data as D
from fastsamclip.data import samples as S
from fastsamclip.errors import ConfigError

from .conftest import mean_abs

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corrupt):
    root = tmp_path_factory.mktemp("stream")
    pics = list(S.load_sample_images(max_side=72).values()) * 3
    pics[7] = corrupt["truncated"]
    S.write_clip_shards(root, pics, shard_size=6)  # 36 samples, 6 shards
    return str(root / "{00000..00005}.tar")


# Without drop_last every readable image comes once an epoch, whatever the workers.
MR = D.MultiResolutionConfig(resolutions=(32, 48), base_batch=6, base_res=32, seed=5, drop_last=False)


def take(stream, n):
    out = []
    for _ in range(n):
        keys, pixels, r = stream.next()
        assert pixels.shape == (len(keys), 3, r, r) and pixels.dtype == torch.uint8
        out.append((stream.epoch, r, tuple(keys), pixels))
    return out


def same(a, b):
    return [x[:3] for x in a] == [x[:3] for x in b] and all(torch.equal(x[3], y[3]) for x, y in zip(a, b))


def test_shards_through_workers_resume_exactly_across_an_epoch(shards):
    full = take(D.ClipStream(shards, MR, num_workers=2), 10)  # past the end of epoch 0
    assert {e for e, _, _, _ in full} == {0, 1}
    epoch0 = [k for e, _, ks, _ in full if e == 0 for k in ks]
    inproc = [k for e, _, ks, _ in take(D.ClipStream(shards, MR), 10) if e == 0 for k in ks]
    # The same images in the epoch (each worker reads its own shards, so not in the same order).
    assert sorted(epoch0) == sorted(inproc) and len(epoch0) == len(set(epoch0)) == 35
    first = D.ClipStream(shards, MR, num_workers=2)
    head = take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds, prefetching aside
    resumed = D.ClipStream(shards, MR, num_workers=2)
    resumed.load_state_dict(state)
    assert same(head + take(resumed, 6), full)
    with pytest.raises(ConfigError, match="position is for 2 DataLoader worker.*pass --num-workers 2"):
        D.ClipStream(shards, MR, num_workers=3).load_state_dict(state)


def test_more_workers_than_a_rank_has_shards_is_refused_and_auto_fits(shards, monkeypatch):
    with pytest.raises(ConfigError, match="--num-workers 4: each DataLoader worker reads its own shards and rank 1 "
                                          "of 2 reads 3"):
        D.ClipStream(shards, MR, rank=1, world_size=2, num_workers=4)
    assert D.ClipStream(shards, MR, num_workers=-1).num_workers == 0  # on the CPU: in-process
    monkeypatch.setattr(D.streams, "auto_workers", lambda device, ranks: 16)  # a big machine
    assert D.ClipStream(shards, MR, num_workers=-1, device="cuda", rank=1, world_size=2).num_workers == 3


def test_device_decode_path_gives_the_cpu_paths_batches_within_tolerance(shards):
    cpu = take(D.ClipStream(shards, MR), 7)
    dev = take(D.ClipStream(shards, MR, decoder="cuda", device="cpu"), 7)  # the GPU path on CPU tensors
    assert [x[:3] for x in dev] == [x[:3] for x in cpu]  # the same images (the truncated one skipped by both)
    assert sum(len(k) for _, _, k, _ in cpu) == sum(MR.batch_size(r) for _, r, _, _ in cpu) - 1  # one unreadable
    for a, b in zip(cpu, dev):
        assert mean_abs(a[3], b[3]) < 1.0
    with pytest.raises(ConfigError, match="CUDA decode path reads WebDataset shards"):
        D.ClipStream(shards, MR, decoder="cuda")


def test_an_input_error_in_a_worker_keeps_its_own_message(tmp_path, images):
    import io
    import tarfile

    pics = list(S.load_sample_images(max_side=40).values())
    path = S.write_clip_shards(tmp_path, pics, shard_size=100)[0]
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:  # the first sample again at the end: past the start-up probe
        for m, data in members + members[:3]:
            t.addfile(m, io.BytesIO(data))
    stream = D.ClipStream(path, MR, num_workers=1)
    with pytest.raises(D.DataError) as e:
        for _ in range(10):
            stream.next()
    assert str(e.value).startswith(f"shard {path} holds two samples with the key '0000000';"), str(e.value)
