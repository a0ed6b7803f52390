"""fastsamclip.kernels: the ops the model, the training loop and the predictor call.

Public surface only; callers never import kernel internals. Every op has a plain-torch
``*_reference`` beside its kernels and is dispatched by one mechanism (``dispatch.py``): the
first able backend runs, a fallback is logged once, and a backend is forced with ``backend=``,
``use_backend(name)`` or ``FASTSAMCLIP_BACKEND`` / ``FASTSAMCLIP_BACKEND_<OP>``.
``op_table()`` lists every op's backends and whether they can run here.

This package imports torch, triton (optional), numpy and the standard library only.
"""

import os as _os

from . import dispatch as _dispatch
from .cpu import native_bf16
from .dispatch import OPS, Backend, Op, op_table, use_backend

# Ops register in import order, which is the order op_table() lists them.
from .relpos_attention import relpos_attention, relpos_attention_reference  # noqa: E402, I001
from .cosine_distill import cosine_distill_loss, cosine_distill_loss_reference  # noqa: E402
from .linear_cosine_distill import linear_cosine_distill_loss, linear_cosine_distill_loss_reference  # noqa: E402
from .focal_dice import focal_dice_loss, focal_dice_loss_reference  # noqa: E402
from .preprocess import preprocess, preprocess_reference  # noqa: E402
from .postprocess_masks import postprocess_masks, postprocess_masks_reference  # noqa: E402

from . import aot  # noqa: E402  (the ahead-of-time GPU builds: ``fastsamclip info --kernels``)

# Once, with every op registered: a forced backend nobody has raises here, naming the valid ones.
_dispatch._apply_environment(_os.environ)

__all__ = [
    "Backend",
    "OPS",
    "Op",
    "aot",
    "cosine_distill_loss",
    "cosine_distill_loss_reference",
    "focal_dice_loss",
    "focal_dice_loss_reference",
    "linear_cosine_distill_loss",
    "native_bf16",
    "linear_cosine_distill_loss_reference",
    "op_table",
    "postprocess_masks",
    "postprocess_masks_reference",
    "preprocess",
    "preprocess_reference",
    "relpos_attention",
    "relpos_attention_reference",
    "use_backend",
]
