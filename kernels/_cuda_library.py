"""The CUDA C++ library (``csrc/*.cu`` built into ``lib/libfastsamclip_cuda.so``), via ctypes.

The library is torch-free (C functions taking raw pointers and a stream), so it does not depend
on torch's C++ ABI. It is loaded once, on first use; what went wrong (not built, dlopen error,
missing symbol) is remembered and reported by :func:`unavailable`, which the ``cuda`` backends
of ``preprocess`` and ``postprocess_masks`` use as their ``is_available``.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence

import torch

LIBRARY_NAME = "libfastsamclip_cuda.so"
SYMBOLS = ("fsc_preprocess_u8", "fsc_postprocess_masks")

_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None


def library_path() -> str:
    """Where the library is looked for: ``lib/`` next to this module (CMake writes it there,
    for editable installs in the source tree)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", LIBRARY_NAME)


def load() -> Optional[ctypes.CDLL]:
    """The library with its argument types declared, or None (then :func:`unavailable` says why)."""
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    path = library_path()
    if not os.path.exists(path):
        _LIB_ERROR = (f"{path} is not built (needs nvcc and cmake at install time: "
                      "pip install -e ., or cmake -S . -B build/cmake && cmake --build build/cmake)")
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        _LIB_ERROR = f"cannot load {path}: {e}"
        return None
    missing = [s for s in SYMBOLS if not hasattr(lib, s)]
    if missing:
        _LIB_ERROR = f"{path} lacks {', '.join(missing)} (stale build? rebuild it)"
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fsc_preprocess_u8.argtypes = [p, i, i, i, p, i, i, i, p, p, p, i, p, p, p]
    lib.fsc_preprocess_u8.restype = i
    lib.fsc_postprocess_masks.argtypes = [p, i, i, i, i, i, i, i, i, i, f, p, p, p]
    lib.fsc_postprocess_masks.restype = i
    _LIB = lib
    return lib


def unavailable() -> Optional[str]:
    """Why the CUDA kernels cannot run here (None: they can)."""
    if load() is None:
        return _LIB_ERROR or "library not loaded"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def tensor_refusals(t: torch.Tensor) -> List[str]:
    """The kernels' one condition on an input: a CUDA tensor (the ``cuda`` backends' check)."""
    return [] if t.is_cuda else [f"input on {t.device} (the CUDA kernel takes CUDA tensors)"]


def require() -> ctypes.CDLL:
    """The loaded library, or a RuntimeError saying why it is missing."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"fastsamclip CUDA library unavailable: {_LIB_ERROR}")
    return lib


def floats3(values: Sequence[float]):
    return (ctypes.c_float * 3)(*values)


def check_rc(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{name} failed with cudaError_t {rc}"
                           + (" (invalid argument)" if rc == 1 else ""))
