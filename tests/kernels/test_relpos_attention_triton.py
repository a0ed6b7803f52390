"""The fused Triton backend of relpos_attention: numerics, registration, its refusals and its
place in the automatic choice.

On a machine without a GPU the kernels run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small; GPU-only tests cover bf16 and full-size shapes.

Accuracy rule (flash-attention's): against a float64 reference, the kernel's error may be at
most TORCH_ERROR_FACTOR x the error of plain torch run in the same low precision, plus a small
atol (tests/helpers.py).
"""

from __future__ import annotations

import pytest
import torch

from fastsamclip.kernels import _triton
from fastsamclip.kernels import relpos_attention_triton as attention_triton
from fastsamclip.kernels import OPS, relpos_attention, relpos_attention_reference, use_backend

from ..conftest import HAS_CUDA, requires_cuda
from ..helpers import assert_close_verbose, assert_within_torch_error

DEVICE = "cuda" if HAS_CUDA else "cpu"
OP = OPS["relpos_attention"]
needs_triton = pytest.mark.skipif(attention_triton.BACKEND.is_available() is not None,
                                  reason=f"triton backend unavailable: {attention_triton.BACKEND.is_available()}")

NAMES = ("out", "dq", "dk", "dv", "d_rel_h", "d_rel_w")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every tensor the Triton launchers allocate starts as NaN: an unwritten element shows."""
    def full_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(attention_triton, "_new_output", full_nan)


def make_inputs(B, nh, H, W, d, dtype, device=DEVICE, requires_grad=True):
    N = H * W
    g = torch.Generator(device="cpu").manual_seed(1234 + B * 7 + H * 13 + W * 17 + d)
    # Biases at the scale SAM's tables reach (a few units), so they matter in the softmax.
    shapes = [(B, nh, N, d)] * 3 + [(B, nh, N, H), (B, nh, N, W)]
    scales = [1.0, 1.0, 1.0, 2.0, 2.0]
    ts = [(torch.randn(s, generator=g) * sc).to(device=device, dtype=dtype) for s, sc in zip(shapes, scales)]
    for t in ts:
        t.requires_grad_(requires_grad)
    return ts


def fwd_bwd(fn, inputs, dout):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach(), *grads]


def check_against_reference(inputs, impl, dtype, scale=None):
    """Run impl and plain torch at ``dtype``, both against float64; apply the TORCH_ERROR_FACTOR rule."""
    dout = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(7)).to(inputs[0].device, dtype)
    ref64 = [t.detach().double().requires_grad_() for t in inputs]
    exact = fwd_bwd(lambda *a: relpos_attention_reference(*a, scale=scale), ref64, dout.double())
    lowp = fwd_bwd(lambda *a: relpos_attention_reference(*a, scale=scale), inputs, dout)
    got = fwd_bwd(impl, inputs, dout)
    for name, g, lp, ex in zip(NAMES, got, lowp, exact):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert_within_torch_error(g, ex, lp, dtype, name)


# (B, heads, H, W, d): each exercises a different tiling path of the kernel.
SHAPES = [
    pytest.param(1, 2, 14, 14, 32, id="window14x14-d32"),  # N=196, W_PAD=16, 4 grid rows per tile
    pytest.param(3, 1, 5, 7, 16, id="grid5x7-d16-b3"),  # odd grid, W=7 padded to 16, last tile partial
    pytest.param(1, 1, 14, 14, 80, id="window14x14-d80"),  # head dim 80 -> 128 with masked lanes
    pytest.param(1, 1, 3, 50, 16, id="grid3x50-rowtile"),  # W_PAD=64: one grid row per tile (BH=1)
    pytest.param(1, 2, 4, 20, 32, id="grid4x20-2rows"),  # W_PAD=32: two grid rows per tile
    pytest.param(2, 1, 2, 100, 16, id="grid2x100-wide"),  # W_PAD=128 > the config's 64-key tile
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,nh,H,W,d", SHAPES)
def test_triton_matches_float64_reference(B, nh, H, W, d, dtype, poisoned_outputs):
    inputs = make_inputs(B, nh, H, W, d, dtype)
    check_against_reference(inputs, attention_triton.relpos_attention_triton, dtype)


@needs_triton
def test_triton_custom_scale_and_public_op(poisoned_outputs):
    # A non-default scale goes through relpos_attention's own dispatch to the kernel.
    inputs = make_inputs(1, 1, 6, 6, 16, torch.float32)
    impl = lambda *a: relpos_attention(*a, scale=0.37, backend="triton")  # noqa: E731
    check_against_reference(inputs, impl, torch.float32, scale=0.37)


@needs_triton
def test_triton_strided_views(poisoned_outputs):
    """SAM's q/k/v are permuted views of one qkv projection: non-contiguous strides."""
    B, nh, H, W, d = 2, 2, 5, 7, 16
    N = H * W
    qkv = torch.randn(B, N, 3, nh, d, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    rel_h = torch.randn(B, nh, H, N, device=DEVICE).transpose(-1, -2)  # last-dim stride != 1
    rel_w = torch.randn(B, nh, N, W, device=DEVICE)
    out = attention_triton.relpos_attention_triton(q, k, v, rel_h, rel_w)
    expected = relpos_attention_reference(*(t.double() for t in (q, k, v, rel_h, rel_w)))
    assert_close_verbose(out, expected, 1e-5, 0.0, "out")


@needs_triton
def test_triton_backward_is_deterministic():
    inputs = make_inputs(1, 1, 5, 7, 16, torch.float32)
    dout = torch.randn_like(inputs[0])
    a = fwd_bwd(attention_triton.relpos_attention_triton, inputs, dout)
    b = fwd_bwd(attention_triton.relpos_attention_triton, inputs, dout)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


@needs_triton
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_triton_in_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    inputs = make_inputs(1, 1, 5, 7, 16, torch.float32)

    def block(q, k, v, rel_h, rel_w):
        # Something around the op so the graph is not just the custom op.
        return relpos_attention(q * 1.0, k, v, rel_h, rel_w, backend="triton").sum(-1).exp()

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    dout = torch.randn(inputs[0].shape[:-1])
    got = fwd_bwd(compiled, inputs, dout)
    expected = fwd_bwd(lambda *a: relpos_attention_reference(*a).sum(-1).exp(), inputs, dout)
    for name, g, e in zip(("out",) + NAMES[1:], got, expected):
        assert_close_verbose(g, e, 1e-4, 0.0, name)


@needs_triton
def test_triton_opcheck():
    inputs = make_inputs(1, 1, 4, 5, 16, torch.float32)
    torch.library.opcheck(torch.ops.fastsamclip.relpos_attention_fwd.default, (*inputs, 0.25))
    q, k, v, rel_h, rel_w = (t.detach() for t in inputs)
    out, lse = attention_triton.relpos_attention_fwd(q, k, v, rel_h, rel_w, 0.25)
    torch.library.opcheck(torch.ops.fastsamclip.relpos_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, rel_h, rel_w, out, lse, 0.25))


# ---------------------------------------------------------------------------------------------
# Autotune pruning (the GPU config path, exercised without a GPU)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(attention_triton.triton is None, reason="triton not installed")
def test_pruner_converts_block_n_to_grid_rows_and_respects_smem(monkeypatch):
    triton = attention_triton.triton
    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": bn}, num_warps=4, num_stages=s)
            for bn in (32, 64, 128) for s in (2, 4)]
    q = torch.empty(1, dtype=torch.float16)
    prune = attention_triton._make_pruner("fwd")
    monkeypatch.setattr(attention_triton, "_device_smem_bytes", lambda: None)
    out = prune(cfgs, {"Q": q, "W_PAD": 16, "D_PAD": 64})
    assert sorted({(c.kwargs["BH"], c.num_stages) for c in out}) == [(2, 2), (2, 4), (4, 2), (4, 4), (8, 2), (8, 4)]
    # A 64-wide grid row: 32- and 64-key targets both become one row per tile, deduplicated.
    out = prune(cfgs, {"Q": q, "W_PAD": 64, "D_PAD": 64})
    assert sorted((c.kwargs["BH"], c.num_stages) for c in out) == [(1, 2), (1, 4), (2, 2), (2, 4)]
    # A device with little shared memory keeps only the configs that fit.
    monkeypatch.setattr(attention_triton, "_device_smem_bytes", lambda: 48 * 1024)
    out = prune(cfgs, {"Q": q, "W_PAD": 64, "D_PAD": 64})
    for c in out:
        assert attention_triton._smem_estimate("fwd", 64, c.kwargs["BH"] * 64, 64, 64, c.num_stages, 2) <= 48 * 1024
    assert out and len(out) < 4
    monkeypatch.setattr(attention_triton, "_device_smem_bytes", lambda: 1024)
    assert [c.kwargs for c in prune(cfgs, {"Q": q, "W_PAD": 64, "D_PAD": 64})] == [{"BLOCK_M": 32, "BH": 1}]


# ---------------------------------------------------------------------------------------------
# Refusals and the automatic choice
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_default_choice_and_forcing():
    inputs = make_inputs(1, 1, 4, 5, 16, torch.float32, requires_grad=False)
    # On CPU the kernel is the interpreter: able, but never picked automatically.
    auto = "triton" if HAS_CUDA else "sdpa"
    assert OP.select(*inputs).name == auto
    assert OP.select(*inputs, backend="triton").name == "triton"
    assert OP.select(*inputs, backend="sdpa").name == "sdpa"
    with use_backend("reference"):
        assert OP.select(*inputs).name == "reference"
        assert OP.select(*inputs, backend="triton").name == "triton"  # argument beats context
    with use_backend("triton"):
        assert OP.select(*inputs).name == "triton"
    assert OP.select(*inputs).name == auto
    if not HAS_CUDA:
        assert any("interpreter" in w for w in attention_triton.BACKEND.auto_check(*inputs, needs_grad=False))
    # Forced backends really run, and agree.
    outs = {n: relpos_attention(*inputs, backend=n) for n in ("triton", "sdpa", "reference")}
    for n in ("triton", "sdpa"):
        assert_close_verbose(outs[n], outs["reference"].double(), 1e-5, 0.0, f"{n} vs reference")


def test_triton_refusal_reasons():
    check = attention_triton.BACKEND.check
    x = lambda *s, dt=torch.float32, dev="cpu": torch.empty(s, dtype=dt, device=dev)  # noqa: E731
    why = check(x(1, 1, 4, 8, dt=torch.float64), x(1, 1, 4, 8, dt=torch.float64), x(1, 1, 4, 8, dt=torch.float64),
                x(1, 1, 4, 2, dt=torch.float64), x(1, 1, 4, 2, dt=torch.float64), False)
    assert any("dtype torch.float64" in w for w in why)
    why = check(x(1, 1, 4, 256), x(1, 1, 4, 256), x(1, 1, 4, 256), x(1, 1, 4, 2), x(1, 1, 4, 2), False)
    assert any("head dim 256" in w for w in why)
    N = 2 * 130
    why = check(x(1, 1, N, 16), x(1, 1, N, 16), x(1, 1, N, 16), x(1, 1, N, 2), x(1, 1, N, 130), False)
    assert any("width 130" in w for w in why)
    m = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    why = check(m(1, 1, 4, 16), m(1, 1, 4, 16), m(1, 1, 4, 16), m(1, 1, 4, 2), m(1, 1, 4, 2), False)
    assert any("device meta" in w for w in why)


def test_triton_availability_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in _triton.unavailable(interpret=False, import_error=None)
    assert "not installed" in _triton.unavailable(interpret=False, import_error="triton is not installed (x)")
    assert _triton.unavailable(interpret=True, import_error=None) is None


# ---------------------------------------------------------------------------------------------
# GPU-only: bf16 (the interpreter's bf16 arithmetic is wrong) and full-size shapes
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("B,nh,H,W,d", SHAPES)
def test_triton_bf16(B, nh, H, W, d, poisoned_outputs):
    inputs = make_inputs(B, nh, H, W, d, torch.bfloat16)
    check_against_reference(inputs, attention_triton.relpos_attention_triton, torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("B,nh,H,W,d", [
    pytest.param(8, 2, 64, 64, 64, id="global4096-b8"),
    pytest.param(200, 2, 14, 14, 64, id="windows196-b8x25"),
    pytest.param(2, 2, 28, 28, 80, id="global784-d80"),
    pytest.param(1, 2, 32, 32, 64, id="global1024-b1"),
])
def test_triton_full_size(B, nh, H, W, d, dtype, poisoned_outputs):
    inputs = make_inputs(B, nh, H, W, d, dtype)
    check_against_reference(inputs, attention_triton.relpos_attention_triton, dtype)


# ---------------------------------------------------------------------------------------------
# The GPU's tile shapes, checked in the interpreter (which otherwise runs one 64 x 64 config)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not attention_triton.INTERPRET, reason="on a GPU, autotune picks the tiles")
@pytest.mark.parametrize("block_m,block_n", [(32, 32), (128, 128), (32, 128), (128, 32)])
@pytest.mark.parametrize("H,W", [(14, 14), (3, 40)], ids=["window14x14", "grid3x40"])
def test_triton_tilings_of_the_gpu_configs(block_m, block_n, H, W, monkeypatch, poisoned_outputs):
    """Every BLOCK_M and grid-rows-per-tile (BH = BLOCK_N // W_PAD: 2, 8 on 14 x 14; 1, 2 on a
    64-padded row) the autotune space can pick, forward and backward."""
    cfg = [attention_triton.triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)]
    for tuned in (attention_triton._fwd_tuned, attention_triton._dkdv_tuned, attention_triton._dq_tuned):
        monkeypatch.setattr(tuned, "configs", cfg)
    inputs = make_inputs(1, 1, H, W, 16, torch.float32)
    check_against_reference(inputs, attention_triton.relpos_attention_triton, torch.float32)
