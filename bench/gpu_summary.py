"""The summary of ``fastsamclip bench gpu``: the test outcomes read from pytest's log, the tables of
every part's CSV, and the claims checked on them (the end-to-end ones by ``bench.report``)."""

from __future__ import annotations

import csv
import os
import re
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .harness import fmt_num, parse_extra, read_csv, row_value
from .report import markdown as e2e_markdown

_TEST_LINE = re.compile(r"(?:\[gw\d+\] )?(?:(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|"
                        r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+::\S+))")


def write_test_rows(log_path: str, csv_path: str) -> List[Tuple[str, str]]:
    """(test, outcome) for every test the (verbose) pytest log reports, to tests.csv; also what a
    stopped run reported before it was stopped."""
    seen: Dict[str, str] = {}
    if os.path.exists(log_path):
        for line in open(log_path, errors="replace"):
            m = _TEST_LINE.search(line)
            if m:
                test, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
                seen.setdefault(test, outcome.lower())
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test", "outcome"])
        w.writerows(sorted(seen.items()))
    return sorted(seen.items())


def _rows(path: str) -> List[Dict[str, str]]:
    return read_csv(path) if os.path.exists(path) else []


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def attention_section(rows: List[Dict[str, str]]) -> Tuple[List[str], List[Tuple[str, Optional[float], str, Optional[bool]]]]:
    lines: List[str] = []
    claims: List[Tuple[str, Optional[float], str, Optional[bool]]] = []
    if not rows:
        return ["no attention rows"], claims
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    table = []
    for case, mode in keys:
        cells = []
        for impl in impls:
            r = next((x for x in rows if (x["case"], x["mode"], x["impl"]) == (case, mode, impl)), None)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("n/a" if r["status"].startswith("skipped") else "failed")
            else:
                cells.append(f"{fmt_num(row_value(r, 'tflops'))} ({fmt_num(row_value(r, 'ms'))} ms)")
        table.append([case, mode] + cells)
    lines += _md_table(["case", "mode"] + impls, table)
    lines.append("")
    lines.append("TFLOP/s of the attention products (4 B h N^2 d forward, 2.5x that backward), median ms in "
                 "brackets; n/a: skipped (the CSV says why).")
    tiles = [(r["case"], r["mode"], parse_extra(r.get("extra", "")).get("tiles")) for r in rows if r["impl"] == "triton"]
    if any(t for _, _, t in tiles):
        lines += ["", "Tiles the fused kernel's autotuner chose (queries x key-grid rows / warps / stages):", ""]
        lines += [f"- {case} {mode}: {t}" for case, mode, t in tiles if t]

    def ms(case, mode, impl):
        r = next((x for x in rows if (x["case"], x["mode"], x["impl"]) == (case, mode, impl) and x["status"] == "ok"),
                 None)
        return row_value(r, "ms") if r else None

    for case, mode in keys:
        fused = ms(case, mode, "triton")
        for other, goal, test, what in (("sdpa-bias", ">= 1x", lambda v: v >= 1.0, "SDPA with the materialised bias"),
                                        ("fold-sdpa-flash", ">= 1x", lambda v: v >= 1.0,
                                         "the bias folded into flash attention")):
            base = ms(case, mode, other)
            v = base / fused if fused and base else None
            claims.append((f"fused attention vs {what}, {case} {mode}", v, goal, None if v is None else test(v)))
        light = ms(case, mode, "flash-nobias")
        v = light / fused if fused and light else None
        claims.append((f"fused attention, share of unbiased flash's speed, {case} {mode}", v, "report",
                       None))
    return lines, claims


def _simple_table(rows: List[Dict[str, str]], extras: Sequence[str]) -> List[str]:
    if not rows:
        return ["no rows"]
    body = []
    for r in rows:
        e = parse_extra(r.get("extra", ""))
        body.append([r["case"], r["impl"], r["mode"], fmt_num(row_value(r, "ms"), 4), r["status"]]
                    + [e.get(k, "-") for k in extras])
    return _md_table(["case", "impl", "mode", "ms", "status"] + list(extras), body)


def train_claims(rows: List[Dict[str, str]]):
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        plain = next((r for r in rows if r["case"] == case and r["impl"] == "plain" and r["status"] == "ok"), None)
        fused = next((r for r in rows if r["case"] == case and r["impl"] == "fused" and r["status"] == "ok"), None)
        a = row_value(fused, "img_s") if fused else None
        b = row_value(plain, "img_s") if plain else None
        v = a / b if a and b else None
        out.append((f"training step img/s, fused vs plain torch ({case})", v, ">= 1x", None if v is None else v >= 1))
        a = row_value(fused, "peak_mem_mb") if fused else None
        b = row_value(plain, "peak_mem_mb") if plain else None
        v = a / b if a and b else None
        out.append((f"training step peak memory, fused vs plain torch ({case})", v, "<= 1x",
                    None if v is None else v <= 1))
    return out


def summary(out: str, outcomes: Sequence, started: float) -> str:
    """summary.md: ``outcomes`` are the parts as run (part, status, seconds, budget_s, logs)."""
    env = {r["key"]: r["value"] for r in _rows(os.path.join(out, "environment.csv"))}
    lines = [f"# fastsamclip on {env.get('device', '?')}", ""]
    lines += _md_table(["", ""], [[k, env.get(k, "-")] for k in ("device", "nvidia_smi", "driver", "cuda", "torch",
                                                                 "triton", "python", "commit", "date", "mode")])
    lines += ["", f"Whole command: {time.time() - started:.0f} s.", "", "## Parts", ""]
    lines += _md_table(["part", "status", "seconds", "deadline s", "logs"],
                       [[o.part, o.status, f"{o.seconds:.0f}", f"{o.budget_s:.0f}", ", ".join(o.logs)]
                        for o in outcomes])
    cache = {r["key"]: r["value"] for r in _rows(os.path.join(out, "triton_cache.csv"))}
    if cache:
        lines += ["", f"Triton cache {cache.get('dir', '?')}: {cache.get('kernels_before', '?')} of the package's "
                      f"kernels before the run, {cache.get('kernels_compiled', '?')} compiled during it (not in the "
                      f"cache it started with), {cache.get('inductor_kernels_compiled', '?')} of Inductor's, "
                      f"{cache.get('autotune_written', '?')} autotune choices written."]
    claims: List[Tuple[str, Optional[float], str, Optional[bool]]] = []
    att, att_claims = attention_section(_rows(os.path.join(out, "attention.csv")))
    claims += att_claims
    lines += ["", "## Attention", ""] + att
    e2e = _rows(os.path.join(out, "e2e.csv"))
    lines += ["", "## End to end", "", e2e_markdown(e2e) if e2e else "no e2e rows"]
    train = _rows(os.path.join(out, "train.csv"))
    claims += train_claims(train)
    lines += ["", "## Training step", ""] + _simple_table(train, ["img_s", "peak_mem_mb", "loss_vs_plain"])
    lines += ["", "## Single request", ""] + _simple_table(
        _rows(os.path.join(out, "inference.csv")),
        ["dtype", "p99_ms", "vs_fp32_sam_rel_err", "vs_fp32_clip_cos", "vs_fp32_mask_iou", "vs_fp32_label_agreement"])
    lines += ["", "## Fused losses", ""] + _simple_table(_rows(os.path.join(out, "losses.csv")),
                                                        ["loss_rel_err_vs_fp32"])
    tests = _rows(os.path.join(out, "tests.csv"))
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines += ["", "## GPU correctness tests", "",
              ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"]
    lines += [f"- {t['test']}: {t['outcome']}" for t in tests if t["outcome"] in ("failed", "error")]
    lines += ["", "## Claims checked here (the end-to-end ones are in that section)", ""]
    lines += _md_table(["claim", "measured", "goal", "met"],
                       [[n, f"{v:.3g}x" if v is not None else "n/a", g,
                         "-" if m is None else ("yes" if m else "**no**")] for n, v, g, m in claims])
    return "\n".join(lines) + "\n"
