"""Shared plumbing of the fused distillation losses: Triton availability, path choice, checks.

Path choice, per call: the fused Triton kernels run on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for tests). Everything else runs the
plain-torch reference of the same op, and the first call that falls back for a given reason logs
it (never silently). Forcing a path: the ``backend=`` argument of each public function
(``"triton"`` or ``"reference"``), or the environment variable ``FASTSAMCLIP_LOSSES_BACKEND``
with the same values, read once at import.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional, Tuple

import torch

log = logging.getLogger("fastsamclip.kernels")

try:  # Triton is optional: without it every loss runs its plain-torch reference.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None
    HAS_TRITON = False

ENV_VAR = "FASTSAMCLIP_LOSSES_BACKEND"
BACKENDS = ("triton", "reference")
# Read once: triton itself decides interpreter-or-GPU when a kernel is decorated (import time),
# so reading the variable later could only disagree with it.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FORCED: Optional[str] = os.environ.get(ENV_VAR) or None
if _FORCED is not None and _FORCED not in BACKENDS:
    raise ValueError(f"{ENV_VAR}={_FORCED!r}: expected one of {BACKENDS}")

# The kernels accumulate in fp32; fp64 would lose precision there, so it takes the reference.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_logged: set = set()


def triton_refusals(device: torch.device, dtypes: Iterable[torch.dtype]) -> list:
    """Reasons the Triton path cannot take tensors on ``device`` with ``dtypes`` (empty: it can)."""
    why = []
    if not HAS_TRITON:
        why.append("triton is not installed")
    if device.type == "cpu" and not _INTERPRET:
        why.append("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    elif device.type not in ("cuda", "cpu"):
        why.append(f"device type {device.type!r} has no Triton backend here")
    bad = sorted({str(d) for d in dtypes if d not in TRITON_DTYPES})
    if bad:
        why.append(f"dtype {', '.join(bad)} (kernels take fp16/bf16/fp32)")
    return why


def choose_path(op: str, device: torch.device, dtypes: Tuple[torch.dtype, ...],
                backend: Optional[str]) -> str:
    """``"triton"`` or ``"reference"`` for one call; logs each distinct fallback once."""
    name = backend or _FORCED
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {name!r}; expected one of {BACKENDS}")
    why = triton_refusals(device, dtypes)
    if name == "triton":
        if why:
            raise RuntimeError(f"{op}: backend 'triton' was forced but cannot run this input: " + "; ".join(why))
        return "triton"
    if name == "reference":
        return "reference"
    if not why:
        return "triton"
    if not torch.compiler.is_compiling():
        key = (op, device.type, tuple(why))
        if key not in _logged:
            _logged.add(key)
            log.warning("%s: running the plain-torch reference because %s", op, "; ".join(why))
    return "reference"


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_reduction(op: str, reduction) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def reduce_rows(loss_rows: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """Per-row losses (R,) -> mean / sum scalar, or the leading shape for ``"none"``."""
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.reshape(lead_shape)
