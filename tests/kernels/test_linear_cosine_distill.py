"""linear_cosine_distill_loss: the cosine fused with the final projection, against float64
references and autograd: chunks that do not divide the rows, tiny K and N, an output wider than
one feature block, partial gradients (frozen x, weight or bias) and no_grad.

On a machine without a GPU the Triton kernels run in the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes are small but awkward on purpose. bf16 numerics are GPU-only
(the interpreter's bf16 arithmetic is wrong). Uninitialised outputs are poisoned (the
``poison_empty`` fixture), so an element a kernel forgets to write fails the finite check.
"""

import pytest
import torch

from ..conftest import requires_cuda
from ..helpers import assert_close_verbose, check_grad, check_loss, grads_vs_reference, rand, upstream

NUMERIC_DTYPES = [torch.float32, torch.float16]  # bf16: GPU only, see test_bf16_on_gpu
pytestmark = pytest.mark.usefixtures("poison_empty")  # an unwritten output element is NaN

from fastsamclip.kernels import linear_cosine_distill_loss, linear_cosine_distill_loss_reference


# --------------------------------------------------------------------------------------------
# Numerics
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
# Input errors
# --------------------------------------------------------------------------------------------
def test_input_errors():
    s = torch.randn(4, 8)
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


# --------------------------------------------------------------------------------------------
# torch.library registration: torch.compile and opcheck
# --------------------------------------------------------------------------------------------
def _losses(x, w, b, tp):
    return linear_cosine_distill_loss(x, w, b, tp) + linear_cosine_distill_loss(x, w, None, tp, "none").sum() * 0.3


def test_compile_fullgraph_fwd_bwd():
    """Both gradient paths (stored for mean, recomputed for none) in one graph, no breaks, same numbers."""
    torch._dynamo.reset()
    inputs = [rand(9, 12), rand(10, 12), rand(10), rand(9, 10)]
    leaves = [0, 1, 2]
    runs = []
    for fn in (_losses, torch.compile(_losses, fullgraph=True)):
        args = [a.clone().requires_grad_(i in leaves) for i, a in enumerate(inputs)]
        out = fn(*args)
        runs.append((out, torch.autograd.grad(out, [args[i] for i in leaves])))
    assert_close_verbose(runs[1][0], runs[0][0], 1e-6, 1e-6, "compiled loss")
    for a, e in zip(runs[1][1], runs[0][1]):
        assert_close_verbose(a, e, 1e-6, 1e-6, "compiled grad")


def test_opcheck():
    ops = torch.ops.fastsamclip
    a, b = rand(6).abs(), rand(6)
    x, w, bias, tp = (rand(9, 12).requires_grad_(True), rand(10, 12).requires_grad_(True),
                      rand(10).requires_grad_(True), rand(9, 10))
    for reduction in ("mean", "none"):
        torch.library.opcheck(ops.linear_cosine_distill_fwd.default,
                              (x, w, bias, tp, 1e-8, reduction, True, True, 4))
    for grad_x, grad_params in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.linear_cosine_distill_bwd.default,
                              (x.detach(), w.detach(), None, tp, a.repeat(2)[:9], b.repeat(2)[:9], rand(9),
                               grad_x, grad_params, 4))


# --------------------------------------------------------------------------------------------
# bf16 (GPU only)
# --------------------------------------------------------------------------------------------
@requires_cuda
def test_bf16_on_gpu():
    dtype = torch.bfloat16
    x, w, bias, tp = rand(3, 700, 96, dtype=dtype), rand(130, 96, dtype=dtype, scale=0.1), rand(130, dtype=dtype), \
        rand(3, 700, 130, dtype=dtype)
    grads_vs_reference(
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss(x_, w_, b_, t_, chunk_size=512, **kw),
        lambda x_, w_, b_, t_, **kw: linear_cosine_distill_loss_reference(x_, w_, b_, t_, **kw),
        [x, w, bias], [tp], dtype, ["x", "weight", "bias"])
