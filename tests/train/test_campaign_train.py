"""The bad-input and fault campaign, kept: training's cases. Numbers that trained backwards or
silently (a NaN or negative learning rate, negative steps), a read-only or full disk, a damaged
last.pt, a resume in stage 3 reporting another held-out score, replayed steps logged twice; and
four behaviours no test protected (the stage-3 learning rate, the warm-up, the SA-1B held-out
images, the range of every numeric field)."""

import dataclasses
import json
import logging
import os
import shutil

import pytest
import torch

import fastsamclip.train.checkpoints as checkpoints
import fastsamclip.train.distiller as distiller
from fastsamclip.cli import main
from fastsamclip.train import TrainConfig, lr_lambda
from fastsamclip.train.checkpoints import find_checkpoint
from fastsamclip.train.config import RANGES

from ..test_campaign_cli import one_line, read_only_disk
from .conftest import trainer
from .test_safety import base_args


# ------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("flag, value", [
    ("--stage1-lr", "nan"), ("--stage1-lr", "-1"), ("--stage3-lr", "0"), ("--stage1-steps", "-5"),
    ("--warmup-fraction", "1.5"), ("--betas", "0.9,1.2"), ("--focal-alpha", "inf"), ("--seed", "-1"),
    ("--log-every", "0"),
])
def test_a_number_out_of_its_range_is_refused_before_anything_runs(env, tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.setattr(distiller, "load_sam_teacher", lambda *a: pytest.fail("a teacher loaded before the check"))
    rc = main(["distill", *base_args(env, tmp_path / "run"), flag, value])
    one_line(capsys, rc, "distill", f"(--{flag[2:]})", "must be")
    assert not (tmp_path / "run").exists()


def test_every_numeric_field_has_a_range():
    """A field added later without one would take NaN, negatives and infinity silently."""
    numeric = {f.name for f in dataclasses.fields(TrainConfig)
               if str(f.type) in ("int", "float") or str(f.type).startswith("Tuple[int") or "float, float" in str(f.type)}
    numeric -= {"stage3_token_pools"}  # its own rule: factors >= 2 (tests/train/test_distiller.py)
    covered = {k.rstrip("[]") for k in RANGES}
    assert numeric - covered == set(), numeric - covered


# ------------------------------------------------------------------------------- disks
def test_a_read_only_out_is_one_line_before_any_teacher_loads(env, tmp_path, capsys, monkeypatch):
    read_only_disk(monkeypatch, tmp_path / "ro")
    monkeypatch.setattr(distiller, "load_sam_teacher", lambda *a: pytest.fail("a teacher loaded before the check"))
    rc = main(["distill", *base_args(env, tmp_path / "ro" / "run")])
    one_line(capsys, rc, "distill", "ro/run: cannot write there: the disk is read-only")


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # stage 2's checkpoint: the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:659] . PytorchStreamWriter failed writing file "
                               "data/7: file write failed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoints.torch, "save", save)
    rc = main(["distill", *base_args(env, out), "--checkpoint-every", "1", "--keep-stage-checkpoints", "false"])
    err = capsys.readouterr().err  # the run's log lines, then the error's one line
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("distill: cannot write checkpoint") and "last.pt" in last and "--resume" in last, err
    assert not [f for f in os.listdir(out / "checkpoints") if f.startswith(".tmp")]  # no half-written file left
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["stage"] == 1  # the one before: intact
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert main(["distill", *base_args(env, out), "--checkpoint-every", "1", "--keep-stage-checkpoints", "false",
                 "--resume"]) == 0
    assert [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------- resume
RUN = dict(stage1_steps=1, stage2_steps=1, stage3_steps=1, checkpoint_every=1, log_every=1)


@pytest.fixture(scope="module")
def killed(env, tmp_path_factory):
    """A run killed after global step 2 of 3 (stage 2's end), its folder and its steps' records."""
    out = tmp_path_factory.mktemp("campaign-resume") / "run"
    t = trainer(env, out, **RUN)
    assert t.run(stop_after=2) == {"stopped_at": 2}
    return {"out": out, "history": list(t.history)}


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_last_checkpoint_falls_back_to_the_newest_intact_one(killed, tmp_path, damage, caplog):
    folder = tmp_path / "checkpoints"
    shutil.copytree(killed["out"] / "checkpoints", folder)
    last = folder / "last.pt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    with caplog.at_level(logging.WARNING, logger="fastsamclip.train"):
        path, state = find_checkpoint(str(folder))
        assert (state["stage"], state["step"]) == (2, 1) and os.path.basename(path) == "stage2.pt"  # the newest
        os.remove(folder / "stage2.pt")
        path, state = find_checkpoint(str(folder))
    assert (state["stage"], state["step"]) == (1, 1) and os.path.basename(path) in ("previous.pt", "stage1.pt")
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "last.pt" in said and os.path.basename(path) in said and "newest intact" in said


def test_a_resume_past_a_damaged_checkpoint_replays_exactly_and_logs_each_step_once(killed, env):
    out = killed["out"]
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # cut, and stage 2's copy gone: the run continues from step 1
    os.remove(out / "checkpoints" / "stage2.pt")
    resumed = trainer(env, out, resume=True, **RUN)
    resumed.run()
    assert resumed.history[:2] == killed["history"]  # step 2 replayed bit for bit from the fallback
    steps = [json.loads(x)["global_step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the killed run had logged step 2 already: once, not twice


def test_the_held_out_report_does_not_depend_on_how_far_the_stream_has_gone(env, tmp_path):
    """The mask agreement of the same weights, before and after the SA-1B stream entered its next
    epoch (where an uninterrupted run is at the end, and a run resumed in stage 3 is not)."""
    t = trainer(env, tmp_path, sam_batch=2, eval_images=1, eval_resolutions=(64,), eval_clip_images=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student that differs from its SAM teacher (at initialisation every IoU is 1)
        for p in t.student.mask_decoder.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    before = t.evaluate()
    assert before["mask_iou"] < 0.99
    while t.sam_stream.epoch == 0:
        t.sam_stream.next()
    t.sam_stream.next()
    assert t.sam_data.epoch == 1
    assert t.evaluate() == before


# ------------------------------------------------------------------------------- pinned behaviours
def test_stage3_trains_the_head_alone_at_its_own_learning_rate(env, tmp_path):
    t = trainer(env, tmp_path, stage1_lr=1e-3, stage2_lr=2e-5, stage3_lr=7e-4, warmup_fraction=0.0)
    opt, sched = t.make_optimizer(3)
    assert {g["name"] for g in opt.param_groups} == {"clip_head", "clip_head_no_decay"}
    assert all(g["initial_lr"] == pytest.approx(7e-4) and g["lr"] == pytest.approx(7e-4) for g in opt.param_groups)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in t.student.clip_head.parameters()}
    assert not any(p.requires_grad for p in t.student.image_encoder.parameters())


def test_the_warm_up_rises_linearly_then_the_cosine_decays(env, tmp_path):
    f = lr_lambda(100, 0.1, 0.0)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert lr_lambda(10, 0.0, 0.2)(10) == pytest.approx(0.2)  # down to min_lr_ratio, never below
    # The trainer's schedule is this one: the lr of each of stage 1's 8 steps, warm-up 1/4.
    t = trainer(env, tmp_path, stage1_steps=8, stage1_lr=1e-3, warmup_fraction=0.25, min_lr_ratio=0.0)
    opt, sched = t.make_optimizer(1)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    g = lr_lambda(8, 0.25, 0.0)
    assert lrs == pytest.approx([1e-3 * g(s) for s in range(8)])
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == lrs[2] == pytest.approx(1e-3) and lrs[2] > lrs[3] > lrs[7]


def test_sa1b_held_out_images_are_never_trained_on(env, tmp_path):
    t = trainer(env, tmp_path, eval_images=2, sam_batch=1)
    held_out = {t.sam_data.stems[i] for i in t.eval_indices}
    assert len(held_out) == 2 and not set(t.eval_indices) & set(t.sam_stream.indices)
    seen = set()
    for _ in range(2 * len(t.sam_stream.indices)):  # two epochs of the stream
        seen |= {item["key"] for item in t.sam_stream.next()}
    assert seen == set(t.sam_data.stems) - held_out
