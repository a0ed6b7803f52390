"""CPU smoke run of the end-to-end benchmark: every configuration has a row, agreement is
reported and small where the arithmetic is the same, plots and profiler traces are written."""

import json
import os

import pytest

from fastsamclip.bench import e2e
from fastsamclip.bench.harness import read_csv

IMPLS = {"separate-eager/tiny-clip", "separate-strong/tiny-clip", "separate-fused/tiny-clip", "merged-reference",
         "merged-fused", "merged-fused-pool2", "merged-fused-pool4", "merged-fused-compile",
         "merged-fused-compile-pool2", "merged-fused-compile-pool4"}
ROWS = 12  # per workload and batch: the impls above, two of them at two precisions


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    out, plots = folder / "e2e.csv", folder / "plots"
    # fp32 fused rows whatever this CPU does natively, so agreement can be held to fp32 rounding.
    assert e2e.main(["--quick", "--dtype", "fp32", "--out", str(out), "--plot-dir", str(plots)]) == 0
    return read_csv(str(out)), plots


def _extra(row):
    return dict(kv.split("=", 1) for kv in row["extra"].split(";") if kv)


def test_every_configuration_has_a_row_per_workload_and_batch(quick_run):
    rows, _ = quick_run
    for workload in e2e.WORKLOADS:
        for b in (1, 2):
            got = {r["impl"] for r in rows if r["mode"] == workload and r["case"] == f"{workload} B{b}"}
            assert got == IMPLS, (workload, b, got)
    # A row is either measured or says why not; never an empty status.
    assert all(r["status"] == "ok" or r["status"].startswith(("skipped: ", "failed: ")) for r in rows)


def test_semantic_workload_rows(quick_run):
    rows, _ = quick_run
    sem = {r["impl"]: r for r in rows if r["mode"] == "semantic"}
    assert set(sem) == {"merged-composed", "sam-amg+clip/tiny-clip"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in sem.values())
    # The baseline must have classified some masks, or it would time an empty CLIP stage.
    assert int(_extra(sem["sam-amg+clip/tiny-clip"])["masks"]) > 0


def test_measured_rows_carry_speed_memory_energy_and_agreement(quick_run):
    rows, _ = quick_run
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] != "semantic"]
    # On the CPU every image-embedding configuration runs; a failure here is a regression.
    assert len(ok) == len(e2e.WORKLOADS) * 2 * ROWS
    for r in ok:
        e = _extra(r)
        # p99 >= p50, up to the CSV's 4-significant-digit rounding.
        assert float(e["img_s"]) > 0 and float(e["p99_ms"]) >= 0.999 * float(r["ms"]) > 0
        assert float(e["weight_mb"]) > 0
        assert e["j_per_img"].startswith("n/a:")  # no GPU here: the column says why
        assert "max_rel_err" in e


def test_fused_agrees_with_plain_torch_reference(quick_run):
    rows, _ = quick_run
    fp32_merged = [r for r in rows if r["status"] == "ok" and r["impl"].startswith(("merged-fused", "separate-fused"))]
    assert len(fp32_merged) == len(e2e.WORKLOADS) * 2 * 7
    for r in fp32_merged:
        e = _extra(r)
        assert e["dtype"] == "fp32"
        # Same math, different attention kernels: fp32 rounding only.
        assert float(e["max_rel_err"]) < 1e-4, (r["case"], r["impl"], e["max_rel_err"])
    for r in rows:
        e = _extra(r)
        if r["status"] == "ok" and e["dtype"] == "bf16":
            # bf16 keeps ~3 significant digits; far off would mean a wrong reference pairing.
            assert 0 < float(e["max_rel_err"]) < 0.1, (r["case"], r["impl"], e["max_rel_err"])


def test_flops_per_image_are_counted_per_pipeline(quick_run):
    rows, _ = quick_run
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] != "semantic"]
    flops = {}
    for r in ok:
        pipeline = "merged-pool" + r["impl"].rsplit("-pool", 1)[1] if "-pool" in r["impl"] else (
            "merged" if r["impl"].startswith("merged") else "separate")
        flops.setdefault((r["mode"], pipeline), set()).add(float(_extra(r)["gflop_per_img"]))
    # One count per pipeline and workload, whatever the implementation, precision or batch.
    assert all(len(v) == 1 and next(iter(v)) > 0 for v in flops.values()), flops
    f = {k: next(iter(v)) for k, v in flops.items()}
    # The SAM side is the same encoder in every pipeline; the pooled head does less work.
    assert f[("sam", "separate")] == f[("sam", "merged")] == f[("sam", "merged-pool2")]
    for w in ("both", "clip"):
        assert f[(w, "merged")] > f[(w, "merged-pool2")] > f[(w, "merged-pool4")], w
    assert f[("both", "separate")] == pytest.approx(f[("sam", "separate")] + f[("clip", "separate")], rel=1e-3)


def test_plot_per_workload(quick_run):
    _, plots = quick_run
    for workload in e2e.WORKLOADS:
        path = plots / f"e2e_{workload}.png"
        assert path.exists() and path.stat().st_size > 1000


def test_profile_writes_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert e2e.main(["--quick", "--batch", "1", "--profile", "merged-fused", "--trace", str(trace)]) == 0
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    assert len(events) > 10
    assert "Self CPU" in capsys.readouterr().out  # the top-kernels table was printed
    assert not os.path.exists(tmp_path / "e2e.csv")  # profiling appends no rows


def test_profile_rejects_unknown_row():
    with pytest.raises(SystemExit):
        e2e.main(["--quick", "--profile", "no-such-row"])


def test_report_checks_the_claims_on_rows_of_the_run(quick_run):
    from fastsamclip.bench import report
    from fastsamclip.bench.harness import row_value

    rows, _ = quick_run
    run = report.run_rows(rows)
    assert run == rows  # one run in the file: all of it
    claims, batch, dtype = report.claims(run)
    assert (batch, dtype) == (2, "fp32") and len(claims) == 8
    by_name = {c[0].split(" (")[0]: c for c in claims}
    # Each ratio is the quotient of two rows of the CSV, not a constant.
    enc = by_name["image encoder img/s vs segment_anything eager fp32"]
    num = report._find(run, "sam", "merged-fused-compile", 2, "fp32")
    den = report._find(run, "sam", "separate-eager/tiny-clip", 2, "fp32")
    assert enc[1] == pytest.approx(row_value(num, "img_s") / row_value(den, "img_s"))
    assert enc[3] == (enc[1] >= 6)
    weights = by_name["both outputs weight bytes vs SAM + CLIP tiny-clip"]
    assert weights[1] == pytest.approx(
        row_value(report._find(run, "both", "merged-reference", 2, "fp32"), "weight_mb")
        / row_value(report._find(run, "both", "separate-eager/tiny-clip", 2, "fp32"), "weight_mb"))
    # No batch 32 and no CUDA memory on the CPU: that claim says why it has no number.
    memory = [c for c in claims if c[0].startswith("peak memory")][0]
    assert memory[1] is None and memory[4].startswith("n/a")
    # Both outputs: the fastest merged row of each CLIP path over the fastest upstream pipeline
    # (segment_anything + open_clip), and the pooled one over SAM on fastsamclip's kernels + CLIP.
    both = [r for r in run if r["mode"] == "both" and r["case"] == "both B2" and r["status"] == "ok"]
    best_up = max(row_value(r, "img_s") for r in both
                  if r["impl"].startswith("separate-") and not r["impl"].startswith("separate-fused"))
    sep_fused = [row_value(r, "img_s") for r in both if r["impl"] == "separate-fused/tiny-clip"][0]
    best_full = max(row_value(r, "img_s") for r in both if r["impl"] in ("merged-fused", "merged-fused-compile"))
    best_pool = max(row_value(r, "img_s") for r in both if r["impl"].startswith("merged-fused") and "-pool" in r["impl"])
    full = [c for c in claims if c[0].startswith("both outputs img/s, CLIP head on all tokens")][0]
    pooled = [c for c in claims if c[0].startswith("both outputs img/s, CLIP head on pooled tokens")][0]
    merging = [c for c in claims if c[0].startswith("both outputs img/s, pooled tokens")][0]
    assert full[1] == pytest.approx(best_full / best_up) and full[3] == (full[1] >= 1)
    assert pooled[1] == pytest.approx(best_pool / best_up) and pooled[2] == ">= 1.2x"  # the CPU's goal
    assert merging[1] == pytest.approx(best_pool / sep_fused) and merging[3] == (merging[1] >= 1)
    md = report.markdown(run)
    assert "| claim | measured | goal | met |" in md and rows[0]["commit"] in md
    assert md.count("\n| sam B2 |") == ROWS  # the table holds the claim's batch size only


def test_report_command_and_compare_against_the_earlier_run(quick_run, tmp_path, capsys):
    from fastsamclip.bench import report

    rows, _ = quick_run
    csv_path = tmp_path / "e2e.csv"
    with open(csv_path, "w", newline="") as f:  # the earlier run, as a file of its own
        import csv

        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert report.main([str(csv_path)]) == 0
    assert "| claim |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no e2e run at commit"):
        report.main([str(csv_path), "--commit", "0000000"])
    # A second, smaller run compared with the first by commit id, through the same CSV.
    assert e2e.main(["--quick", "--dtype", "fp32", "--workloads", "sam", "--batch", "1", "--no-semantic", "--out", str(csv_path),
                     "--plot-dir", str(tmp_path), "--compare", rows[0]["commit"]]) == 0
    out = capsys.readouterr().out
    gains = [line for line in out.splitlines() if line.startswith("sam B1 ") and f"(was {rows[0]['commit']}" in line]
    assert len(gains) == ROWS, out[-3000:]
    with pytest.raises(SystemExit, match="no row of"):
        e2e.main(["--quick", "--out", str(csv_path), "--compare", "not-a-commit"])


@pytest.mark.parametrize("sam_type", ["vit_tiny", "vit_micro"])
def test_strong_sam_baseline_through_sdpa_equals_segment_anything(sam_type):
    """The strong baseline changes how SAM's attention is computed, not what: windowed and global
    blocks, padded windows (vit_micro at 64 px: 4x4 grid in 3x3 windows), forward and backward."""
    import torch

    from fastsamclip.data.samples import randomise_zero_tables
    from fastsamclip.modeling import build_sam

    sam = build_sam(sam_type)
    randomise_zero_tables(sam, torch.Generator().manual_seed(1))
    enc = sam.image_encoder.double()
    fast = e2e.sam_encoder_with_sdpa(enc)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in enc.named_parameters()]
    x = torch.randn(2, 3, enc.img_size, enc.img_size, dtype=torch.float64)
    ref, out = enc(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad((ref * g).sum(), list(enc.parameters()))
    go = torch.autograd.grad((out * g).sum(), list(fast.parameters()))
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert enc.blocks[0].attn.forward.__func__ is type(enc.blocks[0].attn).forward  # the original is untouched


def test_rows_chosen_and_ordered_by_impls_and_segment_anything_fast_said_why(tmp_path):
    out = tmp_path / "e2e.csv"
    assert e2e.main(["--quick", "--workloads", "sam", "--batch", "1", "--no-semantic", "--out", str(out),
                     "--plot-dir", str(tmp_path), "--impls",
                     "merged-reference@fp32,merged-fused@fp16,separate-samfast/tiny-clip"]) == 0
    rows = read_csv(str(out))
    assert [(r["impl"], _extra(r)["dtype"]) for r in rows] == [
        ("merged-reference", "fp32"), ("merged-fused", "fp16"), ("separate-samfast/tiny-clip", "bf16")]
    assert len({r["date"] for r in rows}) == 1  # one run: one stamp, rows written as measured
    assert rows[1]["status"] == "ok" and float(_extra(rows[1])["max_rel_err"]) < 0.05
    assert rows[2]["status"].startswith("skipped: segment_anything_fast"), rows[2]["status"]
    with pytest.raises(SystemExit):
        e2e.main(["--quick", "--out", str(out), "--impls", "nope"])
