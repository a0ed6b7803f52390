"""The attention benchmark: a CPU smoke run of ``--quick`` into a temp CSV, and the
pytest-benchmark view of it (GPU only):

    pytest tests/bench/test_bench_relpos_attention.py --benchmark-columns=median,iqr --benchmark-sort=name

The full table with TFLOP/s, memory and every competitor comes from
``python -m fastsamclip.bench.bench_relpos_attention``; the GPU tests give pytest-benchmark's
statistics and ``--benchmark-compare`` for the fused kernel against the SDPA-with-bias baseline.
"""

import importlib.util

import pytest
import torch

from fastsamclip.bench import bench_relpos_attention
from fastsamclip.bench.bench_relpos_attention import _timed, competitors, make_inputs
from fastsamclip.bench.harness import read_csv
from fastsamclip.kernels import OPS

needs_triton = pytest.mark.skipif(OPS["relpos_attention"]["triton"].is_available() is not None,
                                  reason=f"triton backend unavailable: {OPS['relpos_attention']['triton'].is_available()}")
needs_gpu_and_pytest_benchmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("pytest_benchmark") is None,
    reason="needs a CUDA GPU (timings on CPU mean nothing) and pytest-benchmark")


# ---------------------------------------------------------------------------------------------
# Smoke test: `python -m fastsamclip.bench.bench_relpos_attention --quick` on CPU
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_bench_relpos_attention_quick_writes_rows(tmp_path, capsys):
    out = tmp_path / "relpos_attention.csv"
    impls = ["triton", "flex", "sdpa-bias", "sam-reference", "fold-sdpa-flash", "xformers-bias", "flash-nobias"]
    bench_relpos_attention.main(["--quick", "--modes", "fwd,fwd+bwd", "--impls", *impls, "--out", str(out), "--no-plot"])
    rows = read_csv(str(out))
    assert {r["impl"] for r in rows} == set(impls)
    n_cases = len({r["case"] for r in rows})
    assert n_cases == 2 and len(rows) == n_cases * len(impls) * 2
    for r in rows:  # missing competitors are rows with a reason, never gaps or crashes
        assert r["status"] == "ok" or r["status"].startswith("skipped: "), r
    for impl in ("triton", "sdpa-bias", "sam-reference", "fold-sdpa-flash"):
        ok = [r for r in rows if r["impl"] == impl]
        assert all(r["status"] == "ok" and float(r["ms"]) > 0 and float(r["tflops"]) > 0 for r in ok), ok
        errs = [float(r["extra"].split("max_err=")[1].split(";")[0]) for r in ok]
        assert max(errs) < 1e-4, (impl, errs)  # speed travels with agreement to the reference
    for r in rows:  # the fused kernel's rows say which tiles its autotuner ran, for each kernel that ran
        tiles = r["extra"].split("tiles=")[1].split(";")[0] if "tiles=" in r["extra"] else None
        if r["impl"] == "triton":
            want = "fwd 64x4r/w4/s1" + (", dkdv 64x4r/w4/s1, dq 64x4r/w4/s1" if r["mode"] == "fwd+bwd" else "")
            assert tiles == want, r
        else:
            assert tiles is None, r
    assert "1.00x" in capsys.readouterr().out  # the sdpa-bias baseline against itself
    bench_relpos_attention.main(["--quick", "--modes", "fwd", "--impls", "sdpa-bias", "--out", str(out), "--no-plot"])
    assert len(read_csv(str(out))) == len(rows) + n_cases  # appends, never overwrites


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (GPU only)
# ---------------------------------------------------------------------------------------------
SHAPES = {  # label: (batch of attention calls, heads, H, W, d), ViT-B at 1024px
    "global4096-b1": (1, 12, 64, 64, 64),
    "windows196-b1x25": (25, 12, 14, 14, 64),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", "sdpa-bias", "flex"])
@pytest.mark.parametrize("shape", list(SHAPES))
@needs_gpu_and_pytest_benchmark
def test_attention_speed(benchmark, shape, impl, mode):
    comps = {name: (fn, why) for name, fn, why, _ in competitors("cuda")}
    fn, why = comps[impl]
    if fn is None:
        pytest.skip(why)
    B, nh, H, W, d = SHAPES[shape]
    inputs = make_inputs(B, nh, H, W, d, torch.bfloat16, "cuda", mode != "fwd")
    call, why = _timed(fn, inputs, mode)
    if call is None:
        pytest.skip(why)

    def synced():
        call()
        torch.cuda.synchronize()  # time the kernels, not the launch

    synced()  # warm-up: autotune / compile outside the measurement
    benchmark.pedantic(synced, rounds=20, iterations=5, warmup_rounds=2)
