"""CPU run of the training-step benchmark: a row per stage case and configuration, the backends
each configuration really runs, first-step losses equal to plain torch's, and --compare."""

import logging

import pytest

from fastsamclip.bench import bench_train
from fastsamclip.bench.harness import parse_extra, read_csv


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "train.csv"
    package = logging.getLogger("fastsamclip")
    level = package.level
    assert bench_train.main(["--quick", "--out", str(out)]) == 0
    assert package.level == level  # quiet while it ran, the caller's logging as it was afterwards
    return out, read_csv(str(out))


def test_a_row_per_case_and_configuration(quick_run):
    _, rows = quick_run
    # Stages 1 and 2 at both CLIP sides, stage 3 at its own; B8 at 32 px is B2 at 64 px (constant pixels).
    cases = ["stage1 clip32 B8", "stage1 clip64 B2", "stage2 clip32 B8 + sam64 B2x4", "stage2 clip64 B2 + sam64 B2x4",
             "stage3 clip64 B2"]
    assert [r["case"] for r in rows] == cases * 3
    assert [r["impl"] for r in rows] == [c for c in bench_train.CONFIGS for _ in cases]
    for r in rows:
        e = parse_extra(r["extra"])
        assert r["status"] == "ok", r["status"]
        assert float(e["img_s"]) > 0 and float(r["ms"]) > 0 and float(e["p99_ms"]) >= 0.999 * float(r["ms"])
        assert e["dtype"] == "fp32"  # the training loop's precision on the CPU
        assert ("sam_batch" in e) == r["case"].startswith("stage2")


def test_configurations_run_the_backends_they_name(quick_run):
    _, rows = quick_run
    for r in rows:
        e = parse_extra(r["extra"])
        if r["impl"] == "plain":
            assert (e["attention"], e["losses"], e["compile"]) == ("reference", "reference", "False")
        else:
            # Automatic choice on the CPU: SDPA (Triton is never picked through the interpreter).
            assert e["attention"] == "sdpa" and e["compile"] == str(r["impl"] == "fused-compile")


def test_first_step_loss_equals_plain_torch(quick_run):
    _, rows = quick_run
    for r in rows:
        e = parse_extra(r["extra"])
        assert float(e["loss"]) > 0
        # Same weights and batch, fp32: only the attention kernel's rounding differs.
        assert float(e["loss_vs_plain"]) < 1e-5, (r["case"], r["impl"], e["loss_vs_plain"])


def test_compare_with_an_earlier_run_and_bad_arguments(quick_run, tmp_path, capsys):
    path, _ = quick_run
    out = tmp_path / "again.csv"
    assert bench_train.main(["--quick", "--configs", "plain", "--stages", "1", "--out", str(out),
                             "--compare", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage1 clip")]
    assert sum("x" in line and "(was " in line for line in lines) == 2
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--configs", "plain,fastest"])
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--stages", "4"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_full_size_runs_need_a_gpu_or_an_explicit_cpu(capsys):
    from fastsamclip.bench import bench_inference, e2e

    for main in (bench_train.main, e2e.main, bench_inference.main):
        with pytest.raises(SystemExit):
            main([])
        assert "--quick" in capsys.readouterr().err
