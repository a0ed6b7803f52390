"""Benchmark of the fused focal + dice mask loss: time and peak memory of forward + backward.

    python -m fastsamclip.bench.bench_focal_dice             # bf16, the training shape, on a GPU
    python -m fastsamclip.bench.bench_focal_dice --dtype float32 --out /tmp/focal_dice.csv
    python -m fastsamclip.bench.bench_focal_dice --quick     # tiny shapes; CPU + Triton interpreter

Competitors: ``fused`` (``focal_dice_loss``), ``eager`` (its plain-torch reference) and
``compiled`` (``torch.compile`` of the reference; compiled in the warm-up, never timed). Case:
SAM mask logits (32, 32, 256, 256) against teacher probabilities. Rows are appended to
``bench/results/focal_dice.csv`` (or ``--out``), printed with the speed-up over eager, and
plotted next to the CSV.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import torch

from .harness import LossCase, loss_bench_main, random_tensor, use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()  # before triton is first imported, by the kernels below

from fastsamclip.kernels import focal_dice_loss, focal_dice_loss_reference  # noqa: E402

BENCH = "focal_dice"


def make_cases(dtype: torch.dtype, device: str, quick: bool) -> List[LossCase]:
    el = torch.finfo(dtype).bits // 8
    masks = (2, 3, 32, 32) if quick else (32, 32, 256, 256)

    def make():
        logits = random_tensor(masks, dtype, device, scale=4.0, requires_grad=True)
        target = torch.rand(masks, device=device).to(dtype)  # teacher probabilities in (0, 1)
        return (logits, target), (0,)

    return [LossCase(f"focal-dice {'x'.join(map(str, masks))}", make, focal_dice_loss, focal_dice_loss_reference,
                     None, 5 * torch.Size(masks).numel() * el)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return loss_bench_main(BENCH, __doc__.splitlines()[0], make_cases, argv)


if __name__ == "__main__":
    sys.exit(main())
