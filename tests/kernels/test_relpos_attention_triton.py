"""The fused Triton backend of relpos_attention: numerics, registration, its refusals and its
place in the automatic choice.

On a machine without a GPU the kernels run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small; GPU-only tests cover bf16 and full-size shapes.

Accuracy rule (flash-attention's): against a float64 reference, the kernel's error may be at
most TORCH_ERROR_FACTOR x the error of plain torch run in the same low precision, plus a small
atol (tests/helpers.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types

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
def test_pruner_converts_block_n_to_grid_rows_and_drops_what_does_not_fit():
    """The pruner's rule (select_configs): the family's configs only, BLOCK_N as whole grid rows,
    duplicates dropped, configs over the device's shared memory dropped by the compiled figure,
    and no config left is an error that names each candidate and why it went."""
    triton = attention_triton.triton
    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": bn}, num_warps=4, num_stages=s)
            for bn in (32, 64, 128) for s in (2, 3)]
    select = attention_triton.select_configs
    out = select("fwd", cfgs, None, None, 16)  # the interpreter: every config, as grid rows
    assert sorted({(c.kwargs["BH"], c.num_stages) for c in out}) == [(2, 2), (2, 3), (4, 2), (4, 3), (8, 2), (8, 3)]
    # A 64-wide grid row: 32- and 64-key targets both become one row per tile, deduplicated.
    out = select("fwd", cfgs, None, None, 64)
    assert sorted((c.kwargs["BH"], c.num_stages) for c in out) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    # On a GPU family: only its space's entries (64 x 128 on 4 warps spills: not in sm90's).
    out = select("fwd", cfgs, "sm90", "16bit", 16)
    space = attention_triton.config_space("fwd", "sm90", "16bit")
    assert out and all((c.kwargs["BLOCK_M"], c.kwargs["BH"] * 16, c.num_warps, c.num_stages) in space for c in out)
    assert not any(c.kwargs["BH"] == 8 for c in out)

    # Shared memory as the compiled kernel states it: over the limit, or failing to compile, is out.
    def shared(c):
        if c.kwargs["BH"] == 8:
            raise RuntimeError("PTXASError: out of registers")
        return {2: 40_000, 4: 90_000}[c.kwargs["BH"]]

    out = select("fwd", cfgs, None, None, 16, smem_limit=64_000, shared_of=shared)
    assert sorted({c.kwargs["BH"] for c in out}) == [2]
    with pytest.raises(RuntimeError, match="no tile config is left") as e:
        select("fwd", cfgs, None, None, 16, smem_limit=1000, shared_of=shared)
    assert "64x2r/w4/s2 needs 40000 B of shared memory, the device has 1000 B" in str(e.value)
    assert "64x8r/w4/s3 does not compile (RuntimeError: PTXASError: out of registers)" in str(e.value)
    with pytest.raises(RuntimeError, match="none of the 6 candidates is in the sm80 ieee space"):
        select("fwd", cfgs, "sm80", "ieee", 16)


# ---------------------------------------------------------------------------------------------
# Autotuning as on an H100 / H200, through Triton's own autotuner (no GPU needed)
# ---------------------------------------------------------------------------------------------
TILE = ("BLOCK_M", "BH", "num_warps", "num_stages")


class RecordingKernel:
    """A @triton.jit kernel's stand-in inside Triton's real ``triton.autotune``: Triton's own
    ``JITFunction.warmup`` (which adds ``grid`` and ``warmup=True`` itself), and a ``run`` that binds
    its arguments as the JIT's binder does (each kernel parameter once, no keyword but the kernel's
    parameters and Triton's compile options), records every compile and launch by tile, and
    reports the shared memory of a compiled config (``shared(tile)``) or fails to compile it."""

    def __init__(self, real, shared, fails):
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.runtime.jit import JITFunction

        self.fn, self.arg_names = real.fn, real.arg_names
        self.warmup = JITFunction.warmup.__get__(self)
        self.options = {f.name for f in dataclasses.fields(CUDAOptions)}
        self.shared, self.fails = shared, set(fails)
        self.compiled, self.launched = [], []

    def run(self, *args, grid, warmup, **kwargs):
        params = {k: v for k, v in kwargs.items() if k in self.arg_names}
        inspect.signature(self.fn).bind(*args, **params)  # TypeError: a parameter given twice, or missing
        unknown = set(kwargs) - set(params) - self.options
        if unknown:  # as JITFunction._pack_args
            raise KeyError(f"Keyword argument {sorted(unknown)} was specified but unrecognised")
        tile = tuple(kwargs[k] for k in TILE)
        if not warmup:
            self.launched.append(tile)
            return None
        self.compiled.append(tile)
        if tile in self.fails:
            raise RuntimeError("PTXASError: ptxas fatal: out of registers")
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=self.shared(tile)))


@pytest.fixture
def hopper(monkeypatch, caplog):
    """``install(shared, fails, fastest)``: each kernel's production autotuner (``_tuned``: Triton's
    ``triton.autotune`` -> ``Autotuner.run`` -> the pruner) around a RecordingKernel, as on an
    sm_90 GPU with 227 KB of shared memory, timed so that ``fastest[kind]`` wins."""
    at = attention_triton
    monkeypatch.setattr(at, "INTERPRET", False)
    monkeypatch.setattr(at, "_device_limits", lambda device: ((9, 0), 227 * 1024))
    monkeypatch.setattr(at, "_DROPPED", set())
    monkeypatch.setattr(at, "_CHOSEN", {})
    caplog.set_level(logging.WARNING, logger="fastsamclip.kernels")

    def install(shared=lambda tile: 40_000, fails=(), fastest=None):
        kernels = {}
        for kind in at.KINDS:
            kern = RecordingKernel(at.KERNELS[kind], shared, fails)

            def bench(kernel_call, quantiles, kern=kern, kind=kind):
                kernel_call()
                ms = 1.0 if kern.launched[-1] == (fastest or {}).get(kind) else 2.0 + len(kern.launched) / 100
                return [ms, ms, ms]

            monkeypatch.setitem(at._TUNED, kind, at._tuned(kern, kind, do_bench=bench))
            kernels[kind] = kern
        return kernels

    return install


def _cpu_inputs(B, nh, H, W, d):
    return make_inputs(B, nh, H, W, d, torch.bfloat16, device="cpu", requires_grad=False)


@pytest.mark.skipif(attention_triton.triton is None, reason="triton not installed")
def test_the_autotuner_compiles_times_and_runs_a_config_of_the_gpus_space(hopper, caplog):
    """As on an H100: every candidate of the sm_90 space compiled through warmup, the one that
    fails to compile dropped (said once), each other timed, the fastest launched and reported in
    the backend's notes. Fails on a pruner that hands the autotuner's own launch keywords (grid,
    warmup) on to warmup: every compile fails then, and nothing is left."""
    at = attention_triton
    fastest = {"fwd": (64, 4, 4, 3), "dkdv": (32, 4, 4, 2), "dq": (128, 2, 8, 2)}
    kernels = hopper(fails={(128, 4, 8, 2)}, fastest=fastest)  # the 128-query forward tile fails to compile
    q, k, v, rh, rw = _cpu_inputs(1, 2, 14, 14, 64)
    for _ in range(2):  # the second call is served by the autotuner's cache
        o, lse = at._launch_fwd(q, k, v, rh, rw, 0.125)
        at._launch_bwd(torch.randn_like(q), q, k, v, rh, rw, v, torch.zeros_like(lse), 0.125)
    for kind, kern in kernels.items():
        space = {(bm, at.grid_rows(bn, 16), w, s) for bm, bn, w, s in at.config_space(kind, "sm90", "16bit")}
        assert sorted(kern.compiled) == sorted(space), kind  # each candidate compiled once
        timed = space - {(128, 4, 8, 2)} if kind == "fwd" else space
        assert sorted(kern.launched[:len(timed)]) == sorted(timed), kind  # each kept one timed once
        assert kern.launched[len(timed):] == [fastest[kind]] * 2, kind  # then the fastest runs
    labels = {kind: at.config_label(dict(zip(TILE, tile))) for kind, tile in fastest.items()}
    assert at.chosen_configs(q, rh, rw) == labels
    assert f"{at.TILES_NOTE}fwd 64x4r/w4/s3, dkdv 32x4r/w4/s2, dq 128x2r/w8/s2" in at.BACKEND.notes(q, k, v, rh, rw)
    assert at.chosen_configs(q[:, :1], rh[:, :1], rw[:, :1]) == {}  # another key: nothing chosen for it yet
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "config 128x4r/w8/s2 does not compile here" in msgs[0] and "PTXASError" in msgs[0], msgs


@pytest.mark.skipif(attention_triton.triton is None, reason="triton not installed")
def test_no_config_left_is_an_error_with_every_reason(hopper):
    """Never a silent fallback tile: when every candidate is over the shared memory or fails to
    compile, the launch raises, naming each one and why."""
    hopper(shared=lambda tile: 300_000 if tile[0] == 64 else 40_000, fails={(128, 4, 8, 2)})
    q, k, v, rh, rw = _cpu_inputs(1, 2, 14, 14, 64)
    with pytest.raises(RuntimeError, match=r"relpos_attention fwd: no tile config is left .*sm90 16bit") as e:
        attention_triton._launch_fwd(q, k, v, rh, rw, 0.125)
    assert "64x2r/w4/s2 needs 300000 B of shared memory, the device has 232448 B" in str(e.value)
    assert "128x4r/w8/s2 does not compile (RuntimeError: PTXASError" in str(e.value)


@pytest.mark.skipif(attention_triton.triton is None, reason="triton not installed")
def test_the_number_of_heads_is_part_of_the_autotune_key(hopper):
    """The grid has B x heads x blocks programs: 2 heads and 12 heads of one shape tune apart."""
    kernels = hopper()
    for nh in (2, 2, 12):
        at_inputs = _cpu_inputs(1, nh, 5, 7, 16)
        attention_triton._launch_fwd(*at_inputs, 0.25)
    once = len(set(kernels["fwd"].compiled))
    assert once >= 2 and len(kernels["fwd"].compiled) == 2 * once  # pruned for 2 heads, then for 12


def test_every_space_is_defined_and_small():
    """Each kernel has a space per GPU family and input class, a handful of configs each (each
    one costs a compile and a timing per shape on first use)."""
    at = attention_triton
    for kind in at.KINDS:
        for fam in at.FAMILIES:
            for cls in at.DTYPE_CLASSES:
                space = at.config_space(kind, fam, cls)
                assert 1 <= len(space) <= 4 and len(set(space)) == len(space), (kind, fam, cls)
    with pytest.raises(ValueError, match="no autotune space"):
        at.config_space("fwd", "sm70", "16bit")
    assert at.family_of((9, 0)) == at.family_of((10, 0)) == "sm90" and at.family_of((8, 6)) == "sm80"
    assert at.dtype_class(torch.bfloat16, "tf32", 64, 16) == "16bit-wide"
    assert at.dtype_class(torch.float32, "ieee", 64, 0) == "ieee"


@pytest.mark.parametrize("d,split", [(16, (16, 0)), (32, (32, 0)), (48, (32, 16)), (64, (64, 0)), (72, (64, 16)),
                                     (80, (64, 16)), (96, (64, 32)), (100, (128, 0)), (112, (128, 0)),
                                     (128, (128, 0)), (8, (16, 0)), (24, (32, 0))])
def test_head_split(d, split):
    assert attention_triton.head_split(d) == split


def test_fp32_follows_torchs_tf32_setting():
    """fp32 inputs take TF32 tensor cores exactly when torch allows TF32 for fp32 matmuls, read
    from the setting torch >= 2.9 keeps (both of its APIs write it)."""
    at = attention_triton
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert at.fp32_uses_tf32() and at.dot_precision(torch.float32) == "tf32"
        assert "TF32 tensor cores" in at.fp32_note() and at._bias_precision("tf32") == "tf32x3"
        torch.set_float32_matmul_precision("highest")
        assert not at.fp32_uses_tf32() and at.dot_precision(torch.float32) == "ieee"
        assert "exact IEEE" in at.fp32_note() and at._bias_precision("ieee") == "ieee"
        assert at.dot_precision(torch.bfloat16) == "tf32"  # inert for 16-bit operands
        x = torch.empty(1, 1, 4, 16)
        notes = at.BACKEND.notes(x, x, x, torch.empty(1, 1, 4, 2), torch.empty(1, 1, 4, 2))
        assert notes and "exact IEEE" in notes[0]
        y = torch.empty(1, 1, 4, 80, dtype=torch.float16)
        assert at.BACKEND.notes(y, y, y, y[..., :2], y[..., :2]) == ["head dim 80 as 64 + 16, no padding"]
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(attention_triton.triton is None or attention_triton.INTERPRET,
                    reason="the autotuners exist on a GPU build only (the interpreter runs one config)")
def test_autotuners_key_on_the_batch_and_keep_results_on_disk():
    for tuned in (attention_triton._fwd_tuned, attention_triton._dkdv_tuned, attention_triton._dq_tuned):
        assert {"TUNE_BATCH", "NH", "N"} <= set(tuned.keys) and tuned.cache_results


def test_launch_arguments_carry_the_batch_bucket_and_the_split():
    q, k, v, rh, rw = attention_triton.sam_layout(3, 2, 14, 14, 80, torch.float16)
    launches = attention_triton.aot_launches(q, k, v, rh, rw)
    assert [L.kernel for L in launches] == ["attention fwd", "attention delta", "attention dkdv", "attention dq"]
    fwd = launches[0]
    assert fwd.tuned == "fwd" and fwd.meta["D0"] == 64 and fwd.meta["D1"] == 16 and fwd.meta["W_PAD"] == 16
    assert fwd.args[-1] == 4  # batch 3 -> autotune bucket 4
    assert launches[1].tuned is None and launches[1].options["num_warps"] == 4


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


SECOND_PROCESS = """
import torch
from fastsamclip.kernels import relpos_attention_triton as a
g = torch.Generator().manual_seed(0)
ts = [torch.randn(s, generator=g).cuda().to(torch.bfloat16).requires_grad_() for s in
      [(2, 2, 196, 64)] * 3 + [(2, 2, 196, 14)] * 2]
out = a.relpos_attention_triton(*ts)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
"""


@requires_cuda
def test_a_second_process_tunes_nothing(tmp_path):
    """Autotune choices are kept in Triton's cache directory (cache_results): the first process
    benchmarks the configs of each kernel, a second one with the same cache benchmarks none."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_PRINT_AUTOTUNING="1")
    env.pop("TRITON_INTERPRET", None)
    runs = [subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (r.stdout.count("Triton autotuning for function") for r in runs)
    assert first >= 1 and second == 0, (runs[0].stdout[-2000:], runs[1].stdout[-2000:])


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
