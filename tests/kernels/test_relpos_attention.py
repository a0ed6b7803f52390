"""relpos_attention: the plain backends (reference, sdpa) against a float64 reference, forward and
backward; the op's backends in priority order, its fallback log and errors; input validation.
The fused kernels: test_relpos_attention_triton.py, test_relpos_attention_flex.py."""

import importlib

import pytest
import torch

from fastsamclip.kernels import OPS, Backend, relpos_attention, relpos_attention_reference, use_backend

from ..helpers import assert_close_verbose, tolerance

OP = OPS["relpos_attention"]


def explicit_reference(q, k, v, rel_h, rel_w, scale):
    """The op written out element by element over (kh, kw), independent of the backends' reshapes."""
    N, W = q.shape[2], rel_w.shape[-1]
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
    atol, rtol = tolerance("value", dtype)
    assert_close_verbose(out, ref, atol, rtol, f"{backend} out")
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, g, rg in zip(["dq", "dk", "dv", "drel_h", "drel_w"], grads, ref_grads):
        assert_close_verbose(g, rg, atol * 5, rtol * 5, f"{backend} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget_heads", [1, 2, 4])
def test_sdpa_cpu_inference_groups_heads_and_matches_float64(monkeypatch, dtype, budget_heads):
    # Without gradients on the CPU the bias is built a few (batch, head) pairs at a time: a ragged
    # last group (6 pairs in groups of 4), a wrong slice or a stale buffer would show here.
    mod = importlib.import_module("fastsamclip.kernels.relpos_attention")  # the package exports the function
    B, nh, H, W, d = 2, 3, 5, 7, 16
    monkeypatch.setattr(mod, "SDPA_CPU_BIAS_ELEMENTS", budget_heads * (H * W) ** 2)
    inputs = make_inputs(B, nh, H, W, d, dtype, requires_grad=False)
    ref = explicit_reference(*[x.double() for x in inputs], 0.3)
    with torch.no_grad():
        out = relpos_attention(*inputs, scale=0.3, backend="sdpa")
    atol, rtol = tolerance("value", dtype)
    assert_close_verbose(out, ref, atol, rtol, f"grouped sdpa, {budget_heads} heads a group")
    whole = torch.nn.functional.scaled_dot_product_attention(
        *inputs[:3], attn_mask=mod.materialized_bias(*inputs[3:]), scale=0.3)
    assert torch.allclose(out.float(), whole.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("budget_heads", [1, 2, 3])
def test_sdpa_cpu_groups_export_with_a_dynamic_batch(monkeypatch, budget_heads):
    # torch.export with a dynamic batch (the AOTInductor export): the grouping must put no guard on
    # the batch (a group of 2 pairs with batches up to 64 would), and the exported graph must equal
    # the float64 reference at every batch, with a ragged last group of heads (3 heads in 2s).
    mod = importlib.import_module("fastsamclip.kernels.relpos_attention")
    B, nh, H, W, d = 2, 3, 5, 7, 16
    monkeypatch.setattr(mod, "SDPA_CPU_BIAS_ELEMENTS", budget_heads * (H * W) ** 2)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, rel_h, rel_w):
            return relpos_attention(q, k, v, rel_h, rel_w, scale=0.3, backend="sdpa")

    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(Attention(), tuple(make_inputs(B, nh, H, W, d, torch.float32, False)),
                                      dynamic_shapes=tuple({0: batch} for _ in range(5)))
    for b in (1, 5):
        inputs = make_inputs(b, nh, H, W, d, torch.float32, requires_grad=False)
        with torch.no_grad():
            out = program.module()(*inputs)
        ref = explicit_reference(*[x.double() for x in inputs], 0.3)
        assert_close_verbose(out, ref, *tolerance("value", torch.float32), f"exported, batch {b}")


def test_default_scale_is_head_dim_rsqrt():
    inputs = make_inputs(1, 2, 3, 5, 16, torch.float64, requires_grad=False)
    assert_close_verbose(relpos_attention(*inputs), explicit_reference(*inputs, 16**-0.5), 1e-12, 1e-12, "default scale")


def test_reference_is_sams_arithmetic():
    """The reference backend reproduces segment_anything's add_decomposed_rel_pos + softmax."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, get_rel_pos

    B, nh, H, W, d = 2, 3, 4, 6, 8
    q, k, v = (torch.randn(B * nh, H * W, d) for _ in range(3))
    rel_pos_h = torch.randn(2 * H - 1, d)
    rel_pos_w = torch.randn(2 * W - 1, d)
    attn = (q * d**-0.5) @ k.transpose(-2, -1)
    attn = add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, (H, W), (H, W))
    expected = attn.softmax(-1) @ v
    # The op's tables, computed as SAM does before it adds them (add_decomposed_rel_pos).
    Rh, Rw = get_rel_pos(H, H, rel_pos_h), get_rel_pos(W, W, rel_pos_w)
    r_q = q.reshape(B * nh, H, W, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).reshape(B, nh, H * W, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).reshape(B, nh, H * W, W)
    q4 = q.view(B, nh, H * W, d)
    out = relpos_attention_reference(q4, k.view(B, nh, H * W, d), v.view(B, nh, H * W, d), rel_h, rel_w)
    assert torch.equal(out.reshape(B * nh, H * W, d), expected)


def test_priority_order():
    order = [n for n in OP.names if n in ("triton", "flex", "sdpa", "reference")]
    assert order == ["triton", "flex", "sdpa", "reference"]


def test_forcing_backends_and_errors():
    inputs = make_inputs(1, 1, 2, 3, 4, torch.float32, requires_grad=False)
    assert OP.select(*inputs, backend="reference").name == "reference"
    with use_backend("reference"):
        assert OP.select(*inputs).name == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope' for relpos_attention; known: triton, flex"):
        relpos_attention(*inputs, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with use_backend("nope"):
            pass


def test_refusals_are_listed_and_fallback_logged(caplog, monkeypatch):
    inputs = make_inputs(1, 1, 2, 3, 4, torch.float32, requires_grad=False)
    refuse = lambda *a, **k: ["refuses everything, for the test"]  # noqa: E731
    OP.register(Backend(name="picky", fn=relpos_attention_reference, description="test backend", check=refuse),
                priority=0)
    try:
        with caplog.at_level("INFO", logger="fastsamclip.kernels"):
            be = OP.select(*inputs)
        assert be.name != "picky"
        assert "picky: refuses everything" in caplog.text
        with pytest.raises(RuntimeError, match="forced but cannot run"):
            relpos_attention(*inputs, backend="picky")
        for be in OP.backends:
            if be.name != "picky":
                monkeypatch.setattr(be, "check", refuse)
        with pytest.raises(RuntimeError, match="no backend can run this input:\n  picky: refuses"):
            relpos_attention(*inputs)
    finally:
        OP.unregister("picky")


def test_forced_backend_that_refuses_raises_with_reason():
    inputs = make_inputs(1, 1, 4, 5, 16, torch.float64, requires_grad=False)
    with pytest.raises(RuntimeError, match="'triton' was forced.*float64"):
        relpos_attention(*inputs, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("nope"):
            pass


def test_fallback_logs_and_error_lists_every_backend(monkeypatch, caplog):
    inputs = make_inputs(1, 1, 4, 5, 16, torch.float64, requires_grad=False)
    monkeypatch.setattr(OP, "_logged", set())
    with caplog.at_level("INFO", logger="fastsamclip.kernels"):
        assert OP.select(*inputs).name == "sdpa"
    assert "triton" in caplog.text and "float64" in caplog.text
    for name in ("sdpa", "reference"):
        monkeypatch.setattr(OP[name], "check", lambda *a, _n=name, **k: [f"{_n} refuses for the test"])
    with pytest.raises(RuntimeError) as err:
        OP.select(*inputs)
    msg = str(err.value)
    for name in ("triton", "flex", "sdpa", "reference"):
        assert f"  {name}: " in msg, msg
    assert "sdpa refuses for the test" in msg and "float64" in msg


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


def test_table_lists_every_backend():
    rows = OP.table(device="cpu")
    names = [r["backend"] for r in rows if r["probe"] == "float32 head_dim=64 fwd"]
    assert names == OP.names
    assert {"reference", "sdpa"} <= set(names)
    assert all(r["ok"] or r["why"] for r in rows)
    assert {r["probe"] for r in rows} == {"float32 head_dim=64 fwd", "float32 head_dim=64 fwd+bwd"}
    assert {r["probe"] for r in OP.table(device="cpu", head_dim=80)} == {"float32 head_dim=80 fwd",
                                                                        "float32 head_dim=80 fwd+bwd"}
