"""The FlexAttention backend of relpos_attention: its score_mod on CPU (flex's eager forward),
its declared CPU limits, and forward + backward on a GPU."""

import pytest
import torch

from fastsamclip.kernels import OPS, relpos_attention, relpos_attention_reference
from fastsamclip.kernels import relpos_attention_flex as attention_flex

from ..conftest import requires_cuda
from ..helpers import assert_close_verbose
from .test_relpos_attention_triton import check_against_reference, make_inputs

OP = OPS["relpos_attention"]


@pytest.mark.skipif(attention_flex._flex_attention is None, reason="torch without flex_attention")
def test_flex_score_mod_matches_reference_cpu_forward():
    """The score_mod itself, through flex's eager path (forward; flex has no CPU backward)."""
    inputs = make_inputs(2, 2, 5, 7, 16, torch.float32, device="cpu", requires_grad=False)
    out = attention_flex.relpos_attention_flex(*inputs, compiled=False)
    expected = relpos_attention_reference(*(t.double() for t in inputs))
    assert_close_verbose(out, expected, 1e-5, 0.0, "flex out")


def test_flex_declares_cpu_limits():
    inputs = make_inputs(1, 1, 4, 5, 16, torch.float32, device="cpu", requires_grad=False)
    # flex has no CPU backward: it must refuse, saying why.
    assert any("cpu" in w for w in attention_flex.BACKEND.check(*inputs, needs_grad=True))
    # Its CPU forward is the unfused math path: never the automatic choice there.
    assert OP.select(*inputs).name != "flex"
    assert OP.select(*[t.requires_grad_() for t in inputs], needs_grad=True).name != "flex"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flex_cuda_fwd_bwd(dtype):
    inputs = make_inputs(2, 2, 14, 14, 64, dtype)
    check_against_reference(inputs, lambda *a: relpos_attention(*a, backend="flex"), dtype)
