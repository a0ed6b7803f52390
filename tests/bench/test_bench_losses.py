"""CPU smoke runs of the three loss benchmarks (``python -m fastsamclip.bench.bench_<op> --quick``):
every case and competitor lands in the CSV as a timed, successful row, and the fused and eager rows
agree with the fp32 reference."""

import importlib

import pytest

from fastsamclip.bench.harness import read_csv


@pytest.mark.parametrize("op, n_cases", [("cosine_distill", 2), ("linear_cosine_distill", 1), ("focal_dice", 1)])
def test_loss_benchmark_quick(op, n_cases, tmp_path, capsys):
    bench = importlib.import_module(f"fastsamclip.bench.bench_{op}")
    out = tmp_path / f"{op}.csv"
    # aot_eager: the smoke run checks the plumbing, not Inductor's code generation (seconds, not a minute)
    assert bench.main(["--quick", "--dtype", "fp32", "--out", str(out), "--no-plot",
                       "--compile-backend", "aot_eager"]) == 0
    rows = read_csv(str(out))
    cases = {r["case"] for r in rows}
    assert len(cases) == n_cases, cases
    assert len(rows) == n_cases * 3
    for case in cases:
        assert sorted(r["impl"] for r in rows if r["case"] == case) == ["compiled", "eager", "fused"], case
    for r in rows:
        assert r["bench"] == op and r["mode"] == "fwd+bwd"
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0, r
        extra = dict(kv.split("=", 1) for kv in r["extra"].split(";") if kv)
        if r["impl"] in ("fused", "eager"):
            assert float(extra["loss_rel_err_vs_fp32"]) < 1e-5, r
    assert "speed-up" in capsys.readouterr().out
