"""Triton for every Triton backend: one import guard, the interpreter switch, device checks.

Triton is optional: without it (or with an install that fails to import) ``triton`` and ``tl``
are None, the kernels are not defined, and each Triton backend's ``is_available`` says why.
"""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # ImportError, or a broken install failing in its own import
    triton = None
    tl = None
    IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

HAS_TRITON = triton is not None
# Read once at import, like Triton itself (its @jit decorator reads the variable at import), so
# the two can never disagree.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(interpret: bool = INTERPRET, import_error: Optional[str] = IMPORT_ERROR) -> Optional[str]:
    """Why no Triton kernel can run on this install (None: they can). The interpreter is the
    tests' switch, never a way to run: the reasons people read (``fastsamclip info``, ``-v``)
    do not offer it."""
    if import_error is not None:
        return import_error
    if not interpret and not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


# Fixed at import, like the interpreter switch: the Triton backends' ``is_available``.
UNAVAILABLE = unavailable()

# The kernels accumulate in fp32; fp64 would lose precision there, so it takes the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_refusals(device: torch.device, interpret: bool = INTERPRET) -> List[str]:
    """Why a Triton kernel cannot take tensors on ``device``: CUDA, or CPU in the interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and interpret):
        return []
    return [f"device {device.type} (Triton kernels run on CUDA GPUs)"]


def tensor_refusals(*tensors) -> List[str]:
    """Why a kernel that takes fp16/bf16/fp32 cannot take these tensors (non-tensors, e.g. a
    missing bias, are skipped): their device (one, checked by the op), then their dtypes."""
    device, bad = None, []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            device = device or t.device
            if t.dtype not in KERNEL_DTYPES and str(t.dtype) not in bad:
                bad.append(str(t.dtype))
    why = device_refusals(device)
    if bad:
        why.append(f"dtype {', '.join(sorted(bad))} (kernels take fp16/bf16/fp32)")
    return why


class Launch(NamedTuple):
    """One kernel launch as its host launcher makes it: ``fn[grid](*args, **meta, **options)``, or
    through the autotuner of space ``tuned`` (then ``options`` is empty). Built by the launchers
    for their launches and for the ahead-of-time builds (``aot.py``), so both see the same
    arguments."""

    kernel: str  # the name tables show, e.g. "attention fwd"
    fn: object  # the @triton.jit function
    args: tuple  # positional arguments in the kernel's order (tensors, ints, floats)
    meta: dict  # constexpr keyword arguments the launcher passes
    options: dict  # num_warps / num_stages (and constexprs) of a fixed-config launch
    tuned: Optional[str] = None  # the autotune space ("fwd", "dkdv", "dq") of an autotuned launch

    def run(self, grid) -> None:
        """Launch it on ``grid``."""
        self.fn[grid](*self.args, **self.meta, **self.options)
