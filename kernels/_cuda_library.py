"""The CUDA C++ library (``csrc/*.cu`` built into ``lib/libfastsamclip_cuda.so``), via ctypes.

The library is torch-free (C functions taking raw pointers and a stream), so it does not depend
on torch's C++ ABI. It is loaded once, on first use, and probed once per process on a GPU
(``fsc_probe``: can its kernels run on this driver and GPU, without launching anything). What
went wrong (not built, dlopen error, missing symbol, a driver older than the library's CUDA
runtime, no kernel image for this GPU) is remembered and reported by :func:`unavailable`, which
the ``cuda`` backends of ``preprocess`` and ``postprocess_masks`` use as their ``is_available``,
so the dispatch runs their plain-torch backends and logs the reason once.

A launch that still fails in a way that means the library cannot run here (:data:`UNUSABLE`
errors, e.g. after a driver change) marks it unusable with that reason (:func:`check_rc` raises
:class:`LibraryUnusable`): the op computes that call with the next backend the dispatch picks,
which logs the fallback once, and every later call goes there directly.
"""

from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Sequence

import torch

LIBRARY_NAME = "libfastsamclip_cuda.so"
SYMBOLS = ("fsc_preprocess_u8", "fsc_postprocess_masks", "fsc_probe")

# cudaError_t values that mean "this library cannot run on this machine", not "a bad argument".
UNUSABLE = {
    3: "cudaErrorInitializationError",
    34: "cudaErrorStubLibrary (a stub libcuda, no real driver)",
    35: "cudaErrorInsufficientDriver (the driver is older than the library's CUDA runtime)",
    100: "cudaErrorNoDevice",
    200: "cudaErrorInvalidKernelImage",
    209: "cudaErrorNoKernelImageForDevice (no SASS for this GPU and no PTX its driver can JIT)",
    218: "cudaErrorInvalidPtx",
    221: "cudaErrorJitCompilerNotFound",
    222: "cudaErrorUnsupportedPtxVersion (the driver is older than the PTX)",
    803: "cudaErrorSystemDriverMismatch",
    804: "cudaErrorCompatNotSupportedOnDevice",
}

_LIB: Optional[ctypes.CDLL] = None
_LIB_ERROR: Optional[str] = None
_PROBED = False


class LibraryUnusable(RuntimeError):
    """A call of the library failed because it cannot run here (see :data:`UNUSABLE`)."""


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
    lib.fsc_probe.argtypes = [ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.fsc_probe.restype = i
    _LIB = lib
    return lib


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def probe(lib: ctypes.CDLL) -> Optional[str]:
    """Why ``lib``'s kernels cannot run on the current device (None: they can), from fsc_probe."""
    rt, drv = ctypes.c_int(0), ctypes.c_int(0)
    rc = int(lib.fsc_probe(ctypes.byref(rt), ctypes.byref(drv)))
    if rc == 0:
        return None
    what = UNUSABLE.get(rc, f"cudaError_t {rc}")
    return (f"the CUDA library cannot run here: {what}; it links CUDA runtime {_version(rt.value)}, the "
            f"driver supports CUDA {_version(drv.value)} (rebuild it with this machine's nvcc, or update "
            "the driver)")


def unavailable() -> Optional[str]:
    """Why the CUDA kernels cannot run here (None: they can). The probe runs once, on first use
    with a GPU visible."""
    global _LIB_ERROR, _PROBED
    lib = load()
    if lib is None:
        return _LIB_ERROR or "library not loaded"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if not _PROBED:
        _PROBED = True
        _LIB_ERROR = probe(lib)
    return _LIB_ERROR


def mark_unusable(reason: str) -> None:
    """From now on :func:`unavailable` says ``reason`` (the ``cuda`` backends stop being chosen)."""
    global _LIB_ERROR
    _LIB_ERROR = reason


def tensor_refusals(t: torch.Tensor) -> List[str]:
    """The kernels' one condition on an input: a CUDA tensor (the ``cuda`` backends' check)."""
    return [] if t.is_cuda else [f"input on {t.device} (the CUDA kernel takes CUDA tensors)"]


def require() -> ctypes.CDLL:
    """The loaded library, or a RuntimeError saying why it is missing or cannot run."""
    lib = load()
    if lib is None or _LIB_ERROR is not None:
        raise RuntimeError(f"fastsamclip CUDA library unavailable: {_LIB_ERROR}")
    return lib


def floats3(values: Sequence[float]):
    return (ctypes.c_float * 3)(*values)


def check_rc(rc: int, name: str) -> None:
    """Raise for a non-zero cudaError_t: :class:`LibraryUnusable` (after :func:`mark_unusable`)
    when it means the library cannot run here, else a RuntimeError (a bad argument is a bug)."""
    if rc == 0:
        return
    if rc in UNUSABLE:
        reason = f"{name} failed to launch: {UNUSABLE[rc]}"
        mark_unusable(reason)
        raise LibraryUnusable(reason)
    raise RuntimeError(f"{name} failed with cudaError_t {rc}" + (" (invalid argument)" if rc == 1 else ""))
