"""``fastsamclip bench gpu --out DIR``: the product's measurements on a freshly lent GPU, one command.

    fastsamclip bench gpu --out results-h200             # at most 8 minutes, compiles included
    fastsamclip bench gpu --quick --out /tmp/gpu-quick   # tiny shapes on the CPU (CI): same files

For an H100 / H200 with no internet, after installing from carried wheels (README: "Measuring on
a GPU machine without internet"). The parts run in this order, each as a child process (its
steps one after another) under its own deadline, its budget below, never past the command's end:
a part that overruns is stopped (its process group killed), recorded as overrun, keeps every row
it wrote (the benchmarks write rows as they measure them), and the next part starts.

=============  =========================================================  ======  ==================
part           what                                                       budget  writes
=============  =========================================================  ======  ==================
environment    GPU, driver, torch, triton, commit, every op's backends    15 s    environment.csv,
               (``fastsamclip info``: CUDA library, Triton, fp32 mode)            info.txt
tests          the GPU-only tests: bf16/fp16 kernels against fp32/float64  70 s    tests.csv
               references, CUDA preprocessing against torch, fullgraph
               compile, autotune kept across processes (pytest, -n 8 with
               pytest-xdist)
attention      fwd and fwd+bwd, 64 x 64 grid (batch 8, 12 heads, d 64)    95 s    attention.csv
               and 14 x 14 windows (batch 8 x 25), TFLOP/s: the fused
               kernel, SDPA with the materialised bias, the bias folded
               into flash attention (head dim 192), unbiased flash (the
               speed of light), then FlexAttention (slow to compile)
losses         the fused distillation losses against eager and compiled   35 s    losses.csv
e2e            batch 8, SAM + CLIP ViT-B/16 and ViT-L/14 separately       140 s   e2e.csv
               (segment_anything eager fp32, strong SAM: bf16 + compile +
               SDPA, SAM on the fused kernels), the merged model fused +
               compiled and with the CLIP head on 2 x 2-pooled tokens; then
               the image encoder alone, with segment-anything-fast when
               importable
train          one stage-2 training step, plain against fused (img/s,     60 s    train.csv
               peak memory)
inference      single-request p50/p99 of the predictor (bf16), with its   35 s    inference.csv
               agreement with fp32
=============  =========================================================  ======  ==================

Then ``parts.csv`` (each part's status and time) and ``summary.md``: the environment, the parts,
the test outcome, every table, and the product's claims checked (``bench.report`` for the end to
end ones; the attention and training ones here). Timing is the benchmarks' own: CUDA events
after warm-up, medians, compiles in the warm-up, never timed. Logs of each step in ``logs/``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .harness import environment, fmt_num, parse_extra, read_csv, row_value
from .report import markdown as e2e_markdown

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUDGET_S = 480  # the command's whole wall time: 8 minutes
QUICK_BUDGET_S = 170
RESERVE_S = 10  # kept for the summary

# The GPU-only tests (skipped without a GPU), by node id, and the tests of the compiled paths that
# run on both; tests/bench/test_gpu.py checks that every GPU-only kernel test is listed here.
GPU_TESTS = [
    "tests/kernels/test_relpos_attention_triton.py::test_triton_bf16",
    "tests/kernels/test_relpos_attention_triton.py::test_triton_full_size",
    "tests/kernels/test_relpos_attention_triton.py::test_a_second_process_tunes_nothing",
    "tests/kernels/test_relpos_attention_flex.py::test_flex_cuda_fwd_bwd",
    "tests/kernels/test_cosine_distill.py::test_bf16_on_gpu",
    "tests/kernels/test_linear_cosine_distill.py::test_bf16_on_gpu",
    "tests/kernels/test_focal_dice.py::test_bf16_on_gpu",
    "tests/kernels/test_preprocess.py::test_cuda_preprocess_equals_torch",
    "tests/kernels/test_preprocess.py::test_cuda_raw_call_writes_every_element",
    "tests/kernels/test_preprocess.py::test_cuda_op_compiles_fullgraph",
    "tests/kernels/test_preprocess.py::test_a_launch_that_fails_falls_back_to_torch_logged_once",
    "tests/kernels/test_postprocess_masks.py::test_cuda_postprocess_equals_torch",
    "tests/kernels/test_postprocess_masks.py::test_cuda_op_compiles_fullgraph",
    "tests/test_predictor.py::test_gpu_preprocess_and_cuda_graphs_agree_with_eager",
]
COMPILED_TESTS = [
    "tests/kernels/test_relpos_attention_triton.py::test_triton_in_torch_compile_fullgraph",
    "tests/kernels/test_cosine_distill.py::test_compile_fullgraph_fwd_bwd",
    "tests/kernels/test_focal_dice.py::test_compile_fullgraph_fwd_bwd",
]


@dataclass
class Step:
    label: str
    argv: List[str]  # after ``python``; run in the repository root when there is one


@dataclass
class Part:
    name: str
    budget_s: float
    quick_budget_s: float
    steps: Callable[["Context"], List[Step]]
    files: Tuple[str, ...] = ()


@dataclass
class Context:
    out: str
    quick: bool
    python: str = sys.executable
    xdist: bool = False  # pytest-xdist importable: the tests run in 8 processes
    pytest_timeout: bool = False  # pytest-timeout importable: each test has its own limit too


@dataclass
class Outcome:
    part: str
    status: str  # "ok", "failed (exit N in STEP)", "overran its N s deadline in STEP", "skipped: why"
    seconds: float
    budget_s: float
    logs: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ the parts
def _m(module: str, *args: str) -> List[str]:
    return ["-m", f"fastsamclip.bench.{module}", *args]


def _env_steps(ctx: Context) -> List[Step]:
    return [Step("info", ["-m", "fastsamclip", "info"])]


def _test_steps(ctx: Context) -> List[Step]:
    if not os.path.isdir(os.path.join(REPO, "tests")):
        return []
    ids = GPU_TESTS if ctx.quick else GPU_TESTS + COMPILED_TESTS
    par = ["-n", "8"] if ctx.xdist and not ctx.quick else []
    limit = ["--timeout", "120"] if ctx.pytest_timeout else []
    return [Step("pytest", ["-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *par, *limit, *ids])]


def _attention_steps(ctx: Context) -> List[Step]:
    out = ["--out", os.path.join(ctx.out, "attention.csv"), "--no-plot", "--quiet"]
    if ctx.quick:
        return [Step("fused vs sdpa", _m("bench_relpos_attention", "--quick", "--modes", "fwd", "fwd+bwd",
                                          "--impls", "triton", "sdpa-bias", *out))]
    common = ["--batch", "8", "--modes", "fwd", "fwd+bwd", "--cases", "global-4096", "windows-196",
              "--dtype", "bf16", *out]
    return [Step("fused, sdpa, fold, flash", _m("bench_relpos_attention", *common, "--impls", "triton", "sdpa-bias",
                                                 "flash-nobias", "fold-sdpa-flash")),
            Step("flex", _m("bench_relpos_attention", *common, "--impls", "flex"))]


def _loss_steps(ctx: Context) -> List[Step]:
    dtype = "fp32" if ctx.quick else "bf16"  # the interpreter's bf16 arithmetic is wrong
    # quick: aot_eager traces the compiled competitor without the CPU's C++ compile
    extra = ["--quick", "--compile-backend", "aot_eager"] if ctx.quick else []
    # `fastsamclip bench losses` runs the three loss benchmarks in one process.
    return [Step("losses", ["-m", "fastsamclip", "bench", "losses", *extra, "--dtype", dtype,
                            "--out", os.path.join(ctx.out, "losses.csv"), "--no-plot"])]


def _e2e_steps(ctx: Context) -> List[Step]:
    out = ["--out", os.path.join(ctx.out, "e2e.csv"), "--plot-dir", ctx.out, "--no-semantic"]
    if ctx.quick:
        clips, sizes = ["tiny-clip"], ["--quick", "--batch", "1", "--iters", "1", "--warmup", "1"]
    else:
        clips, sizes = ["ViT-B-16", "ViT-L-14"], ["--batch", "8", "--iters", "10", "--warmup", "2"]
    # Each model's eager fp32 row first: the rows after it report their agreement with it.
    both = ([f"separate-eager/{c}@fp32" for c in clips] + ["merged-reference@fp32", "merged-fused-compile"]
            + [f"separate-strong/{c}" for c in clips] + [f"separate-fused/{clips[-1]}", "merged-fused",
                                                          "merged-fused-pool2"])
    sam = [f"separate-eager/{clips[0]}@fp32", "merged-fused-compile", f"separate-strong/{clips[0]}",
           f"separate-samfast/{clips[0]}"]
    if ctx.quick:  # one process: the same rows and files, less start-up
        return [Step("SAM + CLIP", _m("e2e", *sizes, *out, "--workloads", "both,sam",
                                      "--impls", ",".join(both + sam[-1:])))]
    return [Step("SAM + CLIP", _m("e2e", *sizes, *out, "--workloads", "both", "--impls", ",".join(both))),
            Step("image encoder", _m("e2e", *sizes, *out, "--workloads", "sam", "--clip-model", clips[0],
                                     "--impls", ",".join(sam)))]


def _train_steps(ctx: Context) -> List[Step]:
    size = ["--quick", "--iters", "1", "--warmup", "1"] if ctx.quick else ["--iters", "3", "--warmup", "1"]
    return [Step("stage 2", _m("bench_train", *size, "--stages", "2", "--configs", "plain,fused",
                               "--out", os.path.join(ctx.out, "train.csv")))]


def _inference_steps(ctx: Context) -> List[Step]:
    size = ["--quick", "--iters", "2", "--warmup", "1"] if ctx.quick else ["--iters", "20", "--warmup", "3"]
    return [Step("request", _m("bench_inference", *size, "--no-ttfr", "--out", os.path.join(ctx.out, "inference.csv")))]


PARTS: List[Part] = [
    Part("environment", 15, 20, _env_steps, ("environment.csv", "info.txt")),
    Part("tests", 70, 25, _test_steps, ("tests.csv",)),
    Part("attention", 95, 25, _attention_steps, ("attention.csv",)),
    Part("losses", 35, 20, _loss_steps, ("losses.csv",)),
    Part("e2e", 140, 40, _e2e_steps, ("e2e.csv",)),
    Part("train", 60, 25, _train_steps, ("train.csv",)),
    Part("inference", 35, 20, _inference_steps, ("inference.csv",)),
]


# ------------------------------------------------------------------------------------ running
def _kill_group(p: subprocess.Popen) -> None:
    """Stop a step and every process it started (compile workers, pytest-xdist workers)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(ctx: Context, step: Step, log_path: str, deadline: float) -> Optional[int]:
    """Run one step until it ends or ``deadline`` (time.time()); its exit code, None on overrun."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if ctx.quick:
        env.setdefault("TRITON_INTERPRET", "1")
    cwd = REPO if os.path.isdir(os.path.join(REPO, "tests")) else ctx.out
    with open(log_path, "w") as log:
        log.write(f"$ {ctx.python} {' '.join(step.argv)}\n")
        log.flush()
        p = subprocess.Popen([ctx.python, *step.argv], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                             start_new_session=True)
        try:
            return p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            return None


def run_part(ctx: Context, part: Part, end: float) -> Outcome:
    budget = part.quick_budget_s if ctx.quick else part.budget_s
    start = time.time()
    deadline = min(start + budget, end - RESERVE_S)
    steps = part.steps(ctx)
    out = Outcome(part.name, "ok", 0.0, budget)
    if not steps:
        out.status = "skipped: no tests folder (an installed copy, not a checkout)"
    if part.name == "environment":
        write_environment(ctx)
    for i, step in enumerate(steps):
        log = os.path.join(ctx.out, "logs", f"{part.name}-{i + 1}.log")
        out.logs.append(os.path.relpath(log, ctx.out))
        if time.time() >= deadline:
            out.status = f"overran its {budget:.0f} s deadline before {step.label}"
            break
        rc = run_step(ctx, step, log, deadline)
        if rc is None:
            out.status = f"overran its {budget:.0f} s deadline in {step.label}"
            break
        if rc != 0 and out.status == "ok":
            out.status = f"failed (exit {rc} in {step.label}; see {out.logs[-1]})"
    if part.name == "environment" and out.logs:
        _copy(os.path.join(ctx.out, out.logs[0]), os.path.join(ctx.out, "info.txt"))
    if part.name == "tests" and out.logs:
        write_test_rows(os.path.join(ctx.out, out.logs[0]), os.path.join(ctx.out, "tests.csv"))
    out.seconds = time.time() - start
    return out


def _copy(src: str, dst: str) -> None:
    with open(src) as f, open(dst, "w") as g:
        g.write(f.read())


def _nvidia_smi() -> Dict[str, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia_smi": f"n/a ({type(e).__name__})"}
    first = out.strip().splitlines()[0] if out.strip() else ""
    return {"nvidia_smi": first or "n/a"}


def write_environment(ctx: Context) -> Dict[str, str]:
    env = environment()
    env.update(_nvidia_smi())
    env["mode"] = "quick (tiny shapes, CPU)" if ctx.quick else "full"
    with open(os.path.join(ctx.out, "environment.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "value"])
        w.writerows(sorted(env.items()))
    return env


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


# ------------------------------------------------------------------------------------ summary
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


def summary(out: str, outcomes: Sequence[Outcome], started: float) -> str:
    env = {r["key"]: r["value"] for r in _rows(os.path.join(out, "environment.csv"))}
    lines = [f"# fastsamclip on {env.get('device', '?')}", ""]
    lines += _md_table(["", ""], [[k, env.get(k, "-")] for k in ("device", "nvidia_smi", "driver", "cuda", "torch",
                                                                 "triton", "python", "commit", "date", "mode")])
    lines += ["", f"Whole command: {time.time() - started:.0f} s.", "", "## Parts", ""]
    lines += _md_table(["part", "status", "seconds", "budget s", "logs"],
                       [[o.part, o.status, f"{o.seconds:.0f}", f"{o.budget_s:.0f}", ", ".join(o.logs)]
                        for o in outcomes])
    tests = _rows(os.path.join(out, "tests.csv"))
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    lines += ["", "## GPU-only tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"]
    bad = [t["test"] for t in tests if t["outcome"] in ("failed", "error")]
    lines += [f"- {t}: {o}" for t, o in ((b, "failed") for b in bad)]
    claims: List[Tuple[str, Optional[float], str, Optional[bool]]] = []
    att, att_claims = attention_section(_rows(os.path.join(out, "attention.csv")))
    claims += att_claims
    lines += ["", "## Attention", ""] + att
    lines += ["", "## Fused losses", ""] + _simple_table(_rows(os.path.join(out, "losses.csv")),
                                                        ["loss_rel_err_vs_fp32"])
    e2e = _rows(os.path.join(out, "e2e.csv"))
    lines += ["", "## End to end", "", e2e_markdown(e2e) if e2e else "no e2e rows"]
    train = _rows(os.path.join(out, "train.csv"))
    claims += train_claims(train)
    lines += ["", "## Training step", ""] + _simple_table(train, ["img_s", "peak_mem_mb", "loss_vs_plain"])
    lines += ["", "## Single request", ""] + _simple_table(
        _rows(os.path.join(out, "inference.csv")),
        ["dtype", "p99_ms", "vs_fp32_sam_rel_err", "vs_fp32_clip_cos", "vs_fp32_mask_iou", "vs_fp32_label_agreement"])
    lines += ["", "## Claims checked here (the end-to-end ones are in that section)", ""]
    lines += _md_table(["claim", "measured", "goal", "met"],
                       [[n, f"{v:.3g}x" if v is not None else "n/a", g,
                         "-" if m is None else ("yes" if m else "**no**")] for n, v, g, m in claims])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the CSVs, summary.md and logs (created)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, the same files (CI)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"the whole command's wall time (default {BUDGET_S} s; quick {QUICK_BUDGET_S} s)")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS), help="a subset of the parts, in order")
    args = p.parse_args(argv)
    names = [n for n in args.parts.split(",") if n]
    known = {x.name: x for x in PARTS}
    for n in names:
        if n not in known:
            p.error(f"unknown part {n!r}; parts: {', '.join(known)}")
    if not args.quick:
        if not torch.cuda.is_available():
            p.error("no CUDA GPU is visible: this command measures a GPU (use --quick for the CPU smoke run)")
    started = time.time()
    end = started + (args.budget_s or (QUICK_BUDGET_S if args.quick else BUDGET_S))
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    ctx = Context(out=os.path.abspath(args.out), quick=args.quick,
                  xdist=importlib.util.find_spec("xdist") is not None,
                  pytest_timeout=importlib.util.find_spec("pytest_timeout") is not None)
    outcomes: List[Outcome] = []
    for name in names:
        if time.time() >= end - RESERVE_S:
            outcomes.append(Outcome(name, "overran: no time left in the command's budget", 0.0, known[name].budget_s))
            continue
        print(f"[bench gpu] {name} ...", flush=True)
        o = run_part(ctx, known[name], end)
        print(f"[bench gpu] {name}: {o.status} ({o.seconds:.0f} s)", flush=True)
        outcomes.append(o)
    with open(os.path.join(ctx.out, "parts.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "status", "seconds", "budget_s", "logs"])
        for o in outcomes:
            w.writerow([o.part, o.status, f"{o.seconds:.1f}", f"{o.budget_s:.0f}", " ".join(o.logs)])
    text = summary(ctx.out, outcomes, started)
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"[bench gpu] wrote {ctx.out}/summary.md in {time.time() - started:.0f} s")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
