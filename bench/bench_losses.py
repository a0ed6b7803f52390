"""Benchmark of the fused distillation losses: time and peak memory of forward + backward.

    python -m bench.bench_losses                  # bf16, the training shapes, on a GPU
    python -m bench.bench_losses --dtype float32 --out /tmp/losses.csv
    python -m bench.bench_losses --quick          # tiny shapes; CPU + Triton interpreter in seconds

Competitors per case: ``fused`` (the Triton ops of ``fastsamclip.kernels``), ``eager`` (their
plain-torch references) and ``compiled`` (``torch.compile`` of those references; compiled in the
warm-up, never timed). Cases: pooled CLIP features (2048, 768), dense features (32, 4096, 256),
dense features through the final projection (32, 4096, 768) -> 1024, and SAM mask logits
(32, 32, 256, 256). Each row also carries the loss's relative error against an fp32 reference
of the same inputs (quality beside speed). Rows are appended to ``bench/results/losses.csv`` (or
``--out``), printed with the speed-up over eager, and plotted next to the CSV.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels can only run in the Triton interpreter, which reads this variable
    # when triton is first imported, i.e. before fastsamclip.kernels below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastsamclip.kernels import (  # noqa: E402
    cosine_distill_loss,
    cosine_distill_loss_reference,
    focal_dice_loss,
    focal_dice_loss_reference,
    linear_cosine_distill_loss,
    linear_cosine_distill_loss_reference,
)

from .harness import RESULTS_DIR, Result, append_csv, format_table, plot_csv, run_case  # noqa: E402

BENCH = "losses"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Case:
    name: str
    make: Callable[[], tuple]  # -> (args, indices of the inputs that take a gradient)
    fused: Callable
    reference: Callable
    flops: Optional[float]  # fwd + bwd
    bytes_moved: Optional[float]  # fwd + bwd, the fused kernels' minimum traffic


def _rand(shape, dtype, device, scale=1.0, requires_grad=False):
    """Random normal values (never zeros: a zero tensor would time the kernels' easy paths)."""
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(requires_grad)


def make_cases(dtype: torch.dtype, device: str, quick: bool) -> List[Case]:
    el = torch.finfo(dtype).bits // 8
    pooled = (64, 96) if quick else (2048, 768)
    dense = (2, 64, 32) if quick else (32, 4096, 256)
    proj = ((2, 64, 48), 40) if quick else ((32, 4096, 768), 1024)
    masks = (2, 3, 32, 32) if quick else (32, 32, 256, 256)
    cases = []

    for label, shape in (("pooled", pooled), ("dense", dense)):
        n = torch.Size(shape).numel()

        def make(shape=shape):
            return (_rand(shape, dtype, device, requires_grad=True), _rand(shape, dtype, device)), (0,)

        cases.append(Case(f"cosine {label} {'x'.join(map(str, shape))}", make, cosine_distill_loss,
                          cosine_distill_loss_reference, None, 5 * n * el))  # fwd: s, t; bwd: s, t, ds

    (lead_k, n_out) = proj
    rows, k = torch.Size(lead_k[:-1]).numel(), lead_k[-1]

    def make_proj():
        x = _rand(lead_k, dtype, device, requires_grad=True)
        w = _rand((n_out, k), dtype, device, scale=k**-0.5, requires_grad=True)
        b = _rand((n_out,), dtype, device, scale=0.1, requires_grad=True)
        t = _rand(lead_k[:-1] + (n_out,), dtype, device)
        return (x, w, b, t), (0, 1, 2)

    cases.append(Case(f"linear-cosine {'x'.join(map(str, lead_k))}->{n_out}", make_proj, linear_cosine_distill_loss,
                      linear_cosine_distill_loss_reference, 3 * 2 * rows * k * n_out, None))

    def make_masks():
        logits = _rand(masks, dtype, device, scale=4.0, requires_grad=True)
        target = torch.rand(masks, device=device).to(dtype)  # teacher probabilities in (0, 1)
        return (logits, target), (0,)

    cases.append(Case(f"focal-dice {'x'.join(map(str, masks))}", make_masks, focal_dice_loss,
                      focal_dice_loss_reference, None, 5 * torch.Size(masks).numel() * el))
    return cases


def _fwd_bwd(fn: Callable, args: Sequence, grad_idx: Sequence[int]) -> Callable[[], object]:
    leaves = [args[i] for i in grad_idx]

    def step():
        return torch.autograd.grad(fn(*args), leaves)

    return step


def _rel_err(fn: Callable, args: Sequence, ref32: torch.Tensor) -> float:
    with torch.no_grad():
        out = fn(*args).float()
    return float((out - ref32).abs().item() / max(ref32.abs().item(), 1e-12))


def run(dtype: torch.dtype, quick: bool, compile_backend: str) -> List[Result]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for case in make_cases(dtype, device, quick):
        torch.manual_seed(0)
        args, grad_idx = case.make()
        ref32 = case.reference(*[a.detach().float() for a in args]).detach()
        # dynamic=False: pooled and dense share one reference function; without it the second shape
        # would recompile with symbolic sizes, while training runs one static shape per graph.
        compiled = torch.compile(case.reference, fullgraph=True, dynamic=False, backend=compile_backend)
        competitors = [("eager", case.reference), ("fused", case.fused), ("compiled", compiled)]
        for impl, fn in competitors:
            try:
                err = f"{_rel_err(fn, args, ref32):.2e}"
            except Exception as e:  # reported in the row by run_case's own failure below
                err = f"n/a ({type(e).__name__})"
            results.append(run_case(BENCH, f"{case.name} {str(dtype).replace('torch.', '')}", impl, "fwd+bwd",
                                    _fwd_bwd(fn, args, grad_idx), flops=case.flops, bytes_moved=case.bytes_moved,
                                    loss_rel_err_vs_fp32=err,
                                    **({"compile_backend": compile_backend} if impl == "compiled" else {})))
        del args
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                   help="input dtype (default bf16; on CPU use fp32/fp16: the interpreter's bf16 math is wrong)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run; seconds in the interpreter)")
    p.add_argument("--out", default=None, help=f"CSV to append to (default {RESULTS_DIR}/{BENCH}.csv)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the 'compiled' competitor (aot_eager: no codegen, fast warm-up)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.quick:
        print("no CUDA GPU: the full-size cases would take hours in the Triton interpreter; use --quick",
              file=sys.stderr)
        raise SystemExit(2)
    results = run(DTYPES[a.dtype], a.quick, a.compile_backend)
    path = append_csv(results, a.out)
    print(format_table(results, baseline="eager"))
    print(f"\nappended {len(results)} rows to {path}")
    if not a.no_plot:
        png = plot_csv(path)
        if png:
            print(f"plot: {png}")
    return results


if __name__ == "__main__":
    main()
