"""The real GPU builds, checked without a GPU (kernels/aot.py): every Triton kernel of the package,
for every config its autotuner may pick on H100/H200 (sm_90a) and A100 (sm_80), in fp16 and bf16,
at SAM's shapes, compiled here by the installed Triton with the launchers' own arguments.

It fails on a compile error, any spill or stack frame, shared memory over the target's limit, an
sm_90a fp16/bf16 product not on wgmma, and a synchronous load in an attention key loop. The same
table is ``fastsamclip info --kernels``. About 260 builds over two processes (~1 s each).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fastsamclip.kernels import aot
from fastsamclip.kernels import relpos_attention_triton as attention_triton

pytestmark = pytest.mark.skipif(attention_triton.triton is None, reason="triton not installed")

KERNELS = {"attention fwd", "attention delta", "attention dkdv", "attention dq", "cosine rows fwd",
           "cosine rows fwd +grad", "cosine rows bwd", "focal-dice fwd", "focal-dice finalize", "focal-dice bwd"}


@pytest.fixture(scope="module")
def table():
    builds = aot.builds(aot.TARGETS, ("fp16", "bf16"))
    return builds, aot.run(builds, jobs=2)


def test_every_kernel_builds_clean_for_h100_h200_and_a100(table):
    builds, rows = table
    problems = aot.check(rows)
    assert not problems, aot.versions() + "\n" + aot.format_table(rows) + "\n\n" + "\n".join(problems)
    # Every kernel, for both targets and both dtypes, every attention shape.
    for target in aot.TARGETS:
        for dtype in ("fp16", "bf16"):
            mine = [r for r in rows if r.target == target and r.dtype == dtype]
            assert {r.kernel for r in mine} == KERNELS, (target, dtype)
            for label, *_ in aot.SHAPES:
                assert {r.kernel for r in mine if r.shape == label} >= {"attention fwd", "attention dq"}, label
    # Each autotuned launch once per config of the target's space (deduplicated by grid rows).
    fam = {"sm_90a": "sm90", "sm_80": "sm80"}
    for (label, B, heads, H, W, d) in aot.SHAPES:
        d0, d1 = attention_triton.head_split(d)
        w_pad = attention_triton._w_pad(W)
        for target in aot.TARGETS:
            for kind in attention_triton.KINDS:
                cls = attention_triton.dtype_class(torch.float16, "tf32", d0, d1)
                space = attention_triton.config_space(kind, fam[target], cls)
                want = {(bm, attention_triton.grid_rows(bn, w_pad), w, s) for bm, bn, w, s in space}
                got = {(b.config["BLOCK_M"], b.config["BH"], b.config["num_warps"], b.config["num_stages"])
                       for b, r in zip(builds, rows) if b.target == target and b.label == label
                       and b.dtype == "fp16" and b.config and r.kernel == f"attention {kind}"}
                assert got == want, (label, target, kind)
    # Hopper's products are on wgmma (checked above as a finding), Ampere's on mma.sync.
    assert {r.mma for r in rows if r.target == "sm_80" and r.kernel.startswith("attention")} - {"-"} == {"mma"}
    assert {r.mma for r in rows if r.target == "sm_90a" and r.kernel.startswith("attention")} - {"-"} == {"wgmma"}


def test_the_pruner_agrees_with_the_compiled_shared_memory(table):
    """The pruner drops configs by the shared memory Triton reports for the compiled kernel, so its
    choice is the compiled figure's: at any limit it keeps exactly the configs that fit."""
    builds, rows = table
    tri = attention_triton.triton
    for label, *_ in aot.SHAPES[:3]:
        picked = [(b, r) for b, r in zip(builds, rows) if b.config and b.label == label and b.target == "sm_90a"
                  and b.dtype == "bf16" and r.kernel == "attention fwd"]
        figures = {(b.config["BLOCK_M"], b.config["BH"], b.config["num_warps"], b.config["num_stages"]): r.smem_bytes
                   for b, r in picked}
        limit = sorted(figures.values())[len(figures) // 2]
        w_pad = attention_triton._w_pad(next(s[4] for s in aot.SHAPES if s[0] == label))
        configs = [tri.Config({"BLOCK_M": bm, "BLOCK_N": bh * w_pad}, num_warps=w, num_stages=s)
                   for bm, bh, w, s in figures]

        def shared_of(cfg):
            return figures[(cfg.kwargs["BLOCK_M"], cfg.kwargs["BH"], cfg.num_warps, cfg.num_stages)]

        kept = attention_triton.select_configs("fwd", configs, None, None, w_pad, limit, shared_of)
        assert {(c.kwargs["BLOCK_M"], c.kwargs["BH"], c.num_warps, c.num_stages) for c in kept} == {
            k for k, v in figures.items() if v <= limit}, label


def test_an_injected_spilling_config_is_caught():
    """A config outside the space (128 queries x 64 keys on 4 warps: ~570 B of spill at the
    windows on sm_90a) is reported, with its figure."""
    label, B, heads, H, W, d = aot.SHAPES[0]
    build = aot.Build("attention", [B, heads, H, W, d], label, "fp16", 0,
                      {"BLOCK_M": 128, "BH": 4, "num_warps": 4, "num_stages": 2}, "sm_90a")
    (row,) = aot.run([build], jobs=1)
    assert row.kernel == "attention fwd" and row.regs == 255 and row.spill_bytes > 0, row
    assert any("spills" in f for f in row.findings) and aot.check([row])


def _row(**kw):
    base = dict(kernel="attention fwd", shape="s", dtype="bf16", config="c", target="sm_90a", regs=200, spill_bytes=0,
                stack_bytes=0, smem_bytes=100 * 1024, smem_limit=227 * 1024, mma="wgmma", sync_loads=0)
    base.update(kw)
    return aot.Row(**base)


@pytest.mark.parametrize("kw,finding", [
    (dict(error="PTXASError: boom"), "compile error"),
    (dict(spill_bytes=8, stack_bytes=8), "spills 8 B"),
    (dict(stack_bytes=16), "16 B stack frame"),
    (dict(smem_bytes=241 * 1024), "shared memory 241 KB > 227 KB"),
    (dict(mma="wgmma+mma"), "not wgmma"),
    (dict(mma="fma", dtype="fp16"), "not wgmma"),
    (dict(sync_loads=1), "synchronous load"),
    (dict(regs=None), "no ptxas log"),
])
def test_each_problem_is_a_finding(kw, finding):
    assert any(finding in f for f in aot.findings(_row(**kw))), aot.findings(_row(**kw))


def test_what_is_not_a_problem():
    assert aot.findings(_row()) == []
    assert aot.findings(_row(target="sm_80", mma="mma", smem_limit=163 * 1024)) == []
    assert aot.findings(_row(dtype="fp32", mma="fma")) == []  # exact fp32 has no tensor-core path
    assert aot.findings(_row(mma="-", kernel="cosine rows fwd", sync_loads=None)) == []


TTGIR_SYNC = """
    %k = ttg.async_copy_global_to_local %p, %a : tensor<64x64x!tt.ptr<f16>> -> <64x64xf16>
    %r:3 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z, %rh_cur = %rh0, %kk = %k) -> (f32) {
      %k2 = ttg.async_copy_global_to_local %p, %a : tensor<64x64x!tt.ptr<f16>> -> <64x64xf16>
      %rh_1 = tt.load %ptr, %mask : tensor<64x!tt.ptr<f16>>
      %s = arith.addf %acc, %rh_1 : tensor<64xf32>
      scf.yield %s, %rh_cur, %k2 : f32
    }
"""


def test_the_key_loop_detector():
    assert aot.key_loop_sync_loads(TTGIR_SYNC) == 1
    prefetched = TTGIR_SYNC.replace("arith.addf %acc, %rh_1", "arith.addf %acc, %rh_cur").replace(
        "scf.yield %s, %rh_cur", "scf.yield %s, %rh_1")
    assert aot.key_loop_sync_loads(prefetched) == 0
    assert aot.key_loop_sync_loads("scf.for %i = %a to %b step %c {\n}\n") is None  # no async copies


def test_a_warmed_cache_is_what_the_launch_path_finds(tmp_path):
    """``warm``: the kernels an H100 compiles for a launch (here the dk/dv kernel: each config its
    pruner keeps), built into a Triton cache through the launch path under a stand-in driver;
    warming a copy of it at another path compiles nothing: the key the launch path computes is
    the one stored."""
    shapes, only = [("fp16", ("grid 4 x 4, d 16", 2, 2, 4, 4, 16))], ["attention dkdv"]
    first = aot.warm(str(tmp_path / "a"), shapes, jobs=1, kernels=only)
    space = len(attention_triton.config_space("dkdv", "sm90", "16bit"))
    assert not first.errors and first.kernels == first.new_entries == first.entries == space, first.describe()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    again = aot.warm(str(tmp_path / "b"), shapes, jobs=1, kernels=only)
    assert not again.errors and again.kernels == space and again.new_entries == 0, again.describe()
