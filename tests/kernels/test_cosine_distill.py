"""cosine_distill_loss: the fused Triton kernels against float64 references and autograd, and
the op's backend choice: D = 1, 77, 1000 and 5000 (past the single-pass width), row counts
that are not multiples of any block, zero and tiny rows.

On a machine without a GPU the Triton kernels run in the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes are small but awkward on purpose. bf16 numerics are GPU-only
(the interpreter's bf16 arithmetic is wrong). Uninitialised outputs are poisoned (the
``poison_empty`` fixture), so an element a kernel forgets to write fails the finite check.
"""

import logging

import pytest
import torch

from ..conftest import requires_cuda
from ..helpers import assert_close_verbose, check_grad, check_loss, grads_vs_reference, rand

NUMERIC_DTYPES = [torch.float32, torch.float16]  # bf16: GPU only, see test_bf16_on_gpu
pytestmark = pytest.mark.usefixtures("poison_empty")  # an unwritten output element is NaN

from fastsamclip.kernels import OPS, cosine_distill_loss, cosine_distill_loss_reference, use_backend

OP = OPS["cosine_distill_loss"]


# --------------------------------------------------------------------------------------------
# Numerics
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
# Input errors, backend choice
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


def test_reference_forced_and_fallback_logged_once(caplog, monkeypatch, backend_environment):
    s, t = rand(3, 10), rand(3, 10)
    assert torch.equal(cosine_distill_loss(s, t, backend="reference"), cosine_distill_loss_reference(s, t))
    backend_environment({"FASTSAMCLIP_BACKEND_COSINE_DISTILL_LOSS": "reference"})
    assert OP.select(s, t).name == "reference"
    backend_environment({})
    assert OP.select(s, t).name == "triton"
    with use_backend("reference", op="cosine_distill_loss"):
        assert OP.select(s, t).name == "reference"
    monkeypatch.setattr(OP, "_logged", set())
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        for _ in range(3):  # fp64 is not a kernel dtype: reference, said once
            out = cosine_distill_loss(s.double(), t.double())
    assert torch.equal(out, cosine_distill_loss_reference(s.double(), t.double()))
    msgs = [r.getMessage() for r in caplog.records if "cosine_distill_loss" in r.getMessage()]
    assert len(msgs) == 1 and "float64" in msgs[0], msgs


# --------------------------------------------------------------------------------------------
# torch.library registration: torch.compile and opcheck
# --------------------------------------------------------------------------------------------
def _losses(s, t):
    return (cosine_distill_loss(s, t)
            + cosine_distill_loss(s, t, "none").mul(torch.linspace(0.5, 1.5, s.shape[0], device=s.device)).sum())


def test_compile_fullgraph_fwd_bwd():
    """Both reductions in one graph, no breaks, same numbers."""
    torch._dynamo.reset()
    inputs = [rand(6, 40), rand(6, 40)]
    runs = []
    for fn in (_losses, torch.compile(_losses, fullgraph=True)):
        args = [a.clone().requires_grad_(i == 0) for i, a in enumerate(inputs)]
        out = fn(*args)
        runs.append((out, torch.autograd.grad(out, [args[0]])))
    assert_close_verbose(runs[1][0], runs[0][0], 1e-6, 1e-6, "compiled loss")
    for a, e in zip(runs[1][1], runs[0][1]):
        assert_close_verbose(a, e, 1e-6, 1e-6, "compiled grad")


def test_opcheck():
    ops = torch.ops.fastsamclip
    s, t = rand(6, 40).requires_grad_(True), rand(6, 40)
    a, b = rand(6).abs(), rand(6)
    torch.library.opcheck(ops.cosine_distill_fwd.default, (s, t, 1e-8))
    torch.library.opcheck(ops.cosine_distill_bwd.default, (s.detach(), t, a, b, rand(6)))


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
