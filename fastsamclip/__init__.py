"""fastsamclip: SAM-CLIP, one ViT backbone for promptable masks and image-text semantics.

Layers, each importing only from those below it: ``fastsamclip.kernels`` (ops),
``fastsamclip.modeling`` + ``fastsamclip.transforms`` + ``fastsamclip.checkpoint`` (the model and
its geometry), then the application (``data``, ``train``, ``predictor``, ``eval``, ``cli``).

``import fastsamclip`` imports nothing else (no torch); each subpackage is imported on first use
of its attribute (``fastsamclip.kernels``, ``fastsamclip.predictor``, ...), as after an explicit
``import fastsamclip.kernels``.
"""

import importlib

__version__ = "0.1.0"

SUBMODULES = ("bench", "checkpoint", "cli", "data", "demo", "draw", "errors", "eval", "export", "files", "kernels",
              "modeling", "predictor", "serve", "train", "transforms")


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(SUBMODULES))
