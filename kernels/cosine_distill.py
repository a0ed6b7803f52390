"""Cosine distillation loss, ``1 - cos(student, teacher)`` over rows of the last dimension.

Caveats:
- The teacher is a constant: no gradient flows to it, and a teacher that requires grad is
  detached (the distillation targets come from a frozen model).
- Zero rows follow ``torch.nn.functional.cosine_similarity`` (torch 2.x ATen) exactly: each norm
  is clamped on its own, ``max(|s|, eps)`` and ``max(|t|, eps)``, and the clamp happens under
  no-grad, so autograd differentiates as if it were not there. The student gradient is therefore
  ``t / (|s|_c |t|_c) - cos * s / (|s|_c |s|)`` with the second term 0 when ``|s| = 0``; at a
  zero student row that is ``t / (eps |t|_c)`` (large, ~1e8 for eps=1e-8: torch's behaviour).
- Accumulation is fp32 for every input dtype; fp64 inputs run the plain-torch reference.
- The returned loss has ``torch.promote_types(student.dtype, teacher.dtype)``, as the reference; the per-row
  losses are reduced in fp32 first.
- Block sizes are a heuristic (memory-bound kernel, ~4096 elements per tile), not autotuned;
  the best values on H100/H200 are to be confirmed with ``python -m fastsamclip.bench.bench_cosine_distill``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_float_tensor, check_reduction, check_same_device
from ._triton import HAS_TRITON, UNAVAILABLE, Launch, tensor_refusals, tl, triton
from .dispatch import Backend, Op, Probe, dtype_grad_probes, register_op

__all__ = ["OP", "cosine_distill_loss", "cosine_distill_loss_reference", "CosineDistillFunction"]

NAME = "cosine_distill_loss"
DEFAULT_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------
def cosine_distill_loss_reference(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean",
                                  eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``1 - F.cosine_similarity(student, teacher.detach(), dim=-1, eps=eps)``, then reduced.

    student, teacher: (..., D). Returns a scalar ("mean", "sum") or the leading shape ("none").
    """
    loss = 1.0 - F.cosine_similarity(student, teacher.detach(), dim=-1, eps=eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------------------------
# Block configuration
# --------------------------------------------------------------------------------------------
# Forward holds whole rows in registers up to this width (one read of each row); wider rows loop.
MAX_BLOCK_D = 4096
# ~4096 elements per tile and tensor: enough bytes in flight per program for a memory-bound
# kernel while staying well inside the register file at 8 warps.
TILE_ELEMENTS = 4096
# Backward tiles the feature dim; 256 divides 256/768/1024 so the training widths waste no lanes.
BWD_BLOCK_D = 256


def _fwd_config(D: int) -> Tuple[int, int, int]:
    block_d = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    block_r = max(1, min(64, TILE_ELEMENTS // block_d))
    num_warps = 8 if block_r * block_d >= 4096 else 4
    return block_r, block_d, num_warps


def _bwd_config(D: int) -> Tuple[int, int, int]:
    block_d = min(triton.next_power_of_2(D), BWD_BLOCK_D)
    block_r = max(1, min(64, TILE_ELEMENTS // block_d))
    num_warps = 8 if block_r * block_d >= 4096 else 4
    return block_r, block_d, num_warps


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _cosine_rows_fwd_kernel(
        S, T, LOSS, COEF_A, COEF_B, DS,
        n_rows, D, stride_s, stride_t, stride_ds, eps,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
        SINGLE_PASS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    ):
        """Per row r: loss[r] = 1 - cos(S[r], T[r]), and the two per-row coefficients of the
        gradient, a = 1 / (|s|_c |t|_c), b = cos / (|s|_c |s|) (0 at |s| = 0), so that
        d loss[r] / d S[r] = b * S[r] - a * T[r]. With WRITE_GRAD that gradient is written to DS
        (which may be S itself: each program reads its rows before it writes them)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)  # R * D can pass 2**31 at (32, 4096, 1024)
        cols = tl.arange(0, BLOCK_D)
        if SINGLE_PASS:
            m = rmask[:, None] & (cols[None, :] < D)
            s = tl.load(S + rows64[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(T + rows64[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dot = tl.sum(s * t, axis=1)
            ss = tl.sum(s * s, axis=1)
            tt = tl.sum(t * t, axis=1)
        else:
            dot = tl.zeros([BLOCK_R], dtype=tl.float32)
            ss = tl.zeros([BLOCK_R], dtype=tl.float32)
            tt = tl.zeros([BLOCK_R], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                c = d0 + cols
                m = rmask[:, None] & (c[None, :] < D)
                s = tl.load(S + rows64[:, None] * stride_s + c[None, :], mask=m, other=0.0).to(tl.float32)
                t = tl.load(T + rows64[:, None] * stride_t + c[None, :], mask=m, other=0.0).to(tl.float32)
                dot += tl.sum(s * t, axis=1)
                ss += tl.sum(s * s, axis=1)
                tt += tl.sum(t * t, axis=1)
        ns = tl.sqrt(ss)
        nt = tl.sqrt(tt)
        ns_c = tl.maximum(ns, eps)  # the same clamps as ATen's cosine_similarity
        nt_c = tl.maximum(nt, eps)
        a = 1.0 / (ns_c * nt_c)
        cos = dot * a
        # The |s| factor comes from d|s|/ds = s/|s|; vector_norm's backward sets it to 0 at |s| = 0,
        # where cos = 0 (dot = 0) too; the where and ns_safe keep the 0/0 out of it.
        ns_safe = tl.where(ns > 0, ns, 1.0)
        b = tl.where(ns > 0, cos / (ns_c * ns_safe), 0.0)
        tl.store(LOSS + rows, 1.0 - cos, mask=rmask)
        tl.store(COEF_A + rows, a, mask=rmask)
        tl.store(COEF_B + rows, b, mask=rmask)
        if WRITE_GRAD:
            if SINGLE_PASS:
                ds = s * b[:, None] - t * a[:, None]
                tl.store(DS + rows64[:, None] * stride_ds + cols[None, :],
                         ds.to(DS.dtype.element_ty), mask=m)
            else:
                for d0 in range(0, D, BLOCK_D):
                    c = d0 + cols
                    m = rmask[:, None] & (c[None, :] < D)
                    s = tl.load(S + rows64[:, None] * stride_s + c[None, :], mask=m, other=0.0).to(tl.float32)
                    t = tl.load(T + rows64[:, None] * stride_t + c[None, :], mask=m, other=0.0).to(tl.float32)
                    ds = s * b[:, None] - t * a[:, None]
                    tl.store(DS + rows64[:, None] * stride_ds + c[None, :],
                             ds.to(DS.dtype.element_ty), mask=m)

    @triton.jit
    def _cosine_rows_bwd_kernel(
        S, T, COEF_A, COEF_B, G, DS,
        n_rows, D, stride_s, stride_t, stride_ds,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """DS[r] = G[r] * (b[r] * S[r] - a[r] * T[r]); a 2-D grid (rows, feature blocks), one
        read of S and T and one write of DS. DS may be S itself (element-wise, read first)."""
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        g = tl.load(G + rows, mask=rmask, other=0.0).to(tl.float32)
        a = tl.load(COEF_A + rows, mask=rmask, other=0.0) * g
        b = tl.load(COEF_B + rows, mask=rmask, other=0.0) * g
        s = tl.load(S + rows64[:, None] * stride_s + cols[None, :], mask=m, other=0.0).to(tl.float32)
        t = tl.load(T + rows64[:, None] * stride_t + cols[None, :], mask=m, other=0.0).to(tl.float32)
        ds = s * b[:, None] - t * a[:, None]
        tl.store(DS + rows64[:, None] * stride_ds + cols[None, :], ds.to(DS.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Host launchers (2-D row-major inputs, unit stride along D)
# --------------------------------------------------------------------------------------------
def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_launch(s: torch.Tensor, t: torch.Tensor, eps: float, loss: torch.Tensor, coef_a: torch.Tensor,
                coef_b: torch.Tensor, ds: Optional[torch.Tensor] = None) -> Launch:
    R, D = s.shape
    block_r, block_d, num_warps = _fwd_config(D)
    args = (s, t, loss, coef_a, coef_b, s if ds is None else ds,
            R, D, s.stride(0), t.stride(0), s.stride(0) if ds is None else ds.stride(0), eps)
    meta = dict(BLOCK_R=block_r, BLOCK_D=block_d, SINGLE_PASS=D <= block_d, WRITE_GRAD=ds is not None)
    return Launch("cosine rows fwd" + (" +grad" if ds is not None else ""), _cosine_rows_fwd_kernel, args, meta,
                  dict(num_warps=num_warps))


def _bwd_launch(s: torch.Tensor, t: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor, g: torch.Tensor,
                ds: torch.Tensor) -> Launch:
    R, D = s.shape
    block_r, block_d, num_warps = _bwd_config(D)
    args = (s, t, coef_a, coef_b, g, ds, R, D, s.stride(0), t.stride(0), ds.stride(0))
    return Launch("cosine rows bwd", _cosine_rows_bwd_kernel, args, dict(BLOCK_R=block_r, BLOCK_D=block_d),
                  dict(num_warps=num_warps))


def cosine_rows_fwd(s: torch.Tensor, t: torch.Tensor, eps: float, loss: torch.Tensor, coef_a: torch.Tensor,
                    coef_b: torch.Tensor, ds: Optional[torch.Tensor] = None) -> None:
    """Fills loss/coef_a/coef_b (R,) fp32 for s, t (R, D); with ``ds``, also writes the per-row
    gradient ``b * s - a * t`` there (``ds`` may be ``s``). Plain torch: see the reference."""
    R, D = s.shape
    if R == 0:
        return
    launch = _fwd_launch(s, t, eps, loss, coef_a, coef_b, ds)
    launch.run((triton.cdiv(R, launch.meta["BLOCK_R"]),))


def cosine_rows_bwd(s: torch.Tensor, t: torch.Tensor, coef_a: torch.Tensor, coef_b: torch.Tensor,
                    g: torch.Tensor, ds: torch.Tensor) -> None:
    """ds (R, D) = g[:, None] * (coef_b[:, None] * s - coef_a[:, None] * t); ``ds`` may be ``s``."""
    R, D = s.shape
    if R == 0:
        return
    launch = _bwd_launch(s, t, coef_a, coef_b, g, ds)
    grid = (triton.cdiv(R, launch.meta["BLOCK_R"]), triton.cdiv(D, launch.meta["BLOCK_D"]))
    launch.run(grid)


def aot_launches(rows: int, features: int, dtype: torch.dtype) -> List[Launch]:
    """The launches of a forward (loss only, and with the gradient written, as the linear variant
    does) and a backward on (rows, features) ``dtype`` inputs, on meta tensors: for ``aot.py``."""
    x = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    s, t, ds = x(rows, features), x(rows, features), x(rows, features)
    f = [x(rows, dt=torch.float32) for _ in range(4)]
    return [_fwd_launch(s, t, DEFAULT_EPS, f[0], f[1], f[2]), _fwd_launch(s, t, DEFAULT_EPS, f[0], f[1], f[2], ds),
            _bwd_launch(s, t, f[1], f[2], f[3], ds)]


# --------------------------------------------------------------------------------------------
# torch.library ops (custom_op: compiles with fullgraph=True on CPU and GPU) and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastsamclip::cosine_distill_fwd", mutates_args=())
def _cosine_distill_fwd(student: torch.Tensor, teacher: torch.Tensor, eps: float
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """student, teacher (R, D) -> per-row loss, coef_a, coef_b, each (R,) fp32."""
    s, t = _unit_stride(student), _unit_stride(teacher)
    R = s.shape[0]
    loss, a, b = (torch.empty(R, device=s.device, dtype=torch.float32) for _ in range(3))
    cosine_rows_fwd(s, t, eps, loss, a, b)
    return loss, a, b


@_cosine_distill_fwd.register_fake
def _(student, teacher, eps):
    R = student.shape[0]
    return tuple(student.new_empty(R, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastsamclip::cosine_distill_bwd", mutates_args=())
def _cosine_distill_bwd(student: torch.Tensor, teacher: torch.Tensor, coef_a: torch.Tensor,
                        coef_b: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(grad_rows * loss_rows)`` for the student, (R, D) in its dtype."""
    s, t = _unit_stride(student), _unit_stride(teacher)
    ds = torch.empty_like(s, memory_format=torch.contiguous_format)
    cosine_rows_bwd(s, t, coef_a.contiguous(), coef_b.contiguous(),
                    grad_rows.to(torch.float32).contiguous(), ds)
    return ds


@_cosine_distill_bwd.register_fake
def _(student, teacher, coef_a, coef_b, grad_rows):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


class CosineDistillFunction(torch.autograd.Function):
    """Autograd of the per-row loss: ``CosineDistillFunction.apply(student2d, teacher2d, eps)``
    returns (loss_rows, coef_a, coef_b); only loss_rows is differentiable (in the student).
    The same forward/backward are registered on the ``fastsamclip::cosine_distill_fwd`` op,
    which is what ``cosine_distill_loss`` calls (it also works inside torch.compile)."""

    @staticmethod
    def forward(student, teacher, eps):
        return torch.ops.fastsamclip.cosine_distill_fwd(student, teacher, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, _ = inputs
        _, a, b = output
        ctx.save_for_backward(student, teacher, a, b)
        ctx.mark_non_differentiable(a, b)

    @staticmethod
    def backward(ctx, grad_loss, grad_a=None, grad_b=None):
        student, teacher, a, b = ctx.saved_tensors
        ds = None
        if ctx.needs_input_grad[0]:
            ds = torch.ops.fastsamclip.cosine_distill_bwd(student, teacher, a, b, grad_loss)
        return ds, None, None


torch.library.register_autograd("fastsamclip::cosine_distill_fwd", CosineDistillFunction.backward,
                                setup_context=CosineDistillFunction.setup_context)


# --------------------------------------------------------------------------------------------
# The op (backends in priority order) and its public function
# --------------------------------------------------------------------------------------------
def _validate(student, teacher, reduction, eps) -> None:
    check_float_tensor(NAME, "student", student)
    check_float_tensor(NAME, "teacher", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"{NAME}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
                         "have the same shape (..., D)")
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ValueError(f"{NAME}: inputs need a non-empty last dimension D, got shape {tuple(student.shape)}")
    check_same_device(NAME, student=student, teacher=teacher)
    check_reduction(NAME, reduction)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{NAME}: eps must be a non-negative number, got {eps!r}")


def reduce_rows(loss_rows: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """Per-row losses (R,) -> mean / sum scalar, or the leading shape for ``"none"``."""
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.reshape(lead_shape)


def _cosine_distill_triton(student, teacher, reduction: str, eps: float) -> torch.Tensor:
    D = student.shape[-1]
    lead = student.shape[:-1]
    out_dtype = torch.promote_types(student.dtype, teacher.dtype)
    loss_rows, _, _ = torch.ops.fastsamclip.cosine_distill_fwd(
        student.reshape(-1, D), teacher.detach().reshape(-1, D), float(eps))
    return reduce_rows(loss_rows, reduction, lead).to(out_dtype)


def _probes(device: str) -> List[Probe]:
    def make(dtype, grad):
        return (torch.empty(4, 8, dtype=dtype, device=device, requires_grad=grad),
                torch.empty(4, 8, dtype=dtype, device=device)), {}

    return dtype_grad_probes(device, make)


OP = register_op(Op(NAME, probes=_probes))
OP.register(Backend(
    name="triton",
    fn=_cosine_distill_triton,
    description="fused Triton row kernels, fp32 accumulation (fwd + bwd)",
    check=tensor_refusals,
    is_available=lambda: UNAVAILABLE,
))
OP.register(Backend(
    name="reference",
    fn=cosine_distill_loss_reference,
    description="plain torch, 1 - F.cosine_similarity",
))


def cosine_distill_loss(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean", *,
                        eps: float = DEFAULT_EPS, backend: Optional[str] = None) -> torch.Tensor:
    """``1 - cos(student, teacher)`` per row of the last dimension, reduced.

    Args:
        student: (..., D), e.g. (B, D) pooled or (B, N, D) dense features; fp16/bf16/fp32.
        teacher: same shape; a constant target (detached if it requires grad).
        reduction: "mean" (over all rows), "sum", or "none" (per-row loss, shape ``student.shape[:-1]``).
        eps: norm clamp, as in ``F.cosine_similarity``.
        backend: "triton" or "reference" to force one; default: Triton where it can run.

    Plain torch equivalent::

        (1 - F.cosine_similarity(student, teacher.detach(), dim=-1, eps=eps)).mean()
    """
    _validate(student, teacher, reduction, eps)
    return OP.select(student, teacher, backend=backend).fn(student, teacher, reduction, eps)
