"""CPU smoke run of the inference benchmark: latency rows and cold/warm first-result rows."""

from fastsamclip.bench import bench_inference
from fastsamclip.bench.harness import read_csv


def test_quick_run_writes_latency_and_first_result_rows(tmp_path, capsys):
    out = tmp_path / "inference.csv"
    assert bench_inference.main(["--quick", "--labels", "3", "--out", str(out)]) == 0
    rows = read_csv(str(out))
    modes = {r["mode"]: r for r in rows}
    assert set(modes) == {"request p50", "request p99", "first result cold", "first result warm"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows)
    assert float(modes["request p99"]["ms"]) >= float(modes["request p50"]["ms"])
    # A first result includes process start, model load and one request: slower than a request.
    assert float(modes["first result warm"]["ms"]) > float(modes["request p50"]["ms"])
    assert "appended 4 rows" in capsys.readouterr().out


def test_low_precision_run_reports_agreement_with_fp32(tmp_path):
    out = tmp_path / "inference.csv"
    assert bench_inference.main(["--quick", "--labels", "2", "--iters", "2", "--no-ttfr", "--dtype", "bf16",
                                 "--out", str(out)]) == 0
    (p50,) = [r for r in read_csv(str(out)) if r["mode"] == "request p50"]
    extra = dict(kv.split("=", 1) for kv in p50["extra"].split(";"))
    assert extra["dtype"] == "bf16"
    assert float(extra["vs_fp32_sam_rel_err"]) < 0.05 and float(extra["vs_fp32_clip_cos"]) > 0.99
    assert float(extra["vs_fp32_label_agreement"]) > 0.9
