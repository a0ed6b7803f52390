"""pytest-benchmark view of the attention benchmark (GPU only):

    pytest bench/test_bench_attention.py --benchmark-columns=median,iqr --benchmark-sort=name

The full table with TFLOP/s, memory and every competitor comes from
``python -m bench.bench_attention``; this file gives pytest-benchmark's statistics and
``--benchmark-compare`` for the fused kernel against the SDPA-with-bias baseline.
"""

import pytest
import torch

from bench.bench_attention import _timed, competitors, make_inputs

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (timings on CPU mean nothing)")

SHAPES = {  # label: (batch of attention calls, heads, H, W, d), ViT-B at 1024px
    "global4096-b1": (1, 12, 64, 64, 64),
    "windows196-b1x25": (25, 12, 14, 14, 64),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", "sdpa-bias", "flex"])
@pytest.mark.parametrize("shape", list(SHAPES))
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
