"""fastsamclip.kernels: the ops the model and the training loop call.

Public surface only; models never import kernel internals.
"""

from .attention import (
    AttentionBackend,
    available_backends,
    backend_table,
    register_backend,
    relpos_attention,
    relpos_attention_reference,
    select_backend,
    use_backend,
)

# Attention backends register themselves on import (triton first, then flex, ahead of sdpa).
# Each says why it is unavailable when its dependency is missing; the guard keeps
# `import fastsamclip.kernels` working whatever else goes wrong in their import.
for _mod in ("attention_triton", "attention_flex"):
    try:
        __import__(f"{__name__}.{_mod}")
    except Exception as _e:  # pragma: no cover
        import logging as _logging

        _logging.getLogger("fastsamclip.kernels").warning("attention backend %s unavailable: %s", _mod, _e)

__all__ = [
    "AttentionBackend",
    "available_backends",
    "backend_table",
    "register_backend",
    "relpos_attention",
    "relpos_attention_reference",
    "select_backend",
    "use_backend",
]

# Distillation losses. Without triton they run their plain-torch references; the guard keeps
# `import fastsamclip.kernels` working whatever goes wrong in their import.
try:
    from .losses import (
        cosine_distill_loss,
        cosine_distill_loss_reference,
        focal_dice_loss,
        focal_dice_loss_reference,
        linear_cosine_distill_loss,
        linear_cosine_distill_loss_reference,
    )
except Exception as _e:  # pragma: no cover
    import logging as _logging

    _logging.getLogger("fastsamclip.kernels").warning("distillation losses unavailable: %s", _e)
else:
    __all__ += [
        "cosine_distill_loss",
        "cosine_distill_loss_reference",
        "focal_dice_loss",
        "focal_dice_loss_reference",
        "linear_cosine_distill_loss",
        "linear_cosine_distill_loss_reference",
    ]

from .preprocess import postprocess_masks, postprocess_masks_reference, preprocess, preprocess_reference  # noqa: E402

__all__ += ["postprocess_masks", "postprocess_masks_reference", "preprocess", "preprocess_reference"]
