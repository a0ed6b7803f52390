"""`fastsamclip bench gpu`: the one-shot GPU command, run end to end on the CPU with --quick (tiny
shapes, the Triton interpreter, the same files as on a GPU), its deadlines, and its test list."""

import ast
import csv
import os
import time

import pytest

from fastsamclip.bench import gpu
from fastsamclip.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ["environment.csv", "info.txt", "tests.csv", "attention.csv", "losses.csv", "e2e.csv", "train.csv",
         "inference.csv", "parts.csv", "summary.md"]


def test_quick_run_writes_every_file_and_a_summary(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert cli_main(["bench", "gpu", "--quick", "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "parts.csv") as f:
        parts = list(csv.DictReader(f))
    assert [p["part"] for p in parts] == [p.name for p in gpu.PARTS]
    assert all(p["status"] == "ok" for p in parts), parts
    text = (out / "summary.md").read_text()
    for section in ("## Parts", "## GPU-only tests", "## Attention", "## Fused losses", "## End to end",
                    "| claim | measured | goal | met |", "## Training step", "## Single request"):
        assert section in text, section
    with open(out / "e2e.csv") as f:
        e2e = list(csv.DictReader(f))
    impls = {r["impl"] for r in e2e}
    assert {"separate-eager/tiny-clip", "separate-strong/tiny-clip", "merged-fused-compile",
            "separate-samfast/tiny-clip"} <= impls
    with open(out / "tests.csv") as f:
        tests = list(csv.DictReader(f))
    assert tests and all(t["outcome"] == "skipped" for t in tests)  # GPU-only: skipped on the CPU
    assert "wrote" in capsys.readouterr().out


def test_a_part_past_its_deadline_is_stopped_and_recorded(tmp_path):
    ctx = gpu.Context(out=str(tmp_path), quick=True)
    os.makedirs(tmp_path / "logs")
    hang = gpu.Part("slow", 1, 1, lambda c: [gpu.Step("hang", ["-c", "import time; print('started', flush=True); "
                                                                     "time.sleep(120)"]),
                                           gpu.Step("never", ["-c", "pass"])])
    t0 = time.time()
    outcome = gpu.run_part(ctx, hang, end=time.time() + 100)
    assert time.time() - t0 < 30
    assert outcome.status == "overran its 1 s deadline in hang" and outcome.logs == ["logs/slow-1.log"]
    assert "started" in (tmp_path / "logs" / "slow-1.log").read_text()
    failing = gpu.Part("bad", 30, 30, lambda c: [gpu.Step("exit 3", ["-c", "raise SystemExit(3)"])])
    assert gpu.run_part(ctx, failing, end=time.time() + 100).status.startswith("failed (exit 3 in exit 3")


def test_test_outcomes_are_read_from_the_log_also_of_a_stopped_run(tmp_path):
    log = tmp_path / "log"
    log.write_text("tests/kernels/test_a.py::test_x[bf16] PASSED                [ 10%]\n"
                   "[gw1] [ 20%] FAILED tests/kernels/test_b.py::test_y \n"
                   "[gw0] [ 30%] SKIPPED tests/kernels/test_c.py::test_z[1-2] \n"
                   "tests/kernels/test_d.py::test_w ERROR\n")
    rows = gpu.write_test_rows(str(log), str(tmp_path / "tests.csv"))
    assert rows == [("tests/kernels/test_a.py::test_x[bf16]", "passed"), ("tests/kernels/test_b.py::test_y", "failed"),
                    ("tests/kernels/test_c.py::test_z[1-2]", "skipped"), ("tests/kernels/test_d.py::test_w", "error")]


def _cuda_only_tests(path):
    """Test functions of a file decorated with requires_cuda."""
    tree = ast.parse(open(path).read())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            if any("requires_cuda" in ast.unparse(d) for d in node.decorator_list):
                out.append(node.name)
    return out


def test_every_gpu_only_kernel_test_is_run_by_the_command():
    listed = set(gpu.GPU_TESTS + gpu.COMPILED_TESTS)
    kernels = os.path.join(REPO, "tests", "kernels")
    for name in sorted(os.listdir(kernels)):
        if name.startswith("test_") and name.endswith(".py"):
            for fn in _cuda_only_tests(os.path.join(kernels, name)):
                assert f"tests/kernels/{name}::{fn}" in listed, f"{name}::{fn} is GPU-only but not in gpu.GPU_TESTS"
    for node in listed:  # and every listed test exists
        path, fn = node.split("::")
        src = open(os.path.join(REPO, path)).read()
        assert f"def {fn}(" in src, node


def test_full_run_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path)])
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--out", str(tmp_path), "--parts", "nope"])
