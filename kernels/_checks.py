"""Input checks the ops share: clear errors before any backend sees an input."""

from __future__ import annotations

import torch


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


def check_positive_int(name: str, value) -> int:
    if int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
