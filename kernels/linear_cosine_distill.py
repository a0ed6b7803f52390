"""Cosine distillation loss fused with the final projection: ``1 - cos(x @ W^T + b, teacher)``.

The projected features ``y = x @ W^T + b`` and their gradient are never materialised whole: rows
are processed in chunks, and per chunk one matmul gives ``y_c``, one Triton kernel turns it into
the per-row loss and ``dL/dy_c`` (written over ``y_c``), and two more matmuls give
``grad_x_c = dy_c @ W`` and ``grad_W += dy_c^T @ x_c`` (``grad_b += dy_c.sum(0)``). For
reduction "mean"/"sum" this happens in the forward pass when a gradient will be needed (as in
Liger-Kernel's fused linear cross entropy): the backward only scales the stored gradients by the
upstream gradient. For "none" the upstream gradient differs per row, so the backward recomputes
``y_c`` chunk by chunk instead.

Caveats:
- Memory: one chunk holds ``CHUNK_ELEMENTS = 2**22`` elements of ``y`` (8 MiB in bf16; 4096 rows
  at 1024 outputs) plus a weight-sized product; the reference holds all of ``y`` (256 MiB bf16 at
  (32, 4096) rows x 1024) plus its fp32 intermediates and gradient. The stored gradients are
  x-sized and weight-sized, i.e. what the backward returns anyway.
- The stored gradients are those of the *sum* of the per-row losses; the 1/R of "mean" and the
  upstream gradient are applied in the backward, so no tiny dy underflows in fp16.
- grad_W and grad_b are accumulated over chunks in fp32 and cast to the weight dtype at the end;
  per chunk the bf16/fp16 matmul ``dy_c^T @ x_c`` is rounded to its dtype once before the fp32
  sum (fp32 inputs: exact ``addmm_``).
- The teacher is a constant (detached). Zero-row and eps handling: see ``cosine_distill.py``.
- A forward run with grad enabled does the gradient work up front, only for the inputs that
  require grad (x: grad_x = dy @ W; weight/bias: grad_W, grad_b), so a frozen backbone pays no
  x-sized gradient; under ``torch.no_grad()`` it computes only the loss. Calling ``backward``
  twice on one graph is fine (the stored gradients are only read).
- Time: for "mean"/"sum" the forward does 3 matmuls per chunk (y, grad_x, grad_W), the same
  count as eager forward + backward, and the backward is element-wise; "none" does 1 matmul in
  the forward and 3 in the backward (y is recomputed).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_float_tensor, check_reduction, check_same_device
from ._triton import UNAVAILABLE, tensor_refusals
from .cosine_distill import DEFAULT_EPS, _unit_stride, cosine_distill_loss_reference, cosine_rows_bwd, cosine_rows_fwd
from .dispatch import Backend, Op, Probe, dtype_grad_probes, register_op

__all__ = ["OP", "linear_cosine_distill_loss", "linear_cosine_distill_loss_reference", "LinearCosineDistillFunction"]

NAME = "linear_cosine_distill_loss"
# Elements of y per chunk: 2**22 = 4096 rows x 1024 outputs, 8 MiB in bf16. Large enough that
# each chunk's matmuls (4096 x 768 x 1024, ~6.4 GFLOP) keep an H100 busy, small enough that the
# chunk is noise next to the activations.
CHUNK_ELEMENTS = 2**22


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------
def linear_cosine_distill_loss_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                         teacher: torch.Tensor, reduction: str = "mean",
                                         eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``1 - F.cosine_similarity(F.linear(x, weight, bias), teacher.detach(), dim=-1)``, reduced.

    x: (..., K); weight: (N, K); bias: (N,) or None; teacher: (..., N). Materialises (..., N).
    """
    return cosine_distill_loss_reference(F.linear(x, weight, bias), teacher, reduction, eps)


# --------------------------------------------------------------------------------------------
# Chunked host loops (the Triton kernels live in cosine_distill.py)
# --------------------------------------------------------------------------------------------
def _chunk_rows(R: int, N: int, chunk_rows: int) -> int:
    if chunk_rows > 0:
        return chunk_rows
    rows = CHUNK_ELEMENTS // max(N, 1)
    if rows >= 128:
        rows -= rows % 128  # whole 128-row tiles for the matmuls
    return max(1, min(R, rows))


def _project(xc: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(bias, xc, weight.t()) if bias is not None else torch.mm(xc, weight.t())


def _accumulate_weight_grads(dy: torch.Tensor, xc: torch.Tensor, gw: torch.Tensor,
                             gb: Optional[torch.Tensor]) -> None:
    if dy.dtype == torch.float32:
        gw.addmm_(dy.t(), xc)
    else:
        gw.add_(torch.mm(dy.t(), xc))
    if gb is not None:
        gb.add_(dy.sum(0, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastsamclip::linear_cosine_distill_fwd", mutates_args=())
def _linear_cosine_distill_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], teacher: torch.Tensor, eps: float,
    reduction: str, grad_x: bool, grad_params: bool, chunk_rows: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (R, K), weight (N, K), bias (N,)|None, teacher (R, N) ->
    (loss fp32: () or (R,) for "none", coef_a (R,), coef_b (R,),
     grad_x (R, K) | (0,), grad_w (N, K) fp32 | (0,), grad_b (N,) fp32 | (0,)).
    The grads are those of sum(loss rows), filled for reduction != "none" when asked for:
    ``grad_x`` for x, ``grad_params`` for weight and bias (a frozen backbone skips the x-sized
    gradient and its matmul; a frozen head skips the weight one)."""
    x, weight, teacher = _unit_stride(x), weight.contiguous(), _unit_stride(teacher)
    R, K = x.shape
    N = weight.shape[0]
    dev = x.device
    f32 = dict(device=dev, dtype=torch.float32)
    loss_rows = torch.empty(R, **f32)
    a = torch.empty(R, **f32)
    b = torch.empty(R, **f32)
    pre_x = grad_x and reduction != "none"
    pre_p = grad_params and reduction != "none"
    gx = torch.empty(R, K, device=dev, dtype=x.dtype) if pre_x else x.new_empty(0)
    gw = torch.zeros(N, K, **f32) if pre_p else x.new_empty(0, dtype=torch.float32)
    gb = torch.zeros(N, **f32) if (pre_p and bias is not None) else x.new_empty(0, dtype=torch.float32)
    step = _chunk_rows(R, N, chunk_rows)
    for c0 in range(0, R, step):
        c1 = min(R, c0 + step)
        xc = x[c0:c1]
        y = _project(xc, weight, bias)
        # dL/dy overwrites y in place: the chunk's only N-wide buffer.
        cosine_rows_fwd(y, teacher[c0:c1], eps, loss_rows[c0:c1], a[c0:c1], b[c0:c1],
                        ds=y if (pre_x or pre_p) else None)
        if pre_x:
            torch.mm(y, weight, out=gx[c0:c1])
        if pre_p:
            _accumulate_weight_grads(y, xc, gw, gb if bias is not None else None)
    if reduction == "mean":
        loss = loss_rows.mean()
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows
    return loss, a, b, gx, gw, gb


@_linear_cosine_distill_fwd.register_fake
def _(x, weight, bias, teacher, eps, reduction, grad_x, grad_params, chunk_rows):
    R, K = x.shape
    N = weight.shape[0]
    pre_x = grad_x and reduction != "none"
    pre_p = grad_params and reduction != "none"
    loss = x.new_empty(R if reduction == "none" else (), dtype=torch.float32)
    a = x.new_empty(R, dtype=torch.float32)
    b = x.new_empty(R, dtype=torch.float32)
    gx = x.new_empty((R, K) if pre_x else (0,))
    gw = x.new_empty((N, K) if pre_p else (0,), dtype=torch.float32)
    gb = x.new_empty((N,) if (pre_p and bias is not None) else (0,), dtype=torch.float32)
    return loss, a, b, gx, gw, gb


@torch.library.custom_op("fastsamclip::linear_cosine_distill_bwd", mutates_args=())
def _linear_cosine_distill_bwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], teacher: torch.Tensor,
    coef_a: torch.Tensor, coef_b: torch.Tensor, grad_rows: torch.Tensor, grad_x: bool, grad_params: bool,
    chunk_rows: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_rows * loss_rows)``: (grad_x (R, K), grad_w (N, K), grad_b (N,)), in
    the input dtypes, recomputing y chunk by chunk; (0,)-shaped where not asked for (``grad_x``,
    ``grad_params``) or where there is no bias."""
    x, weight, teacher = _unit_stride(x), weight.contiguous(), _unit_stride(teacher)
    R, K = x.shape
    N = weight.shape[0]
    g = grad_rows.to(torch.float32).contiguous()
    coef_a, coef_b = coef_a.contiguous(), coef_b.contiguous()
    gx = torch.empty(R, K, device=x.device, dtype=x.dtype) if grad_x else x.new_empty(0)
    gw = torch.zeros(N, K, device=x.device, dtype=torch.float32) if grad_params else None
    gb = torch.zeros(N, device=x.device, dtype=torch.float32) if (grad_params and bias is not None) else None
    step = _chunk_rows(R, N, chunk_rows)
    for c0 in range(0, R, step):
        c1 = min(R, c0 + step)
        xc = x[c0:c1]
        y = _project(xc, weight, bias)
        cosine_rows_bwd(y, teacher[c0:c1], coef_a[c0:c1], coef_b[c0:c1], g[c0:c1], ds=y)
        if grad_x:
            torch.mm(y, weight, out=gx[c0:c1])
        if grad_params:
            _accumulate_weight_grads(y, xc, gw, gb)
    gw_out = gw.to(weight.dtype) if gw is not None else x.new_empty(0)
    gb_out = gb.to(bias.dtype) if gb is not None else x.new_empty(0)
    return gx, gw_out, gb_out


@_linear_cosine_distill_bwd.register_fake
def _(x, weight, bias, teacher, coef_a, coef_b, grad_rows, grad_x, grad_params, chunk_rows):
    # new_empty, not empty_like: the real op returns contiguous tensors whatever the input strides
    # (a transposed weight view would otherwise get transposed fake strides).
    gx = x.new_empty(x.shape) if grad_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if grad_params else x.new_empty(0)
    gb = bias.new_empty(bias.shape) if (grad_params and bias is not None) else x.new_empty(0)
    return gx, gw, gb


class LinearCosineDistillFunction(torch.autograd.Function):
    """Autograd of ``fastsamclip::linear_cosine_distill_fwd`` (registered on the op, which is what
    ``linear_cosine_distill_loss`` calls). ``apply(x2d, weight, bias, teacher2d, eps, reduction,
    grad_x, grad_params, chunk_rows)``; only the first output (the loss) is differentiable."""

    @staticmethod
    def forward(x, weight, bias, teacher, eps, reduction, grad_x, grad_params, chunk_rows):
        return torch.ops.fastsamclip.linear_cosine_distill_fwd(x, weight, bias, teacher, eps, reduction,
                                                               grad_x, grad_params, chunk_rows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, teacher, eps, reduction, grad_x, grad_params, chunk_rows = inputs
        _, a, b, gx, gw, gb = output
        ctx.reduction, ctx.chunk_rows, ctx.has_bias = reduction, chunk_rows, bias is not None
        ctx.rows = x.shape[0]
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.grad_x, ctx.grad_params = grad_x, grad_params
        if reduction == "none":
            ctx.save_for_backward(x, weight, bias, teacher, a, b)
        else:
            ctx.save_for_backward(gx, gw, gb)
        ctx.mark_non_differentiable(a, b, gx, gw, gb)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            x, weight, bias, teacher, a, b = ctx.saved_tensors
            gx, gw, gb = torch.ops.fastsamclip.linear_cosine_distill_bwd(
                x, weight, bias, teacher, a, b, grad_loss, need_x, need_w or need_b, ctx.chunk_rows)
            return (gx if need_x else None, gw if need_w else None, gb if (need_b and ctx.has_bias) else None,
                    None, None, None, None, None, None)
        gx, gw, gb = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        if ctx.reduction == "mean":
            scale = scale / ctx.rows
        if (need_x and not ctx.grad_x) or ((need_w or need_b) and not ctx.grad_params):
            # Only reachable by calling the op by hand with flags that disagree with requires_grad.
            raise RuntimeError("linear_cosine_distill_fwd: a gradient is needed that the forward was told "
                               "not to compute (grad_x / grad_params)")
        dx = (gx * scale).to(gx.dtype) if need_x else None
        dw = (gw * scale).to(ctx.weight_dtype) if need_w else None
        db = (gb * scale).to(ctx.bias_dtype) if (need_b and ctx.has_bias) else None
        return dx, dw, db, None, None, None, None, None, None


torch.library.register_autograd("fastsamclip::linear_cosine_distill_fwd", LinearCosineDistillFunction.backward,
                                setup_context=LinearCosineDistillFunction.setup_context)


# --------------------------------------------------------------------------------------------
# The op (backends in priority order) and its public function
# --------------------------------------------------------------------------------------------
def _validate(x, weight, bias, teacher, reduction, eps, chunk_size) -> None:
    check_float_tensor(NAME, "x", x)
    check_float_tensor(NAME, "weight", weight)
    if bias is not None:
        check_float_tensor(NAME, "bias", bias)
    check_float_tensor(NAME, "teacher", teacher)
    if weight.dim() != 2:
        raise ValueError(f"{NAME}: weight must be (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{NAME}: x {tuple(x.shape)} must be (..., K) with K = weight.shape[1] = {K}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{NAME}: bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    if tuple(teacher.shape) != tuple(x.shape[:-1]) + (N,):
        raise ValueError(f"{NAME}: teacher {tuple(teacher.shape)} must be x's leading shape + (N,) = "
                         f"{tuple(x.shape[:-1]) + (N,)}")
    if N < 1:
        raise ValueError(f"{NAME}: weight has no output features")
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        raise TypeError(f"{NAME}: x, weight and bias must share one dtype (as F.linear), got "
                        f"{sorted(map(str, dtypes))}")
    check_same_device(NAME, x=x, weight=weight, bias=bias, teacher=teacher)
    check_reduction(NAME, reduction)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{NAME}: eps must be a non-negative number, got {eps!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size!r}")


def _linear_cosine_distill_triton(x, weight, bias, teacher, reduction: str, eps: float,
                                  chunk_size: Optional[int]) -> torch.Tensor:
    K = x.shape[-1]
    N = weight.shape[0]
    lead = x.shape[:-1]
    grad_on = torch.is_grad_enabled()
    grad_x = grad_on and x.requires_grad
    grad_params = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss = torch.ops.fastsamclip.linear_cosine_distill_fwd(
        x.reshape(-1, K), weight, bias, teacher.detach().reshape(-1, N), float(eps), reduction, grad_x, grad_params,
        int(chunk_size or 0))[0]
    if reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(torch.promote_types(x.dtype, teacher.dtype))


def _reference(x, weight, bias, teacher, reduction: str, eps: float, chunk_size: Optional[int]) -> torch.Tensor:
    # chunk_size is the kernel's tiling; the reference projects all rows at once.
    return linear_cosine_distill_loss_reference(x, weight, bias, teacher, reduction, eps)


def _probes(device: str) -> List[Probe]:
    def make(dtype, grad):
        mk = lambda *shape, g=False: torch.empty(shape, dtype=dtype, device=device, requires_grad=g)  # noqa: E731
        return (mk(4, 8, g=grad), mk(6, 8, g=grad), mk(6, g=grad), mk(4, 6)), {}

    return dtype_grad_probes(device, make)


OP = register_op(Op(NAME, probes=_probes))
OP.register(Backend(
    name="triton",
    fn=_linear_cosine_distill_triton,
    description="chunked projection + fused Triton cosine, y and its gradient never whole (fwd + bwd)",
    check=tensor_refusals,
    is_available=lambda: UNAVAILABLE,
))
OP.register(Backend(
    name="reference",
    fn=_reference,
    description="plain torch, F.linear then 1 - F.cosine_similarity (materialises the projection)",
))


def linear_cosine_distill_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               teacher: torch.Tensor, reduction: str = "mean", *, eps: float = DEFAULT_EPS,
                               chunk_size: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Cosine distillation loss of the projection ``x @ weight.T + bias`` against ``teacher``,
    without materialising the projection or its gradient.

    Args:
        x: (..., K) student features, e.g. (32, 4096, 768).
        weight: (N, K) projection, e.g. (1024, 768); bias: (N,) or None. Same dtype as x.
        teacher: (..., N) target features, a constant (detached if it requires grad).
        reduction: "mean" | "sum" | "none" (per-row loss with x's leading shape).
        eps: norm clamp, as in ``F.cosine_similarity``.
        chunk_size: rows per chunk; default ``CHUNK_ELEMENTS // N`` (4096 rows at N = 1024).
        backend: "triton" or "reference" to force one; default: Triton where it can run.

    Gradients flow to x, weight and bias. Plain torch equivalent::

        (1 - F.cosine_similarity(F.linear(x, weight, bias), teacher.detach(), dim=-1)).mean()
    """
    _validate(x, weight, bias, teacher, reduction, eps, chunk_size)
    return OP.select(x, weight, bias, teacher, backend=backend).fn(x, weight, bias, teacher, reduction, eps,
                                                                    chunk_size)
