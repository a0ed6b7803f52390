"""The paper's findings on the miniature world: each one a change of one field of the recipe (or a
stage of the same run), measured over seeds on the held-out split, beside the paper's numbers.

Runs (each over every seed; the seed is the distillation's: data order, prompt and resolution
draws; the teachers and the merge are the same for all):

    full      the recipe (lambda 10, max pooling): its stage-1, stage-2 and final checkpoints
    lambda0   stage 2 on L_CLIP alone (lambda 0: no D_SAM rehearsal)
    lambda1   lambda 1
    lambda100 lambda 100
    avgpool   average instead of max pooling in the CLIP head

Rows (mean and sample standard deviation over the seeds; "expected" is the direction the paper
reports, "reproduced" compares the means in that direction, and says when they differ by less than
the seeds' spread, the larger sample standard deviation of the two):

    rehearsal          point / box mIoU of full against lambda0 (paper: without rehearsal SAM is forgotten)
    lambda             top-1 and point mIoU at lambda 1 / 10 / 100 (paper: 1 forgets more segmentation,
                       100 holds back classification)
    probing            top-1 after stage 1 only against after stages 1+2 (paper: stage 2 adds)
    pooling            top-1 with max against avg pooling (paper: max wins)
    composed           semantic mIoU, composed against CLIP head only (paper: +5.4 on VOC, 66.0 vs 60.6),
                       and against "SAM everything, then CLIP" with the two teachers (paper: 27.2)
    stage 3            top-1 at 128 px (the native size) before and after resolution adaptation

The lambda runs share the full run's stage 1 (same seed): stage 1 trains the CLIP head alone, which
lambda does not touch, so only stages 2 and 3 are trained again.

Every run's numbers are written to ``OUT/runs/<run>-seed<k>/skills.json`` as soon as they are
measured, so an interrupted command resumes where it stopped and never trains a finished run again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastsamclip.files import write_json
from fastsamclip.miniature.recipe import Limits, Recipe, distill, student_skills, teacher_skills

RUNS: Dict[str, dict] = {
    "full": {},
    "lambda0": {"sam_loss_weight": 0.0},
    "lambda1": {"sam_loss_weight": 1.0},
    "lambda100": {"sam_loss_weight": 100.0},
    "avgpool": {"pool": "avg"},
}
# Runs that differ from the full recipe only after stage 1 (lambda is stage 2's): they start from
# the full run's stage-1 checkpoint of the same seed, which saves a stage 1 each.
FROM_FULL_STAGE1 = ("lambda0", "lambda1", "lambda100")
# What each run's checkpoints are measured on (the stage checkpoints of the full run feed two rows).
MEASURE: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "full": {"stage1": ("top1",), "stage2": ("top1", "top1_high"),
             "final": ("top1", "top1_high", "point", "box", "semantic_clip", "semantic_composed")},
    "lambda0": {"final": ("top1", "point", "box")},
    "lambda1": {"final": ("top1", "point", "box")},
    "lambda100": {"final": ("top1", "point", "box")},
    "avgpool": {"final": ("top1", "semantic_clip")},
}


def run_one(world_root: str, out: str, name: str, seed: int, base: Recipe, limits: Limits,
            teachers: Optional[dict] = None) -> dict:
    """Train one run (unless its skills are on disk already) and measure its checkpoints."""
    folder = os.path.join(out, "runs", f"{name}-seed{seed}")
    done = os.path.join(folder, "skills.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    if os.path.isdir(folder):  # an interrupted run: its training starts over, deterministically
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    recipe = base.with_(seed=seed, **RUNS[name])
    init = None
    if name in FROM_FULL_STAGE1 and recipe.stage_steps[0]:
        # Stage 1 trains the CLIP head alone, so lambda cannot change it: start from the full
        # run's stage-1 student of the same seed (trained first) and run stages 2 and 3 only.
        run_one(world_root, out, "full", seed, base, limits, teachers)  # on disk already unless interrupted
        init = os.path.join(out, "runs", f"full-seed{seed}", "stage1.safetensors")
        recipe = recipe.with_(stage_steps=(0,) + tuple(recipe.stage_steps[1:]))
    paths = distill(world_root, folder, recipe, teachers, init=init)
    skills = {ck: student_skills(paths[ck], world_root, limits, what) for ck, what in MEASURE[name].items()}
    result = {"run": name, "seed": seed, "recipe": recipe.__dict__, "skills": skills,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(done, result)
    return result


def _stats(values: Sequence[float]) -> Tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: Sequence[float], pct: bool) -> str:
    m, s = _stats(values)
    return f"{m:.1f} ± {s:.1f}" if pct else f"{m:.4f} ± {s:.4f}"


def _gt(a: Sequence[float], b: Sequence[float]) -> dict:
    """Whether the mean of ``a`` is above that of ``b`` (the paper's direction), and whether by more
    than the seeds' spread (the larger of the two sample standard deviations)."""
    (ma, sa), (mb, sb) = _stats(a), _stats(b)
    return {"reproduced": ma > mb, "clear": abs(ma - mb) > max(sa, sb)}


def rows(results: List[dict], teachers: dict) -> List[dict]:
    """The table's rows from every run's skills: label, measured cells, paper, expected, reproduced."""
    by: Dict[Tuple[str, str, str], List[float]] = {}
    for r in results:
        for ck, sk in r["skills"].items():
            for k, v in sk.items():
                by.setdefault((r["run"], ck, k), []).append(v)

    def val(run, ck, key):
        return by[(run, ck, key)]

    out = [
        {"finding": "rehearsal: point mIoU, full recipe vs stage 2 without D_SAM (lambda 0)",
         "measured": f"{_fmt(val('full', 'final', 'point'), False)} vs {_fmt(val('lambda0', 'final', 'point'), False)}",
         "paper": "without rehearsal SAM's segmentation is forgotten (stated, no number)",
         "expected": "full > lambda 0", **_gt(val("full", "final", "point"), val("lambda0", "final", "point"))},
        {"finding": "rehearsal: box mIoU, full recipe vs lambda 0",
         "measured": f"{_fmt(val('full', 'final', 'box'), False)} vs {_fmt(val('lambda0', 'final', 'box'), False)}",
         "paper": "(as above)", "expected": "full > lambda 0",
         **_gt(val("full", "final", "box"), val("lambda0", "final", "box"))},
        {"finding": "lambda 1 / 10 / 100: point mIoU",
         "measured": " / ".join(_fmt(val(r, "final", "point"), False) for r in ("lambda1", "full", "lambda100")),
         "paper": "lambda 1 forgot more COCO segmentation than 10 (no number)", "expected": "lambda 1 < lambda 10",
         **_gt(val("full", "final", "point"), val("lambda1", "final", "point"))},
        {"finding": "lambda 1 / 10 / 100: zero-shot top-1 @64 px (%)",
         "measured": " / ".join(_fmt(val(r, "final", "top1"), True) for r in ("lambda1", "full", "lambda100")),
         "paper": "lambda 100 held back ImageNet accuracy (no number)", "expected": "lambda 100 < lambda 10",
         **_gt(val("full", "final", "top1"), val("lambda100", "final", "top1"))},
        {"finding": "head probing only (stage 1) vs stages 1+2: zero-shot top-1 @64 px (%)",
         "measured": f"{_fmt(val('full', 'stage1', 'top1'), True)} vs {_fmt(val('full', 'stage2', 'top1'), True)}",
         "paper": "stage 2 (backbone trained) beyond head probing (no number)", "expected": "stage 1 < stages 1+2",
         **_gt(val("full", "stage2", "top1"), val("full", "stage1", "top1"))},
        {"finding": "CLIP-head pooling, max vs avg: zero-shot top-1 @64 px (%)",
         "measured": f"{_fmt(val('full', 'final', 'top1'), True)} vs {_fmt(val('avgpool', 'final', 'top1'), True)}",
         "paper": "max pooling beat average pooling (no number)", "expected": "max > avg",
         **_gt(val("full", "final", "top1"), val("avgpool", "final", "top1"))},
        {"finding": "semantic mIoU (%), composed vs CLIP head only",
         "measured": f"{_fmt(val('full', 'final', 'semantic_composed'), True)} vs "
                     f"{_fmt(val('full', 'final', 'semantic_clip'), True)}",
         "paper": "66.0 vs 60.6 on VOC (+5.4)", "expected": "composed > CLIP head",
         **_gt(val("full", "final", "semantic_composed"), val("full", "final", "semantic_clip"))},
        {"finding": "semantic mIoU (%), composed vs SAM everything + CLIP on crops (the two teachers)",
         "measured": f"{_fmt(val('full', 'final', 'semantic_composed'), True)} vs "
                     f"{teachers['semantic_everything']:.1f} (deterministic)",
         "paper": "66.0 vs 27.2 on VOC", "expected": "composed > everything + CLIP",
         **_gt(val("full", "final", "semantic_composed"), [teachers["semantic_everything"]])},
        {"finding": "stage 3: zero-shot top-1 @128 px (%), before vs after resolution adaptation",
         "measured": f"{_fmt(val('full', 'stage2', 'top1_high'), True)} vs {_fmt(val('full', 'final', 'top1_high'), True)}",
         "paper": "one 1024 px pass serves both heads after stage 3 (no number)", "expected": "before < after",
         **_gt(val("full", "final", "top1_high"), val("full", "stage2", "top1_high"))},
    ]
    return out


def markdown(table: List[dict], seeds: Sequence[int], teachers: dict) -> str:
    lines = [f"| finding | measured (mean ± sd over seeds {', '.join(map(str, seeds))}) | paper | expected | reproduced |",
             "|---|---|---|---|---|"]
    for r in table:
        verdict = "yes" if r["reproduced"] else "no"
        if not r["clear"]:
            verdict += " (within the seeds' spread)"
        lines.append(f"| {r['finding']} | {r['measured']} | {r['paper']} | {r['expected']} | {verdict} |")
    lines.append("")
    lines.append(f"Teachers: CLIP zero-shot top-1 {teachers['top1']:.1f}%, SAM point mIoU {teachers['point']:.3f}, "
                 f"box mIoU {teachers['box']:.3f}.")
    return "\n".join(lines)


def run_ablations(world_root: str, out: str, seeds: Sequence[int] = (0, 1, 2), base: Recipe = Recipe(),
                  limits: Limits = Limits(), runs: Sequence[str] = tuple(RUNS), teachers: Optional[dict] = None,
                  say: Callable[[str], None] = print) -> dict:
    """Every run over every seed (resuming finished ones), then the table (Markdown and JSON)."""
    os.makedirs(out, exist_ok=True)
    t_path = os.path.join(out, "teachers.json")
    if os.path.exists(t_path):
        with open(t_path) as f:
            teach = json.load(f)
    else:
        teach = teacher_skills(world_root, teachers, limits)
        write_json(t_path, teach)
    results = []
    total = len(runs) * len(seeds)
    t0 = time.perf_counter()
    for i, (name, seed) in enumerate((n, s) for n in runs for s in seeds):
        r = run_one(world_root, out, name, seed, base, limits, teachers)
        results.append(r)
        say(f"[{i + 1}/{total}] {name} seed {seed}: " + "; ".join(
            f"{ck} " + ", ".join(f"{k} {v:.3g}" for k, v in sk.items()) for ck, sk in r["skills"].items())
            + f" ({time.perf_counter() - t0:.0f} s)")
    table = rows(results, teach)
    md = markdown(table, seeds, teach)
    with open(os.path.join(out, "ablations.md"), "w") as f:
        f.write(md + "\n")
    report = {"seeds": list(seeds), "recipe": base.__dict__, "limits": limits.__dict__, "teachers": teach,
              "rows": table, "runs": results}
    write_json(os.path.join(out, "ablations.json"), report)
    say(md)
    return report
