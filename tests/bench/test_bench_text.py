"""CPU smoke run of the segment-by-text benchmark: the three pipelines have a row on the same images,
with speed, instances and the speed-up, and it is part of `fastsamclip bench all`."""

from fastsamclip.bench import bench_text
from fastsamclip.bench.harness import parse_extra, read_csv
from fastsamclip.cli.bench import MODULES
from fastsamclip.cli.parsers import BENCH_ALL, BENCHMARKS

IMPLS = ["samclip-segment_text", "samclip-generate+filter", "sam-amg+clip-crops+filter/tiny-clip"]


def test_quick_run_writes_a_row_per_pipeline(tmp_path, capsys):
    out = tmp_path / "text.csv"
    assert bench_text.main(["--quick", "--phrases", "3", "--points-per-side", "2", "--max-peaks", "2",
                            "--max-side", "96", "--warmup", "0", "--out", str(out)]) == 0
    rows = read_csv(str(out))
    assert [r["impl"] for r in rows] == IMPLS
    assert len({r["case"] for r in rows}) == 1 and "3 phrases" in rows[0]["case"]  # the same images and phrases
    extras = [parse_extra(r["extra"]) for r in rows]
    for r, e in zip(rows, extras):
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(e["img_s"]) > 0
        assert abs(float(e["p50_ms"]) - float(r["ms"])) <= 1e-3 * float(r["ms"]) and r["peak_mem_mb"] != ""
        assert e["weights"] == "random" and e["images"] == "1" and e["phrases"] == "3" and float(e["load_avg"]) >= 0
    ours, gen, amg = extras
    # With every filter off, the generators keep 3 masks per point of the 2 x 2 grid, those named as a
    # phrase remain; segment_text finds at least one instance of each phrase, at most 3 x 2 + 1 per phrase.
    assert float(gen["instances_per_image"]) <= 12 and float(amg["instances_per_image"]) <= 12
    assert 3 <= float(ours["instances_per_image"]) <= 3 * 7 and ours["max_peaks"] == "2"
    assert float(gen["text_speedup"]) > 0 and float(amg["text_speedup"]) > 0 and "text_speedup" not in ours
    assert "appended 3 rows" in capsys.readouterr().out


def test_it_is_registered_and_part_of_bench_all():
    assert MODULES["text"] == ("bench_text",) and "text" in BENCHMARKS and "text" in BENCH_ALL
