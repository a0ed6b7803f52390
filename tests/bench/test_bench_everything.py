"""CPU smoke run of the segment-everything benchmark: both pipelines have a row on the same images,
the merged one finds the generator's masks, and the benchmark is part of `fastsamclip bench all`."""

from fastsamclip.bench import bench_everything
from fastsamclip.bench.harness import parse_extra, read_csv
from fastsamclip.cli.bench import MODULES
from fastsamclip.cli.parsers import BENCH_ALL, BENCHMARKS


def test_quick_run_writes_a_row_per_pipeline_with_speed_memory_and_agreement(tmp_path, capsys):
    out = tmp_path / "everything.csv"
    assert bench_everything.main(["--quick", "--labels", "5", "--out", str(out)]) == 0
    rows = read_csv(str(out))
    assert [r["impl"] for r in rows] == ["sam-amg+clip-crops/tiny-clip", "samclip-generate"]
    assert len({r["case"] for r in rows}) == 1  # the same images and parameters
    base, ours = (parse_extra(r["extra"]) for r in rows)
    for r, e in zip(rows, (base, ours)):
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(e["img_s"]) > 0
        assert float(e["p90_ms"]) >= 0.999 * float(r["ms"])
        assert r["peak_mem_mb"] != ""  # the resident-set peak on the CPU
        assert e["labels"] == "5" and e["weights"] == "random"
    # Random weights keep every candidate (3 per point of the 4 x 4 grid): a CLIP stage with work.
    assert float(base["masks_per_image"]) == float(ours["masks_per_image"]) == 48
    assert float(ours["mask_agreement"]) == 1.0 and float(ours["mean_best_iou"]) > 0.99
    assert 0.0 <= float(ours["label_agreement"]) <= 1.0 and 0.0 <= float(ours["label_agreement_same_head"]) <= 1.0
    assert float(ours["speedup"]) > 0
    assert "appended 2 rows" in capsys.readouterr().out


def test_it_is_registered_and_part_of_bench_all():
    assert MODULES["everything"] == ("bench_everything",) and "everything" in BENCHMARKS
    assert "everything" in BENCH_ALL
