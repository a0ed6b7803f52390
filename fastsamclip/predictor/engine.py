"""The merged model's forward pass for inference: eager, or compiled once per input shape.

``compile=True`` wraps the forward with ``torch.compile(fullgraph=True, dynamic=False)``, one
compiled function per (input shape, outputs asked for): static shapes, so each compiles once and
never recompiles. On CUDA the default mode is "reduce-overhead" (CUDA graphs: static shapes make
them safe; their outputs live in memory the next replay overwrites, so they are copied out).
``cache_dir``: a persistent Inductor cache, so a second process starts warm; Inductor reads its
location from ``TORCHINDUCTOR_CACHE_DIR`` when it compiles, so the variable is set for the duration
of each compiling call and restored after, never left changed in the process.

``dtype``: the precision of the image side (image encoder, neck and CLIP head), which holds nearly
all of the work: "auto" is bf16 on CUDA (tensor cores, the fused attention kernels' fast path)
and on a CPU that runs bf16 matrix products natively (AMX-BF16, AVX512-BF16, Arm BF16:
``fastsamclip.kernels.native_bf16``; 1.8x fp32's speed at 1024 px on a 2-core Xeon with AMX),
fp32 elsewhere; "fp32", "bf16", "fp16" force one. Inputs are cast to it and outputs come back
as fp32, so the prompt encoder, mask decoder and text tower (light, and SAM's prompt encoder
mixes float32 coordinates into its products) stay fp32 and the callers never see the dtype.

``clip_token_pool`` k > 1: the CLIP head runs on the trunk tokens pooled k x k (the cheap path
stage 3 trains; a fifth of the full head's work at 1024 px for k = 2); its per-patch map is
repeated back over the k x k patches of each cell, so every caller sees the patch grid.

Dynamo keeps the compiled graphs of one function (here: one code object for every shape, and
every predictor in the process) up to ``recompile_limit`` (8) and silently runs eagerly past it;
a ninth resolution would then never compile. The compiling call raises that limit for itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config

from fastsamclip.errors import InputError, NonFiniteOutputError
from fastsamclip.kernels import native_bf16

# Graphs one compiling call may add to the function's cache (see the module docstring).
RECOMPILE_LIMIT = 1024
# What each warm-up case runs: the outputs of set_image, embed_images and classify.
WARMUP_OUTPUTS = {"set_image": dict(clip=True, sam=True, clip_patches=True),
                  "embed": dict(clip=True, sam=True, clip_patches=False),
                  "clip": dict(clip=True, sam=False, clip_patches=False)}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device) -> torch.device:
    """The device to run on: ``None`` / "auto" -> CUDA when available, else the CPU; a device this
    machine does not have is a one-line ``InputError`` (not torch's traceback at the first copy)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"device {device!r} is not a device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                             "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def check_finite_outputs(what: str, out: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> None:
    """Outputs holding NaN or Infinity are an error, never an answer (weights that overflow, e.g.
    values near float32's 3.4e38, give finite-looking files and non-finite outputs)."""
    bad = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        hint = " or run in fp32 (--dtype fp32)" if dtype == torch.float16 else ""
        raise NonFiniteOutputError(f"the model's {what} ({', '.join(bad)}) holds NaN or Infinity: its weights "
                                   f"overflow; the checkpoint cannot give answers: train or merge it again{hint}")


def resolve_dtype(dtype, device) -> torch.dtype:
    """The image side's dtype: "auto" -> bf16 on CUDA and on a CPU with native bf16, fp32
    elsewhere; a name of ``DTYPES`` or a torch dtype among them -> that one."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and native_bf16() is not None)
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def image_side(model: torch.nn.Module):
    """The modules the forward pass runs (what ``dtype`` applies to)."""
    return [m for m in (getattr(model, "image_encoder", None), getattr(model, "clip_head", None)) if m is not None]


@contextlib.contextmanager
def _inductor_cache(cache_dir: Optional[str]) -> Iterator[None]:
    if cache_dir is None:
        yield
        return
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        with inductor_config.patch(fx_graph_cache=True):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


class Forward:
    """``model(x, clip=..., sam=..., clip_patches=...)`` on SAM-normalised (B, 3, H, W), run in
    ``dtype`` (the image side is cast to it here, in place), fp32 outputs."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compile: bool = False,
                 backend: str = "inductor", mode: Optional[str] = None, cache_dir: Optional[str] = None,
                 dtype="fp32", clip_token_pool: int = 1):
        if not isinstance(clip_token_pool, int) or clip_token_pool < 1:
            raise ValueError(f"clip_token_pool must be a positive integer (1: all tokens), got {clip_token_pool!r}")
        self.model, self.device = model, device
        self.clip_token_pool = clip_token_pool
        self.dtype = resolve_dtype(dtype, device)
        for m in image_side(model):
            m.to(self.dtype)
        self.compile, self.backend = compile, backend
        # CUDA graphs ("reduce-overhead") replay the whole static-shape graph with one launch.
        self.mode = mode or ("reduce-overhead" if device.type == "cuda" and backend == "inductor" else None)
        self.cache_dir = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            self.cache_dir = os.path.abspath(cache_dir)
        self._compiled: Dict[Tuple, Callable] = {}

    def __call__(self, x: torch.Tensor, clip: bool = True, sam: bool = True,
                 clip_patches: bool = False) -> Dict[str, torch.Tensor]:
        if not self.compile:
            out = self._run(self.model, self.dtype, self.clip_token_pool, x, clip, sam, clip_patches)
            check_finite_outputs("image pass", out, self.dtype)
            return out
        key = (tuple(x.shape), x.dtype, clip, sam, clip_patches)
        fn = self._compiled.get(key)
        if fn is None:
            model, dtype, pool, run_ = self.model, self.dtype, self.clip_token_pool, self._run

            def run(t):
                return run_(model, dtype, pool, t, clip, sam, clip_patches)

            kw = {"mode": self.mode} if self.mode else {}
            fn = torch.compile(run, fullgraph=True, dynamic=False, backend=self.backend, **kw)
            with _inductor_cache(self.cache_dir), dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = fn(x)  # the compiling call
            self._compiled[key] = fn
        else:
            out = fn(x)
        if self.mode == "reduce-overhead":
            out = {k: v.clone() for k, v in out.items()}
        check_finite_outputs("image pass", out, self.dtype)
        return out

    @staticmethod
    def _run(model, dtype, pool: int, x: torch.Tensor, clip: bool, sam: bool, clip_patches: bool):
        out = model(x.to(dtype), clip=clip, sam=sam, clip_patches=clip_patches, clip_token_pool=pool)
        out = {k: v.float() for k, v in out.items()}
        if pool > 1 and "clip_patches" in out:  # each pooled cell's embedding over its k x k patches
            gh, gw = x.shape[-2] // model.config.sam.backbone.patch_size, x.shape[-1] // model.config.sam.backbone.patch_size
            out["clip_patches"] = out["clip_patches"].repeat_interleave(pool, 1).repeat_interleave(pool, 2)[:, :gh, :gw]
        return out

    @torch.no_grad()
    def warmup(self, resolutions: Sequence[int], batch_sizes: Sequence[int], outputs: Sequence[str],
               patch_size: int, dtype: torch.dtype = torch.float32) -> Dict[str, float]:
        """Run (and, compiled, compile) every (resolution, batch, outputs) case; seconds per case.
        ``dtype``: of the warm-up inputs (the callers' pixels are fp32; the cast is inside)."""
        unknown = set(outputs) - set(WARMUP_OUTPUTS)
        if unknown:
            raise ValueError(f"warmup outputs must be among {sorted(WARMUP_OUTPUTS)}, got {sorted(unknown)}")
        times: Dict[str, float] = {}
        for res in resolutions:
            if res % patch_size:
                raise ValueError(f"warmup resolution {res} is not a multiple of {patch_size}")
            for b in batch_sizes:
                for name in outputs:
                    x = torch.randn(b, 3, res, res, device=self.device, dtype=dtype)
                    t0 = time.perf_counter()
                    self(x, **WARMUP_OUTPUTS[name])
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times[f"{name} {res}px batch {b}"] = time.perf_counter() - t0
        return times
