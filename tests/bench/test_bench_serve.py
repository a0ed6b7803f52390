"""CPU smoke run of the serving benchmark: the real server and the in-process predictor, rows written."""

import pytest

from fastsamclip.bench import bench_serve
from fastsamclip.bench.harness import parse_extra, read_csv

from ..export.conftest import session_micro_model

pytest.importorskip("litserve", reason="the server needs litserve (extra 'serve'); CI installs it")
pytest.importorskip("httpx", reason="the benchmark's client (extra 'serve'); CI installs it")


def test_quick_run_writes_throughput_and_latency_rows(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "serve.csv"
    checkpoint = session_micro_model(tmp_path_factory)["merged"]  # the export and serve tests' model
    assert bench_serve.main(["--quick", "--checkpoint", checkpoint, "--requests", "12", "--images", "2",
                             "--out", str(out)]) == 0
    rows = read_csv(str(out))
    assert {(r["impl"].split()[0], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("in-process", "http") for mode in ("request p50", "request p99")}
    for r in rows:
        extra = parse_extra(r["extra"])
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(extra["req_s"]) > 0
        assert float(extra["p99_ms"]) >= float(r["ms"]) - 1e-9 or r["mode"] == "request p99"
    http = [r for r in rows if r["impl"].startswith("http")][0]
    assert 1.0 <= float(parse_extra(http["extra"])["mean_batch"]) <= 8
    assert "throughput: in-process" in capsys.readouterr().out
