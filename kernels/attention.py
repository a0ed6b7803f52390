"""SAM's attention with decomposed relative-position bias, behind a backend chooser.

The op, per batch element and head, on an ``H x W`` token grid (``N = H * W``, key index
``n = kh * W + kw``)::

    S = q @ k^T * scale + rel_h[:, kh(n)] + rel_w[:, kw(n)]      # (N, N), never needed whole
    out = softmax(S, dim=-1) @ v

``rel_h = q_unscaled . Rh[qh - kh + H - 1]`` of shape ``(N, H)`` and ``rel_w`` of shape ``(N, W)``
are computed by the caller (see ``fastsamclip.modeling.backbone.relpos_tables``); they are
inputs of the op so that every backend gets gradients for them through autograd.

Backends are chosen from declared capabilities, the first able one in ``PRIORITY`` wins. Each
backend returns the reasons it cannot take an input; when none can, the error lists them all.
Forcing one: the ``backend=`` argument, the ``use_backend(name)`` context manager, or the
environment variable ``FASTSAMCLIP_ATTENTION_BACKEND`` (read once, at import).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

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

log = logging.getLogger("fastsamclip.kernels")

ENV_VAR = "FASTSAMCLIP_ATTENTION_BACKEND"


# --------------------------------------------------------------------------------------------
# Plain-torch reference: exactly SAM's arithmetic (segment_anything/modeling/image_encoder.py).
# --------------------------------------------------------------------------------------------
def relpos_attention_reference(q, k, v, rel_h, rel_w, scale: Optional[float] = None):
    """Materialises the (B, heads, N, N) scores, as SAM does. Same op order as SAM, so a
    backbone on this backend equals ``segment_anything`` bit for bit in fp32."""
    B, nh, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    scale = d**-0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (
        attn.view(B, nh, N, H, W) + rel_h[..., :, None] + rel_w[..., None, :]
    ).view(B, nh, N, N)
    attn = attn.softmax(dim=-1)
    return attn @ v


def materialized_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, H), (B, heads, N, W) -> the full (B, heads, N, H*W) additive bias."""
    B, nh, N, H = rel_h.shape
    W = rel_w.shape[-1]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, N, H * W)


def relpos_attention_sdpa(q, k, v, rel_h, rel_w, scale: Optional[float] = None):
    """SDPA with the bias materialised as a float ``attn_mask`` (memory-efficient/cuDNN/math
    path; flash attention takes no bias). Gradients reach rel_h/rel_w through the mask."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = materialized_bias(rel_h, rel_w)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


# --------------------------------------------------------------------------------------------
# Backend registry
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionBackend:
    """One way to compute ``relpos_attention``.

    ``check(q, k, v, rel_h, rel_w, needs_grad) -> list[str]`` returns the reasons the backend
    cannot take these inputs (empty: it can). ``is_available() -> str | None`` says why the
    backend cannot run at all on this install (None: it can), independent of any input.
    ``auto_check(q, k, v, rel_h, rel_w, needs_grad) -> list[str]`` returns reasons the backend,
    although able, should not be picked automatically (e.g. a Triton kernel on CPU runs only in
    the slow interpreter); forcing the backend by name ignores them.
    """

    name: str
    fn: Callable
    description: str
    check: Callable[..., List[str]] = field(default=lambda *a, **k: [])
    is_available: Callable[[], Optional[str]] = field(default=lambda: None)
    auto_check: Callable[..., List[str]] = field(default=lambda *a, **k: [])


_BACKENDS: dict[str, AttentionBackend] = {}
# First able backend wins. Fused kernels register themselves in front of the plain ones.
PRIORITY: List[str] = []


def register_backend(backend: AttentionBackend, priority: Optional[int] = None) -> None:
    """Add a backend; ``priority`` is its index in ``PRIORITY`` (default: last)."""
    _BACKENDS[backend.name] = backend
    if backend.name in PRIORITY:
        PRIORITY.remove(backend.name)
    PRIORITY.insert(len(PRIORITY) if priority is None else priority, backend.name)


def _check_any(q, k, v, rel_h, rel_w, needs_grad) -> List[str]:
    return []


register_backend(
    AttentionBackend(
        name="sdpa",
        fn=relpos_attention_sdpa,
        description="torch SDPA with the (N, N) bias materialised as attn_mask",
        check=_check_any,
    )
)
register_backend(
    AttentionBackend(
        name="reference",
        fn=relpos_attention_reference,
        description="plain torch, SAM's own arithmetic (materialises the scores)",
        check=_check_any,
    )
)


def _validate(q, k, v, rel_h, rel_w, scale) -> None:
    """Clear errors for bad input, before any backend sees it."""
    for name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"relpos_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"relpos_attention: {name} must be 4-D, got shape {tuple(t.shape)}; expected "
                "q, k, v of shape (B, heads, N, d), rel_h (B, heads, N, H), rel_w (B, heads, N, W)"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"relpos_attention: q, k, v must have one shape (B, heads, N, d); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, nh, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    if tuple(rel_h.shape[:3]) != (B, nh, N) or tuple(rel_w.shape[:3]) != (B, nh, N):
        raise ValueError(
            f"relpos_attention: rel_h {tuple(rel_h.shape)} and rel_w {tuple(rel_w.shape)} must "
            f"start with (B, heads, N) = {(B, nh, N)} like q"
        )
    if H * W != N:
        raise ValueError(
            f"relpos_attention: the token grid H x W = {H} x {W} (from rel_h/rel_w's last dims) "
            f"has {H * W} tokens but q has N = {N}"
        )
    dtypes = {t.dtype for t in (q, k, v, rel_h, rel_w)}
    if len(dtypes) != 1:
        raise TypeError(f"relpos_attention: all inputs must share one dtype, got {sorted(map(str, dtypes))}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"relpos_attention: dtype {q.dtype} is not a floating type this op supports")
    devices = {t.device for t in (q, k, v, rel_h, rel_w)}
    if len(devices) != 1:
        raise ValueError(f"relpos_attention: all inputs must be on one device, got {sorted(map(str, devices))}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"relpos_attention: scale must be a Python number or None, got {type(scale).__name__}")


def _reasons(backend: AttentionBackend, args, needs_grad: bool) -> List[str]:
    why = backend.is_available()
    if why is not None:
        return [why]
    return list(backend.check(*args, needs_grad))


_forced: List[Optional[str]] = [os.environ.get(ENV_VAR) or None]
_logged: set = set()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend (by name) inside the block; ``None`` restores automatic choice."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(PRIORITY)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select_backend(q, k, v, rel_h, rel_w, needs_grad: bool = False, backend: Optional[str] = None) -> AttentionBackend:
    """The backend that will run these inputs; raises with every backend's reasons if none can."""
    args = (q, k, v, rel_h, rel_w)
    name = backend or _forced[-1]
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(PRIORITY)}")
        why = _reasons(_BACKENDS[name], args, needs_grad)
        if why:
            raise RuntimeError(f"attention backend {name!r} was forced but cannot run this input: " + "; ".join(why))
        return _BACKENDS[name]
    refused = []
    for i, candidate in enumerate(PRIORITY):
        be = _BACKENDS[candidate]
        why = _reasons(be, args, needs_grad) or list(be.auto_check(*args, needs_grad))
        if not why:
            if refused and not torch.compiler.is_compiling():
                key = (be.name, tuple(n for n, _ in refused), q.device.type, q.dtype, q.shape[-1], needs_grad)
                if key not in _logged:
                    _logged.add(key)
                    log.warning(
                        "relpos_attention: using %r; preferred backends refused: %s",
                        be.name,
                        " | ".join(f"{n}: {'; '.join(w)}" for n, w in refused),
                    )
            return be
        refused.append((candidate, why))
    raise RuntimeError(
        "relpos_attention: no backend can run this input:\n"
        + "\n".join(f"  {n}: {'; '.join(w)}" for n, w in refused)
    )


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * scale + rel_h[..., kh] + rel_w[..., kw]) @ v``.

    Args:
        q, k, v: (B, heads, N, d) on an H x W token grid, N = H * W, key n = kh * W + kw.
        rel_h: (B, heads, N, H) height bias per query and key row.
        rel_w: (B, heads, N, W) width bias per query and key column.
        scale: score scale, default ``d ** -0.5``.
        backend: force a backend by name (see ``backend_table()``); default: first able one.

    Returns:
        (B, heads, N, d), differentiable in all five tensor inputs.

    Plain torch equivalent: ``relpos_attention_reference``.
    """
    _validate(q, k, v, rel_h, rel_w, scale)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_h, rel_w)
    )
    be = select_backend(q, k, v, rel_h, rel_w, needs_grad=needs_grad, backend=backend)
    return be.fn(q, k, v, rel_h, rel_w, scale)


def available_backends() -> List[str]:
    """Names of the backends that can run at all on this install, in priority order."""
    return [n for n in PRIORITY if _BACKENDS[n].is_available() is None]


def backend_table(device: Optional[str] = None, dtype: torch.dtype = torch.float16, head_dim: int = 64,
                  needs_grad: bool = False, grid: Sequence[int] = (14, 14)) -> List[dict]:
    """For ``fastsamclip info``: each backend, whether it takes a probe input, and why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    H, W = grid
    N = H * W
    empty = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
    probe = (empty(1, 1, N, head_dim), empty(1, 1, N, head_dim), empty(1, 1, N, head_dim),
             empty(1, 1, N, H), empty(1, 1, N, W))
    rows = []
    for name in PRIORITY:
        be = _BACKENDS[name]
        why = _reasons(be, probe, needs_grad)
        not_auto = [] if why else list(be.auto_check(*probe, needs_grad))
        rows.append(dict(name=name, ok=not why and not not_auto,
                         why="; ".join(why or [f"not chosen automatically: {w}" for w in not_auto]),
                         forced_ok=not why, description=be.description))
    return rows
