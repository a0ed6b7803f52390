"""FlexAttention backend for SAM's attention with decomposed relative-position bias.

Plain-torch equivalent (``relpos_attention.relpos_attention_reference``)::

    S = q @ k^T * scale + rel_h[..., :, kh(n)] + rel_w[..., :, kw(n)]   # (B, heads, N, N)
    out = softmax(S, -1) @ v

through ``torch.nn.attention.flex_attention`` with a ``score_mod`` that reads the two tables::

    score_mod(s, b, h, qi, ki) = s + rel_h[b, h, qi, ki // W] + rel_w[b, h, qi, ki % W]

Compiled, flex generates a flash-attention Triton kernel with the ``score_mod`` inlined, so no
N x N tensor exists; rel_h/rel_w are "captured buffers", and the compiled backward returns their
gradients (accumulated with atomics: not bit-deterministic).

Caveats (torch 2.14 as installed here; GPU claims from the torch source, verified on a GPU by
``tests/kernels/test_relpos_attention_flex.py::test_flex_cuda_fwd_bwd``):

* CUDA: compiled once per shape family (the compile happens on the first call, seconds); fp16,
  bf16, fp32; forward and backward, gradients to all five inputs.
* CPU: not offered as a backend. ``flex_attention`` raises for inputs that require grad on CPU
  ("does not support backward on CPU"), and its eager CPU forward is a math fallback that
  materialises the scores like the reference (compiled CPU forward works for fp32/fp16/bf16 but
  costs seconds of C++ compile per shape). ``relpos_attention_flex(..., compiled=False)`` still
  runs the forward on CPU, which the tests use to check the ``score_mod``.
* A new shape recompiles on CUDA; after the first recompile dynamo marks the changed sizes
  dynamic (automatic dynamic shapes), which flex supports. The grid width ``W`` is a Python int
  in the ``score_mod`` closure: one compile per distinct width (SAM: 14 and 64, or 28 at 448px).
* Gradients to rel_h/rel_w need flex's captured-buffer backward (torch 2.6 and later); older
  torch is refused for ``needs_grad``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch.torch_version import TorchVersion

from .dispatch import Backend

try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention

    _FLEX_IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # torch < 2.5
    _flex_attention = None
    _FLEX_IMPORT_ERROR = f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({e})"

__all__ = ["relpos_attention_flex", "BACKEND"]

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Flex's Triton template needs head dim >= 16 (tl.dot's K); 256 is its largest head dim.
# Gradients of captured buffers (rel_h/rel_w read inside score_mod) arrived in torch 2.6.
_CAPTURED_GRADS = TorchVersion(torch.__version__) >= (2, 6)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

_compiled = None


def _compiled_flex():
    """``torch.compile(flex_attention)``, built on first use: compiling at import would cost
    every ``import fastsamclip`` seconds. Inside an outer ``torch.compile`` dynamo inlines it."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_flex_attention)
    return _compiled


def relpos_attention_flex(q, k, v, rel_h, rel_w, scale: Optional[float] = None, *,
                          compiled: Optional[bool] = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + rel_h[..., kh] + rel_w[..., kw]) @ v`` through FlexAttention.

    q, k, v: (B, heads, N, d); rel_h: (B, heads, N, H); rel_w: (B, heads, N, W); N = H * W.
    Returns (B, heads, N, d). ``compiled`` defaults to True on CUDA; ``compiled=False`` runs
    flex's eager math path (materialises the scores; on CPU forward only), for tests.
    """
    W = rel_w.shape[-1]

    def score_mod(score, b, h, q_idx, kv_idx):
        # key n = kh * W + kw on the H x W grid
        return score + rel_h[b, h, q_idx, kv_idx // W] + rel_w[b, h, q_idx, kv_idx % W]

    if compiled is None:
        compiled = q.device.type == "cuda"
    fn = _compiled_flex() if compiled else _flex_attention
    return fn(q, k, v, score_mod=score_mod, scale=scale)


def _is_available() -> Optional[str]:
    if _FLEX_IMPORT_ERROR is not None:
        return _FLEX_IMPORT_ERROR
    if not torch.cuda.is_available():
        # CPU flex is forward only and eager there is its math fallback, which materialises the
        # scores like the reference: nothing to offer over sdpa.
        return "no CUDA GPU (flex on cpu: forward only, eager math path that materialises the scores)"
    return None


def _check(q, k, v, rel_h, rel_w, needs_grad=False) -> List[str]:
    why = []
    d = q.shape[-1]
    if q.device.type != "cuda":
        why.append(f"device {q.device.type} (flex's fused kernel needs cuda; cpu has no flex backward)")
    if q.dtype not in CUDA_DTYPES:
        why.append(f"dtype {q.dtype} (flex's kernel takes float16, bfloat16, float32)")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        why.append(f"head dim {d} (flex's kernel takes {MIN_HEAD_DIM}..{MAX_HEAD_DIM})")
    if needs_grad and not _CAPTURED_GRADS:
        why.append(f"backward with torch {torch.__version__} (rel_h/rel_w gradients need torch >= 2.6)")
    return why


BACKEND = Backend(
    name="flex",
    fn=relpos_attention_flex,
    description="torch FlexAttention, bias read in score_mod, compiled (cuda only)",
    check=_check,
    is_available=_is_available,
)
