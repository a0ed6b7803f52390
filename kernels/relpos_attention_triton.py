"""Fused Triton kernels for SAM's attention with decomposed relative-position bias.

Plain-torch equivalent (``relpos_attention.relpos_attention_reference``)::

    S = q @ k^T * scale + rel_h[..., :, kh(n)] + rel_w[..., :, kw(n)]   # (B, heads, N, N)
    out = softmax(S, -1) @ v

computed flash-attention style: the scores exist only as register tiles, the forward saves the
per-row log-sum-exp (base 2) and the backward recomputes the probabilities from it. No tensor of
size N x N is ever allocated, forward or backward. (One op's kernels, launchers and registration
in one file, in that order: over 600 lines, read top to bottom.)

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
  a K = 16 tensor-core product that is exact (one non-zero term per output).
* Backward: ``d rel_h[q, kh] = sum_kw dS`` and ``d rel_w[q, kw] = sum_kh dS`` are row/column
  sums of the fp32 ``dS`` tile in the dq kernel (a reshape to ``(BLOCK_M, BH, W_PAD)`` and two
  ``tl.sum``), exact in fp32 and written by the one program that owns those query rows: no
  atomics, deterministic.

Caveats
-------
* Grid width ``W`` at most 128 (one key tile spans at least one whole grid row); wider grids are
  refused by the backend's ``check`` with that reason and go to the next backend.
* Head dims are padded to the next power of two (d = 80 runs as 128 with masked lanes, ~37%
  wasted MMA work); head dims above 128 are refused.
* ``W`` that is not a power of two wastes the padded columns (W = 14 -> 16: 12.5%).
* fp32 inputs run with IEEE fp32 dots (no TF32) so that fp32 is a faithful check dtype; on
  sm_90 those dots are FMA loops that spill registers (ptxas: ~16 KB of spill stores at 64 x 64
  tiles): a check dtype, many times slower than fp16/bf16 on tensor cores.
* Compiled ahead of time for sm_90a without a GPU (Triton 3.8, ``triton.compile`` with a
  ``GPUTarget``), every kernel lowers to wgmma with no spills in fp16/bf16 at the tuned configs
  (170-255 registers, d = 80 at the top of that range); run times are a GPU's to measure.
* Double backward is not supported (the backward op has no autograd formula).
* On CPU it runs only under ``TRITON_INTERPRET=1`` (~1000x slower than sdpa; for tests), and
  the chooser never picks it there (``auto_check``): force it with ``backend="triton"`` or
  ``use_backend("triton")``. In the Triton interpreter bf16 arithmetic is wrong, so bf16 is
  verified on a GPU only.
* Multi-GPU: launches switch to the inputs' device; no other device handling.
* Backward runs two kernels (dk/dv over query blocks; dq + d rel_h + d rel_w over key tiles)
  after a small ``delta = rowsum(dO * O)`` kernel, recomputing ``Q K^T`` twice, as the
  deterministic flash-attention 2 backward does.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from ._triton import INTERPRET, UNAVAILABLE, device_refusals, tl, triton
from .dispatch import Backend

__all__ = ["relpos_attention_triton", "BACKEND"]

MAX_W = 128  # widest key-grid row a tile can hold (W_PAD <= 128)
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _w_pad(W: int) -> int:
    # tl.dot needs K >= 16, and the BH > 1 one-hot product has K = 16 rows.
    return max(16, _next_pow2(W))


def _d_pad(d: int) -> int:
    return max(16, _next_pow2(d))


# --------------------------------------------------------------------------------------------
# Autotune configs, pruned to the device
# --------------------------------------------------------------------------------------------
# Configs name a key-tile size target BLOCK_N; the pruner turns it into BH = BLOCK_N // W_PAD
# grid rows per tile (at least 1) and drops duplicates and configs whose shared memory does
# not fit the device. The interpreter gets one small config: autotuning there would only cost
# test time (each config is a full Python-level run).


def _config_space(kind: str):
    """Autotune candidates as (BLOCK_M, BLOCK_N target, warps, stages).

    Kept to 8 per kernel: each costs a ~3-4 s compile per (N, H, W, d, dtype) key on first use.
    Chosen from ptxas register counts for sm_90a (fp16, d = 64, stages 2, Triton 3.8, inputs
    16-byte aligned as Triton specialises them), windows 14 x 14 / global 64 x 64 grid:
      fwd   BM 64 / 4 warps, BN 64: 176 / 168 regs; BM 128 / 8 warps, BN 64: 192 / 159;
            BM 128 / 4 warps: 239-255 regs (spills at BN 128), so 128-row tiles get 8 warps.
      dq    BM 64 / 4 warps, BN 32: 167 regs; BM 64 / 8 warps, BN 64: 178 / 229;
            BM 64 / 4 warps, BN 64 on the 64-wide grid: 247 (no spill, low occupancy).
      dkdv  BM 32 / 4 warps, BN 64: 184 / 179; BM 64 / 8 warps, BN 64: 228 / 211.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = {
        "fwd": [(64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)],
        "dkdv": [(32, 64, 4), (32, 128, 8), (64, 64, 8), (64, 128, 8)],  # BLOCK_M: queries streamed past a key tile
        "dq": [(64, 32, 4), (64, 64, 8), (128, 32, 8), (128, 64, 8)],
    }
    if kind not in shapes:
        raise ValueError(kind)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w in shapes[kind] for st in (2, 3)]


def _device_smem_bytes() -> Optional[int]:
    if INTERPRET or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None) or getattr(props, "shared_memory_per_block", None)


def _smem_estimate(kind: str, block_m: int, block_n: int, d_pad: int, w_pad: int, stages: int, elt: int) -> int:
    """Rough shared-memory bytes: pipelined operand tiles plus one fp32 tile for layout
    conversions. Over-estimating only drops configs that would likely spill or fail."""
    if kind == "fwd":  # q resident, k and v pipelined
        ops = block_m * d_pad + stages * 2 * block_n * d_pad
    elif kind == "dkdv":  # k, v resident, q and dO pipelined
        ops = 2 * block_n * d_pad + stages * 2 * block_m * d_pad
    else:  # dq: q, dO resident, k and v pipelined
        ops = 2 * block_m * d_pad + stages * 2 * block_n * d_pad
    return ops * elt + block_m * max(block_n, w_pad) * 4


def _make_pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        w_pad, d_pad = int(args["W_PAD"]), int(args["D_PAD"])
        elt = args["Q"].element_size()
        smem = _device_smem_bytes()
        out, seen = [], set()
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            bh = max(1, bn // w_pad)
            key = (bm, bh, c.num_warps, c.num_stages)
            if key in seen:
                continue
            if smem is not None and _smem_estimate(kind, bm, bh * w_pad, d_pad, w_pad, c.num_stages, elt) > smem:
                continue
            seen.add(key)
            out.append(triton.Config({"BLOCK_M": bm, "BH": bh}, num_warps=c.num_warps, num_stages=c.num_stages))
        if not out:  # never leave autotune empty: the smallest tile always fits
            out.append(triton.Config({"BLOCK_M": 32, "BH": 1}, num_warps=4, num_stages=1))
        return out

    return prune


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _bias_rows(RH_rows, RW_rows, offs_m, m_mask, kh0, H, W,
                   BLOCK_M: tl.constexpr, BH: tl.constexpr, W_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
        """Per-tile part of the bias, (BLOCK_M, BH * W_PAD) fp32: rel_h[m, kh0 + j // W_PAD].

        ``RH_rows``: (BLOCK_M,) pointers to rel_h[m, 0]."""
        BLOCK_N: tl.constexpr = BH * W_PAD
        if BH == 1:
            rh = tl.load(RH_rows + kh0, mask=m_mask & (kh0 < H), other=0.0).to(tl.float32)
            out = tl.broadcast_to(rh[:, None], (BLOCK_M, BLOCK_N))
        else:
            r = tl.arange(0, 16)
            jr = tl.arange(0, BLOCK_N) // W_PAD
            rh = tl.load(RH_rows[:, None] + kh0 + r[None, :],
                         mask=m_mask[:, None] & (r[None, :] < BH) & (kh0 + r[None, :] < H), other=0.0)
            onehot = (r[:, None] == jr[None, :]).to(rh.dtype)  # (16, BLOCK_N), exact product
            out = tl.dot(rh, onehot, input_precision=DOT_PREC)
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
    def _score_tile(q, K_base, V_base, skn, svn, RH_rows, RW_rows, bias_w, offs_m, m_mask, offs_d, d_mask,
                    jr, jc, kh0, H, W, qk_scale,
                    BLOCK_M: tl.constexpr, BH: tl.constexpr, W_PAD: tl.constexpr, DOT_PREC: tl.constexpr):
        """Key tile of grid rows kh0 .. kh0 + BH - 1: (scores in log2 units with the whole bias,
        -inf on padded keys; its K; its V)."""
        LOG2E: tl.constexpr = 1.4426950408889634
        kh = kh0 + jr
        n_idx = kh * W + jc
        kv_mask = ((kh < H) & (jc < W))[:, None] & d_mask[None, :]
        k = tl.load(K_base + n_idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_base + n_idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias_w
        s += _bias_rows(RH_rows, RW_rows, offs_m, m_mask, kh0, H, W, BLOCK_M, BH, W_PAD, DOT_PREC) * LOG2E
        if BH > 1:
            if kh0 + BH > H:
                s = tl.where((kh < H)[None, :], s, float("-inf"))
        return s, k, v

    @triton.jit
    def _fwd_kernel(Q, K, V, RH, RW, O, LSE,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    srhb, srhh, srhn, srwb, srwh, srwn, sob, soh, son,
                    NH, N, H, W, qk_scale,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, W_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr):
        BLOCK_N: tl.constexpr = BH * W_PAD
        bh, b, h, offs_m, m_mask = _query_block(N, NH, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        RH_rows = RH + b * srhb + h * srhh + offs_m * srhn
        RW_rows = RW + b * srwb + h * srwh + offs_m * srwn
        bias_w = _width_bias(RW_rows, m_mask, jc, W)

        K_base = K + b * skb + h * skh
        V_base = V + b * svb + h * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for t in range(0, tl.cdiv(H, BH)):
            s, k, v = _score_tile(q, K_base, V_base, skn, svn, RH_rows, RW_rows, bias_w, offs_m, m_mask, offs_d,
                                  d_mask, jr, jc, t * BH, H, W, qk_scale, BLOCK_M, BH, W_PAD, DOT_PREC)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        # Every query row sees key (0, 0) in the first tile, so l_i > 0 and m_i is finite.
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
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

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                         srhb, srhh, srhn, srwb, srwh, srwn, sdob, sdoh, sdon,
                         sdkb, sdkh, sdkn,
                         NH, N, H, W, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, W_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr):
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

        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD
        kh0 = t * BH
        kh = kh0 + jr
        k_valid = (kh < H) & (jc < W)
        n_idx = kh * W + jc
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k = tl.load(K + b * skb + h * skh + n_idx[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + n_idx[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        if BH > 1:
            # one-hot selectors (key j -> its grid row / column), loop invariant
            r16 = tl.arange(0, 16)
            onehot_hT = (jr[:, None] == r16[None, :]).to(k.dtype)  # (BLOCK_N, 16)
            wcol = tl.arange(0, W_PAD)
            onehot_wT = (jc[:, None] == wcol[None, :]).to(k.dtype)  # (BLOCK_N, W_PAD)

        Q_base = Q + b * sqb + h * sqh
        DO_base = DO + b * sdob + h * sdoh
        RH_base = RH + b * srhb + h * srhh
        RW_base = RW + b * srwb + h * srwh
        dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
        dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
        for mb in range(0, tl.cdiv(N, BLOCK_M)):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < N
            qd_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(Q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO_base + offs_m[:, None] * sdon + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + bh * N + offs_m, mask=m_mask, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=m_mask, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
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
                biasT = tl.dot(onehot_wT, rwT, input_precision=DOT_PREC)
                biasT += tl.dot(onehot_hT, rhT, input_precision=DOT_PREC)
            sT += biasT * LOG2E
            pT = tl.exp2(sT - lse[None, :])
            pT = tl.where(k_valid[:, None] & m_mask[None, :], pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
        dk *= sm_scale
        out_off = b * sdkb + h * sdkh + n_idx[:, None] * sdkn + offs_d[None, :]
        tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                       srhb, srhh, srhn, srwb, srwh, srwn, sdob, sdoh, sdon,
                       sdqb, sdqh, sdqn,
                       NH, N, H, W, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, W_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BH: tl.constexpr, DOT_PREC: tl.constexpr):
        """One program per (batch, head, query block); streams the key tiles. Writes dq, and
        the bias gradients d rel_h (per key tile: each grid row lies in exactly one tile) and
        d rel_w (summed over tiles in registers). DRH/DRW are contiguous (B, heads, N, H/W)."""
        BLOCK_N: tl.constexpr = BH * W_PAD
        bh, b, h, offs_m, m_mask = _query_block(N, NH, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        j = tl.arange(0, BLOCK_N)
        jr = j // W_PAD
        jc = j % W_PAD
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :], mask=qd_mask, other=0.0)
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
        dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        drw = tl.zeros((BLOCK_M, W_PAD), tl.float32)
        for t in range(0, tl.cdiv(H, BH)):
            kh0 = t * BH
            s, k, v = _score_tile(q, K_base, V_base, skn, svn, RH_rows, RW_rows, bias_w, offs_m, m_mask, offs_d,
                                  d_mask, jr, jc, kh0, H, W, qk_scale, BLOCK_M, BH, W_PAD, DOT_PREC)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])  # dL/dS, fp32, (BLOCK_M, BLOCK_N)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            # Bias gradients from the fp32 dS (not the rounded copy used for dq).
            if BH == 1:
                drw += ds
                tl.store(DRH_rows + kh0, tl.sum(ds, 1), mask=m_mask)
            else:
                ds3 = tl.reshape(ds, (BLOCK_M, BH, W_PAD))
                drw += tl.sum(ds3, 1)
                rr = tl.arange(0, BH)
                tl.store(DRH_rows[:, None] + kh0 + rr[None, :], tl.sum(ds3, 2),
                         mask=m_mask[:, None] & (kh0 + rr[None, :] < H))
        dq *= sm_scale
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)
        wcol = tl.arange(0, W_PAD)
        tl.store(DRW + bh * N * W + offs_m[:, None] * W + wcol[None, :], drw,
                 mask=m_mask[:, None] & (wcol[None, :] < W))

    class _SingleConfig:
        """Interpreter stand-in for ``triton.autotune``: its one config goes through the same
        pruner as on a GPU (which turns BLOCK_N into BH), then the kernel runs with it.
        (triton.autotune skips pruning when it holds a single config.)"""

        def __init__(self, fn, kind):
            self.fn, self.configs, self.prune = fn, _config_space(kind), _make_pruner(kind)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.fn.arg_names, args))
                cfg = self.prune(self.configs, named, **kwargs)[0]
                meta = {**kwargs, **cfg.kwargs}
                g = grid({**named, **meta}) if callable(grid) else grid
                return self.fn[g](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            return launch

    def _tuned(fn, kind):
        if INTERPRET:
            return _SingleConfig(fn, kind)
        # Key: the shape (dtype is part of Triton's autotune key already).
        return triton.autotune(configs=_config_space(kind), key=["N", "H", "W", "HEAD_DIM"],
                               prune_configs_by={"early_config_prune": _make_pruner(kind)})(fn)

    _fwd_tuned = _tuned(_fwd_kernel, "fwd")
    _dkdv_tuned = _tuned(_bwd_dkdv_kernel, "dkdv")
    _dq_tuned = _tuned(_bwd_dq_kernel, "dq")


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
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


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_fwd(q, k, v, rel_h, rel_w, scale: float):
    q, k, v, rel_h, rel_w = map(_unit_last, (q, k, v, rel_h, rel_w))
    B, NH, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    o = _new_output((B, NH, N, d), q.dtype, q.device)
    lse = _new_output((B, NH, N), torch.float32, q.device)
    grid = lambda META: (B * NH * triton.cdiv(N, META["BLOCK_M"]),)  # noqa: E731
    _fwd_tuned[grid](
        q, k, v, rel_h, rel_w, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        rel_h.stride(0), rel_h.stride(1), rel_h.stride(2), rel_w.stride(0), rel_w.stride(1), rel_w.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        NH, N, H, W, scale * 1.4426950408889634,
        HEAD_DIM=d, D_PAD=_d_pad(d), W_PAD=_w_pad(W), DOT_PREC=_dot_prec(q.dtype),
    )
    return o, lse


def _launch_bwd(do, q, k, v, rel_h, rel_w, o, lse, scale: float):
    do, q, k, v, rel_h, rel_w = map(_unit_last, (do, q, k, v, rel_h, rel_w))
    B, NH, N, d = q.shape
    H, W = rel_h.shape[-1], rel_w.shape[-1]
    dev, dt = q.device, q.dtype
    d_pad, w_pad = _d_pad(d), _w_pad(W)
    delta = _new_output((B, NH, N), torch.float32, dev)
    blk = 64
    _bwd_delta_kernel[(B * NH * triton.cdiv(N, blk),)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        NH, N, HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=blk)

    dq = _new_output((B, NH, N, d), dt, dev)
    dk = _new_output((B, NH, N, d), dt, dev)
    dv = _new_output((B, NH, N, d), dt, dev)
    # Bias gradients are produced in fp32 and cast at the end: they are sums of up to N
    # terms of dS and stay exact that way.
    drh = _new_output((B, NH, N, H), torch.float32, dev)
    drw = _new_output((B, NH, N, W), torch.float32, dev)
    common = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        rel_h.stride(0), rel_h.stride(1), rel_h.stride(2), rel_w.stride(0), rel_w.stride(1), rel_w.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
    )
    meta = dict(HEAD_DIM=d, D_PAD=d_pad, W_PAD=w_pad, DOT_PREC=_dot_prec(dt))
    qk_scale = scale * 1.4426950408889634
    grid_kv = lambda META: (B * NH * triton.cdiv(H, META["BH"]),)  # noqa: E731
    _dkdv_tuned[grid_kv](q, k, v, rel_h, rel_w, do, lse, delta, dk, dv, *common,
                         dk.stride(0), dk.stride(1), dk.stride(2), NH, N, H, W, qk_scale, scale, **meta)
    grid_q = lambda META: (B * NH * triton.cdiv(N, META["BLOCK_M"]),)  # noqa: E731
    _dq_tuned[grid_q](q, k, v, rel_h, rel_w, do, lse, delta, dq, drh, drw, *common,
                      dq.stride(0), dq.stride(1), dq.stride(2), NH, N, H, W, qk_scale, scale, **meta)
    return dq, dk, dv, drh.to(dt), drw.to(dt)


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


BACKEND = Backend(
    name="triton",
    fn=relpos_attention_triton,
    description="fused Triton flash attention, bias added in registers (fwd + bwd, no N x N tensor)",
    check=_check,
    is_available=lambda: UNAVAILABLE,
    auto_check=_auto_check,
)
