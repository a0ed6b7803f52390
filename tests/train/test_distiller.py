"""Training: the three stages, learning-rate groups, the teacher cache, exact resume, non-finite
steps, start-up errors and the command line, on tiny teachers (vit_micro SAM, a 64 px CLIP)."""

import dataclasses
import json
import math
import os

import pytest
import torch

from fastsamclip import data
from fastsamclip.data import samples
from fastsamclip.data.samples import TINY_CLIP_CFG, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.errors import ConfigError, DataError
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher
from fastsamclip.train import Distiller, TrainingStopped, cache_teachers

from .conftest import make_cfg, trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_step_of_each_stage_trains_the_right_parameters(env, tmp_path, stage):
    # The public (automatic) loss path in stage 2, the reference elsewhere: both must train.
    t = trainer(env, tmp_path, loss_backend=None if stage == 2 else "reference")
    s = t.student
    parts = {name: (getattr(s, name), snapshot(getattr(s, name)))
             for name in ("clip_head", "image_encoder", "mask_decoder", "prompt_encoder", "text")}
    opt, sched = t.make_optimizer(stage)
    rec = t.train_step(stage, opt, sched)
    assert math.isfinite(rec["loss_clip"]) and not rec["skipped"]
    if stage == 2:
        assert math.isfinite(rec["loss_sam"]) and rec["loss_sam"] > 0
    trained = {"clip_head"} | ({"image_encoder", "mask_decoder"} if stage == 2 else set())
    for name, (mod, before) in parts.items():
        assert changed(before, mod) == (name in trained), f"stage {stage}: {name} changed={changed(before, mod)}"


@pytest.mark.parametrize("pools", [(2,), (2, 4), ()])
def test_stage3_trains_the_head_on_full_and_pooled_tokens_alike(env, tmp_path, pools):
    # The stage-3 gradient is that of the mean of L_CLIP over the full path and each pooled one;
    # an ignored, mis-weighted or mis-pooled path changes it.
    t = trainer(env, tmp_path, stage3_token_pools=pools)
    s, head = t.student, t.student.clip_head
    keys, pixels, res = t._clip_stream(3).next()
    params = [p for p in head.parameters()]
    for p in s.parameters():
        p.grad = None
    total, n = t.clip_step(3, keys, pixels, res, denominator=pixels.shape[0])
    got = [p.grad.clone() for p in params]
    for p in s.parameters():
        p.grad = None
    target = t.targets.live_clip(pixels)
    with torch.no_grad():
        feats = s.forward_features(s.preprocess(pixels))
    losses = [(1 - torch.cosine_similarity(s.clip_embeddings(feats, token_pool=k), target, dim=-1)).mean()
              for k in (1,) + pools]
    want_loss = torch.stack(losses).mean()
    want = torch.autograd.grad(want_loss, params, retain_graph=True)
    assert total / n == pytest.approx(want_loss.item(), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # Stage 1 stays the paper's full-token path whatever the pools.
    for p in s.parameters():
        p.grad = None
    t.clip_step(1, keys, pixels, res, denominator=pixels.shape[0])
    want1 = torch.autograd.grad(losses[0], params)
    for p, w in zip(params, want1):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


def test_token_pools_below_two_are_refused(env, tmp_path):
    with pytest.raises(ConfigError, match="stage3_token_pools"):
        trainer(env, tmp_path, stage3_token_pools=(1,))


def test_stage2_lr_groups_head_vs_scaled_backbone_and_decoder(env, tmp_path):
    t = trainer(env, tmp_path)
    opt, _ = t.make_optimizer(2)
    lrs = {g["name"]: g["initial_lr"] for g in opt.param_groups}
    assert lrs["clip_head"] == lrs["clip_head_no_decay"] == pytest.approx(4e-5)
    for part in ("backbone", "backbone_no_decay", "sam_head", "sam_head_no_decay"):
        assert lrs[part] == pytest.approx(4e-6), part
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    s = t.student
    assert all(id(p) in grouped for p in s.mask_decoder.parameters())
    assert not any(id(p) in grouped for p in list(s.prompt_encoder.parameters()) + list(s.text.parameters()))
    assert all(not p.requires_grad for p in s.prompt_encoder.parameters())
    # Norms, biases and position tables carry no weight decay.
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(s.image_encoder.pos_embed) in no_decay and id(s.image_encoder.patch_embed.proj.weight) not in no_decay
    opt1, _ = t.make_optimizer(1)
    assert {g["name"] for g in opt1.param_groups} == {"clip_head", "clip_head_no_decay"}
    assert all(g["initial_lr"] == pytest.approx(8e-4) for g in opt1.param_groups)


# ------------------------------------------------------------------------------- teacher cache
def test_cache_equals_live_teachers_and_training_with_it_matches(env, tmp_path):
    cfg = make_cfg(env, tmp_path / "live")
    cache = cache_teachers(cfg, out=str(tmp_path / "cache"), batch_size=5, sam_teacher=env["sam"],
                           clip_teacher=env["clip"])
    live = Distiller(cfg, sam_teacher=env["sam"], clip_teacher=env["clip"])
    cached = Distiller(dataclasses.replace(cfg, out=str(tmp_path / "cached"), teacher_cache=cache),
                       sam_teacher=env["sam"], clip_teacher=env["clip"])
    keys, images, res = cached._clip_stream(2).next()
    a = cached.targets.clip_embeddings(keys, images, res)
    assert cached.targets.misses == 0
    b = live.targets.clip_embeddings(keys, images, res)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    items = cached.sam_stream.next()
    imgs = torch.stack([it["image"] for it in items])
    hw = [it["input_size"] for it in items]
    torch.testing.assert_close(cached.targets.sam_embeddings([it["key"] for it in items], imgs, hw),
                               live.targets.sam_embeddings([it["key"] for it in items], imgs, hw), atol=1e-5, rtol=1e-5)
    assert cached.targets.misses == 0

    live2 = Distiller(dataclasses.replace(cfg, out=str(tmp_path / "live2")), sam_teacher=env["sam"], clip_teacher=env["clip"])
    cached2 = Distiller(dataclasses.replace(cfg, out=str(tmp_path / "cached2"), teacher_cache=cache),
                        sam_teacher=env["sam"], clip_teacher=env["clip"])
    live2.run()
    cached2.run()
    assert cached2.targets.misses == 0
    for ha, hb in zip(live2.history, cached2.history):
        assert ha["loss_clip"] == pytest.approx(hb["loss_clip"], abs=1e-5)
        assert ha.get("loss_sam", 0) == pytest.approx(hb.get("loss_sam", 0), abs=1e-5)
    # AdamW moves each weight by up to lr a step whatever its gradient's size, so a weight whose
    # gradient is near zero (which one depends on the images the hash split keeps) takes a step
    # set by rounding: such weights are compared at that scale, all others tightly.
    steps = cfg.stage1_steps + cfg.stage2_steps + cfg.stage3_steps
    max_step = steps * max(cfg.stage1_lr, cfg.stage2_lr, cfg.stage3_lr)
    for (k, va), vb in zip(live2.student.state_dict().items(), cached2.student.state_dict().values()):
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a shift shared by every
            # key): all of its steps are rounding noise.
            dim = va.shape[0] // 3
            torch.testing.assert_close(va[dim:2 * dim], vb[dim:2 * dim], atol=max_step, rtol=0, msg=k)
            va, vb = torch.cat([va[:dim], va[2 * dim:]]), torch.cat([vb[:dim], vb[2 * dim:]])
        off = ((va - vb).abs() > 1e-5 + 1e-4 * vb.abs()).sum().item()
        assert off <= max(1, va.numel() // 1000), f"{k}: {off} of {va.numel()} weights differ"
        torch.testing.assert_close(va, vb, atol=max_step, rtol=0, msg=k)


def test_cache_of_other_teachers_is_refused(env, tmp_path):
    cfg = make_cfg(env, tmp_path)
    other = load_sam_teacher(write_sam_checkpoint(str(tmp_path / "other.pth"), "vit_micro", seed=1), "vit_micro")
    cache = cache_teachers(cfg, out=str(tmp_path / "cache"), sam_teacher=other, clip_teacher=env["clip"])
    with pytest.raises(ValueError, match="sam_teacher.*rebuild it"):
        trainer(env, tmp_path, teacher_cache=cache)


# ------------------------------------------------------------------------------- resume
def test_kill_and_resume_gives_the_same_run_exactly(env, tmp_path):
    full = trainer(env, tmp_path / "full")
    full.run()
    # Killed in the middle of stage 2 (global step 3 of 2 + 2 + 2), everything rebuilt from disk.
    first = trainer(env, tmp_path / "killed")
    assert first.run(stop_after=3) == {"stopped_at": 3}
    del first
    second = trainer(env, tmp_path / "killed", resume=True)
    second.run()
    assert len(second.history) == len(full.history) == 6
    for a, b in zip(full.history, second.history):
        assert a == b  # same losses, lrs, grad norms and resolutions, bit for bit
    for (k, va), vb in zip(full.student.state_dict().items(), second.student.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_without_checkpoint_says_so(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer(env, tmp_path, resume=True).run()


# ------------------------------------------------------------------------------- non-finite steps
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(env, tmp_path):
    t = trainer(env, tmp_path, max_nan_skips=3, stage1_steps=10)  # lr > 0 on step 3
    real = t.targets.clip_embeddings
    poison = {2}
    calls = {"n": 0}

    def targets(keys, images, res):
        calls["n"] += 1
        out = real(keys, images, res)
        return out * float("nan") if calls["n"] in poison else out

    t.targets.clip_embeddings = targets
    opt, sched = t.make_optimizer(1)
    t.train_step(1, opt, sched)
    before = snapshot(t.student.clip_head)
    rec = t.train_step(1, opt, sched)
    assert rec["skipped"] and t.nan_skips == 1
    assert not changed(before, t.student.clip_head)  # the poisoned step did not touch the weights
    rec = t.train_step(1, opt, sched)
    assert not rec["skipped"] and t.nan_skips == 1 and changed(before, t.student.clip_head)

    stopper = trainer(env, tmp_path / "stop", max_nan_skips=2, stage1_steps=5)
    stopper.targets.clip_embeddings = lambda k, x, r: real(k, x, r) * float("nan")
    with pytest.raises(TrainingStopped, match=r"2 steps had a non-finite.*--max-nan-skips 2"):
        stopper.run()
    assert stopper.nan_skips == 2 and len(stopper.history) == 2


# ------------------------------------------------------------------------------- start-up errors
def test_startup_errors_name_the_problem(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no file with an image extension"):
        trainer(env, tmp_path, clip_data=str(empty))
    corrupt = tmp_path / "corrupt"
    samples.write_image_folder(corrupt, [b"not a jpeg"] * 3)
    with pytest.raises(DataError, match="could be decoded"):
        trainer(env, tmp_path, clip_data=str(corrupt))
    with pytest.raises(FileNotFoundError, match="expands to"):
        trainer(env, tmp_path, clip_data=str(tmp_path / "nowhere" / "{00000..00003}.tar"))
    no_masks = tmp_path / "sa1b_empty"
    no_masks.mkdir()
    pic = samples.load_sample_images(["chelsea"], max_side=64)["chelsea"]
    samples.write_sa1b(no_masks, [(pic, torch.zeros(0, *pic.shape[:2], dtype=torch.bool).numpy())])
    with pytest.raises(DataError, match="decodable mask"):
        trainer(env, tmp_path, sam_data=str(no_masks))
    nothing = tmp_path / "sa1b_nothing"
    nothing.mkdir()
    with pytest.raises(FileNotFoundError, match="no sa_.*json"):
        trainer(env, tmp_path, sam_data=str(nothing))
    assert not (tmp_path / "checkpoints").exists()


def test_teacher_student_size_mismatch_is_refused(env, tmp_path):
    from fastsamclip.checkpoint import save_merged
    from fastsamclip.modeling import samclip_from_teachers

    tiny = load_sam_teacher(write_sam_checkpoint(str(tmp_path / "tiny.pth"), "vit_tiny"), "vit_tiny")
    save_merged(samclip_from_teachers(tiny, env["clip"], sam_config="vit_tiny"), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(ValueError, match="SAM part of another size"):
        trainer(env, tmp_path, init_from=str(tmp_path / "tiny.safetensors"))
    wide = load_clip_teacher(write_clip_local_dir(str(tmp_path / "clip48"), {**TINY_CLIP_CFG, "embed_dim": 48}))
    save_merged(samclip_from_teachers(env["sam"], wide, sam_config="vit_micro"), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="predicts 48-d CLIP embeddings.*gives 32-d"):
        trainer(env, tmp_path, init_from=str(tmp_path / "w.safetensors"))


# ------------------------------------------------------------------------------- command line
def test_distill_command_with_config_file_and_overrides(env, tmp_path):
    from fastsamclip.cli import main
    from fastsamclip.checkpoint import load_merged

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("stage1_steps: 1\nstage2_steps: 1\nstage3_steps: 1\nclip_batch: 4\nclip_base_res: 64\n"
                        "clip_resolutions: [64]\nstage3_resolutions: [64, 128]\nsam_batch: 2\nmasks_per_image: 2\n"
                        "eval_images: 1\nprogress: false\nstage2_lr: 1.0e-3\nloss_backend: reference\n")
    out = tmp_path / "run"
    rc = main(["distill", "--sam-checkpoint", env["sam_path"], "--sam-type", "vit_micro", "--clip-model",
               env["clip_name"], "--clip-pretrained", "none", "--clip-data", env["spec"], "--sam-data",
               str(env["root"] / "sa1b"), "--out", str(out), "--config", str(cfg_file), "--stage2-lr", "3e-3",
               "--tensorboard", "false", "--clip-holdout", "0.25"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stage_steps"] == {"1": 1, "2": 1, "3": 1}
    assert set(report["eval"]["clip_cosine"]) == {"64", "128"} and 0 <= report["eval"]["mask_iou"] <= 1
    assert set(report["eval"]["clip_cosine_pooled"]["2"]) == {"64", "128"}  # the pooled path, side by side
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[1] == pytest.approx(3e-3)  # the command line beat the config file's 1e-3
    assert os.path.isfile(out / "checkpoints" / "stage3.pt")
    load_merged(str(out / "merged.safetensors"))


def test_ranks_on_shards_of_unequal_sizes_stay_in_the_same_epoch(env):
    """Three shards over two ranks: one rank reads twice the records of the other, yet batch k has
    the same epoch and resolution on both (the short rank re-reads its shards)."""
    mr = data.MultiResolutionConfig(resolutions=(64, 96), base_batch=4, base_res=64, seed=3)  # global batch
    streams = [data.ClipStream(env["spec"], mr, rank=r, world_size=2) for r in range(2)]
    assert len(data.expand_shard_spec(env["spec"])) == 3
    seen = [[], []]
    for _ in range(12):  # three epochs of 4 batches per rank
        for r, st in enumerate(streams):
            keys, images, res = st.next()
            seen[r].append((st.epoch, res, images.shape[0]))
    assert [s[:2] for s in seen[0]] == [s[:2] for s in seen[1]]
    assert [e for e, _, _ in seen[0]] == [0] * 4 + [1] * 4 + [2] * 4
    # Each rank holds its share of the global batch (4 at 64 px, 1 at 96 px: the second rank none).
    for r in range(2):
        assert [b for _, _, b in seen[r]] == [data.rank_share(mr.batch_size(res), r, 2)[1] for _, res, _ in seen[r]]


def test_two_process_run_through_torchrun_on_cpu(env, tmp_path):
    """The same command on N processes: torchrun, gloo on the CPU, data sharded by rank."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "fastsamclip", "distill", "--sam-checkpoint", env["sam_path"], "--sam-type", "vit_micro",
           "--clip-model", env["clip_name"], "--clip-pretrained", "none", "--clip-data", env["spec"],
           "--sam-data", str(env["root"] / "sa1b"), "--out", str(out), "--stage1-steps", "2",
           "--stage2-steps", "2", "--stage3-steps", "1", "--clip-batch", "4", "--clip-base-res", "64",
           "--clip-resolutions", "64", "--stage3-resolutions", "64,128", "--sam-batch", "2",
           "--masks-per-image", "2", "--eval-images", "1", "--progress", "false", "--tensorboard", "false",
           "--loss-backend", "reference", "--clip-holdout", "0.25"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stage_steps"] == {"1": 2, "2": 2, "3": 1}
    assert os.path.isfile(out / "merged.safetensors")
