"""The end-to-end results as Markdown, and the product's claims checked against them.

    python -m bench.report                      # latest run in bench/results/e2e.csv
    python -m bench.report runs/e2e.csv --commit 1a2b3c4

Reads the rows of one run of ``bench.e2e`` (the latest in the CSV unless ``--commit``/``--date``
picks another) and prints: the run's device, driver, commit and date; the claims (ratios of
rows measured in that same run, each with its goal and whether it is met); and a table of the
rows at the claim's batch size. Paste it into the README with the device it names.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .harness import RESULTS_DIR, fmt_num, parse_extra, read_csv, row_value

Row = Dict[str, str]


def run_rows(rows: Sequence[Row], commit: Optional[str] = None, date: Optional[str] = None) -> List[Row]:
    """The rows of one run (one ``date`` stamp): the latest, or the latest at ``commit``, or ``date``."""
    rows = [r for r in rows if r.get("bench") == "e2e"]
    if commit:
        rows = [r for r in rows if r["commit"].startswith(commit)]
    if date:
        rows = [r for r in rows if r["date"] == date]
    if not rows:
        return []
    last = rows[-1]["date"]
    return [r for r in rows if r["date"] == last]


def _find(rows: Sequence[Row], mode: str, impl: str, batch: Optional[int] = None,
          dtype: Optional[str] = None) -> Optional[Row]:
    for r in rows:
        e = parse_extra(r["extra"])
        if (r["mode"] == mode and r["impl"] == impl and r["status"] == "ok"
                and (batch is None or e.get("batch") == str(batch)) and (dtype is None or e.get("dtype") == dtype)):
            return r
    return None


def _clips(rows: Sequence[Row]) -> List[str]:
    """CLIP models of the separate rows, in the run's order."""
    return list(dict.fromkeys(r["impl"].split("/", 1)[1] for r in rows
                              if r["impl"].startswith("separate-") and "/" in r["impl"]))


def pool_of(impl: str) -> int:
    """The CLIP head's token-pool factor of a merged row: ``merged-fused-pool2`` -> 2, else 1."""
    tail = impl.rsplit("-pool", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 1


def _best(rows: Sequence[Row], mode: str, batch: int, keep) -> Optional[Row]:
    """The row of the most img/s among successful rows of ``mode`` at ``batch`` with ``keep(impl)``."""
    cands = [r for r in rows if r["mode"] == mode and r["status"] == "ok" and keep(r["impl"])
             and parse_extra(r["extra"]).get("batch") == str(batch) and row_value(r, "img_s") is not None]
    return max(cands, key=lambda r: row_value(r, "img_s"), default=None)


def _label(r: Optional[Row]) -> str:
    return "-" if r is None else f"{r['impl']} {parse_extra(r['extra']).get('dtype', '')}".strip()


def claims(rows: Sequence[Row]) -> Tuple[List[Tuple[str, Optional[float], str, Optional[bool], str]], int, str]:
    """[(claim, measured ratio or None, goal, met or None, why n/a)], batch used, fast dtype.

    Every ratio divides two rows of the same run on the same images: the merged model with fused
    kernels and compiled graphs against the separate models (segment_anything SAM, open_clip CLIP).
    """
    batches = sorted({int(parse_extra(r["extra"])["batch"]) for r in rows if r["mode"] in ("both", "sam")
                      and "batch" in parse_extra(r["extra"])})
    b = 8 if 8 in batches else (batches[-1] if batches else 0)
    fast = _find(rows, "sam", "merged-fused-compile", b)
    dtype = parse_extra(fast["extra"])["dtype"] if fast else "bf16"
    clips = _clips(rows)
    big = "ViT-L-14" if "ViT-L-14" in clips else (clips[-1] if clips else "?")
    any_clip = clips[0] if clips else "?"
    out = []

    def ratio(name, num, den, goal, test, metric="img_s", invert=False):
        if num is None or den is None:
            missing = [n for n, r in (("merged", num), ("baseline", den)) if r is None]
            out.append((name, None, goal, None, f"n/a: no successful {' and '.join(missing)} row"))
            return
        a, c = row_value(num, metric), row_value(den, metric)
        if a is None or c is None or (c == 0 and not invert) or (a == 0 and invert):
            out.append((name, None, goal, None, f"n/a: {metric} not measured"))
            return
        v = c / a if invert else a / c
        out.append((name, v, goal, test(v), ""))

    merged_sam = _find(rows, "sam", "merged-fused-compile", b, dtype)
    ratio(f"image encoder img/s vs segment_anything eager fp32 (B{b})", merged_sam,
          _find(rows, "sam", f"separate-eager/{any_clip}", b, "fp32"), ">= 6x", lambda v: v >= 6)
    ratio(f"image encoder img/s vs SAM bf16 + compile + SDPA (B{b})", merged_sam,
          _find(rows, "sam", f"separate-strong/{any_clip}", b, "bf16"), ">= 1.5x", lambda v: v >= 1.5)
    # Both outputs: the fastest merged row of each CLIP path against the fastest pipeline users run
    # today (segment_anything SAM + open_clip CLIP, eager, bf16 or compiled with SDPA), whatever the
    # precision or compilation (each row's agreement with its fp32 reference is in the table); and
    # the pooled path against SAM ported onto fastsamclip's own backbone and kernels + open_clip,
    # the merging's gain alone (one image tower fewer), bounded by the CLIP tower's share of the work.
    cpu = bool(rows) and rows[0]["device"].startswith("cpu")
    best_up = _best(rows, "both", b, lambda i: i.startswith("separate-") and not i.startswith("separate-fused/")
                    and i.endswith(f"/{big}"))
    sep_fused = _best(rows, "both", b, lambda i: i == f"separate-fused/{big}")
    merged_rows = lambda i: i.startswith("merged-fused")  # noqa: E731
    best_full = _best(rows, "both", b, lambda i: merged_rows(i) and pool_of(i) == 1)
    best_pool = _best(rows, "both", b, lambda i: merged_rows(i) and pool_of(i) > 1)
    ratio(f"both outputs img/s, CLIP head on all tokens: {_label(best_full)} vs the best segment_anything + "
          f"open_clip pipeline, {_label(best_up)} (B{b})", best_full, best_up, ">= 1x", lambda v: v >= 1.0)
    goal = 1.2 if cpu else 1.5
    ratio(f"both outputs img/s, CLIP head on pooled tokens: {_label(best_pool)} vs {_label(best_up)} (B{b})",
          best_pool, best_up, f">= {goal:g}x", lambda v: v >= goal)
    ratio(f"both outputs img/s, pooled tokens: {_label(best_pool)} vs SAM on fastsamclip's kernels + CLIP, "
          f"{_label(sep_fused)} (B{b})", best_pool, sep_fused, ">= 1x", lambda v: v >= 1.0)
    # Weight bytes at one precision on both sides: the fp32 rows (bytes scale with the dtype alike).
    ratio(f"both outputs weight bytes vs SAM + CLIP {big}", _find(rows, "both", "merged-reference", b, "fp32"),
          _find(rows, "both", f"separate-eager/{big}", b, "fp32"), "<= 0.5x", lambda v: v <= 0.5, metric="weight_mb")
    ratio(f"semantic segmentation, 20 labels: speed-up over SAM everything + CLIP {big} crops",
          _find(rows, "semantic", "merged-composed"), _find(rows, "semantic", f"sam-amg+clip/{big}"),
          ">= 10x", lambda v: v >= 10, metric="ms", invert=True)
    ratio("peak memory of the image encoder at B32 vs SAM bf16 + compile + SDPA",
          _find(rows, "sam", "merged-fused-compile", 32, dtype), _find(rows, "sam", f"separate-strong/{any_clip}", 32, "bf16"),
          "<= 0.5x", lambda v: v <= 0.5, metric="peak_mem_mb")
    return out, b, dtype


def _short(v: Optional[str]) -> str:
    """A measured value as written, a reason as "n/a" (the CSV keeps the reason)."""
    return "-" if v is None else ("n/a" if v.startswith("n/a") else v)


def markdown(rows: Sequence[Row]) -> str:
    if not rows:
        return "no e2e rows"
    head = rows[0]
    cl, b, dtype = claims(rows)
    lines = [f"{head['device']}, driver {head['driver'] or '-'}, torch {head['torch']}, triton {head['triton']}, "
             f"commit {head['commit']}, {head['date']} (`python -m bench.e2e`; random weights unless "
             f"checkpoints were given; each ratio from rows of this one run; merged rows: fused kernels and "
             f"compiled graphs in {dtype})", "",
             "| claim | measured | goal | met |", "|---|---|---|---|"]
    for name, v, goal, met, why in cl:
        lines.append(f"| {name} | {fmt_num(v) + 'x' if v is not None else why} | {goal} | "
                     f"{'-' if met is None else ('yes' if met else '**no**')} |")
    lines += ["", "| workload | impl | dtype | img/s | GFLOP/img | GFLOP/s | p50 ms | p99 ms | peak MB | weights MB | "
              "J/img | max rel err |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = parse_extra(r["extra"])
        if r["mode"] != "semantic" and e.get("batch") != str(b):
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['impl']} | {e.get('dtype', '')} | {r['status']} |||||||||")
            continue
        img_s, gflop = row_value(r, "img_s"), row_value(r, "gflop_per_img")
        lines.append(f"| {r['case']} | {r['impl']} | {e.get('dtype', '')} | {fmt_num(img_s, 4)} | {fmt_num(gflop, 4)} | "
                     f"{fmt_num(gflop * img_s if gflop is not None and img_s is not None else None, 4)} | "
                     f"{fmt_num(row_value(r, 'ms'), 4)} | {fmt_num(row_value(r, 'p99_ms'), 4)} | "
                     f"{fmt_num(row_value(r, 'peak_mem_mb'), 4)} | {fmt_num(row_value(r, 'weight_mb'), 4)} | "
                     f"{_short(e.get('j_per_img'))} | {_short(e.get('max_rel_err'))} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="?", default=os.path.join(RESULTS_DIR, "e2e.csv"))
    p.add_argument("--commit", default=None, help="the latest run at this commit (prefix)")
    p.add_argument("--date", default=None, help="the run with exactly this date stamp")
    args = p.parse_args(argv)
    if not os.path.isfile(args.csv):
        raise SystemExit(f"{args.csv}: no such file; run `python -m bench.e2e` first")
    rows = run_rows(read_csv(args.csv), args.commit, args.date)
    if not rows:
        raise SystemExit(f"{args.csv}: no e2e run" + (f" at commit {args.commit}" if args.commit else "")
                         + (f" dated {args.date}" if args.date else ""))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
