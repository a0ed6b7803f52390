"""SAM-CLIP in miniature: a world where both teachers have real, measurable skills, small enough
to train on two CPU cores, and the paper's recipe run on it.

- ``world``: the canvases, their objects and masks, written in the real layouts (``write_world``);
- ``teachers``: the CLIP and SAM teachers trained here, in their official formats; the files
  trained by ``fastsamclip miniature teachers`` ship in ``teachers/`` (``shipped_paths``);
- ``skills``: their held-out skills through the evaluation harness;
- ``recipe``: merge and the three stages at miniature size (``Recipe``, ``distill``), and the
  skills of each stage's student;
- ``ablations``: the paper's findings, each a change of one field of the recipe, over seeds.
"""

from fastsamclip.miniature.recipe import (
    HIGH_RES,
    LOW_RES,
    Limits,
    Recipe,
    distill,
    merge_teachers,
    student_skills,
    teacher_skills,
)
from fastsamclip.miniature.skills import prompt_miou, semantic_miou, world_paths, zero_shot_top1
from fastsamclip.miniature.teachers import SAM_TYPE, TeacherConfig, shipped_paths, train_teachers
from fastsamclip.miniature.world import CLASSES, Canvas, WorldConfig, render_canvas, write_world

__all__ = ["CLASSES", "Canvas", "HIGH_RES", "LOW_RES", "Limits", "Recipe", "SAM_TYPE", "TeacherConfig", "WorldConfig",
           "distill", "merge_teachers", "prompt_miou", "render_canvas", "semantic_miou", "shipped_paths",
           "student_skills", "teacher_skills", "train_teachers", "world_paths", "write_world", "zero_shot_top1"]
