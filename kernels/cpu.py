"""What the CPU computes natively: whether bf16 matrix products run in hardware here.

On a CPU with native bf16 (Intel AMX-BF16 or AVX512-BF16, Arm FEAT_BF16) oneDNN runs bf16
matrix products at twice the fp32 rate or more, so the image side of the model is faster in
bf16; on one without, bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

import platform
from typing import Optional

import torch


def _arm_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("Features") and " bf16" in f" {line.split(':', 1)[-1]} " for line in f)
    except OSError:
        return False


def native_bf16() -> Optional[str]:
    """The instruction set that runs bf16 matrix products natively on this CPU ("AMX-BF16",
    "AVX512-BF16", "Arm BF16"), or None when bf16 would be emulated."""
    cpu = getattr(torch, "cpu", None)
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "Arm BF16" if _arm_bf16() else None
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)() and \
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AMX-BF16"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None
