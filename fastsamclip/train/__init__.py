"""SAM-CLIP training: the paper's three stages on one or many GPUs (``fastsamclip distill``).

- :mod:`~fastsamclip.train.config`: every number of the recipe (:class:`TrainConfig`).
- :mod:`~fastsamclip.train.distiller`: the stages and the step (:class:`Distiller`).
- :mod:`~fastsamclip.train.targets`: the teachers' outputs, live or cached, and the shared prompts.
- :mod:`~fastsamclip.train.optim`: trainable groups, learning rates, schedule.
- :mod:`~fastsamclip.train.checkpoints`: exact-resume checkpoints.
- :mod:`~fastsamclip.train.teacher_cache`: the teachers' outputs stored, read back by pieces.
- :mod:`~fastsamclip.train.cache_build`: the cache built over GPUs and nodes, resumable.
- :mod:`~fastsamclip.train.agreement`: held-out agreement with the teachers (the report).
"""

from fastsamclip.train.agreement import evaluate_agreement
from fastsamclip.train.config import (
    STAGES,
    TrainConfig,
    config_from_dict,
    load_config_file,
)
from fastsamclip.train.distiller import Distiller, TrainingStopped, train
from fastsamclip.train.distributed import Dist, dist_from_env, setup_distributed
from fastsamclip.train.optim import (
    lr_lambda,
    param_groups,
    set_trainable,
    stage_trainable,
)
from fastsamclip.train.cache_build import cache_teachers
from fastsamclip.train.teacher_cache import TeacherCache, TeacherCacheWriter

__all__ = [
    "STAGES", "Dist", "Distiller", "TeacherCache", "TeacherCacheWriter", "TrainConfig", "TrainingStopped",
    "cache_teachers", "config_from_dict", "dist_from_env", "evaluate_agreement", "load_config_file", "lr_lambda", "param_groups",
    "set_trainable", "setup_distributed", "stage_trainable", "train",
]
