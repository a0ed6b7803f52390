"""Benchmark of the fused cosine distillation loss: time and peak memory of forward + backward.

    python -m fastsamclip.bench.bench_cosine_distill             # bf16, the training shapes, on a GPU
    python -m fastsamclip.bench.bench_cosine_distill --dtype float32 --out /tmp/cosine.csv
    python -m fastsamclip.bench.bench_cosine_distill --quick     # tiny shapes; CPU + Triton interpreter

Competitors per case: ``fused`` (``cosine_distill_loss``), ``eager`` (its plain-torch
reference) and ``compiled`` (``torch.compile`` of the reference; compiled in the warm-up, never
timed). Cases: pooled CLIP features (2048, 768) and dense features (32, 4096, 256). Rows are
appended to ``bench/results/cosine_distill.csv`` (or ``--out``), printed with the speed-up over
eager, and plotted next to the CSV.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch

from .harness import LossCase, loss_bench_main, random_tensor, use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()  # before triton is first imported, by the kernels below

from fastsamclip.kernels import cosine_distill_loss, cosine_distill_loss_reference  # noqa: E402

BENCH = "cosine_distill"


def make_cases(dtype: torch.dtype, device: str, quick: bool) -> List[LossCase]:
    el = torch.finfo(dtype).bits // 8
    pooled = (64, 96) if quick else (2048, 768)
    dense = (2, 64, 32) if quick else (32, 4096, 256)
    cases = []
    for label, shape in (("pooled", pooled), ("dense", dense)):
        n = torch.Size(shape).numel()

        def make(shape=shape):
            return (random_tensor(shape, dtype, device, requires_grad=True), random_tensor(shape, dtype, device)), (0,)

        cases.append(LossCase(f"cosine {label} {'x'.join(map(str, shape))}", make, cosine_distill_loss,
                              cosine_distill_loss_reference, None, 5 * n * el))  # fwd: s, t; bwd: s, t, ds
    return cases


def main(argv: Optional[Sequence[str]] = None) -> int:
    return loss_bench_main(BENCH, __doc__.splitlines()[0], make_cases, argv)


if __name__ == "__main__":
    sys.exit(main())
