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
