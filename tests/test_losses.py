"""The fused distillation losses against float64 references, torchvision's focal loss and autograd.

On a machine without a GPU the Triton kernels run in the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes are small but awkward on purpose: D = 1, 77, 1000 and 5000 (past
the single-pass width), row counts that are not multiples of any block, M = 1, 17 x 23 masks and a
mask wider than one 4096-pixel block. bf16 numerics are GPU-only (the interpreter's bf16
arithmetic is wrong).

Uninitialised outputs are poisoned: with deterministic algorithms on, ``torch.empty`` fills float
tensors with NaN, so an element a kernel forgets to write fails the finite check of
``assert_close_verbose``.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from fastsamclip.kernels import _loss_dispatch as dispatch
from fastsamclip.kernels import (
    cosine_distill_loss,
    cosine_distill_loss_reference,
    focal_dice_loss,
    focal_dice_loss_reference,
    linear_cosine_distill_loss,
    linear_cosine_distill_loss_reference,
)

from .conftest import requires_cuda
from .helpers import TOLERANCES, assert_close_verbose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMERIC_DTYPES = [torch.float32, torch.float16]  # bf16: GPU only, see test_bf16_on_gpu

# (atol, rtol) per dtype and quantity, against float64 references of the same (rounded) inputs.
# Gradients are compared with atol scaled by the largest reference magnitude: a gradient element
# near zero carries the absolute error of its larger neighbours' arithmetic, not a relative one.
TOL = {
    torch.float32: {"loss": TOLERANCES[torch.float32], "grad": (2e-5, 1e-4)},
    # fp16: the loss comes back in fp16 (half an ulp is 2.4e-4 relative); the projection of the
    # linear variant is rounded to fp16 before the cosine, as in F.linear.
    torch.float16: {"loss": (2e-3, 2e-3), "grad": (4e-3, 1e-2)},
    torch.bfloat16: {"loss": (2e-2, 2e-2), "grad": (3e-2, 5e-2)},
}


@pytest.fixture(autouse=True)
def _poison_empty():
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


def check_loss(actual, expected, dtype, name):
    atol, rtol = TOL[dtype]["loss"]
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert_close_verbose(actual, expected, atol, rtol, name)


def check_grad(actual, expected, dtype, name, floor=1e-30):
    """``floor``: the least magnitude atol scales with, for gradients that are 0 up to rounding."""
    atol, rtol = TOL[dtype]["grad"]
    assert actual is not None, f"{name}: no gradient"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    scale = max(expected.detach().abs().max().item(), floor)
    assert_close_verbose(actual, expected, atol * scale, rtol, name)


def rand(*shape, dtype=torch.float32, scale=1.0):
    """Random inputs drawn in float64 and rounded once, so the reference sees the same values."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def upstream(loss):
    """0.37 for a scalar loss, random per row for reduction="none" (never all ones)."""
    if loss.dim() == 0:
        return torch.full_like(loss, 0.37)
    return torch.randn_like(loss)


def grads_vs_reference(fn, ref_fn, inputs, consts, dtype, names, grad_floor=1e-30, **kw):
    """Runs the fused op and the float64 reference, checks loss and gradients of ``inputs``."""
    inputs = [None if x is None else x.detach().requires_grad_(True) for x in inputs]
    live = [x for x in inputs if x is not None]
    ref_inputs = [None if x is None else x.detach().double().requires_grad_(True) for x in inputs]
    ref_live = [x for x in ref_inputs if x is not None]
    out = fn(*inputs, *consts, **kw)
    ref = ref_fn(*ref_inputs, *[c.double() for c in consts], **kw)
    check_loss(out, ref, dtype, "loss")
    g = upstream(out)
    got = torch.autograd.grad(out, live, g)
    want = torch.autograd.grad(ref, ref_live, g.double())
    for name, a, e in zip([n for n, x in zip(names, inputs) if x is not None], got, want):
        check_grad(a, e, dtype, f"grad {name}", grad_floor)
    return out


# --------------------------------------------------------------------------------------------
# cosine_distill_loss
# --------------------------------------------------------------------------------------------
COSINE_SHAPES = [(7, 1), (3, 5, 77), (67, 1000), (3, 5000), (2, 3, 4, 33)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", COSINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_cosine_matches_float64(dtype, shape, reduction):
    s, t = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype, scale=3.0)
    out = grads_vs_reference(lambda s_, t_, **kw: cosine_distill_loss(s_, t_, **kw),
                             lambda s_, t_, **kw: cosine_distill_loss_reference(s_, t_, **kw),
                             [s], [t], dtype, ["student"], reduction=reduction,
                             # at D = 1 the gradient is 0 up to the rounding of its two ~1/|s| terms
                             grad_floor=0.1 if shape[-1] == 1 else 1e-30)
    if reduction == "none":
        assert out.shape == shape[:-1]


def test_cosine_zero_and_tiny_rows_follow_torch():
    """Zero student rows, zero teacher rows, both, and a row with 0 < |s| < eps: loss and
    gradient of F.cosine_similarity's formula (each norm clamped on its own, clamp outside autograd)."""
    dtype = torch.float32
    s, t = rand(6, 40, dtype=dtype), rand(6, 40, dtype=dtype)
    s[0] = 0
    t[1] = 0
    s[2] = 0
    t[2] = 0
    # 0 < |s| = 5e-9 < eps, mostly along t: cos ~ 0.4, so the d|s|/ds term (taken with the
    # unclamped |s|) is as large as the t term
    s[4] = s[4] / s[4].norm() * 0.5 + t[4] / t[4].norm()  # also an ordinary row, rounded first
    s[3] = (t[3] / t[3].norm() + 0.5 * s[3] / s[3].norm()) / 1.12 * 5e-9
    out = grads_vs_reference(lambda s_, t_, **kw: cosine_distill_loss(s_, t_, **kw),
                             lambda s_, t_, **kw: cosine_distill_loss_reference(s_, t_, **kw),
                             [s], [t], dtype, ["student"], reduction="none")
    assert torch.equal(out[:3].cpu(), torch.ones(3)), out[:3]  # cos is 0 at any zero row


def test_cosine_zero_rows_fp16_forward():
    """fp16: the kernels clamp with eps in fp32, so zero rows give loss 1 (F.cosine_similarity in
    fp16 rounds eps = 1e-8 to 0 and returns nan there). Zero teacher rows keep a finite gradient;
    the gradient at a zero student row is ~|t_i| / (|t| eps), beyond fp16's range (documented)."""
    s, t = rand(4, 24, dtype=torch.float16), rand(4, 24, dtype=torch.float16)
    s[0] = 0
    t[1] = 0
    out = cosine_distill_loss(s, t, "none")
    expected = cosine_distill_loss_reference(s.double(), t.double(), "none")
    check_loss(out, expected, torch.float16, "fp16 zero rows")
    s2 = s[1:].detach().requires_grad_(True)
    (g,) = torch.autograd.grad(cosine_distill_loss(s2, t[1:]), s2)
    s64 = s[1:].double().requires_grad_(True)
    (g64,) = torch.autograd.grad(cosine_distill_loss_reference(s64, t[1:].double()), s64)
    check_grad(g, g64, torch.float16, "fp16 grad, zero teacher row")


def test_cosine_teacher_is_constant_and_strided_inputs():
    s = rand(6, 2 * 50)[:, ::2]  # non-unit stride along D: copied, same result
    t = rand(6, 50).requires_grad_(True)
    out = cosine_distill_loss(s.requires_grad_(True), t)
    out.backward()
    assert t.grad is None, "the teacher must get no gradient"
    check_loss(out.detach(), cosine_distill_loss_reference(s.double(), t.double()), torch.float32, "strided")


# --------------------------------------------------------------------------------------------
# linear_cosine_distill_loss
# --------------------------------------------------------------------------------------------
LINEAR_CASES = [  # (lead shape, K, N, chunk_size)
    ((2, 37), 48, 77, 16),  # 74 rows: 4 full chunks and a partial one
    ((50,), 2, 3, None),  # tiny K and N (K = 1 makes the gradient 0 without bias), one chunk
    ((3, 7), 33, 1000, 8),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}-K{c[1]}-N{c[2]}-c{c[3]}")
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_linear_matches_float64(dtype, case, bias, reduction):
    lead, K, N, chunk = case
    x = rand(*lead, K, dtype=dtype)
    w = rand(N, K, dtype=dtype, scale=K**-0.5)
    b = rand(N, dtype=dtype, scale=0.5) if bias else None
    teacher = rand(*lead, N, dtype=dtype)
    out = grads_vs_reference(
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss(x_, w_, b_, t_, chunk_size=chunk, **kw),
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss_reference(x_, w_, b_, t_, **kw),
        [x, w, b], [teacher], dtype, ["x", "weight", "bias"], reduction=reduction)
    if reduction == "none":
        assert out.shape == lead


def test_linear_zero_rows_and_chunk_invariance():
    """A zero projected row (x = 0, no bias), a zero teacher row; the result does not depend on
    the chunk size beyond fp32 rounding."""
    x, w, t = rand(29, 16), rand(24, 16, scale=0.25), rand(29, 24)
    x[3] = 0
    t[5] = 0
    grads_vs_reference(lambda x_, w_, t_, **kw: linear_cosine_distill_loss(x_, w_, None, t_, chunk_size=4, **kw),
                       lambda x_, w_, t_, **kw: linear_cosine_distill_loss_reference(x_, w_, None, t_, **kw),
                       [x, w], [t], torch.float32, ["x", "weight"], reduction="sum")
    losses = [linear_cosine_distill_loss(x, w, None, t, "none", chunk_size=c) for c in (1, 7, None)]
    for c, loss in zip((1, 7), losses):
        assert_close_verbose(loss, losses[-1], 1e-6, 1e-6, f"chunk_size={c} vs one chunk")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_wide_output_loops_over_features(reduction):
    """N > MAX_BLOCK_D (4096): the forward kernel loops over the feature dim and, for mean/sum,
    writes dL/dy in a second pass over the chunk."""
    x, w, b, t = rand(5, 8), rand(4100, 8, scale=0.35), rand(4100, scale=0.5), rand(5, 4100)
    grads_vs_reference(
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss(x_, w_, b_, t_, chunk_size=2, **kw),
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss_reference(x_, w_, b_, t_, **kw),
        [x, w, b], [t], torch.float32, ["x", "weight", "bias"], reduction=reduction)


def test_linear_partial_grads_and_no_grad():
    x, w, b, t = rand(10, 12), rand(9, 12), rand(9), rand(10, 9)
    ref = linear_cosine_distill_loss_reference(x.double(), w.double(), b.double(), t.double())
    with torch.no_grad():
        check_loss(linear_cosine_distill_loss(x, w, b, t), ref, torch.float32, "no_grad loss")
    w.requires_grad_(True)  # only the weight trains (x frozen, bias frozen)
    out = linear_cosine_distill_loss(x, w, b, t)
    (gw,) = torch.autograd.grad(out, w, torch.tensor(0.37))
    w64 = w.detach().double().requires_grad_(True)
    (gw64,) = torch.autograd.grad(linear_cosine_distill_loss_reference(x.double(), w64, b.double(), t.double()), w64,
                                  torch.tensor(0.37, dtype=torch.float64))
    check_grad(gw, gw64, torch.float32, "weight-only grad")
    # only x trains (a frozen head): the x gradient alone, for both the stored and recomputed paths
    w.requires_grad_(False)
    for reduction in ("mean", "none"):
        xg = x.clone().requires_grad_(True)
        out = linear_cosine_distill_loss(xg, w, b, t, reduction, chunk_size=3)
        g = upstream(out)
        (gx,) = torch.autograd.grad(out, xg, g)
        x64 = x.double().requires_grad_(True)
        ref = linear_cosine_distill_loss_reference(x64, w.double(), b.double(), t.double(), reduction)
        (gx64,) = torch.autograd.grad(ref, x64, g.double())
        check_grad(gx, gx64, torch.float32, f"x-only grad ({reduction})")


# --------------------------------------------------------------------------------------------
# focal_dice_loss
# --------------------------------------------------------------------------------------------
MASK_SHAPES = [(2, 3, 17, 23), (1, 1, 64, 80), (3, 1, 1, 1)]  # odd sizes; 5120 px = 2 blocks; 1 px


def mask_inputs(shape, dtype, logit_scale=3.0):
    logits = rand(*shape, dtype=dtype, scale=logit_scale)
    soft = torch.rand(*shape, dtype=torch.float64)
    hard = (torch.rand(*shape, dtype=torch.float64) > 0.7).double()
    # half soft teacher probabilities, half hard 0/1 masks: both kinds of target occur in training
    target = torch.where(torch.rand(*shape, dtype=torch.float64) > 0.5, soft, hard).to(dtype).to(DEVICE)
    return logits, target


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_focal_dice_matches_float64(dtype, shape):
    logits, target = mask_inputs(shape, dtype)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], dtype, ["logits"])


@pytest.mark.parametrize("shape", [(3, 43, 2, 3), (1, 1, 257, 257)], ids=["129-masks", "17-blocks"])
def test_focal_dice_finalize_loops(shape):
    """The one-program reduction steps over masks 128 at a time and over blocks 16 at a time:
    129 masks, and a 257 x 257 mask (17 blocks of 4096 pixels), take both loops."""
    logits, target = mask_inputs(shape, torch.float32)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], torch.float32, ["logits"])


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 2.0), (0.25, 0.0), (0.6, 1.0), (0.25, 1.5), (0.25, 3.0), (0.25, 0.5)])
def test_focal_dice_alpha_gamma(alpha, gamma):
    logits, target = mask_inputs((2, 2, 9, 13), torch.float32)
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], torch.float32, ["logits"],
                       focal_weight=3.0, dice_weight=0.7, alpha=alpha, gamma=gamma)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.4, 1.5)])
def test_focal_part_equals_torchvision(alpha, gamma):
    from torchvision.ops import sigmoid_focal_loss

    logits, target = mask_inputs((2, 3, 11, 7), torch.float32)
    logits.requires_grad_(True)
    out = focal_dice_loss(logits, target, focal_weight=1.0, dice_weight=0.0, alpha=alpha, gamma=gamma)
    x64 = logits.detach().double().requires_grad_(True)
    ref = sigmoid_focal_loss(x64, target.double(), alpha=alpha, gamma=gamma, reduction="mean")
    check_loss(out, ref, torch.float32, "focal vs torchvision")
    (g,) = torch.autograd.grad(out, logits, torch.tensor(0.37))
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(0.37, dtype=torch.float64))
    check_grad(g, g64, torch.float32, "focal grad vs torchvision")


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=str)
def test_focal_dice_extreme_logits(dtype):
    """Saturated logits (+-30, +-100, +-1000) with hard and soft targets: finite, and equal to
    the float64 reference (whose BCE-with-logits is stable there)."""
    values = torch.tensor([30.0, -30.0, 100.0, -100.0, 1000.0, -1000.0, 0.0])
    n = 2 * 2 * 9 * 9  # 7 logits x 3 targets cycle through every pairing (7 and 3 are coprime)
    logits = values.repeat(n // 7 + 1)[:n].reshape(2, 2, 9, 9).to(dtype).to(DEVICE)
    target = torch.tensor([0.0, 1.0, 0.3]).repeat(n // 3)[:n].reshape(2, 2, 9, 9).to(dtype).to(DEVICE)
    x = logits.clone().requires_grad_(True)
    out = focal_dice_loss(x, target)
    (g,) = torch.autograd.grad(out, x, torch.tensor(0.37, dtype=dtype, device=DEVICE))
    assert torch.isfinite(out) and torch.isfinite(g).all(), (out, g)
    x64 = logits.double().requires_grad_(True)
    ref = focal_dice_loss_reference(x64, target.double())
    (g64,) = torch.autograd.grad(ref, x64, torch.tensor(0.37, dtype=torch.float64, device=DEVICE))
    check_loss(out, ref, dtype, "extreme logits loss")
    check_grad(g, g64, dtype, "extreme logits grad")


def test_focal_dice_is_deterministic():
    """Per-block partial sums reduced in a fixed order: bitwise equal run to run (float atomics
    would not be, on a GPU)."""
    logits, target = mask_inputs((2, 2, 70, 90), torch.float32)
    x = logits.requires_grad_(True)
    runs = []
    for _ in range(2):
        out = focal_dice_loss(x, target)
        runs.append((out.detach(), torch.autograd.grad(out, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------------------------
# Input errors, path choice
# --------------------------------------------------------------------------------------------
def test_input_errors():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="same shape"):
        cosine_distill_loss(s, t[:, :7])
    with pytest.raises(TypeError, match="floating-point"):
        cosine_distill_loss(s, t.long())
    with pytest.raises(ValueError, match="one device"):
        cosine_distill_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match="reduction"):
        cosine_distill_loss(s, t, "avg")
    with pytest.raises(ValueError, match="unknown backend"):
        cosine_distill_loss(s, t, backend="cuda")
    with pytest.raises(RuntimeError, match="forced"):
        cosine_distill_loss(s.double(), t.double(), backend="triton")
    w, b = torch.randn(5, 8), torch.randn(5)
    with pytest.raises(ValueError, match="K = weight"):
        linear_cosine_distill_loss(torch.randn(4, 7), w, b, torch.randn(4, 5))
    with pytest.raises(ValueError, match="teacher"):
        linear_cosine_distill_loss(s, w, b, torch.randn(4, 6))
    with pytest.raises(ValueError, match="bias"):
        linear_cosine_distill_loss(s, w, torch.randn(6), torch.randn(4, 5))
    with pytest.raises(TypeError, match="one dtype"):
        linear_cosine_distill_loss(s, w.half(), b, torch.randn(4, 5))
    with pytest.raises(ValueError, match="reduction"):
        linear_cosine_distill_loss(s, w, b, torch.randn(4, 5), reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cosine_distill_loss(s, w, b, torch.randn(4, 5), chunk_size=0)
    m = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, M, h, w\)"):
        focal_dice_loss(m[0], m[0])
    with pytest.raises(ValueError, match="logits' shape"):
        focal_dice_loss(m, m[..., :3])
    with pytest.raises(TypeError, match="floating-point"):
        focal_dice_loss(m, (m > 0))
    with pytest.raises(ValueError, match="one device"):
        focal_dice_loss(m, m.to("meta"))
    with pytest.raises(ValueError, match="gamma"):
        focal_dice_loss(m, m.sigmoid(), gamma=-1.0)


def test_reference_path_forced_and_fallback_logged_once(caplog, monkeypatch):
    s, t = rand(3, 10), rand(3, 10)
    assert torch.equal(cosine_distill_loss(s, t, backend="reference"), cosine_distill_loss_reference(s, t))
    monkeypatch.setattr(dispatch, "_FORCED", "reference")  # what FASTSAMCLIP_LOSSES_BACKEND sets
    assert dispatch.choose_path("x", s.device, (s.dtype,), None) == "reference"
    monkeypatch.setattr(dispatch, "_FORCED", None)
    assert dispatch.choose_path("x", s.device, (s.dtype,), None) == "triton"
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="fastsamclip.kernels"):
        for _ in range(3):  # fp64 is not a kernel dtype: reference, said once
            out = cosine_distill_loss(s.double(), t.double())
    assert torch.equal(out, cosine_distill_loss_reference(s.double(), t.double()))
    msgs = [r.getMessage() for r in caplog.records if "cosine_distill_loss" in r.getMessage()]
    assert len(msgs) == 1 and "float64" in msgs[0], msgs


# --------------------------------------------------------------------------------------------
# torch.library registration: torch.compile and opcheck
# --------------------------------------------------------------------------------------------
def _all_losses(s, t, x, w, b, tp, logits, target):
    return (cosine_distill_loss(s, t)
            + cosine_distill_loss(s, t, "none").mul(torch.linspace(0.5, 1.5, s.shape[0], device=s.device)).sum()
            + linear_cosine_distill_loss(x, w, b, tp)
            + linear_cosine_distill_loss(x, w, None, tp, "none").sum() * 0.3
            + focal_dice_loss(logits, target))


def test_compile_fullgraph_fwd_bwd():
    """All ops (and both gradient paths of the linear one) in one graph, no breaks, same numbers."""
    torch._dynamo.reset()
    logits, target = mask_inputs((2, 2, 5, 7), torch.float32)
    inputs = [rand(6, 40), rand(6, 40), rand(9, 12), rand(10, 12), rand(10), rand(9, 10), logits, target]
    leaves = [0, 2, 3, 4, 6]
    runs = []
    for fn in (_all_losses, torch.compile(_all_losses, fullgraph=True)):
        args = [a.clone().requires_grad_(i in leaves) for i, a in enumerate(inputs)]
        out = fn(*args)
        runs.append((out, torch.autograd.grad(out, [args[i] for i in leaves])))
    assert_close_verbose(runs[1][0], runs[0][0], 1e-6, 1e-6, "compiled loss")
    for a, e in zip(runs[1][1], runs[0][1]):
        assert_close_verbose(a, e, 1e-6, 1e-6, "compiled grad")


def test_opcheck():
    ops = torch.ops.fastsamclip
    s, t = rand(6, 40).requires_grad_(True), rand(6, 40)
    a, b = rand(6).abs(), rand(6)
    torch.library.opcheck(ops.cosine_distill_fwd.default, (s, t, 1e-8))
    torch.library.opcheck(ops.cosine_distill_bwd.default, (s.detach(), t, a, b, rand(6)))
    x, w, bias, tp = (rand(9, 12).requires_grad_(True), rand(10, 12).requires_grad_(True),
                      rand(10).requires_grad_(True), rand(9, 10))
    for reduction in ("mean", "none"):
        torch.library.opcheck(ops.linear_cosine_distill_fwd.default,
                              (x, w, bias, tp, 1e-8, reduction, True, True, 4))
    for grad_x, grad_params in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.linear_cosine_distill_bwd.default,
                              (x.detach(), w.detach(), None, tp, a.repeat(2)[:9], b.repeat(2)[:9], rand(9),
                               grad_x, grad_params, 4))
    logits, target = mask_inputs((2, 2, 5, 7), torch.float32)
    torch.library.opcheck(ops.focal_dice_fwd.default, (logits.requires_grad_(True), target, 20.0, 1.0, 0.25, 2.0))
    torch.library.opcheck(ops.focal_dice_bwd.default,
                          (logits.detach(), target, rand(4, 2), torch.tensor(0.37), 20.0, 0.25, 2.0))


# --------------------------------------------------------------------------------------------
# bf16 (GPU only)
# --------------------------------------------------------------------------------------------
@requires_cuda
def test_bf16_on_gpu():
    dtype = torch.bfloat16
    s, t = rand(5, 300, 256, dtype=dtype), rand(5, 300, 256, dtype=dtype)
    grads_vs_reference(lambda s_, t_, **kw: cosine_distill_loss(s_, t_, **kw),
                       lambda s_, t_, **kw: cosine_distill_loss_reference(s_, t_, **kw),
                       [s], [t], dtype, ["student"])
    x, w, bias, tp = rand(3, 700, 96, dtype=dtype), rand(130, 96, dtype=dtype, scale=0.1), rand(130, dtype=dtype), \
        rand(3, 700, 130, dtype=dtype)
    grads_vs_reference(
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss(x_, w_, b_, t_, chunk_size=512, **kw),
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss_reference(x_, w_, b_, t_, **kw),
        [x, w, bias], [tp], dtype, ["x", "weight", "bias"])
    logits, target = mask_inputs((2, 3, 67, 129), dtype)
    logits[0, 0, 0, :4] = torch.tensor([30.0, -30.0, 100.0, -100.0])
    grads_vs_reference(focal_dice_loss, focal_dice_loss_reference, [logits], [target], dtype, ["logits"])
