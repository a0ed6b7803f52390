"""Benchmark of the cosine distillation loss fused with the final projection: forward + backward.

    python -m fastsamclip.bench.bench_linear_cosine_distill           # bf16, the training shape, on a GPU
    python -m fastsamclip.bench.bench_linear_cosine_distill --dtype float32 --out /tmp/linear.csv
    python -m fastsamclip.bench.bench_linear_cosine_distill --quick   # tiny shapes; CPU + Triton interpreter

Competitors: ``fused`` (``linear_cosine_distill_loss``: chunked, the projection never whole),
``eager`` (its plain-torch reference, F.linear then the cosine) and ``compiled``
(``torch.compile`` of the reference; compiled in the warm-up, never timed). Case: dense features
(32, 4096, 768) through a 768 -> 1024 projection. Rows are appended to
``bench/results/linear_cosine_distill.csv`` (or ``--out``), printed with the speed-up over eager,
and plotted next to the CSV.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch

from .harness import LossCase, loss_bench_main, random_tensor, use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()  # before triton is first imported, by the kernels below

from fastsamclip.kernels import linear_cosine_distill_loss, linear_cosine_distill_loss_reference  # noqa: E402

BENCH = "linear_cosine_distill"


def make_cases(dtype: torch.dtype, device: str, quick: bool) -> List[LossCase]:
    lead_k, n_out = ((2, 64, 48), 40) if quick else ((32, 4096, 768), 1024)
    rows, k = torch.Size(lead_k[:-1]).numel(), lead_k[-1]

    def make():
        x = random_tensor(lead_k, dtype, device, requires_grad=True)
        w = random_tensor((n_out, k), dtype, device, scale=k**-0.5, requires_grad=True)
        b = random_tensor((n_out,), dtype, device, scale=0.1, requires_grad=True)
        t = random_tensor(lead_k[:-1] + (n_out,), dtype, device)
        return (x, w, b, t), (0, 1, 2)

    return [LossCase(f"linear-cosine {'x'.join(map(str, lead_k))}->{n_out}", make, linear_cosine_distill_loss,
                     linear_cosine_distill_loss_reference, 3 * 2 * rows * k * n_out, None)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return loss_bench_main(BENCH, __doc__.splitlines()[0], make_cases, argv)


if __name__ == "__main__":
    sys.exit(main())
