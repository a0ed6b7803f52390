"""Training that cannot silently go wrong: one teacher target per image, no run overwritten, no
random teacher unasked, no damaged checkpoint loaded, settings checked before the first step,
and every bad input answered with one line and exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.cli import main
from fastsamclip.data import ClipWebDataset, DataError, samples
from fastsamclip.data.holdout import in_split
from fastsamclip.errors import ConfigError
from fastsamclip.modeling import CheckpointError, samclip_from_teachers
from fastsamclip.train import Distiller, TeacherCache, cache_teachers

from .conftest import make_cfg, trainer


def base_args(env, out, *extra):
    """`fastsamclip distill` arguments of a one-step-per-stage run on the tiny set-up."""
    return ["--sam-checkpoint", env["sam_path"], "--sam-type", "vit_micro", "--clip-model", env["clip_name"],
            "--clip-data", env["spec"], "--sam-data", str(env["root"] / "sa1b"), "--out", str(out),
            "--stage1-steps", "1", "--stage2-steps", "1", "--stage3-steps", "1", "--clip-batch", "4",
            "--clip-base-res", "64", "--clip-resolutions", "64", "--stage3-resolutions", "64", "--sam-batch", "2",
            "--masks-per-image", "2", "--eval-images", "1", "--progress", "false", "--tensorboard", "false",
            "--loss-backend", "reference", "--clip-holdout", "0.25", *extra]


def one_line(capsys, rc, command, match):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"{command}: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


# ------------------------------------------------------------------------------- teacher cache keys
@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two img2dataset runs of 4 images each: both number their keys from 000000000."""
    root = tmp_path_factory.mktemp("sources")
    pics = list(samples.load_sample_images(max_side=64).values())
    for name, part in (("a", pics[:4]), ("b", pics[4:8])):
        samples.write_clip_shards(root / name, part, shard_size=10000)
    return root, f"{root / 'a' / '00000.tar'}::{root / 'b' / '00000.tar'}"


def test_cache_keeps_one_target_per_image_across_sources_with_colliding_keys(env, tmp_path, two_sources, capsys):
    root, spec = two_sources
    keys = [k for k, _ in ClipWebDataset(spec, shuffle_shards=False)]
    assert len(keys) == len(set(keys)) == 8 and keys[0].endswith("/000000000") and keys[4].endswith("/000000000")
    out = tmp_path / "cache"
    rc = main(["cache-teachers", *base_args(env, tmp_path / "run"), "--clip-data", spec, "--cache-out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cache = TeacherCache(str(out))
    assert sorted(cache.names("clip")) == sorted(keys) and len(cache) == 8 + 6  # 8 images at 1 resolution, 6 SA-1B
    # Each entry is its own image's teacher embedding (the live teacher on the same view).
    t = make_cfg(env, tmp_path / "t", clip_data=spec, clip_holdout=0.3, clip_resolutions=(64,), clip_batch=4,
                 teacher_cache=str(out))
    cached = Distiller(t, sam_teacher=env["sam"], clip_teacher=env["clip"])
    train_ids = {k for k in keys if in_split(k, "train", 0.3)}  # fixed by the identities, not the folder
    seen = set()
    for _ in range(12):  # epochs of shuffled batches of 4 until every training image came (at most 8)
        if seen == train_ids:
            break
        ids, pixels, res = cached._clip_stream(1).next()
        seen |= set(ids)
        torch.testing.assert_close(cached.targets.clip_embeddings(ids, pixels, res),
                                   cached.targets.live_clip(pixels), atol=1e-5, rtol=1e-5)
    assert seen == train_ids and len(train_ids) < len(keys)
    assert {i.rsplit("/", 2)[-3][-1] for i in seen} == {i.rsplit("/", 2)[-3][-1] for i in train_ids}
    assert cached.targets.misses == 0


def test_a_key_twice_in_one_shard_is_an_error_naming_the_shard(tmp_path):
    import tarfile

    pics = list(samples.load_sample_images(["chelsea", "coffee"], max_side=48).values())
    path = samples.write_clip_shards(tmp_path, pics, shard_size=10)[0]
    with tarfile.open(path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:  # the first sample again at the end: the same key twice
        for m, data in members + members[:3]:
            import io

            t.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=f"shard {path} holds two samples with the key '000000'"):
        list(ClipWebDataset(path, validate=False))


def test_a_cache_of_the_old_format_is_refused_with_the_reason(env, tmp_path):
    out = cache_teachers(make_cfg(env, tmp_path), out=str(tmp_path / "cache"), sam_teacher=env["sam"],
                         clip_teacher=env["clip"])
    index = json.loads(open(os.path.join(out, "index.json")).read())
    for version, reason in ((1, "version 1, whose CLIP entries were keyed without their source"),
                            (3, "version 3; this fastsamclip reads version 4 (pieces with a range index")):
        index["version"] = version
        open(os.path.join(out, "index.json"), "w").write(json.dumps(index))
        with pytest.raises(ConfigError, match=reason.replace("(", r"\(")):
            trainer(env, tmp_path / "run", teacher_cache=out)


# ------------------------------------------------------------------------------- reruns
def test_a_rerun_into_a_run_folder_is_refused_and_overwrite_starts_clean(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *base_args(env, out)]) == 0
    capsys.readouterr()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    merged = (out / "merged.safetensors").read_bytes()
    rc = main(["distill", *base_args(env, out)])
    one_line(capsys, rc, "distill", "holds a run already")
    assert (out / "metrics.jsonl").read_text().splitlines() == lines  # untouched
    assert (out / "merged.safetensors").read_bytes() == merged
    assert main(["distill", *base_args(env, out), "--overwrite", "--seed", "3"]) == 0
    fresh = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(fresh) == len(lines) and [r["global_step"] for r in fresh] == [1, 2, 3]  # one run, not two
    capsys.readouterr()
    rc = main(["distill", *base_args(env, out), "--overwrite", "--resume"])
    one_line(capsys, rc, "distill", "give one of them")


# ------------------------------------------------------------------------------- random teachers
def test_teachers_without_weights_are_refused_unless_asked_for(env, tmp_path, capsys):
    args = base_args(env, tmp_path / "run")
    i = args.index("--sam-checkpoint")
    no_sam = args[:i] + args[i + 2:]
    rc = main(["distill", *no_sam])
    one_line(capsys, rc, "distill", "no weights for the SAM teacher: pass --sam-checkpoint")
    rc = main(["cache-teachers", *no_sam])
    one_line(capsys, rc, "cache-teachers", "--random-teachers")
    assert not (tmp_path / "run").exists()


def test_random_teachers_run_is_recorded_and_its_log_is_short(env, tmp_path):
    args = base_args(env, tmp_path / "run")
    i = args.index("--sam-checkpoint")
    cmd = [sys.executable, "-m", "fastsamclip", "distill", *args[:i], *args[i + 2:], "--random-teachers"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["random_teachers"] is True and report["teachers"]["sam"] == "random"
    assert report["teachers"]["clip"] == env["clip_name"]
    # What a person needs: this package's lines only (open_clip logs every model it builds at INFO).
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert all("fastsamclip" in x for x in lines), lines
    assert len(lines) <= 6, lines


# ------------------------------------------------------------------------------- damaged checkpoints
def test_a_damaged_checkpoint_of_the_right_size_is_refused_naming_the_tensor(env, tmp_path, capsys):
    path = str(tmp_path / "merged.safetensors")
    save_merged(samclip_from_teachers(env["sam"], env["clip"], sam_config="vit_micro"), path)
    data = bytearray(open(path, "rb").read())
    data[-4000:-3000] = b"\xff" * 1000  # NaNs in the last tensors, file size unchanged
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor \S+ does not match the file's integrity record.*damaged"):
        load_merged(path)
    # A file written before the integrity record: the NaN/Infinity scan names the tensor.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata=meta)
    with pytest.raises(CheckpointError, match=r"tensor \S+ holds \d+ NaN/Infinity value\(s\).*damaged"):
        load_merged(old)
    capsys.readouterr()  # load_merged's own warning about the missing record, not predict's output
    img = tmp_path / "pic.png"
    from PIL import Image

    Image.fromarray(samples.sample_image("chelsea")[:60, :80]).save(img)
    rc = main(["predict", str(img), "--checkpoint", path, "--points", "10,10", "--out", str(tmp_path / "o")])
    one_line(capsys, rc, "predict", "integrity record")
    assert not list((tmp_path / "o").glob("*.json")) if (tmp_path / "o").exists() else True


# ------------------------------------------------------------------------------- settings before the first step
def test_a_sam_image_size_the_teacher_can_follow_trains_and_another_is_refused_before_loading(env, tmp_path,
                                                                                              monkeypatch, capsys):
    # 48 px for a 64 px-native SAM: the teacher's encoder resizes its tables, as the student's does.
    t = trainer(env, tmp_path / "a", sam_image_size=48)
    opt, sched = t.make_optimizer(2)
    rec = t.train_step(2, opt, sched)
    assert rec["loss_sam"] > 0 and not rec["skipped"]
    item = t.sam_stream.next()[0]
    assert item["image"].shape == (3, 48, 48) and item["gt_masks"].shape[-1] == 12
    # A size that is not a multiple of the patch: refused before a teacher is even read.
    import fastsamclip.train.distiller as distiller

    monkeypatch.setattr(distiller, "load_sam_teacher", lambda *a: pytest.fail("teacher loaded before the check"))
    rc = main(["distill", *base_args(env, tmp_path / "b"), "--sam-image-size", "50"])
    one_line(capsys, rc, "distill", "sam_image_size (50,): every side must be a positive multiple of the patch size 16")


# ------------------------------------------------------------------------------- one line for bad input
@pytest.fixture
def bad_inputs(env, tmp_path):
    half = tmp_path / "half.pth"
    half.write_bytes(open(env["sam_path"], "rb").read()[:5000])
    nothing = tmp_path / "sa1b_bad"
    nothing.mkdir()
    for i in (1, 2):
        (nothing / f"sa_{i}.json").write_text("{not json")
    return {"half": str(half), "sa1b_bad": str(nothing), "tmp": tmp_path}


@pytest.mark.parametrize("case, match", [
    ("merge_wrong_type", "pass --sam-type vit_micro"),
    ("merge_missing", "SAM checkpoint not found"),
    ("merge_half_file", "could not be read as a torch checkpoint"),
    ("empty_spec", "no D_CLIP data"),
    ("spec_matches_nothing", "expands to"),
    ("clip_batch_abc", "clip_batch (--clip-batch) 'abc': expected an integer"),
    ("resume_without_checkpoint", "--resume: no checkpoint"),
    ("sa1b_all_undecodable", "none of the first 2 samples"),
])
def test_bad_input_is_one_line_and_exit_2(env, bad_inputs, capsys, case, match):
    tmp = bad_inputs["tmp"]
    merge = ["merge", "--sam-checkpoint", env["sam_path"], "--sam-type", "vit_micro", "--clip-model", env["clip_name"],
             "--out", str(tmp / "m.safetensors")]
    argv = {
        "merge_wrong_type": [*merge[:4], "vit_tiny", *merge[5:]],
        "merge_missing": [merge[0], merge[1], str(tmp / "missing.pth"), *merge[3:]],
        "merge_half_file": [merge[0], merge[1], bad_inputs["half"], *merge[3:]],
        "empty_spec": ["distill", *base_args(env, tmp / "r"), "--clip-data", ""],
        "spec_matches_nothing": ["distill", *base_args(env, tmp / "r"), "--clip-data", str(tmp / "x/{00000..00003}.tar")],
        "clip_batch_abc": ["distill", *base_args(env, tmp / "r"), "--clip-batch", "abc"],
        "resume_without_checkpoint": ["distill", *base_args(env, tmp / "r"), "--resume"],
        "sa1b_all_undecodable": ["distill", *base_args(env, tmp / "r"), "--sam-data", bad_inputs["sa1b_bad"]],
    }[case]
    one_line(capsys, main(argv), argv[0], match)
