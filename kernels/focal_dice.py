"""Focal + dice loss on mask logits, SAM's mask loss used for SAM-head distillation.

``loss = focal_weight * sigmoid_focal_loss(logits, target, alpha, gamma, "mean")
       + dice_weight * mean over masks of 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``,
with ``p = sigmoid(logits)``; the focal term equals ``torchvision.ops.sigmoid_focal_loss``.

One forward kernel reads logits and targets once and writes, per (mask, block of pixels), the
partial sums of the focal term, ``p t``, ``p`` and ``t``; a one-program kernel then reduces that
small buffer (64 KiB for 32 x 32 masks of 256 x 256) in a fixed order into the loss and two dice
coefficients per mask (deterministic: no float atomics). One backward kernel reads logits and
targets again and writes the logit gradient, using those coefficients.

Caveats:
- The target is a constant (teacher probabilities or 0/1 masks): no gradient flows to it.
- Stable for any finite logits: ``p`` and ``1 - p`` both come from ``exp(-|x|)`` (never
  overflows), the cross-entropy is ``max(x, 0) - x t + log1p(exp(-|x|))``, and ``1 - p_t`` is
  ``p (1 - t) + (1 - p) t`` (no cancellation at saturated logits).
- gamma must be >= 0; integer gamma 0..4 takes a multiply-only path (gamma = 2 is SAM's), other
  values use exp2/log2 with ``(1 - p_t)**gamma`` taken as 0 where ``1 - p_t`` is 0.
- Accumulation is fp32; the loss is returned in the logits' dtype. fp64 runs the reference.
- BLOCK = 4096 pixels per program (a 256 x 256 mask is 16 programs): a heuristic for a
  memory-bound element-wise kernel, to be confirmed on H100/H200 by ``bench/bench_focal_dice.py``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_float_tensor, check_same_device
from ._triton import HAS_TRITON, UNAVAILABLE, Launch, tensor_refusals, tl, triton
from .dispatch import Backend, Op, Probe, dtype_grad_probes, register_op

__all__ = ["OP", "focal_dice_loss", "focal_dice_loss_reference", "FocalDiceFunction"]

NAME = "focal_dice_loss"


# --------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------
def focal_dice_loss_reference(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 20.0,
                              dice_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """logits, target: (B, M, h, w) -> scalar. The focal part is torchvision's
    ``sigmoid_focal_loss(..., reduction="mean")`` line for line; the dice part is SAM's."""
    target = target.detach()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        focal = (alpha * target + (1 - alpha) * (1 - target)) * focal
    p2, t2 = p.flatten(2), target.flatten(2)
    dice = 1 - (2 * (p2 * t2).sum(-1) + 1) / (p2.sum(-1) + t2.sum(-1) + 1)
    return focal_weight * focal.mean() + dice_weight * dice.mean()


# --------------------------------------------------------------------------------------------
# Block configuration
# --------------------------------------------------------------------------------------------
BLOCK = 4096  # pixels per program; 8 warps -> 16 fp32 values per thread per tensor
INT_GAMMAS = (0, 1, 2, 3, 4)


def _config(hw: int) -> Tuple[int, int]:
    block = min(BLOCK, triton.next_power_of_2(hw))
    return block, (8 if block >= 4096 else 4)


def _gamma_int(gamma: float) -> int:
    """The integer gamma for the multiply-only path, or -1 for the general exp2/log2 path."""
    return int(gamma) if float(gamma).is_integer() and int(gamma) in INT_GAMMAS else -1


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _sigmoid_terms(x, t, alpha, gamma, USE_ALPHA: tl.constexpr, GAMMA_INT: tl.constexpr):
        """Per element: p, 1 - p, ce, m = 1 - p_t, alpha_t, m**gamma, m**(gamma - 1)."""
        e = tl.exp(-tl.abs(x))  # in (0, 1]: no overflow at any logit
        inv = 1.0 / (1.0 + e)
        pos = x >= 0
        p = tl.where(pos, inv, e * inv)
        q = tl.where(pos, e * inv, inv)  # 1 - p without cancellation
        # log1p(e) without a log1p primitive: log(u) * e / (u - 1) is exact to rounding (Goldberg).
        u = 1.0 + e
        sp = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
        ce = tl.maximum(x, 0.0) - x * t + sp
        m = p * (1.0 - t) + q * t
        if USE_ALPHA:
            a_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        else:
            a_t = tl.full(x.shape, 1.0, tl.float32)
        if GAMMA_INT >= 0:
            pm1 = tl.full(x.shape, 1.0, tl.float32)
            if GAMMA_INT >= 2:
                for _ in tl.static_range(GAMMA_INT - 1):
                    pm1 = pm1 * m
            if GAMMA_INT >= 1:
                pg = pm1 * m
            else:
                pg = tl.full(x.shape, 1.0, tl.float32)
        else:
            # m = 0 only at a saturated logit with a hard target; there m**gamma -> 0 and
            # m**(gamma-1) * dm/dx -> 0 for every gamma > 0 (dm/dx carries a factor m).
            nz = m > 0
            lg = tl.log2(tl.where(nz, m, 1.0))
            pg = tl.where(nz, tl.exp2(gamma * lg), 0.0)
            pm1 = tl.where(nz, tl.exp2((gamma - 1.0) * lg), 0.0)
        return p, q, ce, m, a_t, pg, pm1

    @triton.jit
    def _block(X, T, HW, BLOCK: tl.constexpr):
        """This program's block of one mask: (mask, block, mask offset, offsets, their mask,
        logits x and targets t in fp32, 0 past the end)."""
        mask_id = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < HW
        base = mask_id.to(tl.int64) * HW
        x = tl.load(X + base + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(T + base + offs, mask=valid, other=0.0).to(tl.float32)
        return mask_id, blk, base, offs, valid, x, t

    @triton.jit
    def _focal_dice_fwd_kernel(
        X, T, PART, HW, n_blocks, alpha, gamma,
        BLOCK: tl.constexpr, USE_ALPHA: tl.constexpr, GAMMA_INT: tl.constexpr,
    ):
        """PART[mask, block] = (sum focal, sum p t, sum p, sum t) over one block of one mask."""
        mask_id, blk, base, offs, valid, x, t = _block(X, T, HW, BLOCK)
        p, q, ce, m, a_t, pg, pm1 = _sigmoid_terms(x, t, alpha, gamma, USE_ALPHA, GAMMA_INT)
        focal = tl.where(valid, a_t * ce * pg, 0.0)
        p = tl.where(valid, p, 0.0)  # padding lanes have x = 0, p = 1/2
        out = PART + (mask_id.to(tl.int64) * n_blocks + blk) * 4
        tl.store(out + 0, tl.sum(focal, axis=0))
        tl.store(out + 1, tl.sum(p * t, axis=0))
        tl.store(out + 2, tl.sum(p, axis=0))
        tl.store(out + 3, tl.sum(t, axis=0))

    @triton.jit
    def _focal_dice_finalize_kernel(
        PART, LOSS, COEF, n_masks, n_blocks, inv_numel, focal_weight, dice_weight,
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        """One program: PART (masks, blocks, 4) -> LOSS (the scalar) and COEF (masks, 2) =
        dice_weight / masks * (num / den^2, 2 / den), num = 2 sum(p t) + 1, den = sum(p) + sum(t) + 1.
        Replaces ~15 tiny torch launches (sums, divisions, stack) with one, in a fixed order."""
        focal_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        dice_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        scale = dice_weight / n_masks
        for m0 in range(0, n_masks, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            mvalid = ms < n_masks
            f = tl.zeros([BLOCK_M], dtype=tl.float32)
            pt = tl.zeros([BLOCK_M], dtype=tl.float32)
            ps = tl.zeros([BLOCK_M], dtype=tl.float32)
            ts = tl.zeros([BLOCK_M], dtype=tl.float32)
            for b0 in range(0, n_blocks, BLOCK_B):
                bs = b0 + tl.arange(0, BLOCK_B)
                valid = mvalid[:, None] & (bs[None, :] < n_blocks)
                ptr = PART + (ms.to(tl.int64)[:, None] * n_blocks + bs[None, :]) * 4
                f += tl.sum(tl.load(ptr + 0, mask=valid, other=0.0), axis=1)
                pt += tl.sum(tl.load(ptr + 1, mask=valid, other=0.0), axis=1)
                ps += tl.sum(tl.load(ptr + 2, mask=valid, other=0.0), axis=1)
                ts += tl.sum(tl.load(ptr + 3, mask=valid, other=0.0), axis=1)
            num = 2.0 * pt + 1.0
            den = ps + ts + 1.0  # >= 1: no division hazard
            focal_acc += f
            dice_acc += tl.where(mvalid, 1.0 - num / den, 0.0)
            # d mean_dice / d p_i = (num - 2 t_i den) / den^2 / masks = kA - kB t_i
            tl.store(COEF + ms * 2, num / (den * den) * scale, mask=mvalid)
            tl.store(COEF + ms * 2 + 1, 2.0 / den * scale, mask=mvalid)
        focal = tl.sum(focal_acc, axis=0) * inv_numel
        dice = tl.sum(dice_acc, axis=0) / n_masks
        loss = focal_weight * focal + dice_weight * dice
        tl.store(LOSS, loss)

    @triton.jit
    def _focal_dice_bwd_kernel(
        X, T, COEF, G, DX, HW, alpha, gamma, focal_scale,
        BLOCK: tl.constexpr, USE_ALPHA: tl.constexpr, GAMMA_INT: tl.constexpr,
    ):
        """DX = g * (focal_scale * d focal / dx + (kA - kB t) p (1 - p)), (kA, kB) = COEF[mask]."""
        mask_id, blk, base, offs, valid, x, t = _block(X, T, HW, BLOCK)
        g = tl.load(G).to(tl.float32)
        k_a = tl.load(COEF + mask_id * 2)
        k_b = tl.load(COEF + mask_id * 2 + 1)
        p, q, ce, m, a_t, pg, pm1 = _sigmoid_terms(x, t, alpha, gamma, USE_ALPHA, GAMMA_INT)
        pq = p * q  # d p / d x
        # d/dx [a_t ce m^gamma] = a_t ((p - t) m^gamma + ce gamma m^(gamma-1) dm/dx), dm/dx = pq (1 - 2t)
        d_focal = a_t * ((p - t) * pg + ce * gamma * pm1 * pq * (1.0 - 2.0 * t))
        d_dice = (k_a - k_b * t) * pq
        dx = g * (focal_scale * d_focal + d_dice)
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(x.shape[0] * x.shape[1], -1)


# The finalize kernel: 128 masks x 16 blocks (a 256 x 256 mask) per step, 4 warps: 8 steps for
# SAM's 32 x 32 masks.
FINALIZE_MASKS = 128


def _fwd_launches(x2: torch.Tensor, t2: torch.Tensor, part: torch.Tensor, loss: torch.Tensor, coef: torch.Tensor,
                  focal_weight: float, dice_weight: float, alpha: float, gamma: float) -> Tuple[Launch, Launch]:
    n_masks, hw = x2.shape
    block, num_warps = _config(hw)
    n_blocks = triton.cdiv(hw, block)
    fwd = Launch("focal-dice fwd", _focal_dice_fwd_kernel, (x2, t2, part, hw, n_blocks, float(alpha), float(gamma)),
                 dict(BLOCK=block, USE_ALPHA=alpha >= 0, GAMMA_INT=_gamma_int(gamma)), dict(num_warps=num_warps))
    fin = Launch("focal-dice finalize", _focal_dice_finalize_kernel,
                 (part, loss, coef, n_masks, n_blocks, 1.0 / (n_masks * hw), float(focal_weight), float(dice_weight)),
                 dict(BLOCK_M=FINALIZE_MASKS, BLOCK_B=min(16, triton.next_power_of_2(n_blocks))), dict(num_warps=4))
    return fwd, fin


def _bwd_launch(x2, t2, coef, g, dx, alpha: float, gamma: float, focal_scale: float) -> Launch:
    n_masks, hw = x2.shape
    block, num_warps = _config(hw)
    return Launch("focal-dice bwd", _focal_dice_bwd_kernel,
                  (x2, t2, coef, g, dx, hw, float(alpha), float(gamma), float(focal_scale)),
                  dict(BLOCK=block, USE_ALPHA=alpha >= 0, GAMMA_INT=_gamma_int(gamma)), dict(num_warps=num_warps))


def focal_dice_fwd(x2: torch.Tensor, t2: torch.Tensor, focal_weight: float, dice_weight: float, alpha: float,
                   gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """x2, t2 (masks, HW) -> (loss () fp32, dice gradient coefficients (masks, 2) fp32).
    Two launches: the element-wise pass writing per-block partial sums, then one program that
    reduces them in a fixed order (deterministic; no float atomics)."""
    n_masks, hw = x2.shape
    block, _ = _config(hw)
    part = torch.empty(n_masks, triton.cdiv(hw, block), 4, device=x2.device, dtype=torch.float32)
    loss = torch.empty((), device=x2.device, dtype=torch.float32)
    coef = torch.empty(n_masks, 2, device=x2.device, dtype=torch.float32)
    fwd, fin = _fwd_launches(x2, t2, part, loss, coef, focal_weight, dice_weight, alpha, gamma)
    fwd.run((n_masks, part.shape[1]))
    fin.run((1,))
    return loss, coef


def focal_dice_bwd(x2: torch.Tensor, t2: torch.Tensor, coef: torch.Tensor, g: torch.Tensor, alpha: float,
                   gamma: float, focal_scale: float) -> torch.Tensor:
    n_masks, hw = x2.shape
    dx = torch.empty_like(x2)
    launch = _bwd_launch(x2, t2, coef, g, dx, alpha, gamma, focal_scale)
    launch.run((n_masks, triton.cdiv(hw, launch.meta["BLOCK"])))
    return dx


def aot_launches(masks: int, hw: int, dtype: torch.dtype, alpha: float = 0.25, gamma: float = 2.0) -> List[Launch]:
    """The launches of a forward and backward on (masks, hw) ``dtype`` logits with SAM's
    alpha/gamma, on meta tensors: for ``aot.py``."""
    x = lambda *shape, dt=dtype: torch.empty(shape, dtype=dt, device="meta")  # noqa: E731
    block, _ = _config(hw)
    part = x(masks, triton.cdiv(hw, block), 4, dt=torch.float32)
    coef = x(masks, 2, dt=torch.float32)
    fwd, fin = _fwd_launches(x(masks, hw), x(masks, hw), part, x(dt=torch.float32), coef, 20.0, 1.0, alpha, gamma)
    return [fwd, fin, _bwd_launch(x(masks, hw), x(masks, hw), coef, x(dt=torch.float32), x(masks, hw), alpha, gamma,
                                  20.0 / (masks * hw))]


# --------------------------------------------------------------------------------------------
# torch.library ops and autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastsamclip::focal_dice_fwd", mutates_args=())
def _focal_dice_fwd(logits: torch.Tensor, target: torch.Tensor, focal_weight: float, dice_weight: float,
                    alpha: float, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits, target (B, M, h, w) -> (loss () fp32, dice coefficients (B*M, 2) fp32 for the backward)."""
    return focal_dice_fwd(_flat(logits), _flat(target), focal_weight, dice_weight, alpha, gamma)


@_focal_dice_fwd.register_fake
def _(logits, target, focal_weight, dice_weight, alpha, gamma):
    n_masks = logits.shape[0] * logits.shape[1]
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(n_masks, 2, dtype=torch.float32)


@torch.library.custom_op("fastsamclip::focal_dice_bwd", mutates_args=())
def _focal_dice_bwd(logits: torch.Tensor, target: torch.Tensor, coef: torch.Tensor, grad: torch.Tensor,
                    focal_weight: float, alpha: float, gamma: float) -> torch.Tensor:
    """Gradient of ``grad * loss`` for the logits, (B, M, h, w) in their dtype."""
    x2, t2 = _flat(logits), _flat(target)
    focal_scale = focal_weight / x2.numel()
    dx = focal_dice_bwd(x2, t2, coef.contiguous(), grad.to(torch.float32).contiguous(), alpha, gamma, focal_scale)
    return dx.view(logits.shape)


@_focal_dice_bwd.register_fake
def _(logits, target, coef, grad, focal_weight, alpha, gamma):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class FocalDiceFunction(torch.autograd.Function):
    """Autograd of ``fastsamclip::focal_dice_fwd`` (registered on the op, which is what
    ``focal_dice_loss`` calls): ``apply(logits, target, focal_weight, dice_weight, alpha, gamma)``
    -> (loss fp32, coef); gradient for the logits only."""

    @staticmethod
    def forward(logits, target, focal_weight, dice_weight, alpha, gamma):
        return torch.ops.fastsamclip.focal_dice_fwd(logits, target, focal_weight, dice_weight, alpha, gamma)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, focal_weight, _, alpha, gamma = inputs
        ctx.save_for_backward(logits, target, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.focal_weight, ctx.alpha, ctx.gamma = focal_weight, alpha, gamma

    @staticmethod
    def backward(ctx, grad_loss, grad_coef=None):
        logits, target, coef = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.fastsamclip.focal_dice_bwd(logits, target, coef, grad_loss, ctx.focal_weight,
                                                      ctx.alpha, ctx.gamma)
        return dx, None, None, None, None, None


torch.library.register_autograd("fastsamclip::focal_dice_fwd", FocalDiceFunction.backward,
                                setup_context=FocalDiceFunction.setup_context)


# --------------------------------------------------------------------------------------------
# The op (backends in priority order) and its public function
# --------------------------------------------------------------------------------------------
def _validate(logits, target, focal_weight, dice_weight, alpha, gamma) -> None:
    check_float_tensor(NAME, "logits", logits)
    check_float_tensor(NAME, "target", target)
    if logits.dim() != 4:
        raise ValueError(f"{NAME}: logits must be (B, M, h, w), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"{NAME}: target {tuple(target.shape)} must have the logits' shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{NAME}: empty input {tuple(logits.shape)}")
    check_same_device(NAME, logits=logits, target=target)
    for name, v in (("focal_weight", focal_weight), ("dice_weight", dice_weight), ("alpha", alpha), ("gamma", gamma)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{NAME}: {name} must be a finite number, got {v!r}")
    if gamma < 0:
        raise ValueError(f"{NAME}: gamma must be >= 0, got {gamma}")


def _focal_dice_triton(logits, target, focal_weight: float, dice_weight: float, alpha: float,
                       gamma: float) -> torch.Tensor:
    loss, _ = torch.ops.fastsamclip.focal_dice_fwd(logits, target.detach(), float(focal_weight), float(dice_weight),
                                                   float(alpha), float(gamma))
    return loss.to(logits.dtype)


def _probes(device: str) -> List[Probe]:
    def make(dtype, grad):
        return (torch.empty(1, 2, 8, 8, dtype=dtype, device=device, requires_grad=grad),
                torch.empty(1, 2, 8, 8, dtype=dtype, device=device)), {}

    return dtype_grad_probes(device, make)


OP = register_op(Op(NAME, probes=_probes))
OP.register(Backend(
    name="triton",
    fn=_focal_dice_triton,
    description="fused Triton sigmoid/focal/dice pass, deterministic reduction (fwd + bwd)",
    check=tensor_refusals,
    is_available=lambda: UNAVAILABLE,
))
OP.register(Backend(
    name="reference",
    fn=focal_dice_loss_reference,
    description="plain torch, torchvision's sigmoid_focal_loss + SAM's dice",
))


def focal_dice_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 20.0, dice_weight: float = 1.0,
                    alpha: float = 0.25, gamma: float = 2.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """SAM's mask loss: ``focal_weight * focal + dice_weight * dice``, fused.

    Args:
        logits: (B, M, h, w) mask logits (e.g. 32 x 32 x 256 x 256); fp16/bf16/fp32.
        target: same shape, probabilities in [0, 1] (the teacher's sigmoid, or 0/1 masks); a constant.
        focal_weight, dice_weight: SAM's 20 : 1 by default.
        alpha: focal class balance; alpha < 0 disables it (as in torchvision).
        gamma: focal exponent, >= 0.
        backend: "triton" or "reference" to force one; default: Triton where it can run.

    Returns a scalar in the logits' dtype. Plain torch equivalent::

        focal_weight * torchvision.ops.sigmoid_focal_loss(logits, target, alpha, gamma, "mean")
        + dice_weight * (1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)).mean()
    """
    _validate(logits, target, focal_weight, dice_weight, alpha, gamma)
    be = OP.select(logits, target, backend=backend)
    return be.fn(logits, target, focal_weight, dice_weight, alpha, gamma)
