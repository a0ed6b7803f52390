"""The ablation table's arithmetic and its resuming, and the demo's refusal of a used folder."""

import json
import os

import pytest

from fastsamclip.cli import main
from fastsamclip.demo import check_demo_out, demo_table
from fastsamclip.errors import ConfigError
from fastsamclip.miniature import ablations
from fastsamclip.miniature.recipe import Limits, Recipe


def _result(run, seed, **checkpoints):
    return {"run": run, "seed": seed, "skills": checkpoints}


def _results(full_point=(0.8, 0.82, 0.81), lambda0_point=(0.5, 0.6, 0.55)):
    out = []
    for k in range(3):
        out += [
            _result("full", k, stage1={"top1": 50.0 + k}, stage2={"top1": 70.0 + k, "top1_high": 40.0},
                    final={"top1": 72.0 + k, "top1_high": 60.0 + k, "point": full_point[k], "box": 0.9,
                           "semantic_clip": 30.0, "semantic_composed": 40.0 + k}),
            _result("lambda0", k, final={"top1": 75.0, "point": lambda0_point[k], "box": 0.95}),
            _result("lambda1", k, final={"top1": 74.0, "point": 0.7, "box": 0.85}),
            _result("lambda100", k, final={"top1": 65.0, "point": 0.83, "box": 0.91}),
            _result("avgpool", k, final={"top1": 60.0, "semantic_clip": 20.0}),
        ]
    return out


def test_rows_give_mean_and_spread_over_seeds_and_compare_means_in_the_papers_direction():
    by = {r["finding"]: r for r in ablations.rows(_results(), {"top1": 80.0, "point": 0.85, "box": 0.9,
                                                                "semantic_everything": 45.0})}
    assert len(by) == 9  # one row per finding
    point = by["rehearsal: point mIoU, full recipe vs stage 2 without D_SAM (lambda 0)"]
    assert point["measured"] == "0.8100 ± 0.0100 vs 0.5500 ± 0.0500" and point["reproduced"]
    box = by["rehearsal: box mIoU, full recipe vs lambda 0"]
    assert not box["reproduced"]  # 0.90 < 0.95: a finding that does not hold is reported as such
    assert by["head probing only (stage 1) vs stages 1+2: zero-shot top-1 @64 px (%)"]["measured"] == \
        "51.0 ± 1.0 vs 71.0 ± 1.0"
    assert by["CLIP-head pooling, max vs avg: zero-shot top-1 @64 px (%)"]["reproduced"]
    assert by["lambda 1 / 10 / 100: zero-shot top-1 @64 px (%)"]["reproduced"]  # 65 < 73
    assert by["lambda 1 / 10 / 100: point mIoU"]["reproduced"]  # 0.70 < 0.81
    assert not by["semantic mIoU (%), composed vs SAM everything + CLIP on crops (the two teachers)"]["reproduced"]
    assert by["stage 3: zero-shot top-1 @128 px (%), before vs after resolution adaptation"]["reproduced"]
    assert point["clear"] and box["clear"]  # 0.26 and 0.05 apart, spreads 0.05 and 0
    md = ablations.markdown(list(by.values()), (0, 1, 2), {"top1": 80.0, "point": 0.85, "box": 0.9})
    assert "| no |" in md and "| yes |" in md and "seeds 0, 1, 2" in md and "spread" not in md
    # Means in the paper's direction by less than the seeds' spread: said so, not a plain "yes".
    noisy = {r["finding"]: r for r in ablations.rows(_results(full_point=(0.8, 0.9, 0.7),
                                                                lambda0_point=(0.75, 0.75, 0.75)),
                                                       {"semantic_everything": 45.0})}
    row = noisy["rehearsal: point mIoU, full recipe vs stage 2 without D_SAM (lambda 0)"]
    assert row["reproduced"] and not row["clear"]  # 0.05 apart, spread 0.1
    md = ablations.markdown([row], (0, 1, 2), {"top1": 80.0, "point": 0.85, "box": 0.9})
    assert "| yes (within the seeds' spread) |" in md


def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "lambda1-seed2"
    folder.mkdir(parents=True)
    done = {"run": "lambda1", "seed": 2, "skills": {"final": {"top1": 1.0, "point": 0.5, "box": 0.5}}}
    (folder / "skills.json").write_text(json.dumps(done))

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(ablations, "distill", no_training)
    assert ablations.run_one("unused", str(tmp_path), "lambda1", 2, Recipe(), Limits()) == done
    # An unfinished one (no skills.json) is started over from a clean folder.
    (tmp_path / "runs" / "full-seed0").mkdir()
    (tmp_path / "runs" / "full-seed0" / "stale").write_text("x")
    with pytest.raises(AssertionError, match="trained again"):
        ablations.run_one("unused", str(tmp_path), "full", 0, Recipe(), Limits())
    assert not (tmp_path / "runs" / "full-seed0" / "stale").exists()


def test_the_lambda_runs_start_from_the_full_runs_stage1_of_their_seed(tmp_path, monkeypatch):
    """Stage 1 does not depend on lambda: a lambda run trains stages 2-3 from the full run's
    stage-1 student of the same seed (training that run first), the pooling run trains its own."""
    calls = []

    def fake_distill(world, folder, recipe, teachers=None, init=None):
        calls.append((os.path.basename(folder), recipe.stage_steps, recipe.sam_loss_weight, recipe.pool, init))
        os.makedirs(folder, exist_ok=True)
        return {"merge": "m", "stage1": "s1", "stage2": "s2", "final": "f"}

    monkeypatch.setattr(ablations, "distill", fake_distill)
    monkeypatch.setattr(ablations, "student_skills", lambda *a, **k: {"top1": 1.0})
    base = Recipe(stage_steps=(5, 3, 2))
    ablations.run_one("w", str(tmp_path), "lambda0", 1, base, Limits())
    ablations.run_one("w", str(tmp_path), "lambda100", 1, base, Limits())  # the full run is on disk now
    ablations.run_one("w", str(tmp_path), "avgpool", 1, base, Limits())
    full_s1 = str(tmp_path / "runs" / "full-seed1" / "stage1.safetensors")
    assert calls == [("full-seed1", (5, 3, 2), 10.0, "max", None),
                     ("lambda0-seed1", (0, 3, 2), 0.0, "max", full_s1),
                     ("lambda100-seed1", (0, 3, 2), 100.0, "max", full_s1),
                     ("avgpool-seed1", (5, 3, 2), 10.0, "avg", None)]


def test_the_demo_refuses_a_folder_with_an_earlier_run_and_names_its_own_flag(tmp_path, capsys):
    run = tmp_path / "run" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" not in err and len(err.strip().splitlines()) == 1
    check_demo_out(str(tmp_path), overwrite=True)  # what --overwrite lets through
    with pytest.raises(ConfigError):
        check_demo_out(str(tmp_path), overwrite=False)
    check_demo_out(str(tmp_path / "fresh"), overwrite=False)


@pytest.mark.parametrize("steps", ["500,150", "500,x,40", "0,0,40", "500,-1,40"])
def test_ablations_refuse_bad_steps_in_one_line_before_writing_anything(tmp_path, capsys, steps):
    assert main(["miniature", "ablations", "--out", str(tmp_path / "out"), "--steps", steps]) == 2
    err = capsys.readouterr().err.strip()
    assert "--steps" in err and "S1,S2,S3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_demo_table_has_a_row_per_skill_and_the_baseline_in_the_teacher_column():
    sk = {"top1": 90.0, "top1_high": 88.0, "point": 0.8, "box": 0.9, "semantic_clip": 30.0, "semantic_composed": 50.0}
    lines = demo_table({"top1": 95.0, "point": 0.81, "box": 0.92, "semantic_everything": 20.0}, sk, sk)
    assert len(lines) == 2 + 6
    assert lines[2].startswith("| zero-shot top-1 @64 px (%) | 95.0 | 90.0 | 90.0 |")
    assert "20.0 (SAM everything + CLIP crops)" in lines[-1]
    assert os.linesep not in "".join(lines)
