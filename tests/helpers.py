"""Shared test helpers: a verbose allclose and per-dtype tolerances kept in one place."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype for comparisons against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """allclose that says where and by how much it failed."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad}")
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    over = diff > bound
    if over.any():
        idx = over.nonzero()
        worst = tuple(torch.unravel_index(torch.argmax(diff - bound), diff.shape))
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: {int(over.sum())} of {diff.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"max |diff| {diff.max().item():.3e} at {worst} (got {actual[worst].item():.6g}, "
            f"expected {expected[worst].item():.6g}); first mismatches at {idx[:5].tolist()}"
        )
