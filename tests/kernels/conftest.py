"""Fixtures of the kernel tests."""

import os

import pytest
import torch

from fastsamclip.kernels import dispatch


@pytest.fixture
def poison_empty():
    """Uninitialised outputs are poisoned: with deterministic algorithms on, ``torch.empty`` fills
    float tensors with NaN, so an element a kernel forgets to write fails the finite check of
    ``assert_close_verbose``."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def backend_environment():
    """``apply(environ)``: every op's forcing as if ``fastsamclip.kernels`` were imported under
    ``environ``; the real environment's forcing is restored afterwards."""
    yield dispatch._apply_environment
    dispatch._apply_environment(os.environ)
