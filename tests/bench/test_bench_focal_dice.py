"""CPU smoke run of ``python -m fastsamclip.bench.bench_focal_dice --quick``: every case and
competitor lands in the CSV as a timed, successful row, and the fused rows agree with the fp32
reference."""

from fastsamclip.bench import bench_focal_dice
from fastsamclip.bench.harness import read_csv


def test_bench_focal_dice_quick(tmp_path, capsys):
    out = tmp_path / "focal_dice.csv"
    # aot_eager: the smoke run checks the plumbing, not Inductor's code generation (seconds, not a minute)
    assert bench_focal_dice.main(["--quick", "--dtype", "fp32", "--out", str(out), "--no-plot",
                               "--compile-backend", "aot_eager"]) == 0
    rows = read_csv(str(out))
    cases = {r["case"] for r in rows}
    assert len(cases) == 1, cases
    assert len(rows) == 1 * 3
    for case in cases:
        assert sorted(r["impl"] for r in rows if r["case"] == case) == ["compiled", "eager", "fused"], case
    for r in rows:
        assert r["bench"] == "focal_dice" and r["mode"] == "fwd+bwd"
        assert r["status"] == "ok", r
        assert float(r["ms"]) > 0, r
        extra = dict(kv.split("=", 1) for kv in r["extra"].split(";") if kv)
        if r["impl"] in ("fused", "eager"):
            assert float(extra["loss_rel_err_vs_fp32"]) < 1e-5, r
    assert "speed-up" in capsys.readouterr().out
