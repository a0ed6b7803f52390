"""The whole backbone on the fused Triton attention backend equals the reference backend,
forward and backward, eager and under torch.compile(fullgraph=True)."""

import pytest
import torch

from fastsamclip.data.samples import randomise_zero_tables
from fastsamclip.kernels import OPS, use_backend
from fastsamclip.modeling import BACKBONE_CONFIGS, build_backbone

from .helpers import assert_close_verbose

pytestmark = pytest.mark.skipif(OPS["relpos_attention"]["triton"].is_available() is not None,
                                reason=str(OPS["relpos_attention"]["triton"].is_available()))


def _model():
    torch.manual_seed(0)
    model = build_backbone(BACKBONE_CONFIGS["vit_micro"])  # windows of 3 on a 4x4 grid: padded
    randomise_zero_tables(model, torch.Generator().manual_seed(0))
    return model


def _run(model, x, backend):
    with use_backend(backend):
        out = model(x)
        grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_backbone_triton_equals_reference_fwd_bwd():
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    ref, ref_grads = _run(model, x, "reference")
    got, grads = _run(model, x, "triton")
    assert_close_verbose(got, ref, 2e-5, 2e-5, "backbone output")
    for name, g in ref_grads.items():
        assert_close_verbose(grads[name], g, 1e-4, 1e-4, f"grad {name}")


def test_backbone_triton_compiles_fullgraph():
    model = _model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), use_backend("reference"):
        ref = model(x)
    with torch.no_grad(), use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(x)
    assert_close_verbose(got, ref, 2e-5, 2e-5, "compiled backbone")
