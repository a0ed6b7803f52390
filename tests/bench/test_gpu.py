"""`fastsamclip bench gpu`: the one-shot GPU command, run end to end on the CPU with --quick (tiny
shapes, the Triton interpreter, the same files as on a GPU), its deadlines, and its test list."""

import ast
import csv
import os
import tarfile
import time

import pytest
import torch

from fastsamclip.bench import e2e, gpu
from fastsamclip.cli import main as cli_main
from fastsamclip.predictor.engine import resolve_dtype

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILES = ["environment.csv", "info.txt", "tests.csv", "attention.csv", "losses.csv", "e2e.csv", "train.csv",
         "inference.csv", "parts.csv", "triton_cache.csv", "summary.md"]


def test_quick_run_writes_every_file_a_summary_and_one_archive_of_them(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert cli_main(["bench", "gpu", "--quick", "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "parts.csv") as f:
        parts = list(csv.DictReader(f))
    assert [p["part"] for p in parts] == [p.name for p in gpu.PARTS]
    assert all(p["status"] == "ok" for p in parts), parts
    text = (out / "summary.md").read_text()
    for section in ("## Parts", "## GPU correctness tests", "## Attention", "## Fused losses", "## End to end",
                    "| claim | measured | goal | met |", "## Training step", "## Single request", "Triton cache "):
        assert section in text, section
    with open(out / "e2e.csv") as f:
        e2e = [(r["mode"], r["impl"], r["extra"].split("dtype=")[1].split(";")[0]) for r in csv.DictReader(f)]
    fast = "bf16" if resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16 else "fp32"
    c = "tiny-clip"
    assert e2e == [  # every row, in the plan's order: eager, each model's fp32 reference first, then a compiled pair
        ("both", "merged-reference", "fp32"), ("both", f"separate-eager/{c}", "fp32"), ("both", "merged-fused", fast),
        ("both", "merged-fused-pool2", fast), ("both", f"separate-fused/{c}", fast), ("both", f"separate-eager/{c}", "bf16"),
        ("sam", "merged-reference", "fp32"), ("sam", f"separate-eager/{c}", "fp32"), ("sam", "merged-fused-compile", fast),
        ("sam", f"separate-strong/{c}", "bf16"), ("sam", f"separate-samfast/{c}", "bf16")]
    with open(out / "attention.csv") as f:
        assert {r["impl"] for r in csv.DictReader(f)} == {"triton", "sdpa-bias", "flex"}
    with open(out / "tests.csv") as f:
        tests = list(csv.DictReader(f))
    assert tests and all(t["outcome"] == "skipped" for t in tests)  # GPU-only: skipped on the CPU
    # One archive holds every file the run wrote, and nothing else.
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    with tarfile.open(out / gpu.ARCHIVE) as tar:
        assert sorted(tar.getnames()) == [w for w in written if w != gpu.ARCHIVE]
    assert "every file in" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a folder that holds a run is not written over
        gpu.main(["--quick", "--out", str(out)])


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
    # A part gets its deadline plus the time the parts before it left unused, never past the end.
    quick = gpu.Part("on time", 0, 0, lambda c: [gpu.Step("pass", ["-c", "pass"])])
    assert gpu.run_part(ctx, quick, end=time.time() + 100).status == "overran its 0 s deadline before pass"
    assert gpu.run_part(ctx, quick, end=time.time() + 100, extra_s=60).status == "ok"
    assert gpu.run_part(ctx, quick, end=time.time() + gpu.RESERVE_S, extra_s=60).status.startswith("overran")


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


def test_every_gpu_only_kernel_test_is_run_by_the_command_or_left_out_with_a_reason():
    run = gpu.GPU_TESTS + gpu.COMPILED_TESTS
    kernels = os.path.join(REPO, "tests", "kernels")
    for name in sorted(os.listdir(kernels)):
        if name.startswith("test_") and name.endswith(".py"):
            for fn in _cuda_only_tests(os.path.join(kernels, name)):
                node = f"tests/kernels/{name}::{fn}"
                assert any(t == node or t.startswith(node + "[") for t in run + list(gpu.LEFT_OUT)), \
                    f"{node} is GPU-only but neither in gpu.GPU_TESTS nor in gpu.LEFT_OUT"
    for node in run + list(gpu.LEFT_OUT):  # and every one named exists
        path, fn = node.split("::")
        src = open(os.path.join(REPO, path)).read()
        assert f"def {fn.split('[')[0]}(" in src, node
    assert all(why for why in gpu.LEFT_OUT.values())


def test_the_plan_fits_six_minutes_in_the_order_of_value():
    """Measurements first (attention, end to end, training, a request; flex and the losses last), the
    correctness tests after them, all within 6 minutes; --dry-run prints it and runs nothing."""
    assert [p.name for p in gpu.PARTS] == ["environment", "attention", "e2e", "train", "inference", "losses", "flex",
                                          "tests"]
    assert gpu.BUDGET_S == sum(p.budget_s for p in gpu.PARTS) <= 360
    assert all(p.estimate and p.what for p in gpu.PARTS)
    rows = gpu.e2e_rows("C")
    eager = [r for r in rows if "compile" not in r and "strong" not in r]
    assert rows.index("sam:merged-fused-compile") > max(rows.index(r) for r in eager if r.startswith("both:"))
    text = gpu.plan_text()
    for i, p in enumerate(gpu.PARTS, 1):
        assert f"{i:>2}  {p.name:12s} {p.budget_s:>6.0f} s" in text
    assert f"sum of the deadlines: {gpu.BUDGET_S:.0f} s" in text


def test_dry_run_prints_the_plan_without_a_gpu(tmp_path, capsys):
    assert cli_main(["bench", "gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sum of the deadlines: 360 s (6.0 min)" in out and "How each deadline was estimated" in out
    assert not list(tmp_path.iterdir())


def test_the_triton_cache_counts_kernels_and_autotune_choices(tmp_path):
    for name, files in {"a": ["_fwd_kernel.cubin", "_fwd_kernel.json"], "b": ["_bwd_dq_kernel.cubin"],
                        "c": ["_fwd_kernel.autotune.json"], "d": ["launcher.so"],
                        "e": ["triton_poi_fused_add_0.cubin"]}.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")
    assert gpu.triton_cache_entries(str(tmp_path)) == ({"a", "b"}, {"e"}, {"c"})
    assert gpu.triton_cache_entries(str(tmp_path / "none")) == (set(), set(), set())


def test_full_run_refuses_a_machine_without_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path)])
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--out", str(tmp_path), "--parts", "nope"])


def test_the_end_to_end_rows_are_named_with_their_workload(capsys):
    """The plan's e2e rows are ``workload:impl[@dtype]``; a malformed one is one clear line (exit 2)
    before any model is built."""
    for bad in ("merged-fused", "nope:merged-fused", "both:"):
        with pytest.raises(SystemExit) as e:
            e2e.main(["--quick", "--rows", bad])
        assert e.value.code == 2 and "--rows" in capsys.readouterr().err
    assert all(r.partition(":")[0] in e2e.WORKLOADS for r in gpu.e2e_rows("C"))
