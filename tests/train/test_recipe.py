"""The recipe pinned by independent computations: what one stage-2 step minimises (L_CLIP +
lambda * L_SAM, lambda = 10), what the SAM teacher is asked (the student's prompts, in the same
frame, checked against segment_anything's own predictor), what L_SAM is at initialisation, that
the teachers stay frozen, and that N processes, on one node or on two, train exactly as one
process over the same global batch."""

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from segment_anything import SamPredictor

from fastsamclip.data import samples
from fastsamclip.train import TrainConfig
from fastsamclip.transforms import apply_boxes, apply_coords

from .conftest import make_cfg, trainer

FOCAL, DICE, ALPHA, GAMMA, LAMBDA = 20.0, 1.0, 0.25, 2.0, 10.0  # SAM's mask loss and the paper's lambda


def test_the_paper_numbers_are_the_defaults():
    cfg = TrainConfig()
    assert (cfg.sam_loss_weight, cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha, cfg.focal_gamma) == (
        LAMBDA, FOCAL, DICE, ALPHA, GAMMA)
    assert (cfg.stage1_lr, cfg.stage2_lr, cfg.stage2_lr_scale, cfg.stage3_lr) == (8e-4, 4e-5, 0.1, 8e-4)
    assert (cfg.clip_batch, cfg.sam_batch, cfg.masks_per_image, cfg.clip_holdout) == (2048, 32, 32, 0.01)


def dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over masks of 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), written out here."""
    num = 2 * (p * t).flatten(1).sum(1) + 1
    den = p.flatten(1).sum(1) + t.flatten(1).sum(1) + 1
    return (1 - num / den).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M, h, w) logits and target probabilities -> SAM's focal + dice, from torchvision and by hand."""
    focal = torchvision.ops.sigmoid_focal_loss(logits, target, ALPHA, GAMMA, reduction="mean")
    return FOCAL * focal + DICE * dice(torch.sigmoid(logits), target)


@pytest.fixture
def stage2(env, tmp_path):
    """A trainer at initialisation and one stage-2 batch of each stream, with the dataset indices
    of the SA-1B items."""
    t = trainer(env, tmp_path, grad_clip=0.0, masks_per_image=4)
    keys, pixels, res = t._clip_stream(2).next()
    index = [0, 1]
    items = [t.sam_data[i] for i in index]
    return t, (keys, pixels, res), items, index


def _low_res(env, t, items, index):
    """The SAM teacher's logits of every mask of the batch, independently: (M, h, w)."""
    pred = SamPredictor(env["sam"])
    out = []
    for item, i in zip(items, index):
        raw = t.sam_data.load_raw(i)
        assert raw.key == item["key"]
        pred.set_image(raw.image)
        p, size, tf = raw.prompts, raw.image.shape[:2], pred.transform
        # Box-prompted masks first (0, 2, ...), then point-prompted (1, 3, ...): the step's order.
        boxes = torch.as_tensor(tf.apply_boxes(p.boxes[0::2], size), dtype=torch.float)
        _, _, low_b = pred.predict_torch(None, None, boxes=boxes, multimask_output=False)
        pts = torch.as_tensor(tf.apply_coords(p.points[1::2], size), dtype=torch.float)
        _, _, low_p = pred.predict_torch(pts, torch.from_numpy(p.point_labels[1::2]), multimask_output=False)
        out += [low_b[:, 0], low_p[:, 0]]
    return torch.cat(out)


def test_the_sam_teacher_gets_the_students_prompts_in_the_same_frame(env, stage2):
    from fastsamclip.train.targets import split_prompts

    t, _, items, index = stage2
    ref = _low_res(env, t, items, index)
    mine = []
    with torch.no_grad():
        for item in items:
            pixels = item["image"][None]
            emb = t.targets.live_sam(pixels, [item["input_size"]])[0]
            mine.append(t.targets.masks(emb, split_prompts(item, t.cfg.prompt_types, t.device))[:, 0])
    mine = torch.cat(mine)
    assert mine.shape == ref.shape and ref.abs().max() > 0
    torch.testing.assert_close(mine, ref, atol=2e-4, rtol=1e-4)


def test_one_step_minimises_l_clip_plus_lambda_l_sam_as_computed_independently(env, stage2):
    t, (keys, pixels, res), items, index = stage2
    ref = copy.deepcopy(t.student).train()
    # Independent L_CLIP: the teacher's and the student's pooled embeddings of the same views.
    with torch.no_grad():
        target = env["clip"].encode_image(env["clip"].preprocess(pixels))
    l_clip = (1 - F.cosine_similarity(ref(ref.preprocess(pixels), sam=False)["clip"], target, dim=-1)).mean()
    # Independent L_SAM: the student's masks for the same prompts against the teacher's sigmoid.
    teacher = _low_res(env, t, items, index)
    student = []
    for item, i in zip(items, index):
        raw = t.sam_data.load_raw(i)
        emb = ref(ref.preprocess(item["image"][None], [item["input_size"]]), clip=False)["sam"]
        size, p, frame = raw.image.shape[:2], raw.prompts, (64, 64)
        boxes = torch.as_tensor(apply_boxes(p.boxes[0::2].astype(np.float64), size, 64), dtype=torch.float)
        pts = torch.as_tensor(apply_coords(p.points[1::2].astype(np.float64), size, 64), dtype=torch.float)
        student.append(ref.predict_masks(emb, frame, boxes=boxes, multimask_output=False)[0][:, 0])
        student.append(ref.predict_masks(emb, frame, points=(pts, torch.from_numpy(p.point_labels[1::2])),
                                         multimask_output=False)[0][:, 0])
    l_sam = mask_loss(torch.cat(student), torch.sigmoid(teacher))
    total = l_clip + LAMBDA * l_sam
    total.backward()

    opt, sched = t.make_optimizer(2)
    rec = t.train_step(2, opt, sched, clip_batch=(keys, pixels, res), sam_items=items)
    assert rec["loss_clip"] == pytest.approx(l_clip.item(), rel=1e-5, abs=1e-6)
    assert rec["loss_sam"] == pytest.approx(l_sam.item(), rel=1e-4, abs=1e-6)
    assert rec["loss"] == pytest.approx(total.item(), rel=1e-4, abs=1e-6)
    # The gradient the optimizer stepped with is that of L_CLIP + lambda * L_SAM (grad_clip off).
    trained = dict(t.student.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if trained[name].requires_grad and p.grad is not None:
            torch.testing.assert_close(trained[name].grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)
            checked += 1
    assert checked > 20


def test_at_initialisation_l_sam_is_the_teachers_own_focal_dice(env, stage2):
    t, clip_batch, items, index = stage2
    logits = _low_res(env, t, items, index)
    opt, sched = t.make_optimizer(2)
    rec = t.train_step(2, opt, sched, clip_batch=clip_batch, sam_items=items)
    expected = mask_loss(logits, torch.sigmoid(logits)).item()  # the student IS the teacher here
    assert rec["loss_sam"] == pytest.approx(expected, rel=1e-4)


def test_teachers_stay_frozen_and_in_eval_mode_all_through_training(env, tmp_path):
    t = trainer(env, tmp_path)
    seen = []

    def watch(module, _inputs):
        seen.append((type(module).__name__, module.training, torch.is_grad_enabled()))

    modules = [t.sam.image_encoder, t.sam.prompt_encoder, t.sam.mask_decoder, t.clip.model.visual]
    hooks = [m.register_forward_pre_hook(watch) for m in modules]
    try:
        t.run()
    finally:
        for h in hooks:
            h.remove()
    assert {name for name, _, _ in seen} >= {"ImageEncoderViT", "PromptEncoder", "MaskDecoder"}
    assert not any(training for _, training, _ in seen), "a teacher ran in training mode"
    assert not any(grad for _, _, grad in seen), "a teacher ran with gradients enabled"
    for m in (t.sam, t.clip):
        assert not m.training and all(not p.requires_grad and p.grad is None for p in m.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script: str, config: str, env: dict) -> None:
    """``torchrun --nnodes 2`` twice on this machine, one process each, meeting through a c10d
    rendezvous on localhost: what two machines of one process each run."""
    port, rdzv_id = free_port(), f"nodes-{os.getpid()}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
              "--local-addr", "127.0.0.1", script, config]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]


def test_two_processes_and_two_nodes_train_exactly_as_one_over_the_same_global_batch(env, tmp_path):
    """torchrun with 2 gloo ranks on an image folder (the same global batches as one process, each
    rank holding a share) and two CLIP resolutions: the same final weights, on both ranks; and the
    same on two nodes of one process each (two torchrun launches, a c10d rendezvous)."""
    folder = tmp_path / "clip_folder"
    pics = list(samples.load_sample_images(max_side=64).values())
    samples.write_image_folder(folder, pics + [p[::-1].copy() for p in pics])  # 24 images
    # 64 masks per image: each SA-1B image gives all it has, so the two ranks hold unequal mask counts.
    cfg = dataclasses.asdict(make_cfg(env, tmp_path / "x", clip_data=str(folder), clip_batch=5, masks_per_image=64,
                                      stage1_steps=2, stage2_steps=2, stage3_steps=1, loss_backend="reference"))
    cfg.pop("out")
    script = os.path.join(os.path.dirname(__file__), "torchrun_train.py")
    run_env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two, nodes = tmp_path / "one", tmp_path / "two", tmp_path / "nodes"
    r = subprocess.run([sys.executable, script, json.dumps({**cfg, "out": str(one)})], capture_output=True, text=True,
                       timeout=600, env=run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        script, json.dumps({**cfg, "out": str(two)})], capture_output=True, text=True, timeout=600,
                       env=run_env)
    assert r.returncode == 0, r.stderr[-3000:]
    two_nodes(script, json.dumps({**cfg, "out": str(nodes)}), run_env)
    ref = torch.load(one / "rank0.pt")
    h1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    for run in (two, nodes):
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["world_size"] == 2
        same_run(ref, h1, [torch.load(run / f"rank{i}.pt") for i in range(2)],
                 [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])


def same_run(ref, h1, ranks, h2):
    assert [x["resolution"] for x in h1] == [x["resolution"] for x in h2] and len({x["resolution"] for x in h1}) > 1
    assert [x["images"] for x in h1] == [x["images"] for x in h2]
    for a, b in zip(h1, h2):
        assert a["loss_clip"] == pytest.approx(b["loss_clip"], rel=1e-5)
        assert a.get("loss_sam", 0) == pytest.approx(b.get("loss_sam", 0), rel=1e-5)
    for k, v in ref.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the ranks never drift apart
        if k.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a shift shared by every key), so
            # AdamW's step on it is rounding noise scaled to up to lr: compare it at that scale.
            d = v.shape[0] // 3
            torch.testing.assert_close(ranks[0][k][d:2 * d], v[d:2 * d], atol=1e-3, rtol=0, msg=k)
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([ranks[0][k][:d], ranks[0][k][2 * d:]])
        else:
            w = ranks[0][k]
        torch.testing.assert_close(w, v, atol=2e-5, rtol=1e-4, msg=k)
