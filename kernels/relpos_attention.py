"""SAM's attention with decomposed relative-position bias, behind a backend chooser.

The op, per batch element and head, on an ``H x W`` token grid (``N = H * W``, key index
``n = kh * W + kw``)::

    S = q @ k^T * scale + rel_h[:, kh(n)] + rel_w[:, kw(n)]      # (N, N), never needed whole
    out = softmax(S, dim=-1) @ v

``rel_h = q_unscaled . Rh[qh - kh + H - 1]`` of shape ``(N, H)`` and ``rel_w`` of shape ``(N, W)``
are computed by the caller (see ``fastsamclip.modeling.backbone.relpos_tables``); they are
inputs of the op so that every backend gets gradients for them through autograd.

Backends, in priority order (the first able one runs; see ``dispatch.py`` for forcing one):
``triton`` (``relpos_attention_triton.py``), ``flex`` (``relpos_attention_flex.py``), ``sdpa``
and ``reference`` (both here). Each says why it cannot take an input; ``OP.table()`` lists them.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from . import relpos_attention_flex, relpos_attention_triton
from .dispatch import Backend, Op, Probe, dtype_grad_probes, register_op

__all__ = ["OP", "relpos_attention", "relpos_attention_reference", "relpos_attention_sdpa"]


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


# Bias elements materialised at once by the CPU inference path: 2 heads of a 64 x 64 grid.
SDPA_CPU_BIAS_ELEMENTS = 2**25


def relpos_attention_sdpa(q, k, v, rel_h, rel_w, scale: Optional[float] = None):
    """SDPA with the bias materialised as a float ``attn_mask`` (memory-efficient/cuDNN/math
    path; flash attention takes no bias). Gradients reach rel_h/rel_w through the mask.

    On the CPU without gradients the (batch, head) pairs go through SDPA in groups whose bias
    holds at most ``SDPA_CPU_BIAS_ELEMENTS``, one buffer refilled per group: at 1024 px a global
    block's whole bias is 400 MB in bf16, and writing it fresh costs more than the attention
    (1.5-1.9x faster per global block on a 2-core Xeon, bf16 and fp32; identical results).

    Traced with a symbolic batch (``torch.export`` with a dynamic batch dimension, the AOTInductor
    export), the groups are of heads, each over the whole batch: a group size compared with the
    batch, or a loop over it, would put a guard on the exported batch dimension (and fail the
    export at every size where a group is smaller than the largest batch). Same results; the bias
    of one group then grows with the batch."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, nh, N, d = q.shape
    group = max(1, SDPA_CPU_BIAS_ELEMENTS // (N * N))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w))
    symbolic_batch = isinstance(B, torch.SymInt)
    G = nh if symbolic_batch else B * nh  # what is grouped: heads, or (batch, head) pairs
    if q.device.type != "cpu" or grad or group >= G:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=materialized_bias(rel_h, rel_w), scale=scale)
    if symbolic_batch:
        return torch.cat([F.scaled_dot_product_attention(
            q[:, s:s + group], k[:, s:s + group], v[:, s:s + group],
            attn_mask=materialized_bias(rel_h[:, s:s + group], rel_w[:, s:s + group]), scale=scale)
            for s in range(0, nh, group)], dim=1)
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    qf, kf, vf = (t.reshape(G, 1, N, d) for t in (q, k, v))
    rh, rw = rel_h.reshape(G, N, H, 1), rel_w.reshape(G, N, 1, W)
    bias = q.new_empty(group, N, H, W)
    out = q.new_empty(G, 1, N, d)
    for s in range(0, G, group):
        e = min(G, s + group)
        b = bias[:e - s]
        torch.add(rh[s:e], rw[s:e], out=b)
        out[s:e] = F.scaled_dot_product_attention(qf[s:e], kf[s:e], vf[s:e], attn_mask=b.view(e - s, 1, N, N),
                                                  scale=scale)
    return out.view(B, nh, N, d)


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


# --------------------------------------------------------------------------------------------
# The op: its backends in priority order
# --------------------------------------------------------------------------------------------
def _probes(device: str, head_dim: int = 64, grid=(14, 14)) -> List[Probe]:
    """One 14 x 14 window (SAM's windowed blocks) per dtype, fwd and fwd+bwd."""
    H, W = grid
    N = H * W

    def make(dtype, needs_grad):
        empty = lambda *shape: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        args = (empty(1, 1, N, head_dim), empty(1, 1, N, head_dim), empty(1, 1, N, head_dim),
                empty(1, 1, N, H), empty(1, 1, N, W))
        return args, dict(needs_grad=needs_grad)

    return dtype_grad_probes(device, make, f"head_dim={head_dim}")


OP = register_op(Op("relpos_attention", probes=_probes))
OP.register(relpos_attention_triton.BACKEND)
OP.register(relpos_attention_flex.BACKEND)
OP.register(Backend(
    name="sdpa",
    fn=relpos_attention_sdpa,
    description="torch SDPA with the (N, N) bias materialised as attn_mask",
))
OP.register(Backend(
    name="reference",
    fn=relpos_attention_reference,
    description="plain torch, SAM's own arithmetic (materialises the scores)",
))


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
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
        backend: force a backend by name (``OP.names``); default: the first able one.

    Returns:
        (B, heads, N, d), differentiable in all five tensor inputs.

    Plain torch equivalent: ``relpos_attention_reference``.
    """
    _validate(q, k, v, rel_h, rel_w, scale)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_h, rel_w)
    )
    be = OP.select(q, k, v, rel_h, rel_w, needs_grad=needs_grad, backend=backend)
    return be.fn(q, k, v, rel_h, rel_w, scale)
