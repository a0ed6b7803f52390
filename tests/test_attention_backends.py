"""relpos_attention: every plain backend against a float64 reference, forward and backward,
the chooser, and input validation."""

import pytest
import torch

from fastsamclip.kernels import attention as A
from fastsamclip.kernels import relpos_attention, relpos_attention_reference, use_backend

from .helpers import TOLERANCES, assert_close_verbose


def explicit_reference(q, k, v, rel_h, rel_w, scale):
    """The op written out element by element over (kh, kw), independent of the backends' reshapes."""
    B, nh, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    kh = torch.arange(N) // W
    kw = torch.arange(N) % W
    s = s + rel_h[..., kh] + rel_w[..., kw]
    return torch.softmax(s, -1) @ v


def make_inputs(B, nh, H, W, d, dtype, requires_grad=True):
    N = H * W
    t = lambda *s: (torch.randn(*s, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return t(B, nh, N, d), t(B, nh, N, d), t(B, nh, N, d), t(B, nh, N, H), t(B, nh, N, W)


SHAPES = [(1, 1, 14, 14, 64), (3, 2, 5, 7, 16), (2, 3, 4, 4, 80), (1, 2, 1, 9, 8)]
PLAIN_BACKENDS = ["reference", "sdpa"]


@pytest.mark.parametrize("backend", PLAIN_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_float64(backend, shape, dtype):
    B, nh, H, W, d = shape
    inputs = make_inputs(B, nh, H, W, d, dtype)
    ref_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    scale = 0.3  # not the default, so a scale mix-up shows
    out = relpos_attention(*inputs, scale=scale, backend=backend)
    ref = explicit_reference(*ref_inputs, scale)
    atol, rtol = TOLERANCES[dtype]
    assert_close_verbose(out, ref, atol, rtol, f"{backend} out")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, g, rg in zip(["dq", "dk", "dv", "drel_h", "drel_w"], grads, ref_grads):
        assert_close_verbose(g, rg, atol * 5, rtol * 5, f"{backend} {name}")


def test_default_scale_is_head_dim_rsqrt():
    inputs = make_inputs(1, 2, 3, 5, 16, torch.float64, requires_grad=False)
    assert_close_verbose(relpos_attention(*inputs), explicit_reference(*inputs, 16**-0.5), 1e-12, 1e-12, "default scale")


def test_reference_is_sams_arithmetic():
    """The reference backend reproduces segment_anything's add_decomposed_rel_pos + softmax."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    B, nh, H, W, d = 2, 3, 4, 6, 8
    q, k, v = (torch.randn(B * nh, H * W, d) for _ in range(3))
    rel_pos_h = torch.randn(2 * H - 1, d)
    rel_pos_w = torch.randn(2 * W - 1, d)
    attn = (q * d**-0.5) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, (H, W), (H, W))
    expected = attn.softmax(-1) @ v
    from fastsamclip.modeling.backbone import relpos_tables

    q4 = q.view(B, nh, H * W, d)
    rel_h, rel_w = relpos_tables(q4, rel_pos_h, rel_pos_w, (H, W))
    out = relpos_attention_reference(q4, k.view(B, nh, H * W, d), v.view(B, nh, H * W, d), rel_h, rel_w)
    assert torch.equal(out.reshape(B * nh, H * W, d), expected)


def test_forcing_backends_and_errors():
    inputs = make_inputs(1, 1, 2, 3, 4, torch.float32, requires_grad=False)
    assert A.select_backend(*inputs, backend="reference").name == "reference"
    with use_backend("reference"):
        assert A.select_backend(*inputs).name == "reference"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        relpos_attention(*inputs, backend="nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_backend("nope"):
            pass


def test_refusals_are_listed_and_fallback_logged(caplog):
    inputs = make_inputs(1, 1, 2, 3, 4, torch.float32, requires_grad=False)
    refuse = lambda *a: ["refuses everything, for the test"]  # noqa: E731
    A.register_backend(A.AttentionBackend(
        name="picky", fn=A.relpos_attention_reference, description="test backend", check=refuse), priority=0)
    try:
        with caplog.at_level("WARNING", logger="fastsamclip.kernels"):
            be = A.select_backend(*inputs)
        assert be.name != "picky"
        assert "picky: refuses everything" in caplog.text
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            relpos_attention(*inputs, backend="picky")
        saved = list(A.PRIORITY)
        A.PRIORITY[:] = ["picky"]
        try:
            with pytest.raises(RuntimeError, match="no backend can run this input:\n  picky: refuses"):
                relpos_attention(*inputs)
        finally:
            A.PRIORITY[:] = saved
    finally:
        A.PRIORITY.remove("picky")
        del A._BACKENDS["picky"]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, v, h, w: (q[0], k, v, h, w), "q must be 4-D"),
        (lambda q, k, v, h, w: (q, k[:, :, :-1], v, h, w), "must have one shape"),
        (lambda q, k, v, h, w: (q, k, v, h[..., :-1], w), "has 10 tokens but q has N = 15"),
        (lambda q, k, v, h, w: (q, k, v, h[:, :1], w), "must start with"),
        (lambda q, k, v, h, w: (q, k, v.double(), h, w), "share one dtype"),
        (lambda q, k, v, h, w: (q.int(), k.int(), v.int(), h.int(), w.int()), "not a floating type"),
        (lambda q, k, v, h, w: (q, k, v, h, w.to("meta")), "one device"),
        (lambda q, k, v, h, w: (q.numpy(), k, v, h, w), "must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(mutate, match):
    inputs = make_inputs(1, 2, 3, 5, 8, torch.float32, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        relpos_attention(*mutate(*inputs))


def test_backend_table_lists_every_backend():
    rows = A.backend_table(device="cpu", dtype=torch.float32)
    names = [r["name"] for r in rows]
    assert names == A.PRIORITY
    assert {"reference", "sdpa"} <= set(names)
    assert all(r["ok"] or r["why"] for r in rows)
