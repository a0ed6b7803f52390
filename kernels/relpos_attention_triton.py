"""Fused Triton kernels for SAM's attention with decomposed relative-position bias.

Plain-torch equivalent (``relpos_attention.relpos_attention_reference``)::

    S = q @ k^T * scale + rel_h[..., :, kh(n)] + rel_w[..., :, kw(n)]   # (B, heads, N, N)
    out = softmax(S, -1) @ v

computed flash-attention style: the scores exist only as register tiles, the forward saves the
per-row log-sum-exp (base 2) and the backward recomputes the probabilities from it. No tensor of
size N x N is ever allocated, forward or backward. (One op's kernels, configs, launchers and
registration in one file, in that order: over 600 lines, read top to bottom.)

How the bias is added. Key tiles are whole rows of the key grid: a tile holds ``BH`` grid rows of
``W_PAD = next_pow2(max(W, 16))`` columns, so key ``j`` of a tile sits at
``(kh0 + j // W_PAD, j % W_PAD)`` and is masked when the row is past ``H`` or the column past
``W`` (columns through a -inf in the loop-invariant rel_w tile, rows by a select in the one
tile that has rows past ``H``). Then

* ``rel_w[q, kw(j)]`` depends on the query block only: it is loaded once per program, before
  the key loop (``BH == 1``: the ``(BLOCK_M, W_PAD)`` tile itself; ``BH > 1``: the same tile
  repeated, through a pointer pattern ``j % W_PAD`` that the compiler vectorises).
* ``rel_h[q, kh0 + j // W_PAD]`` changes per key tile: with ``BH == 1`` (e.g. a 64 x 64 grid with
  64-key tiles) it is one column broadcast along the tile; with ``BH > 1`` (e.g. 14 x 14 windows,
  four 16-wide rows per 64-key tile) it is ``rel_h_tile (BLOCK_M, 16) @ onehot (16, BLOCK_N)``,
  a K = 16 tensor-core product that is exact (one non-zero term per output; for fp32 inputs on
  TF32 it runs as 3xTF32, which keeps the fp32 bias). The rel_h tile of the NEXT key tile is
  loaded at the top of each iteration and consumed by the next one: its latency overlaps a whole
  iteration of MMA and softmax (its rows are 2-byte aligned at H = 14, so cp.async, which K and V
  ride, cannot carry it).
* Backward: ``d rel_h[q, kh] = sum_kw dS`` and ``d rel_w[q, kw] = sum_kh dS`` are row/column
  sums of the fp32 ``dS`` tile in the dq kernel (a reshape to ``(BLOCK_M, BH, W_PAD)`` and two
  ``tl.sum``), exact in fp32, rounded once to the input dtype and written by the one program that
  owns those query rows: no atomics, deterministic, no cast kernels after.

Head dims. A head dim that is not a power of two runs as two power-of-two parts ``D0 + D1``
(``head_split``: 80 = 64 + 16, ViT-H): every product over the head dim is two tl.dot calls and
every (rows, d) tile two tiles, so d = 80 does 80/80 of the MMA work instead of 128/80 with a
padded 128. Sizes the split does not help (e.g. 112) are padded to the next power of two.

Caveats
-------
* Grid width ``W`` at most 128 (one key tile spans at least one whole grid row); wider grids are
  refused by the backend's ``check`` with that reason and go to the next backend.
* ``W`` that is not a power of two wastes the padded columns (W = 14 -> 16: 12.5%).
* fp32 inputs follow torch's fp32 matmul precision: TF32 tensor cores when torch allows TF32
  (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, e.g. after
  ``torch.set_float32_matmul_precision("high")``), otherwise exact IEEE fp32 dots, which are
  FMA loops on every GPU (no tensor-core path keeps fp32): a check dtype, many times slower.
  ``fastsamclip info`` and the backend's ``notes`` say which one a call gets.
* Compiled ahead of time for sm_90a and sm_80 (``fastsamclip.kernels.aot``, run in CI: every
  config of the autotune spaces below at SAM's shapes, fp16 and bf16): no spills, shared memory
  under each GPU's limit, wgmma on sm_90a, no synchronous load in the key loops. fp32 (not in
  CI's matrix; ``fastsamclip info --kernels --dtypes fp32,fp32-ieee``): clean at d = 64 but for
  the dq kernel's V tile, which TF32 cannot take by cp.async; at d = 80 some fp32 kernels spill
  in every config tried (the spaces below say which). Run times are a GPU's to measure.
* Autotuning is keyed by (N, heads, H, W, head dim, batch rounded to a power of two, fp32 product
  precision, dtypes) and kept on disk in Triton's cache (``cache_results``): a second process with
  the same cache tunes nothing. The pruner compiles each candidate of the GPU's space and drops
  those that do not fit or do not compile, with a warning; when none is left it raises with every
  reason (never a silent fallback tile). The tiles chosen show in the backend's ``notes``.
* Double backward is not supported (the backward op has no autograd formula).
* On CPU it runs only under ``TRITON_INTERPRET=1`` (~1000x slower than sdpa; for tests), and
  the chooser never picks it there (``auto_check``): force it with ``backend="triton"`` or
  ``use_backend("triton")``. In the Triton interpreter bf16 arithmetic is wrong, so bf16 is
  verified on a GPU only.
* Multi-GPU: launches switch to the inputs' device; no other device handling.
* Backward runs two kernels (dk/dv over query blocks; dq + d rel_h + d rel_w over key tiles)
  after a small ``delta = rowsum(dO * O)`` kernel, recomputing ``Q K^T`` twice, as the
  deterministic flash-attention 2 backward does (7 N^2 d products where a backward with atomic
  dq needs 5).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._triton import INTERPRET, UNAVAILABLE, Launch, device_refusals, tl, triton
from .dispatch import Backend, log

__all__ = ["relpos_attention_triton", "BACKEND", "head_split", "fp32_uses_tf32", "config_space", "config_label",
           "chosen_configs", "aot_launches", "TILES_NOTE"]

MAX_W = 128  # widest key-grid row a tile can hold (W_PAD <= 128)
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E_PY = 1.4426950408889634


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _w_pad(W: int) -> int:
    # tl.dot needs K >= 16, and the BH > 1 one-hot product has K = 16 rows.
    return max(16, _next_pow2(W))


def _d_pad(d: int) -> int:
    """The padded head dim of the (element-wise) delta kernel."""
    return max(16, _next_pow2(d))


def head_split(d: int) -> Tuple[int, int]:
    """(D0, D1): the head dim as two power-of-two parts, D1 = 0 when one suffices. 80 -> (64, 16),
    96 -> (64, 32), 64 -> (64, 0); a split no smaller than the next power of two is not taken
    (112 -> (128, 0)). Lanes past d are masked."""
    p = max(16, _next_pow2(d))
    if d >= p or p == 16:
        return p, 0
    lo = p // 2
    d1 = max(16, _next_pow2(d - lo))
    return (p, 0) if lo + d1 >= p else (lo, d1)


# --------------------------------------------------------------------------------------------
# Precision of fp32 inputs
# --------------------------------------------------------------------------------------------
def fp32_uses_tf32() -> bool:
    """Whether torch currently allows TF32 for fp32 matmuls (the kernels follow it).

    torch >= 2.9 keeps the setting in ``torch.backends.cuda.matmul.fp32_precision`` ("tf32",
    "ieee", or "none": inherit ``torch.backends.fp32_precision``); it is what
    ``torch.set_float32_matmul_precision`` and the legacy ``allow_tf32`` flag write. Reading the
    legacy flag raises there once both APIs were used, and ``get_float32_matmul_precision()``
    does not see the new one, so the new attribute is read first."""
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec is not None:
        if prec == "none":
            prec = getattr(torch.backends, "fp32_precision", "ieee")
        return prec == "tf32"
    return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: it applies to fp32 operands only ("tf32" for fp16/bf16 is inert)."""
    if dtype == torch.float32 and not fp32_uses_tf32():
        return "ieee"
    return "tf32"


def _bias_precision(dot_prec: str) -> str:
    # The one-hot bias product must not round rel_h: 3xTF32 keeps fp32 inputs to ~fp32.
    return "tf32x3" if dot_prec == "tf32" else dot_prec


def fp32_note() -> str:
    """How fp32 inputs run now, for ``fastsamclip info`` and the backend's notes."""
    if fp32_uses_tf32():
        return ("fp32 on TF32 tensor cores (torch allows TF32 for fp32 matmuls; the bias products "
                "stay fp32 through 3xTF32)")
    return ("fp32 with exact IEEE dots on FMA units (torch disallows TF32: "
            "torch.set_float32_matmul_precision('high') moves fp32 to tensor cores)")


# --------------------------------------------------------------------------------------------
# Autotune spaces, per kernel, GPU family and dtype class, pruned on the device
# --------------------------------------------------------------------------------------------
# A config names a key-tile size target BLOCK_N (queries for dkdv: BLOCK_M is then the query
# block streamed past a key tile); the pruner turns BLOCK_N into BH = BLOCK_N // W_PAD grid rows
# per tile (at least 1), drops duplicates, keeps the configs of the device's family and dtype
# class, and drops those whose compiled kernel needs more shared memory than the device has
# (Triton's own figure, read from the compiled kernel: no formula to drift from it).
#
# Every entry was compiled for its target (sm_90a: H100/H200; sm_80: A100) at SAM's shapes
# (14 x 14 windows, 28 x 28 and 64 x 64 grids; d = 64, and d = 80 for the "wide" spaces; fp16 and
# bf16) by ``fastsamclip.kernels.aot``. CI fails if any entry spills or outgrows the target's
# shared memory. Figures quoted: ptxas registers (Triton 3.8, fp16; 3.6 within a few), over the
# shapes, and the configs they rule out.
#   (BLOCK_M, BLOCK_N target, warps, stages)
_SM90_16BIT = {
    # 64 x 32-64 keys on 4 warps: 116-205 registers; 128 x 64 needs 8 warps (154-218; on 4 warps
    # 255 and 540-596 B of spill); every 128-key tile spills (36-140 B at 4 warps, 72-96 B at 8).
    "fwd": [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
    # 32 queries x 64 keys on 4 warps: 168-251; 128 keys need 8 warps (172-235; 4 warps: 255 and
    # 60-448 B of spill); 64 x 64 on 8 warps 178-255 (on 4 warps, 3 stages: 40 B spill at d 80).
    # Two stages only in the backward: every candidate costs a compile and a timing per shape on
    # first use, and the 3-stage variants compiled as clean (207-255) but are unmeasured.
    "dkdv": [(32, 64, 4, 2), (32, 128, 8, 2), (64, 64, 8, 2)],
    # 164-255 registers, no spill anywhere (at d 80 on the 64 x 64 grid every config sits at 255).
    "dq": [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
}
_SM80_16BIT = {
    # mma.sync keeps the operands in registers: 64-row tiles on 4 warps (168-255), 128 x 64 on 8
    # (194-255); 128 x 64 on 4 warps spills 228-562 B (d 80: 32 registers and 9 KB of spill).
    "fwd": [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
    # 32-query blocks on 4 warps spill 8-100 B on the 64 x 64 grid, on 8 warps 8-12 B at 28 x 28
    # (Triton 3.6 too), and 64-query blocks 1.2-7 KB (ptxas falling to 32 registers); 16 queries
    # do not (244-255 registers).
    "dkdv": [(16, 64, 4, 2), (16, 64, 8, 2)],
    # 32-row query blocks (128-225); 64 rows spill 44-368 B, and 128 rows on 8 warps 48-360 B.
    "dq": [(16, 32, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2)],
}
_SM80_16BIT_WIDE = {
    "fwd": _SM80_16BIT["fwd"],
    # d 80: every 32-query config spills (188-412 B); 16 queries on 4 warps do not (255).
    "dkdv": [(16, 64, 4, 2)],
    # d 80 on the 64 x 64 grid: every 4- and 8-warp dq config spills (20-52 B); 2 warps do not.
    "dq": [(16, 32, 2, 2)],
}
# fp32 inputs (a check dtype: the model runs bf16 on GPUs): 4-byte operands double the shared
# memory and the registers of every tile, and TF32 wgmma needs both operands K-major, so the
# dq kernel's V tile is loaded to registers, not by cp.async (1-2 such loads per iteration).
_SM90_TF32 = {
    # 140-255 registers at every shape, d 80 included.
    "fwd": [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
    # 16 queries on 8 warps: 158-242; 32 queries spill 16-24 B, 4 warps 20-56 B at d 80.
    "dkdv": [(16, 64, 8, 2)],
    # 203-255 at d 64.
    "dq": [(64, 32, 8, 2), (64, 64, 8, 2)],
}
_SM90_TF32_WIDE = dict(_SM90_TF32, dq=[(64, 32, 8, 2)])  # d 80, 64 x 64 grid: 84 B of spill, the least of 10 tried
_SM80_TF32 = {
    "fwd": [(64, 32, 4, 2), (64, 32, 8, 2)],  # 145-255 at d 64; 64 x 64 keys on 8 warps spill at d 80
    "dkdv": [(16, 32, 4, 2)],  # 158-241 at d 64
    "dq": [(32, 32, 8, 2), (16, 32, 4, 2)],  # 136-255 at d 64
}
# d 80 on sm_80 in fp32: every config tried spills somewhere (fwd 28 B, dk/dv 44 B, dq 360 B are
# the least); these are the least-spilling ones.
_SM80_TF32_WIDE = {"fwd": [(64, 32, 8, 2)], "dkdv": [(16, 64, 8, 2)], "dq": [(16, 32, 4, 2)]}
# Exact fp32: FMA products, small tiles (69-204 registers on both families).
_IEEE = {"fwd": [(32, 32, 8, 2)], "dkdv": [(16, 64, 4, 2)], "dq": [(16, 32, 4, 2)]}
SPACES: Dict[Tuple[str, str, str], List[Tuple[int, int, int, int]]] = {}
for _fam, _classes in {"sm90": {"16bit": _SM90_16BIT, "16bit-wide": _SM90_16BIT, "tf32": _SM90_TF32,
                                "tf32-wide": _SM90_TF32_WIDE, "ieee": _IEEE, "ieee-wide": _IEEE},
                       "sm80": {"16bit": _SM80_16BIT, "16bit-wide": _SM80_16BIT_WIDE, "tf32": _SM80_TF32,
                                "tf32-wide": _SM80_TF32_WIDE, "ieee": _IEEE, "ieee-wide": _IEEE}}.items():
    for _cls, _table in _classes.items():
        for _kind, _space in _table.items():
            SPACES[(_kind, _fam, _cls)] = _space
# The interpreter runs one small config: each autotune candidate would be a full Python-level run.
INTERPRET_CONFIG = (64, 64, 4, 1)
FAMILIES = ("sm90", "sm80")
DTYPE_CLASSES = ("16bit", "16bit-wide", "tf32", "tf32-wide", "ieee", "ieee-wide")
KINDS = ("fwd", "dkdv", "dq")


def family_of(capability: Tuple[int, int]) -> str:
    """The autotune space a GPU gets: Hopper and newer "sm90" (wgmma, 227 KB shared memory), the
    rest "sm80" (mma.sync; A100's 163 KB, smaller GPUs pruned by the compiled figure)."""
    return "sm90" if capability[0] >= 9 else "sm80"


def dtype_class(dtype: torch.dtype, dot_prec: str, d0: int = 64, d1: int = 0) -> str:
    """The space of these inputs: by dtype (fp16/bf16, fp32 on TF32, exact fp32), "-wide" when
    the head dim runs wider than 64 (d = 80: 64 + 16)."""
    cls = "16bit" if dtype in (torch.float16, torch.bfloat16) else ("tf32" if dot_prec == "tf32" else "ieee")
    return cls + ("-wide" if d0 + d1 > 64 else "")


def config_space(kind: str, family: str, dclass: str) -> List[Tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N target, warps, stages) candidates of ``kind`` on ``family`` for
    ``dclass`` inputs."""
    if kind not in KINDS or family not in FAMILIES or dclass not in DTYPE_CLASSES:
        raise ValueError(f"no autotune space for {(kind, family, dclass)}")
    return SPACES[(kind, family, dclass)]


def grid_rows(block_n: int, w_pad: int) -> int:
    """BH: whole grid rows per key tile for a BLOCK_N target (at least one row)."""
    return max(1, block_n // w_pad)


def _autotune_configs(kind: str, interpret: bool = INTERPRET) -> list:
    """The union over families and dtype classes (what ``triton.autotune`` holds; the pruner keeps
    the device's share); in the interpreter its one config."""
    if interpret:
        bm, bn, w, s = INTERPRET_CONFIG
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]
    seen = {}
    for (k, _, _), space in SPACES.items():
        if k == kind:
            for c in space:
                seen.setdefault(c, None)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in seen]


def config_label(cfg) -> str:
    """A tile config as tables show it: ``64x4r/w4/s2`` = 64 queries, 4 grid rows of keys, 4 warps,
    2 stages (``cfg``: a triton.Config with BLOCK_M / BH, or a dict with those and num_warps / num_stages)."""
    kw = dict(cfg) if isinstance(cfg, dict) else dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return f"{kw['BLOCK_M']}x{kw['BH']}r/w{kw['num_warps']}/s{kw['num_stages']}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def select_configs(kind: str, configs: Sequence, family: Optional[str], dclass: Optional[str], w_pad: int,
                   smem_limit: Optional[int] = None,
                   shared_of: Optional[Callable[[object], int]] = None) -> list:
    """The pruner's rule, without a device: of ``configs`` (triton.Config with BLOCK_M / BLOCK_N
    targets) keep those in ``config_space(kind, family, dclass)`` (all of them when family is
    None: the interpreter), as BLOCK_M / BH configs, duplicates dropped; with ``smem_limit``,
    drop those whose ``shared_of(config)`` (bytes of the compiled kernel; raising: it does not
    compile) exceeds it. When nothing is left it raises, naming every candidate and why it went:
    a silent fallback to some other tile would hide a broken build behind a slow kernel."""
    space = set(config_space(kind, family, dclass)) if family is not None else None
    out, seen, dropped = [], set(), []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if space is not None and (bm, bn, c.num_warps, c.num_stages) not in space:
            continue
        bh = grid_rows(bn, w_pad)
        key = (bm, bh, c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen.add(key)
        cfg = triton.Config({"BLOCK_M": bm, "BH": bh}, num_warps=c.num_warps, num_stages=c.num_stages)
        if smem_limit is not None and shared_of is not None:
            try:
                need = shared_of(cfg)
            except Exception as e:  # the config does not compile here: dropped, with the reason
                dropped.append(f"{config_label(cfg)} does not compile ({_first_line(e)})")
                continue
            if need > smem_limit:
                dropped.append(f"{config_label(cfg)} needs {need} B of shared memory, the device has {smem_limit} B")
                continue
        out.append(cfg)
    if not out:
        where = f"{family} {dclass}" if family is not None else "the interpreter"
        why = "; ".join(dropped) or f"none of the {len(configs)} candidates is in the {where} space"
        raise RuntimeError(f"relpos_attention {kind}: no tile config is left for this device ({where}, "
                           f"key-grid rows padded to {w_pad}): {why}")
    return out


def _device_limits(device: torch.device) -> Tuple[Tuple[int, int], int]:
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block
    return (props.major, props.minor), int(smem)


_DROPPED: set = set()


def _make_pruner(kind: str, fn):
    """``early_config_prune`` of ``kind``'s autotuner; ``fn`` is its @triton.jit kernel.

    Triton's ``Autotuner.run`` calls it as ``early_config_prune(configs, named_args, **kwargs)``
    with its own launch keywords among the kwargs (``grid`` and ``warmup`` in Triton 3.6 and 3.8,
    which ``JITFunction.warmup`` sets itself): only the kernel's own parameters are passed on."""
    params = frozenset(fn.arg_names)

    def prune(configs, named_args, **kwargs):
        meta = {k: v for k, v in kwargs.items() if k in params}
        w_pad = int(meta["W_PAD"])
        if INTERPRET:
            return select_configs(kind, configs, None, None, w_pad)
        q = named_args["Q"]
        capability, smem = _device_limits(q.device)

        def shared_of(cfg):
            # Compiles the config (Triton caches it, so the autotuner's own launch reuses it) and
            # reads the shared memory Triton allocated; a config that fails to compile is dropped
            # (select_configs keeps the reason), and said once.
            try:
                return fn.warmup(*named_args.values(), grid=(1,), **meta, **cfg.all_kwargs()).metadata.shared
            except Exception as e:
                key = (kind, str(cfg), type(e).__name__)
                if key not in _DROPPED:
                    _DROPPED.add(key)
                    log.warning("relpos_attention %s: config %s does not compile here, dropped (%s)", kind,
                                config_label(cfg), _first_line(e))
                raise

        dclass = dtype_class(q.dtype, meta["DOT_PREC"], int(meta["D0"]), int(meta["D1"]))
        return select_configs(kind, configs, family_of(capability), dclass, w_pad, smem, shared_of)

    return prune


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _load_head(rows, row_mask, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        """The (R, D0) and (R, D1) parts of R rows of a head-dim tensor; ``rows``: (R,) pointers to
        each row's element 0. The second part is the first again when D1 == 0 (unused then)."""
        c0 = tl.arange(0, D0)
        x0 = tl.load(rows[:, None] + c0[None, :], mask=row_mask[:, None] & (c0 < HEAD_DIM)[None, :], other=0.0)
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            x1 = tl.load(rows[:, None] + c1[None, :], mask=row_mask[:, None] & (c1 < HEAD_DIM)[None, :], other=0.0)
        else:
            x1 = x0
        return x0, x1

    @triton.jit
    def _store_head(rows, row_mask, x0, x1, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
        c0 = tl.arange(0, D0)
        tl.store(rows[:, None] + c0[None, :], x0, mask=row_mask[:, None] & (c0 < HEAD_DIM)[None, :])
        if D1 > 0:
            c1 = D0 + tl.arange(0, D1)
            tl.store(rows[:, None] + c1[None, :], x1, mask=row_mask[:, None] & (c1 < HEAD_DIM)[None, :])

    @triton.jit
    def _row_bias_load(RH_rows, m_mask, kh0, H, BH: tl.constexpr):
        """rel_h of grid rows kh0 .. kh0 + BH - 1 for the query block (``RH_rows``: (BLOCK_M,)
        pointers to rel_h[m, 0]): (BLOCK_M,) when BH == 1, else (BLOCK_M, 16) with 0 past BH or H."""
        if BH == 1:
            rh = tl.load(RH_rows + kh0, mask=m_mask & (kh0 < H), other=0.0)
        else:
            r = tl.arange(0, 16)
            rh = tl.load(RH_rows[:, None] + kh0 + r[None, :],
                         mask=m_mask[:, None] & (r[None, :] < BH) & (kh0 + r[None, :] < H), other=0.0)
        return rh

    @triton.jit
    def _row_bias(rh, BLOCK_M: tl.constexpr, BH: tl.constexpr, W_PAD: tl.constexpr, BIAS_PREC: tl.constexpr):
        """The per-tile part of the bias, (BLOCK_M, BH * W_PAD) fp32: rel_h[m, kh0 + j // W_PAD]."""
        BLOCK_N: tl.constexpr = BH * W_PAD
        if BH == 1:
            out = tl.broadcast_to(rh.to(tl.float32)[:, None], (BLOCK_M, BLOCK_N))
        else:
            r = tl.arange(0, 16)
            jr = tl.arange(0, BLOCK_N) // W_PAD
            onehot = (r[:, None] == jr[None, :]).to(rh.dtype)  # (16, BLOCK_N): one term per output
            out = tl.dot(rh, onehot, input_precision=BIAS_PREC)
        return out

    @triton.jit
    def _query_block(N, NH, BLOCK_M: tl.constexpr):
        """This program's (batch * head, batch, head, query offsets, their mask). One flat grid
        axis (no 65535 limit for B * 25 windows * heads); adjacent programs share a (batch,
        head) so its K/V stay in L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(N, BLOCK_M)
        # int64: b * stride overflows int32 once a tensor passes 2**31 elements (B * heads >= 8192 at N = 4096, d = 64).
        bh = (pid // num_m).to(tl.int64)
        offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        return bh, bh // NH, bh % NH, offs_m, offs_m < N

    @triton.jit
    def _width_bias(RW_rows, m_mask, jc, W):
        """rel_w[m, kw(j)] in log2 units, the same for every key tile, so loaded once per query
        block; padded grid columns (kw >= W) get -inf here, once, through this loop-invariant
        bias, so the loops spend a select per score only in the one tile holding rows past H."""
        LOG2E: tl.constexpr = 1.4426950408889634
        bias_w = tl.load(RW_rows[:, None] + jc[None, :], mask=m_mask[:, None] & (jc[None, :] < W),
                         other=0.0).to(tl.float32) * LOG2E
        return tl.where(jc[None, :] < W, bias_w, float("-inf"))

    @triton.jit
    def _score_tile(q0, q1, K_base, V_base, skn, svn, rh, bias_w, jr, jc, kh0, H, W, qk_scale,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_M: tl.constexpr,
                    BH: tl.constexpr, W_PAD: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_PREC: tl.constexpr):
        """Key tile of grid rows kh0 .. kh0 + BH - 1 (``rh``: their rel_h, from _row_bias_load):
        (scores in log2 units with the whole bias, -inf on padded keys; its K and V, two parts each)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        kh = kh0 + jr
        k_valid = (kh < H) & (jc < W)
        n_idx = kh * W + jc
        k0, k1 = _load_head(K_base + n_idx * skn, k_valid, HEAD_DIM, D0, D1)
        v0, v1 = _load_head(V_base + n_idx * svn, k_valid, HEAD_DIM, D0, D1)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if D1 > 0:
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        s = s * qk_scale + bias_w + _row_bias(rh, BLOCK_M, BH, W_PAD, BIAS_PREC) * LOG2E
        if BH > 1:
            if kh0 + BH > H:
                s = tl.where((kh < H)[None, :], s, float("-inf"))
        return s, k0, k1, v0, v1

    @triton.jit(do_not_specialize=["TUNE_BATCH"])
    def _fwd_kernel(Q, K, V, RH, RW, O, LSE,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    srhb, srhh, srhn, srwb, srwh, srwn, sob, soh, son,
                    NH, N, H, W, qk_scale, TUNE_BATCH,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, W_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_PREC: tl.constexpr):
        """One program per (batch, head, query block); streams the key tiles. TUNE_BATCH: the
        autotune key's batch bucket, not read."""
        BLOCK_N: tl.constexpr = BH * W_PAD
        bh, b, h, offs_m, m_mask = _query_block(N, NH, BLOCK_M)
        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD
        q0, q1 = _load_head(Q + b * sqb + h * sqh + offs_m * sqn, m_mask, HEAD_DIM, D0, D1)
        RH_rows = RH + b * srhb + h * srhh + offs_m * srhn
        RW_rows = RW + b * srwb + h * srwh + offs_m * srwn
        bias_w = _width_bias(RW_rows, m_mask, jc, W)

        K_base = K + b * skb + h * skh
        V_base = V + b * svb + h * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
        if D1 > 0:
            acc1 = tl.zeros((BLOCK_M, D1), tl.float32)
        rh = _row_bias_load(RH_rows, m_mask, 0, H, BH)
        for t in range(0, tl.cdiv(H, BH)):
            kh0 = t * BH
            # The next tile's rel_h, issued now and consumed next iteration (0 past the last row).
            rh_next = _row_bias_load(RH_rows, m_mask, kh0 + BH, H, BH)
            s, k0, k1, v0, v1 = _score_tile(q0, q1, K_base, V_base, skn, svn, rh, bias_w, jr, jc, kh0, H, W,
                                            qk_scale, HEAD_DIM, D0, D1, BLOCK_M, BH, W_PAD, DOT_PREC, BIAS_PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pv = p.to(v0.dtype)
            acc0 = tl.dot(pv, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
            if D1 > 0:
                acc1 = tl.dot(pv, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
            rh = rh_next
        # Every query row sees key (0, 0) in the first tile, so l_i > 0 and m_i is finite.
        o_rows = O + b * sob + h * soh + offs_m * son
        o0 = (acc0 / l_i[:, None]).to(O.dtype.element_ty)
        if D1 > 0:
            o1 = (acc1 / l_i[:, None]).to(O.dtype.element_ty)
        else:
            o1 = o0
        _store_head(o_rows, m_mask, o0, o1, HEAD_DIM, D0, D1)
        tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=m_mask)

    @triton.jit
    def _bwd_delta_kernel(O, DO, DELTA, sob, soh, son, sdob, sdoh, sdon, NH, N,
                          HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        """delta[b, h, m] = sum_d dO * O in fp32 (the softmax-backward row term)."""
        bh, b, h, offs_m, m_mask = _query_block(N, NH, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :], mask=mask, other=0.0)
        tl.store(DELTA + bh * N + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_mask)

    @triton.jit(do_not_specialize=["TUNE_BATCH"])
    def _bwd_dkdv_kernel(Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                         srhb, srhh, srhn, srwb, srwh, srwn, sdob, sdoh, sdon,
                         sdkb, sdkh, sdkn,
                         NH, N, H, W, qk_scale, sm_scale, TUNE_BATCH,
                         HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, W_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr,
                         BIAS_PREC: tl.constexpr):
        """One program per (batch, head, key tile); streams every query block past it.
        Works on transposed scores sT (BLOCK_N, BLOCK_M) so dk/dv accumulate per key row."""
        LOG2E: tl.constexpr = 1.4426950408889634
        BLOCK_N: tl.constexpr = BH * W_PAD
        pid = tl.program_id(0)
        num_t = tl.cdiv(H, BH)
        # int64: b * stride overflows int32 once a tensor passes 2**31 elements (B * heads >= 8192 at N = 4096, d = 64).
        bh = (pid // num_t).to(tl.int64)
        t = pid % num_t
        b = bh // NH
        h = bh % NH

        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD
        kh0 = t * BH
        kh = kh0 + jr
        k_valid = (kh < H) & (jc < W)
        n_idx = kh * W + jc
        k0, k1 = _load_head(K + b * skb + h * skh + n_idx * skn, k_valid, HEAD_DIM, D0, D1)
        v0, v1 = _load_head(V + b * svb + h * svh + n_idx * svn, k_valid, HEAD_DIM, D0, D1)
        if BH > 1:
            # one-hot selectors (key j -> its grid row / column), loop invariant
            r16 = tl.arange(0, 16)
            onehot_hT = (jr[:, None] == r16[None, :]).to(k0.dtype)  # (BLOCK_N, 16)
            wcol = tl.arange(0, W_PAD)
            onehot_wT = (jc[:, None] == wcol[None, :]).to(k0.dtype)  # (BLOCK_N, W_PAD)

        Q_base = Q + b * sqb + h * sqh
        DO_base = DO + b * sdob + h * sdoh
        RH_base = RH + b * srhb + h * srhh
        RW_base = RW + b * srwb + h * srwh
        dk0 = tl.zeros((BLOCK_N, D0), tl.float32)
        dv0 = tl.zeros((BLOCK_N, D0), tl.float32)
        if D1 > 0:
            dk1 = tl.zeros((BLOCK_N, D1), tl.float32)
            dv1 = tl.zeros((BLOCK_N, D1), tl.float32)
        for mb in range(0, tl.cdiv(N, BLOCK_M)):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < N
            q0, q1 = _load_head(Q_base + offs_m * sqn, m_mask, HEAD_DIM, D0, D1)
            do0, do1 = _load_head(DO_base + offs_m * sdon, m_mask, HEAD_DIM, D0, D1)
            lse = tl.load(LSE + bh * N + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=m_mask, other=0.0)
            sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
            if D1 > 0:
                sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PREC)
            sT = sT * qk_scale
            if BH == 1:
                # BLOCK_N == W_PAD: key j is column j, so the rel_w tile is the bias itself.
                rwT = tl.load(RW_base + offs_m[None, :] * srwn + jc[:, None],
                              mask=m_mask[None, :] & (jc[:, None] < W), other=0.0)
                rh = tl.load(RH_base + offs_m * srhn + kh0, mask=m_mask, other=0.0)
                biasT = rwT.to(tl.float32) + rh.to(tl.float32)[None, :]
            else:
                rwT = tl.load(RW_base + offs_m[None, :] * srwn + wcol[:, None],
                              mask=m_mask[None, :] & (wcol[:, None] < W), other=0.0)  # (W_PAD, BLOCK_M)
                rhT = tl.load(RH_base + offs_m[None, :] * srhn + kh0 + r16[:, None],
                              mask=m_mask[None, :] & (r16[:, None] < BH) & (kh0 + r16[:, None] < H),
                              other=0.0)  # (16, BLOCK_M)
                biasT = tl.dot(onehot_wT, rwT, input_precision=BIAS_PREC)
                biasT = tl.dot(onehot_hT, rhT, biasT, input_precision=BIAS_PREC)
            sT += biasT * LOG2E
            pT = tl.exp2(sT - lse[None, :])
            pT = tl.where(k_valid[:, None] & m_mask[None, :], pT, 0.0)
            pTc = pT.to(do0.dtype)
            dv0 = tl.dot(pTc, do0, dv0, input_precision=DOT_PREC)
            dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
            if D1 > 0:
                dv1 = tl.dot(pTc, do1, dv1, input_precision=DOT_PREC)
                dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
            dsT = (pT * (dpT - delta[None, :])).to(q0.dtype)
            dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
            if D1 > 0:
                dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
        dk_rows = DK + b * sdkb + h * sdkh + n_idx * sdkn
        dv_rows = DV + b * sdkb + h * sdkh + n_idx * sdkn
        if D1 > 0:
            _store_head(dk_rows, k_valid, (dk0 * sm_scale).to(DK.dtype.element_ty),
                        (dk1 * sm_scale).to(DK.dtype.element_ty), HEAD_DIM, D0, D1)
            _store_head(dv_rows, k_valid, dv0.to(DV.dtype.element_ty), dv1.to(DV.dtype.element_ty), HEAD_DIM, D0, D1)
        else:
            dk = (dk0 * sm_scale).to(DK.dtype.element_ty)
            dv = dv0.to(DV.dtype.element_ty)
            _store_head(dk_rows, k_valid, dk, dk, HEAD_DIM, D0, D1)
            _store_head(dv_rows, k_valid, dv, dv, HEAD_DIM, D0, D1)

    @triton.jit(do_not_specialize=["TUNE_BATCH"])
    def _bwd_dq_kernel(Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                       srhb, srhh, srhn, srwb, srwh, srwn, sdob, sdoh, sdon,
                       sdqb, sdqh, sdqn,
                       NH, N, H, W, qk_scale, sm_scale, TUNE_BATCH,
                       HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, W_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_PREC: tl.constexpr):
        """One program per (batch, head, query block); streams the key tiles. Writes dq, and
        the bias gradients d rel_h (per key tile: each grid row lies in exactly one tile) and
        d rel_w (summed over tiles in registers), in the input dtype. DRH/DRW are contiguous
        (B, heads, N, H/W)."""
        BLOCK_N: tl.constexpr = BH * W_PAD
        bh, b, h, offs_m, m_mask = _query_block(N, NH, BLOCK_M)
        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD
        q0, q1 = _load_head(Q + b * sqb + h * sqh + offs_m * sqn, m_mask, HEAD_DIM, D0, D1)
        do0, do1 = _load_head(DO + b * sdob + h * sdoh + offs_m * sdon, m_mask, HEAD_DIM, D0, D1)
        lse = tl.load(LSE + bh * N + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=m_mask, other=0.0)
        RH_rows = RH + b * srhb + h * srhh + offs_m * srhn
        RW_rows = RW + b * srwb + h * srwh + offs_m * srwn
        # Padded columns are -inf as in the forward (p = 0 there, so dS = 0 and the bias gradient
        # sums gain nothing). Padded query rows need no mask: q = dO = 0 there, so
        # dS = p * (0 - 0) = 0, and none of their values is stored.
        bias_w = _width_bias(RW_rows, m_mask, jc, W)

        K_base = K + b * skb + h * skh
        V_base = V + b * svb + h * svh
        DRH_rows = DRH + bh * N * H + offs_m * H
        dq0 = tl.zeros((BLOCK_M, D0), tl.float32)
        if D1 > 0:
            dq1 = tl.zeros((BLOCK_M, D1), tl.float32)
        drw = tl.zeros((BLOCK_M, W_PAD), tl.float32)
        rh = _row_bias_load(RH_rows, m_mask, 0, H, BH)
        for t in range(0, tl.cdiv(H, BH)):
            kh0 = t * BH
            rh_next = _row_bias_load(RH_rows, m_mask, kh0 + BH, H, BH)  # consumed next iteration
            s, k0, k1, v0, v1 = _score_tile(q0, q1, K_base, V_base, skn, svn, rh, bias_w, jr, jc, kh0, H, W,
                                            qk_scale, HEAD_DIM, D0, D1, BLOCK_M, BH, W_PAD, DOT_PREC, BIAS_PREC)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
            if D1 > 0:
                dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])  # dL/dS, fp32, (BLOCK_M, BLOCK_N)
            dsc = ds.to(k0.dtype)
            dq0 = tl.dot(dsc, k0, dq0, input_precision=DOT_PREC)
            if D1 > 0:
                dq1 = tl.dot(dsc, k1, dq1, input_precision=DOT_PREC)
            # Bias gradients from the fp32 dS (not the rounded copy used for dq): each value is
            # complete in this program, so one rounding to the input dtype, as a cast after would do.
            if BH == 1:
                drw += ds
                tl.store(DRH_rows + kh0, tl.sum(ds, 1).to(DRH.dtype.element_ty), mask=m_mask)
            else:
                ds3 = tl.reshape(ds, (BLOCK_M, BH, W_PAD))
                drw += tl.sum(ds3, 1)
                rr = tl.arange(0, BH)
                tl.store(DRH_rows[:, None] + kh0 + rr[None, :], tl.sum(ds3, 2).to(DRH.dtype.element_ty),
                         mask=m_mask[:, None] & (kh0 + rr[None, :] < H))
            rh = rh_next
        dq_rows = DQ + b * sdqb + h * sdqh + offs_m * sdqn
        dqa = (dq0 * sm_scale).to(DQ.dtype.element_ty)
        if D1 > 0:
            dqb = (dq1 * sm_scale).to(DQ.dtype.element_ty)
        else:
            dqb = dqa
        _store_head(dq_rows, m_mask, dqa, dqb, HEAD_DIM, D0, D1)
        wcol = tl.arange(0, W_PAD)
        tl.store(DRW + bh * N * W + offs_m[:, None] * W + wcol[None, :], drw.to(DRW.dtype.element_ty),
                 mask=m_mask[:, None] & (wcol[None, :] < W))

    class _SingleConfig:
        """Interpreter stand-in for ``triton.autotune``: its one config goes through the same
        pruner as on a GPU (which turns BLOCK_N into BH), then the kernel runs with it.
        (triton.autotune skips pruning when it holds a single config.)"""

        def __init__(self, fn, kind):
            self.fn, self.configs, self.prune = fn, _autotune_configs(kind), _make_pruner(kind, fn)
            self.best_config = None  # the config of the last launch, as triton.autotune keeps it

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.fn.arg_names, args))
                cfg = self.best_config = self.prune(self.configs, named, **kwargs)[0]
                meta = {**kwargs, **cfg.kwargs}
                g = grid({**named, **meta}) if callable(grid) else grid
                return self.fn[g](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            return launch

    # The autotune key: the shape, the number of heads and the batch rounded to a power of two
    # (TUNE_BATCH): the grid has B x heads x blocks programs, and its size decides between tiles
    # (a test with 2 heads must not hand its choice to a model with 12); and the fp32 product
    # precision (DOT_PREC: TF32 and exact fp32 prune to different config spaces, so one must not
    # reuse the other's choice); Triton adds the tensors' dtypes. cache_results keeps each choice in
    # Triton's cache directory (keyed also by Triton's version, the GPU architecture, the kernel's
    # source and the config list).
    AUTOTUNE_KEY = ["N", "NH", "H", "W", "HEAD_DIM", "TUNE_BATCH", "DOT_PREC"]

    def _tuned(fn, kind, do_bench=None):
        """``kind``'s autotuner around ``fn``; ``do_bench``: Triton's timer unless given (tests)."""
        if INTERPRET:
            return _SingleConfig(fn, kind)
        return triton.autotune(configs=_autotune_configs(kind, interpret=False), key=AUTOTUNE_KEY, cache_results=True,
                               prune_configs_by={"early_config_prune": _make_pruner(kind, fn)},
                               do_bench=do_bench)(fn)

    KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


# --------------------------------------------------------------------------------------------
# Host launchers: the argument lists are built once, for the launches and for the AOT builds
# --------------------------------------------------------------------------------------------
# delta: element-wise, BLOCK_M = 64 rows of the head dim per program, Triton's default warps and
# stages (4, 3): 64 x 64 fp32 products in registers, no shared memory but the reduction's.
DELTA_CONFIG = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}


def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device: inputs on another GPU need it switched.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it with a NaN-filling allocator
    so that an element a kernel forgets to write fails the comparison)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels take (batch, head, token) strides and need the last dim contiguous; SAM's
    # q/k/v are permuted views of the qkv projection that already are.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(*tensors) -> tuple:
    return tuple(s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2)))


def _tune_batch(B: int) -> int:
    return _next_pow2(B)


def _common_meta(q, rel_w, dot_prec: Optional[str] = None) -> dict:
    d, W = q.shape[-1], rel_w.shape[-1]
    d0, d1 = head_split(d)
    prec = dot_prec or dot_precision(q.dtype)
    return dict(HEAD_DIM=d, D0=d0, D1=d1, W_PAD=_w_pad(W), DOT_PREC=prec, BIAS_PREC=_bias_precision(prec))


def _fwd_launch(q, k, v, rel_h, rel_w, o, lse, scale: float, dot_prec: Optional[str] = None) -> Launch:
    B, NH, N, _ = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    args = (q, k, v, rel_h, rel_w, o, lse, *_strides(q, k, v, rel_h, rel_w, o),
            NH, N, H, W, scale * LOG2E_PY, _tune_batch(B))
    return Launch("attention fwd", _fwd_kernel, args, _common_meta(q, rel_w, dot_prec), {}, "fwd")


def _delta_launch(o, do, delta) -> Launch:
    _, NH, N, d = o.shape
    args = (o, do, delta, *_strides(o, do), NH, N)
    meta = dict(HEAD_DIM=d, D_PAD=_d_pad(d))
    return Launch("attention delta", _bwd_delta_kernel, args, meta, dict(DELTA_CONFIG))


def _bwd_launches(do, q, k, v, rel_h, rel_w, lse, delta, dq, dk, dv, drh, drw, scale: float,
                  dot_prec: Optional[str] = None) -> Tuple[Launch, Launch]:
    B, NH, N, _ = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    common = _strides(q, k, v, rel_h, rel_w, do)
    meta = _common_meta(q, rel_w, dot_prec)
    qk_scale = scale * LOG2E_PY
    tail = (NH, N, H, W, qk_scale, scale, _tune_batch(B))
    dkdv = Launch("attention dkdv", _bwd_dkdv_kernel,
                  (q, k, v, rel_h, rel_w, do, lse, delta, dk, dv, *common, *_strides(dk), *tail), meta, {}, "dkdv")
    dq_ = Launch("attention dq", _bwd_dq_kernel,
                 (q, k, v, rel_h, rel_w, do, lse, delta, dq, drh, drw, *common, *_strides(dq), *tail), meta, {}, "dq")
    return dkdv, dq_


# (kind, N, heads, H, W, head dim, batch bucket, fp32 product precision, dtype) -> the tile config
# the last such launch ran (config_label), for the backend's notes and the benchmark rows.
_CHOSEN: Dict[tuple, str] = {}


def _run(launch: Launch, grid) -> None:
    if not launch.tuned:
        launch.run(grid)
        return
    tuned = _TUNED[launch.tuned]
    tuned[grid](*launch.args, **launch.meta)
    a = dict(zip(launch.fn.arg_names, launch.args))
    key = (launch.tuned, a["N"], a["NH"], a["H"], a["W"], launch.meta["HEAD_DIM"], a["TUNE_BATCH"],
           launch.meta["DOT_PREC"], a["Q"].dtype)
    _CHOSEN[key] = config_label(tuned.best_config)


def chosen_configs(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> Dict[str, str]:
    """kernel kind -> the tile config (``config_label``) its autotuner ran for inputs shaped like
    these (q (B, heads, N, d), rel_h (.., H), rel_w (.., W)), for each kernel that has run them."""
    B, NH, N, d = q.shape
    key = (N, NH, rel_h.shape[-1], rel_w.shape[-1], d, _tune_batch(B), dot_precision(q.dtype), q.dtype)
    return {kind: _CHOSEN[(kind, *key)] for kind in KINDS if (kind, *key) in _CHOSEN}


def _launch_fwd(q, k, v, rel_h, rel_w, scale: float):
    q, k, v, rel_h, rel_w = map(_unit_last, (q, k, v, rel_h, rel_w))
    B, NH, N, d = q.shape
    o = _new_output((B, NH, N, d), q.dtype, q.device)
    lse = _new_output((B, NH, N), torch.float32, q.device)
    _run(_fwd_launch(q, k, v, rel_h, rel_w, o, lse, scale),
         lambda META: (B * NH * triton.cdiv(N, META["BLOCK_M"]),))
    return o, lse


def _launch_bwd(do, q, k, v, rel_h, rel_w, o, lse, scale: float):
    do, q, k, v, rel_h, rel_w = map(_unit_last, (do, q, k, v, rel_h, rel_w))
    B, NH, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    dev, dt = q.device, q.dtype
    delta = _new_output((B, NH, N), torch.float32, dev)
    _run(_delta_launch(o, do, delta), (B * NH * triton.cdiv(N, DELTA_CONFIG["BLOCK_M"]),))
    dq = _new_output((B, NH, N, d), dt, dev)
    dk = _new_output((B, NH, N, d), dt, dev)
    dv = _new_output((B, NH, N, d), dt, dev)
    # Written by the dq kernel in the input dtype (each value is an fp32 sum complete in one
    # program, rounded once): no fp32 copies, no cast kernels.
    drh = _new_output((B, NH, N, H), dt, dev)
    drw = _new_output((B, NH, N, W), dt, dev)
    dkdv, dq_ = _bwd_launches(do, q, k, v, rel_h, rel_w, lse, delta, dq, dk, dv, drh, drw, scale)
    _run(dkdv, lambda META: (B * NH * triton.cdiv(H, META["BH"]),))
    _run(dq_, lambda META: (B * NH * triton.cdiv(N, META["BLOCK_M"]),))
    return dq, dk, dv, drh, drw


def sam_layout(B: int, heads: int, H: int, W: int, d: int, dtype: torch.dtype, device="meta"):
    """q, k, v, rel_h, rel_w as SAM's attention passes them: q/k/v permuted views of one
    (B, N, 3, heads, d) qkv projection, the bias tables contiguous (B, heads, N, H / W)."""
    N = H * W
    qkv = torch.empty(B, N, 3, heads, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return (q, k, v, torch.empty(B, heads, N, H, dtype=dtype, device=device),
            torch.empty(B, heads, N, W, dtype=dtype, device=device))


def aot_launches(q, k, v, rel_h, rel_w, dot_prec: Optional[str] = None) -> List[Launch]:
    """Every launch of a forward and backward on these inputs (e.g. ``sam_layout`` meta tensors),
    with the arguments the launchers pass: for ``fastsamclip.kernels.aot``. Call with triton
    importable (the kernels exist). ``dot_prec``: fp32's "tf32" or "ieee" (default: torch's setting now)."""
    B, NH, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    new = lambda *shape, dtype=q.dtype: torch.empty(shape, dtype=dtype, device=q.device)  # noqa: E731
    o, lse, delta = new(B, NH, N, d), new(B, NH, N, dtype=torch.float32), new(B, NH, N, dtype=torch.float32)
    do, dq, dk, dv = new(B, NH, N, d), new(B, NH, N, d), new(B, NH, N, d), new(B, NH, N, d)
    drh, drw = new(B, NH, N, H), new(B, NH, N, W)
    scale = d ** -0.5
    return [_fwd_launch(q, k, v, rel_h, rel_w, o, lse, scale, dot_prec), _delta_launch(o, do, delta),
            *_bwd_launches(do, q, k, v, rel_h, rel_w, lse, delta, dq, dk, dv, drh, drw, scale, dot_prec)]


if triton is not None:
    _TUNED = {kind: _tuned(KERNELS[kind], kind) for kind in KINDS}
    _fwd_tuned, _dkdv_tuned, _dq_tuned = _TUNED["fwd"], _TUNED["dkdv"], _TUNED["dq"]


# --------------------------------------------------------------------------------------------
# torch.library registration (custom_op: compiles with fullgraph=True on CPU and GPU)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastsamclip::relpos_attention_fwd", mutates_args=())
def relpos_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                         rel_w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, heads, N, d), lse (B, heads, N) fp32, base-2 log-sum-exp of each score row)."""
    with _on_device_of(q):
        return _launch_fwd(q, k, v, rel_h, rel_w, scale)


@relpos_attention_fwd.register_fake
def _(q, k, v, rel_h, rel_w, scale):
    B, NH, N, d = q.shape
    return q.new_empty((B, NH, N, d)), q.new_empty((B, NH, N), dtype=torch.float32)


@torch.library.custom_op("fastsamclip::relpos_attention_bwd", mutates_args=())
def relpos_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rel_h: torch.Tensor, rel_w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d rel_h, d rel_w), shaped and typed like the inputs."""
    with _on_device_of(q):
        return _launch_bwd(do, q, k, v, rel_h, rel_w, out, lse, scale)


@relpos_attention_bwd.register_fake
def _(do, q, k, v, rel_h, rel_w, out, lse, scale):
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty(rel_h.shape), q.new_empty(rel_w.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
    # lse is non-differentiable; only dout carries gradient.
    dq, dk, dv, drh, drw = relpos_attention_bwd(dout, q, k, v, rel_h, rel_w, out, lse, ctx.scale)
    return dq, dk, dv, drh, drw, None


relpos_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention_triton(q, k, v, rel_h, rel_w, scale: Optional[float] = None) -> torch.Tensor:
    """Fused ``softmax(q @ k^T * scale + rel_h[..., kh] + rel_w[..., kw]) @ v``.

    q, k, v: (B, heads, N, d); rel_h: (B, heads, N, H); rel_w: (B, heads, N, W); N = H * W.
    Returns (B, heads, N, d) in q's dtype, differentiable in all five tensors.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = relpos_attention_fwd(q, k, v, rel_h, rel_w, scale)
    return out


# --------------------------------------------------------------------------------------------
# The backend (relpos_attention.py registers it first in the op's priority order)
# --------------------------------------------------------------------------------------------

def _check(q, k, v, rel_h, rel_w, needs_grad=False) -> List[str]:
    why = device_refusals(q.device)
    if q.dtype not in SUPPORTED_DTYPES:
        why.append(f"dtype {q.dtype} (supports float16, bfloat16, float32)")
    if q.shape[-1] > MAX_HEAD_DIM:
        why.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if rel_w.shape[-1] > MAX_W:
        why.append(f"token grid width {rel_w.shape[-1]} > {MAX_W} (a key tile holds whole grid rows)")
    return why


def _auto_check(q, k, v, rel_h, rel_w, needs_grad=False) -> List[str]:
    # On CPU the kernels run in the Triton interpreter, ~1000x slower than sdpa (a 14x14 window,
    # one head, fwd+bwd: ~2 s): it is there to test the kernels, never to run a model.
    if q.device.type == "cpu":
        return ["cpu runs the Triton interpreter (for tests; force with backend='triton')"]
    return []


# The note that names the tiles the autotuner chose for inputs like these (after they ran).
TILES_NOTE = "autotuned tiles (queries x key-grid rows / warps / stages): "


def _notes(q, k, v, rel_h, rel_w, needs_grad=False) -> List[str]:
    out = [fp32_note()] if q.dtype == torch.float32 else []
    chosen = chosen_configs(q, rel_h, rel_w)
    if chosen:
        out.append(f"{TILES_NOTE}{', '.join(f'{kind} {label}' for kind, label in chosen.items())}")
    d0, d1 = head_split(q.shape[-1])
    if d0 + d1 != q.shape[-1]:
        out.append(f"head dim {q.shape[-1]} padded to {d0 + d1}" + (f" ({d0} + {d1})" if d1 else ""))
    elif d1:
        out.append(f"head dim {q.shape[-1]} as {d0} + {d1}, no padding")
    return out


BACKEND = Backend(
    name="triton",
    fn=relpos_attention_triton,
    description="fused Triton flash attention, bias added in registers (fwd + bwd, no N x N tensor)",
    check=_check,
    is_available=lambda: UNAVAILABLE,
    auto_check=_auto_check,
    notes=_notes,
)
