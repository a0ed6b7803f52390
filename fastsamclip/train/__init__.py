"""SAM-CLIP training: the paper's three stages on one or many GPUs (``fastsamclip distill``).

- :mod:`~fastsamclip.train.config`: every number of the recipe (:class:`TrainConfig`).
- :mod:`~fastsamclip.train.distiller`: the stages and the step (:class:`Distiller`).
- :mod:`~fastsamclip.train.targets`: the teachers' outputs, live or cached, and the shared prompts.
- :mod:`~fastsamclip.train.optim`: trainable groups, learning rates, schedule.
- :mod:`~fastsamclip.train.checkpoints`: exact-resume checkpoints.
- :mod:`~fastsamclip.train.teacher_cache`: the teachers' outputs stored, read back by pieces.
- :mod:`~fastsamclip.train.cache_build`: the cache built over GPUs and nodes, resumable.
- :mod:`~fastsamclip.train.agreement`: held-out agreement with the teachers (the report).

Each name below is imported from its module on first use: ``from fastsamclip.train import
TrainConfig`` imports the configuration alone (no torch), which the command line's parser reads
to offer one option per field.
"""

import importlib

# name -> the module of this package that defines it
_HOMES = {
    "evaluate_agreement": "agreement",
    "STAGES": "config", "TrainConfig": "config", "config_from_dict": "config", "load_config_file": "config",
    "Distiller": "distiller", "TrainingStopped": "distiller", "train": "distiller",
    "Dist": "distributed", "dist_from_env": "distributed", "setup_distributed": "distributed",
    "lr_lambda": "optim", "param_groups": "optim", "set_trainable": "optim", "stage_trainable": "optim",
    "TeacherCache": "teacher_cache", "TeacherCacheWriter": "teacher_cache", "cache_teachers": "cache_build",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_HOMES))
