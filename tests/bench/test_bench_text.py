"""CPU smoke run of the segment-by-text benchmark: the three pipelines have a row per phrase count on
the same images, with speed, instances and the speed-up, and it is part of `fastsamclip bench all`."""

from fastsamclip.bench import bench_text
from fastsamclip.bench.harness import parse_extra, read_csv
from fastsamclip.cli.bench import BENCH_ALL, BENCHMARKS, MODULES

IMPLS = ["samclip-segment_text", "samclip-generate+filter", "sam-amg+clip-crops+filter/tiny-clip"]


def test_quick_run_writes_a_row_per_pipeline_and_phrase_count(tmp_path, capsys):
    out = tmp_path / "text.csv"
    assert bench_text.main(["--quick", "--phrases", "1", "3", "--points-per-side", "2", "--max-peaks", "2",
                            "--max-side", "96", "--warmup", "0", "--out", str(out)]) == 0
    rows = read_csv(str(out))
    assert [r["impl"] for r in rows] == IMPLS * 2
    assert [r["case"] for r in rows] == [rows[0]["case"]] * 3 + [rows[3]["case"]] * 3 and "3 phrases" in rows[3]["case"]
    extras = [parse_extra(r["extra"]) for r in rows]
    for r, e in zip(rows, extras):
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(e["img_s"]) > 0
        assert abs(float(e["p50_ms"]) - float(r["ms"])) <= 1e-3 * float(r["ms"]) and r["peak_mem_mb"] != ""
        assert e["weights"] == "random" and e["images"] == "1"
    for k, n in ((0, 1), (3, 3)):
        ours, gen, amg = extras[k:k + 3]
        assert ours["phrases"] == gen["phrases"] == amg["phrases"] == str(n)
        # With every filter off, the generators keep 3 masks per point of the 2 x 2 grid, those named as a
        # phrase remain; segment_text finds at least one instance of each phrase, at most 3 x 2 + 1 per phrase.
        assert float(gen["instances_per_image"]) <= 12 and float(amg["instances_per_image"]) <= 12
        assert n <= float(ours["instances_per_image"]) <= n * 7 and ours["max_peaks"] == "2"
        assert float(gen["text_speedup"]) > 0 and "text_speedup" not in ours
    assert "appended 6 rows" in capsys.readouterr().out


def test_it_is_registered_and_part_of_bench_all():
    assert MODULES["text"] == ("bench_text",) and "text" in BENCHMARKS and "text" in BENCH_ALL
