"""`fastsamclip export --format aoti`: one package per resolution, loaded by a process that imports
only torch, equal to the eager model; what the package may carry (no fastsamclip op)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastsamclip.checkpoint import load_merged
from fastsamclip.cli import main
from fastsamclip.export import ImageEncoder, foreign_ops, max_rel_err, package_name
from fastsamclip.export.aoti import FUSED_OP, attention_candidates, export_program, is_triton_op

RTOL = 1e-4

# Run in a fresh interpreter: torch only. It must not import fastsamclip, and says so.
LOADER = r"""
import json, sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.load(sys.argv[2])
outs = [runner(x[:1]), runner(x)]          # batch 1 and batch 3: the batch is dynamic
torch.save(outs, sys.argv[3])
print(json.dumps({"metadata": runner.get_metadata(),
                  "fastsamclip": sorted(m for m in sys.modules if m.startswith("fastsamclip"))}))
"""


@pytest.fixture(scope="module")
def package(micro, tmp_path_factory):
    """One small package, compiled once (AOTInductor's C++ compile on the CPU: ~30-60 s)."""
    out = tmp_path_factory.mktemp("aoti")
    assert main(["export", "--checkpoint", micro["merged"], "--format", "aoti", "--device", "cpu",
                 "--out", str(out)]) == 0
    return {"out": out, "path": str(out / package_name(64)), **micro}


def test_package_runs_without_the_model_code_and_equals_the_eager_model(package, tmp_path):
    x = torch.randn(3, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-c", LOADER, package["path"], str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["fastsamclip"] == []
    meta = report["metadata"]
    assert meta["attention"] == "sdpa" and meta["resolution"] == "64" and meta["device"] == "cpu"
    model = load_merged(package["merged"], "cpu")
    with torch.no_grad():
        ref = ImageEncoder(model)(x)
    one, three = torch.load(tmp_path / "y.pt")
    for name, got1, got3, want in zip(("sam_embedding", "clip_embedding", "clip_patches"), one, three, ref):
        assert max_rel_err(got1, want[:1]) < RTOL, name
        assert max_rel_err(got3, want) < RTOL, name


def test_package_metadata_beside_it(package):
    side = json.load(open(package["out"] / "encoder_64.json"))
    assert side["attention"] == "sdpa" and "triton" in side["attention_not_used"]
    assert max(side["verified"]["max_rel_err"].values()) < RTOL
    assert json.load(open(package["out"] / "export.json"))["aoti"]["64"]["file"] == "encoder_64.pt2"


def test_the_fused_kernel_as_a_custom_op_is_what_a_package_cannot_carry(micro):
    """Exported with the Triton backend forced (the interpreter runs it on the CPU), the graph calls
    fastsamclip's custom op: the check that keeps such a graph out of a package finds it."""
    model = load_merged(micro["merged"], "cpu")
    program = export_program(model, 64, torch.device("cpu"), "triton")
    assert foreign_ops(program) == [FUSED_OP]
    assert foreign_ops(export_program(model, 64, torch.device("cpu"), "sdpa")) == []
    candidates, not_used = attention_candidates(torch.device("cpu"))
    assert candidates == ["sdpa"] and "GPU code" in not_used["triton"]


def test_is_triton_op_tells_triton_ops_from_custom_ops():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    @torch.library.triton_op("fastsamclip_test::copy", mutates_args=())
    def copy(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        torch.library.wrap_triton(_copy)[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
        return y

    @torch.library.custom_op("fastsamclip_test::plain", mutates_args=())
    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    assert is_triton_op("fastsamclip_test::copy")
    assert not is_triton_op("fastsamclip_test::plain")
