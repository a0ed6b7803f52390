"""CPU smoke run of the input-pipeline benchmark: a row per stream and worker count, the data-wait
consumer, and the step model it defaults to."""

import argparse

import pytest

from fastsamclip.bench import bench_data
from fastsamclip.bench.harness import parse_extra, read_csv

pytest.importorskip("webdataset")


def test_quick_run_writes_rate_and_wait_rows(tmp_path, capsys):
    out = tmp_path / "data.csv"
    assert bench_data.main(["--quick", "--schedules", "mixed", "--workers", "0,1", "--images", "24", "--sam-images",
                            "2", "--sam-batch", "2", "--batches", "2", "--data", str(tmp_path / "d"),
                            "--train-csv", str(tmp_path / "none.csv"), "--out", str(out)]) == 0
    rows = read_csv(str(out))
    assert [(r["case"], r["impl"]) for r in rows] == [
        ("clip 224/448", "stream w=0"), ("clip 224/448", "stream w=1"), ("clip 224/448", "pil full"),
        ("clip 224/448", "torchvision cpu"), ("sa1b 1024", "stream w=0"), ("sa1b 1024", "stream w=1"),
        ("wait live", "stream w=0"), ("wait live", "stream w=1"), ("wait cached", "stream w=0"),
        ("wait cached", "stream w=1")]
    for r in rows:
        e = parse_extra(r["extra"])
        assert r["status"] == "ok", r["status"]
        if r["case"].startswith("wait"):
            assert 0 <= float(e["wait_pct"]) <= 100 and e["source"] == "the FLOP model at 400 TFLOP/s"
        else:
            assert float(e["img_s"]) > 0 and float(r["ms"]) > 0
    assert "appended 10 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_data.main(["--quick", "--workers", "9", "--images", "24"])  # more workers than shards


def test_the_step_model(tmp_path):
    gpu_rows = tmp_path / "train.csv"  # bench train's CSV with GPU rows: their step times are used
    gpu_rows.write_text("date,commit,device,driver,torch,triton,bench,case,impl,mode,ms,tflops,gbps,peak_mem_mb,status,extra\n"
                        ",,NVIDIA H200,,,,train,stage2 clip224 B64 + sam1024 B4x32,fused,step,80,,,,ok,\n"
                        ",,NVIDIA H200,,,,train,stage2 clip224 B64 + sam1024 B4x32,fused-compile,step,64,,,,ok,\n"
                        ",,NVIDIA H200,,,,train,stage2 clip448 B16 + sam1024 B4x32,fused,step,48,,,,ok,\n"
                        ",,cpu (x86_64 2 cores),,,,train,stage2 clip224 B8 + sam64 B2x4,fused,step,1,,,,ok,\n")
    measured, source = bench_data.step_model(argparse.Namespace(step_ms=None, batch=256, tflops=400.0,
                                                                train_csv=str(gpu_rows)))
    assert measured["live"] == {224: 256.0, 448: 192.0} and source == "bench train's fastest stage-2 GPU rows"
    model, source = bench_data.step_model(argparse.Namespace(step_ms=None, batch=256, tflops=400.0,
                                                             train_csv=str(tmp_path / "none.csv")))
    # 256 images at 224: (131 + 162) GFLOP each at 400 TFLOP/s; 64 at 448: (554.5 + 162).
    assert model["live"][224] == pytest.approx(187.5, abs=0.1) and model["cached"][224] == pytest.approx(83.8, abs=0.1)
    assert model["live"][448] == pytest.approx(114.6, abs=0.1) and source == "the FLOP model at 400 TFLOP/s"
    given, source = bench_data.step_model(argparse.Namespace(step_ms="100,50", batch=256, tflops=400.0, train_csv=None))
    assert given["live"] == given["cached"] == {224: 100.0, 448: 50.0} and source == "--step-ms"
