"""One source of truth: `fastsamclip eval` on the miniature datasets gives the numbers the
miniature's tables are made of, for a teacher and for a merged student; the student at merge
answers prompts exactly as its SAM teacher does."""

import json

import pytest

from fastsamclip.cli import main
from fastsamclip.eval.models import CLIPTeacherModel, MergedModel, SAMTeacherModel
from fastsamclip.miniature import (
    HIGH_RES,
    LOW_RES,
    SAM_TYPE,
    merge_teachers,
    prompt_miou,
    semantic_miou,
    shipped_paths,
    world_paths,
    zero_shot_top1,
)

import torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return merge_teachers(str(tmp_path_factory.mktemp("mini-merge") / "merge.safetensors"))


def _eval(argv, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert main(["eval", *argv, "--no-progress", "--workers", "0", "--out", out, "--overwrite"]) == 0, \
        capsys.readouterr().err
    with open(out) as f:
        return json.load(f)["metrics"]


def test_eval_classify_gives_the_teachers_zero_shot_top1(world, tmp_path, capsys):
    p = world_paths(world["root"])
    clip = shipped_paths()["clip"]
    cli = _eval(["classify", "--teacher", "clip", "--clip-model", clip, "--data-root", p["crops"],
                 "--dataset", "folder"], tmp_path, capsys)
    model = CLIPTeacherModel(clip, None, CPU)
    assert cli["top1"] == zero_shot_top1(model, world["root"], model.teacher.image_size)


def test_eval_classify_gives_the_students_zero_shot_top1(world, merged, tmp_path, capsys):
    """The student's row of every table (fp32 at 64 px) is what `eval classify` prints for it."""
    p = world_paths(world["root"])
    cli = _eval(["classify", "--checkpoint", merged, "--dtype", "fp32", "--resolution", str(LOW_RES),
                 "--data-root", p["crops"], "--dataset", "folder"], tmp_path, capsys)
    assert cli["top1"] == zero_shot_top1(MergedModel(merged, CPU, hash_file=False, dtype="fp32"), world["root"],
                                         LOW_RES)


def test_eval_instances_and_retrieval_run_on_the_miniature_layouts(world, merged, tmp_path, capsys):
    """The two tasks no table reads (box-prompted COCO AP, caption retrieval) run on the world's
    layouts unchanged; the student at merge prompts as its SAM teacher, so their AP agree."""
    p = world_paths(world["root"])
    inst = ["instances", "--data-root", p["coco"], "--dataset", "coco"]
    student = _eval([*inst, "--checkpoint", merged, "--dtype", "fp32"], tmp_path, capsys)
    teacher = _eval([*inst, "--teacher", "sam", "--sam-checkpoint", shipped_paths()["sam"], "--sam-type", SAM_TYPE],
                    tmp_path, capsys)
    key = next(k for k in student if "AP" in k)
    assert 20.0 < teacher[key] <= 100.0  # percent: a trained teacher finds the objects
    assert student[key] == pytest.approx(teacher[key], abs=2.0)
    ret = _eval(["retrieval", "--checkpoint", merged, "--dtype", "fp32", "--resolution", str(HIGH_RES),
                 "--data-root", p["retrieval"], "--dataset", "coco"], tmp_path, capsys)
    assert (ret["images"], ret["captions"]) == (world["meta"]["heldout"], 5 * world["meta"]["heldout"])  # every canvas, five captions each
    assert 0.0 <= ret["R@1"] <= ret["R@5"] <= ret["R@10"] <= 100.0


def test_eval_semantic_gives_the_students_miou_in_both_modes(world, merged, tmp_path, capsys):
    p = world_paths(world["root"])
    model = MergedModel(merged, CPU, hash_file=False, dtype="fp32")
    for mode in ("clip", "composed"):
        argv = ["semantic", "--checkpoint", merged, "--dtype", "fp32", "--data-root", p["voc"], "--dataset", "voc",
                "--class-names", p["voc_class_names"], "--mode", mode, "--limit", "6"]
        if mode == "clip":
            argv += ["--resolution", str(HIGH_RES)]
        cli = _eval(argv, tmp_path, capsys)
        assert cli["mIoU"] == pytest.approx(semantic_miou(model, world["root"], mode, HIGH_RES, limit=6), abs=1e-9)


def test_the_student_at_merge_answers_prompts_as_its_sam_teacher(world, merged):
    """The merged student starts as SAM: through SAMCLIPPredictor and through segment_anything's
    SamPredictor, the same prompts give the same masks (a prompt mapping or a normalisation
    that differs between the two paths shows here)."""
    student = prompt_miou(MergedModel(merged, CPU, hash_file=False, dtype="fp32"), world["root"], limit=8)
    teacher = prompt_miou(SAMTeacherModel(shipped_paths()["sam"], SAM_TYPE, CPU), world["root"], limit=8)
    assert student["point"] == pytest.approx(teacher["point"], abs=2e-3)
    assert student["box"] == pytest.approx(teacher["box"], abs=2e-3)
    assert teacher["box"] > 0.5  # a trained teacher: the agreement is about real masks
