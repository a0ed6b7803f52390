"""Shared test helpers: one verbose allclose and the tolerances, kept as data in one place."""

from __future__ import annotations

import torch

_F64, _F32, _F16, _BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# (atol, rtol) per quantity and dtype, against float64 references of the same (rounded) inputs.
TOLERANCES = {
    # values of a computation run at that dtype (the default)
    "value": {_F64: (1e-10, 1e-10), _F32: (2e-5, 2e-5), _F16: (2e-3, 2e-3), _BF16: (2e-2, 2e-2)},
    # a loss returned at that dtype: fp16 is half an ulp (2.4e-4 relative) away at best; the
    # projection of the linear variant is rounded to fp16 before the cosine, as in F.linear
    "loss": {_F32: (2e-5, 2e-5), _F16: (2e-3, 2e-3), _BF16: (2e-2, 2e-2)},
    # gradients: atol is scaled by the largest reference magnitude (check_grad), since an element
    # near zero carries the absolute error of its larger neighbours' arithmetic
    "grad": {_F32: (2e-5, 1e-4), _F16: (4e-3, 1e-2), _BF16: (3e-2, 5e-2)},
    # attention kernels: atol on top of TORCH_ERROR_FACTOR x plain torch's error (assert_within_torch_error)
    "attention": {_F32: (2e-5, 0.0), _F16: (2e-3, 0.0), _BF16: (1.5e-2, 0.0)},
    # a CUDA C++ kernel against the torch reference on the same GPU: same formula, float rounding only
    "cuda_vs_reference": {_F32: (1e-5, 0.0)},
}
# flash-attention's rule: a kernel's error against float64 may be at most this many times the
# error of plain torch run at the same low precision (plus the table's atol).
TORCH_ERROR_FACTOR = 2.0


def tolerance(kind: str, dtype: torch.dtype) -> tuple:
    """(atol, rtol) of ``kind`` (a key of TOLERANCES) at ``dtype``."""
    return TOLERANCES[kind][dtype]


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0,
                         name: str = "") -> None:
    """allclose (|actual - expected| <= atol + rtol |expected|, no NaN or inf in ``actual``)
    that says where and by how much it failed."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        bad = ~torch.isfinite(actual)
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values (unwritten or invalid), first at "
                             f"{bad.nonzero()[:5].tolist()}")
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    over = diff > bound
    if over.any():
        idx = over.nonzero()
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff - bound), diff.shape))
        raise AssertionError(
            f"{name}: {int(over.sum())} of {diff.numel()} elements differ beyond atol={atol:.3e}, rtol={rtol}; "
            f"max |diff| {diff.max().item():.3e} at {worst} (got {actual[worst].item():.6g}, "
            f"expected {expected[worst].item():.6g}); mean |diff| {diff.mean().item():.3e}; "
            f"first mismatches at {idx[:5].tolist()}"
        )


def assert_within_torch_error(actual: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor,
                              dtype: torch.dtype, name: str = "") -> None:
    """The kernel's max error against ``exact`` (float64) is at most TORCH_ERROR_FACTOR x that of
    ``torch_lowp`` (plain torch at ``dtype``) plus the attention atol of ``dtype``."""
    atol, _ = tolerance("attention", dtype)
    torch_err = (torch_lowp.detach().double() - exact.detach().double()).abs().max().item()
    assert_close_verbose(actual, exact, TORCH_ERROR_FACTOR * torch_err + atol, 0.0, name)


# ---------------------------------------------------------------------------------------------
# A fused loss against its float64 reference: the loss, and gradients under a non-trivial
# upstream gradient
# ---------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_loss(actual, expected, dtype, name):
    atol, rtol = tolerance("loss", dtype)
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert_close_verbose(actual, expected, atol, rtol, name)


def check_grad(actual, expected, dtype, name, floor=1e-30):
    """``floor``: the least magnitude atol scales with, for gradients that are 0 up to rounding."""
    atol, rtol = tolerance("grad", dtype)
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
