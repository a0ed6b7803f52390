"""Benchmark: SAM's relative-position attention, fused Triton kernel against its competitors.

    python -m fastsamclip.bench.bench_relpos_attention             # ViT-B shapes, bf16, batch 1/8/32
    python -m fastsamclip.bench.bench_relpos_attention --batch 8 --modes fwd --dtype fp16
    python -m fastsamclip.bench.bench_relpos_attention --quick     # tiny shapes, runs on CPU (CI smoke)

Shapes (ViT-B: 12 heads, head dim 64): the 1024px global blocks (64 x 64 grid, N = 4096), the
windowed blocks (B x 25 windows of 14 x 14 = 196 tokens) and 448px global blocks (28 x 28).

Competitors (one row each; a missing one is a row with the reason):
  triton          the fused kernel (``relpos_attention(backend="triton")``)
  flex            FlexAttention, compiled (compile happens in the warm-up), bias in score_mod
  sdpa-bias       the op's sdpa backend: SDPA with the (N, N) bias materialised as attn_mask
                  (the speed-up baseline)
  sam-reference   SAM's original attention: materialised scores under autograd
  fold-sdpa-flash bias folded into plain flash attention: q' = [q * scale, rel_h, rel_w],
                  k' = [k, onehot(kh), onehot(kw)], head dim padded to a multiple of 8,
                  SDPA restricted to its flash backend (exact; ~2x the QK flops)
  fold-flash-attn the same fold through ``flash_attn.flash_attn_func`` (if installed)
  xformers-bias   ``xformers.ops.memory_efficient_attention`` with the bias tensor (if installed)
  flash-nobias    plain flash attention, NO bias: the speed of light for this shape

TFLOP/s count the attention matmuls only, 4 * B * heads * N^2 * d for the forward, 2.5x that
for the backward (flash-attention's convention), so every competitor is measured on one scale.
Each row also records ``max_err``: the forward's max abs error against the fp32 reference on
the first batch element; the fused kernel's rows record ``tiles``, the config its autotuner chose
for each kernel that ran (queries x key-grid rows / warps / stages).
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastsamclip.kernels import OPS, relpos_attention, relpos_attention_reference

from .harness import append_csv, environment, format_table, plot_csv, run_case

BENCH = "relpos_attention"
ATTENTION = OPS["relpos_attention"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------
# Competitors: each builder returns (fn(q, k, v, rel_h, rel_w) -> out, None) or (None, reason)
# ---------------------------------------------------------------------------------------------
def _backend_impl(name: str):
    if name not in ATTENTION:
        return None, f"backend {name!r} not registered"
    why = ATTENTION[name].is_available()
    if why:
        return None, why

    def fn(q, k, v, rh, rw):
        return relpos_attention(q, k, v, rh, rw, backend=name)

    return fn, None


def _check_backend(name: str, inputs, needs_grad: bool) -> Optional[str]:
    why = ATTENTION[name].check(*inputs, needs_grad=needs_grad)
    return "; ".join(why) if why else None


def _tiles(name: str, inputs, needs_grad: bool) -> Optional[str]:
    """The tiles the backend's autotuner ran for these inputs (the fused kernel's notes say them
    once it has run them), e.g. ``fwd 64x4r/w4/s2, dkdv 32x4r/w4/s2, dq 64x2r/w4/s2``."""
    for note in ATTENTION[name].notes(*inputs, needs_grad=needs_grad):
        if note.startswith("autotuned tiles"):
            return note.split(": ", 1)[1]
    return None


def fold_inputs(q, k, v, rel_h, rel_w, scale: float):
    """The exact fold of the decomposed bias into plain attention (scale already applied):

        q' = [q * scale, rel_h, rel_w, 0], k' = [k, onehot(kh), onehot(kw), 0], v' = [v, 0]

    so ``q' @ k'^T = q @ k^T * scale + rel_h[:, kh] + rel_w[:, kw]``; head dim padded to a
    multiple of 8 (flash kernels' requirement), v padded to the same (SDPA flash wants one)."""
    B, nh, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    n = torch.arange(N, device=q.device)
    oh = F.one_hot(n // W, H).to(q.dtype)
    ow = F.one_hot(n % W, W).to(q.dtype)
    e = d + H + W
    e_pad = -(-e // 8) * 8
    zq = q.new_zeros(B, nh, N, e_pad - e)
    qf = torch.cat([q * scale, rel_h, rel_w, zq], dim=-1)
    kf = torch.cat([k, oh.expand(B, nh, N, H), ow.expand(B, nh, N, W), zq], dim=-1)
    vf = F.pad(v, (0, e_pad - d))
    return qf, kf, vf, d


def _fold_sdpa_impl(device: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def fn(q, k, v, rh, rw):
        qf, kf, vf, d = fold_inputs(q, k, v, rh, rw, q.shape[-1] ** -0.5)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qf, kf, vf, scale=1.0)[..., :d]

    return fn, None


def _fold_flash_attn_impl(device: str):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        return None, f"flash-attn not installed ({e})"
    if device != "cuda":
        return None, "flash-attn needs cuda"

    def fn(q, k, v, rh, rw):
        qf, kf, vf, d = fold_inputs(q, k, v, rh, rw, q.shape[-1] ** -0.5)
        # flash_attn layout is (B, N, heads, d)
        out = flash_attn_func(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), softmax_scale=1.0)
        return out.transpose(1, 2)[..., :d]

    return fn, None


def _xformers_impl(device: str):
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a CUDA-12 build failing against this torch
        return None, f"xformers not importable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if device != "cuda":
        return None, "xformers memory_efficient_attention needs cuda"

    def fn(q, k, v, rh, rw):
        B, nh, N, d = q.shape
        # xformers wants the bias's last dim 8-aligned in memory: allocate padded, slice.
        n_pad = -(-N // 8) * 8
        bias = q.new_empty(B, nh, N, n_pad)[..., :N]
        bias.copy_((rh[..., :, None] + rw[..., None, :]).reshape(B, nh, N, N))  # the (N, N) bias
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=d ** -0.5)
        return out.transpose(1, 2)

    return fn, None


def _flash_nobias_impl(device: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device != "cuda":
        return None, "the no-bias speed-of-light row is a GPU flash-kernel number"

    def fn(q, k, v, rh, rw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return fn, None


def competitors(device: str) -> List[Tuple[str, Optional[Callable], Optional[str], Optional[str]]]:
    """(impl name, fn, reason it is missing, registry backend whose ``check`` applies)."""
    out = []
    for impl, be in (("triton", "triton"), ("flex", "flex")):
        fn, why = _backend_impl(be)
        out.append((impl, fn, why, be))
    # The sdpa backend's own function: no dispatch in the timed call, as the baseline always was.
    out.append(("sdpa-bias", ATTENTION["sdpa"].fn, None, None))
    out.append(("sam-reference", relpos_attention_reference, None, None))
    for impl, builder in (("fold-sdpa-flash", _fold_sdpa_impl), ("fold-flash-attn", _fold_flash_attn_impl),
                          ("xformers-bias", _xformers_impl), ("flash-nobias", _flash_nobias_impl)):
        fn, why = builder(device)
        out.append((impl, fn, why, None))
    return out


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
def cases(batches: List[int], quick: bool) -> List[Tuple[str, int, int, int, int, int]]:
    """(label, batch of attention calls, heads, H, W, d)."""
    if quick:
        # Tiny, awkward shapes: seconds on CPU in the Triton interpreter.
        return [("quick-grid5x7", 1, 2, 5, 7, 16), ("quick-windows", 2 * 2, 1, 4, 4, 16)]
    out = []
    for b in batches:
        out.append((f"global-4096 B{b}", b, 12, 64, 64, 64))
        out.append((f"windows-196 B{b}x25", b * 25, 12, 14, 14, 64))
        out.append((f"global-784 B{b}", b, 12, 28, 28, 64))
    return out


def make_inputs(B, nh, H, W, d, dtype, device, requires_grad):
    N = H * W
    # Drawn on the device: the CPU takes seconds per call for the 8 x 25 windows' 30 M values a tensor.
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=device) * sc).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return [mk(B, nh, N, d), mk(B, nh, N, d), mk(B, nh, N, d), mk(B, nh, N, H, sc=2.0), mk(B, nh, N, W, sc=2.0)]


def _max_err(fn, inputs) -> Optional[float]:
    """Forward max abs error against the fp32 reference on batch element 0."""
    one = [t.detach()[:1] for t in inputs]
    with torch.no_grad():
        got = fn(*one).float()
        ref = relpos_attention_reference(*(t.float() for t in one))
    return float((got - ref).abs().max())


def run(args, sink=None) -> list:
    """Every (case, mode, competitor) row; ``sink(rows)`` gets each (case, mode)'s rows as soon
    as they are measured (main appends them to the CSV, so an interrupted run keeps them)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    results = []
    comps = competitors(device)
    if args.impls:
        comps = [c for name in args.impls for c in comps if c[0] == name]  # in the order asked
    selected = [c for c in cases(args.batch, args.quick)
                if not args.cases or any(c[0].startswith(prefix) for prefix in args.cases)]
    for label, B, nh, H, W, d in selected:
        N = H * W
        case = f"{label} h{nh} d{d} {args.dtype or str(dtype).split('.')[-1]}"
        fwd_flops = 4.0 * B * nh * N * N * d
        for mode in args.modes:
            grad = mode != "fwd"
            flops = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
            for impl, fn, missing, be_name in comps:
                inputs = make_inputs(B, nh, H, W, d, dtype, device, grad)
                why = missing
                if why is None and be_name is not None:
                    why = _check_backend(be_name, inputs, grad)
                if why is not None:
                    results.append(run_case(BENCH, case, impl, mode, None, flops=flops, skip_reason=why))
                    continue
                timed, err = _timed(fn, inputs, mode)
                if timed is None:
                    results.append(run_case(BENCH, case, impl, mode, None, skip_reason=err))
                    continue
                extra = {}
                if impl != "flash-nobias":  # computes a different function by design
                    try:
                        extra["max_err"] = f"{_max_err(fn, inputs):.2e}"
                    except Exception as e:  # an accuracy probe that fails is reported, not fatal
                        extra["max_err"] = f"failed {type(e).__name__}"
                row = run_case(BENCH, case, impl, mode, timed, flops=flops, **extra)
                if be_name is not None and row.status == "ok":
                    tiles = _tiles(be_name, inputs, grad)
                    if tiles:
                        row.extra["tiles"] = tiles
                results.append(row)
                del inputs, timed
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
            group = [r for r in results if r.case == case and r.mode == mode]
            if sink is not None:
                sink(group)
            if not args.quiet:
                print(format_table(group, baseline="sdpa-bias"), flush=True)
    return results


def _timed(fn, inputs, mode):
    """The callable to time for ``mode``, or (None, reason) when the forward itself fails."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(*inputs)
        return call, None
    if mode == "fwd+bwd":
        dout = None

        def call():
            nonlocal dout
            out = fn(*inputs)
            if dout is None:
                dout = torch.randn_like(out)
            # allow_unused: the no-bias row never touches rel_h / rel_w
            return torch.autograd.grad(out, inputs, dout, allow_unused=True)
        return call, None
    # bwd: one forward outside the timed part, its graph kept for repeated backward passes
    try:
        out = fn(*inputs)
    except torch.cuda.OutOfMemoryError:
        return None, "out of memory in the forward"
    except Exception as e:
        return None, f"forward failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    dout = torch.randn_like(out)
    return (lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True, allow_unused=True)), None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="images per call")
    p.add_argument("--modes", nargs="+", default=list(MODES),
                   help="any of fwd bwd fwd+bwd, space- or comma-separated")
    p.add_argument("--impls", nargs="+", default=None, help="only these competitors, in this order")
    p.add_argument("--cases", nargs="+", default=None,
                   help="only cases whose label starts with one of these (e.g. global-4096 windows-196)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--out", default=None, help=f"CSV to append to (default bench/results/{BENCH}.csv)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.modes = [m for item in args.modes for m in item.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env, written = environment(), []

    def sink(rows):
        written.append(append_csv(rows, args.out, env))

    results = run(args, sink)
    if not results:
        print("no case matches --cases", file=sys.stderr)
        return 2
    path = written[-1]
    print(format_table(results, baseline="sdpa-bias"))
    print(f"appended {len(results)} rows to {path}")
    if not args.no_plot:
        png = plot_csv(path, metric="ms")
        if png:
            print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
