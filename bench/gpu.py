"""``fastsamclip bench gpu --out DIR``: the product's measurements on a freshly lent GPU, one command.

    fastsamclip bench gpu --dry-run                      # the plan: parts, order, deadlines, their sum
    fastsamclip bench gpu --out results-h200             # at most 6 minutes on an H100 / H200
    fastsamclip bench gpu --quick --out /tmp/gpu-quick   # tiny shapes on the CPU (CI): same files
    fastsamclip bench gpu --warm-triton-cache DIR        # the sm_90a Triton builds of the run, made here

A lent GPU comes for minutes, once: the measurements come first, the most valuable first, and the
correctness tests after them, each part a child process under its own deadline. A part that
overruns is stopped (its process group killed), recorded as overrun, keeps every row it wrote
(each benchmark writes a row the moment it is measured, so a cut loses only the row in flight),
and the next part starts; time a part leaves unused passes to the next one, so the whole run
stays within the sum of the deadlines. ``PARTS`` below is the plan (``--dry-run`` prints it with
how each deadline was estimated).

DIR gets one CSV per part, ``parts.csv`` (each part's status and time), ``summary.md`` (the
environment, the parts, the test outcome, every table, and the product's claims checked:
``bench.report`` for the end-to-end ones, the attention and training ones here), ``logs/``, and
last ``fastsamclip-gpu.tar.gz``: every file of DIR in one archive, which is what a machine that
returns few files should send back. Timing is the benchmarks' own: CUDA events after warm-up,
medians, compiles in the warm-up, never timed.

Compiles are most of a cold run. ``--warm-triton-cache DIR`` compiles, on any machine and with
the Triton the GPU machine has, every attention kernel the run will launch on an H100 / H200
(sm_90a): the autotuner's pruner under a stand-in for the GPU's driver, the same code path and
cache key as there. ``bench/gpu_device.sh`` unpacks such a cache into ``TRITON_CACHE_DIR`` and
reports how many kernels the run still compiled.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastsamclip.kernels import aot

from .gpu_summary import summary, write_test_rows
from .harness import environment

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
QUICK_BUDGET_S = 500  # tiny shapes on CI's 2 cores: generous, it only bounds a hang
RESERVE_S = 10  # kept for the summary and the archive
ARCHIVE = "fastsamclip-gpu.tar.gz"
CLIP = "ViT-L-14"  # the separate pipeline's CLIP, and the teacher the merged model's head predicts (the paper's)

# The GPU correctness tests the run makes, cut to the shapes and precisions the benchmarks ran
# (bf16 and fp16 against fp32 / float64 references), most valuable first; the compiled-graph
# tests last. Node ids (a test's parameters in brackets).
_ATT = "tests/kernels/test_relpos_attention_triton.py"
GPU_TESTS = [
    f"{_ATT}::test_triton_full_size[global4096-b8-bf16]",
    f"{_ATT}::test_triton_full_size[windows196-b8x25-bf16]",
    f"{_ATT}::test_triton_full_size[global4096-b8-fp16]",
    f"{_ATT}::test_triton_full_size[windows196-b8x25-fp16]",
    f"{_ATT}::test_triton_full_size[global1024-b1-bf16]",
    "tests/kernels/test_cosine_distill.py::test_bf16_on_gpu",
    "tests/kernels/test_linear_cosine_distill.py::test_bf16_on_gpu",
    "tests/kernels/test_focal_dice.py::test_bf16_on_gpu",
    "tests/kernels/test_preprocess.py::test_cuda_preprocess_equals_torch",
    "tests/kernels/test_preprocess.py::test_cuda_raw_call_writes_every_element",
    "tests/kernels/test_preprocess.py::test_a_launch_that_fails_falls_back_to_torch_logged_once",
    "tests/kernels/test_postprocess_masks.py::test_cuda_postprocess_equals_torch",
    "tests/test_predictor.py::test_gpu_preprocess_and_cuda_graphs_agree_with_eager",
    f"{_ATT}::test_a_second_process_tunes_nothing",
]
COMPILED_TESTS = [
    f"{_ATT}::test_triton_in_torch_compile_fullgraph",
    "tests/kernels/test_preprocess.py::test_cuda_op_compiles_fullgraph",
    "tests/kernels/test_postprocess_masks.py::test_cuda_op_compiles_fullgraph",
    "tests/kernels/test_cosine_distill.py::test_compile_fullgraph_fwd_bwd",
    "tests/kernels/test_focal_dice.py::test_compile_fullgraph_fwd_bwd",
]
# GPU-only kernel tests the run leaves out, and why (tests/bench/test_gpu.py: each is run or here).
LEFT_OUT = {
    f"{_ATT}::test_triton_bf16": "awkward shapes no benchmark runs (pytest tests/kernels -k bf16 on a GPU)",
    f"{_ATT}::test_triton_full_size[global784-d80": "ViT-H's head dim 80, which no benchmark of the run uses",
    "tests/kernels/test_relpos_attention_flex.py::test_flex_cuda_fwd_bwd":
        "FlexAttention compiles for minutes; its benchmark rows carry max_err against the fp32 reference",
}

# The attention launches of the run on an H100 / H200, by what the Triton compiler sees: the grid,
# the head dim and the dtype (the batch and the number of heads change the grid, not the compiled
# kernel; SAM's strided q/k/v specialise as contiguous ones do). (label, batch, heads, H, W, d).
WARM_SHAPES = {
    "bf16": [("14 x 14: windows, CLIP at 224 px", 200, 12, 14, 14, 64),
             ("64 x 64: 1024 px global blocks, the CLIP head", 8, 12, 64, 64, 64),
             ("32 x 32: the CLIP head on 2 x 2-pooled tokens", 8, 12, 32, 32, 64),
             ("28 x 28: CLIP at 448 px in training", 16, 12, 28, 28, 64)],
    "fp16": [("14 x 14: the fp16 tests", 200, 12, 14, 14, 64), ("64 x 64: the fp16 tests", 8, 12, 64, 64, 64)],
}


@dataclass
class Step:
    label: str
    argv: List[str]  # after ``python``; run in the repository root when there is one


@dataclass
class Part:
    name: str
    budget_s: float  # its deadline on an H100 / H200, compiles included
    quick_budget_s: float
    steps: Callable[["Context"], List[Step]]
    files: Tuple[str, ...] = ()
    what: str = ""  # what it measures, for the plan
    estimate: str = ""  # how the deadline was estimated


@dataclass
class Context:
    out: str
    quick: bool
    python: str = sys.executable
    xdist: bool = False  # pytest-xdist importable: the tests run in 4 processes
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


def _attention_args(ctx: Context, *impls: str) -> List[str]:
    """The attention benchmark's arguments: ViT-B's 64 x 64 grid and 14 x 14 windows at batch 8 in bf16
    (quick: its tiny shapes), these competitors, rows appended to attention.csv."""
    shapes = ["--quick"] if ctx.quick else ["--batch", "8", "--cases", "global-4096", "windows-196", "--dtype", "bf16"]
    return _m("bench_relpos_attention", *shapes, "--modes", "fwd", "fwd+bwd", "--impls", *impls,
              "--out", os.path.join(ctx.out, "attention.csv"), "--no-plot", "--quiet")


def _attention_steps(ctx: Context) -> List[Step]:
    if ctx.quick:
        return [Step("fused vs sdpa", _attention_args(ctx, "triton", "sdpa-bias"))]
    return [Step("fused, sdpa, fold, flash", _attention_args(ctx, "triton", "sdpa-bias", "fold-sdpa-flash",
                                                             "flash-nobias"))]


def e2e_rows(clip: str) -> List[str]:
    """The end-to-end rows in order (``workload:impl[@dtype]``): each model's eager fp32 reference
    first (the rows after it report their agreement with it, and the weight bytes come from them),
    then the eager rows of both outputs, then one compiled pair on the image encoder."""
    return ["both:merged-reference@fp32", f"both:separate-eager/{clip}@fp32",
            "both:merged-fused", "both:merged-fused-pool2", f"both:separate-fused/{clip}",
            f"both:separate-eager/{clip}@bf16",
            "sam:merged-reference@fp32", f"sam:separate-eager/{clip}@fp32",
            "sam:merged-fused-compile", f"sam:separate-strong/{clip}", f"sam:separate-samfast/{clip}"]


def _e2e_steps(ctx: Context) -> List[Step]:
    out = ["--out", os.path.join(ctx.out, "e2e.csv"), "--plot-dir", ctx.out, "--no-semantic", "--clip-token-pools", "2"]
    if ctx.quick:
        sizes, clip = ["--quick", "--batch", "1", "--iters", "1", "--warmup", "1"], "tiny-clip"
    else:
        sizes, clip = ["--batch", "8", "--iters", "10", "--warmup", "2", "--clip-model", CLIP], CLIP
    return [Step("eager rows, then a compiled pair", _m("e2e", *sizes, *out, "--rows", ",".join(e2e_rows(clip))))]


def _train_steps(ctx: Context) -> List[Step]:
    size = (["--quick", "--iters", "1", "--warmup", "1", "--clip-res", "32"] if ctx.quick
            else ["--iters", "3", "--warmup", "1", "--clip-model", CLIP])
    return [Step("stage 2", _m("bench_train", *size, "--stages", "2", "--configs", "plain,fused",
                               "--out", os.path.join(ctx.out, "train.csv")))]


def _inference_steps(ctx: Context) -> List[Step]:
    size = ["--quick", "--iters", "2", "--warmup", "1"] if ctx.quick else ["--iters", "20", "--warmup", "3"]
    return [Step("request", _m("bench_inference", *size, "--no-ttfr", "--out", os.path.join(ctx.out, "inference.csv")))]


def _loss_steps(ctx: Context) -> List[Step]:
    dtype = "fp32" if ctx.quick else "bf16"  # the interpreter's bf16 arithmetic is wrong
    # quick: aot_eager traces the compiled competitor without the CPU's C++ compile
    extra = ["--quick", "--compile-backend", "aot_eager"] if ctx.quick else []
    # `fastsamclip bench losses` runs the three loss benchmarks in one process.
    return [Step("losses", ["-m", "fastsamclip", "bench", "losses", *extra, "--dtype", dtype,
                            "--out", os.path.join(ctx.out, "losses.csv"), "--no-plot"])]


def _flex_steps(ctx: Context) -> List[Step]:
    return [Step("flex", _attention_args(ctx, "flex"))]


def _test_steps(ctx: Context) -> List[Step]:
    if not os.path.isdir(os.path.join(REPO, "tests")):
        return []
    par = ["-n", "4"] if ctx.xdist and not ctx.quick else []
    limit = ["--timeout", "120"] if ctx.pytest_timeout else []
    # quick: the GPU-only tests (each skips, saying why); the compiled ones run in the CPU suite already
    ids = GPU_TESTS if ctx.quick else GPU_TESTS + COMPILED_TESTS
    return [Step("pytest", ["-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", *par, *limit, *ids])]


# The plan. Deadlines are estimates for one H100 / H200 with a cold Inductor cache (the Triton cache
# carried or not), from: CPU seconds measured on a 2-core Xeon (imports, model builds: they run on
# the GPU machine's CPU the same way), Triton compiles counted by the AOT builds of
# ``fastsamclip.kernels.aot`` for sm_90a (about 1 CPU second each here), and GPU work as counted
# FLOPs at the 790 TFLOP/s bf16 measured on an H200 (a fraction of it for small kernels).
PARTS: List[Part] = [
    Part("environment", 10, 40, _env_steps, ("environment.csv", "info.txt"),
         "GPU, driver, torch, triton, commit; every op's backends (fastsamclip info)",
         "imports and the backends' probes: 8 CPU s here"),
    Part("attention", 55, 60, _attention_steps, ("attention.csv",),
         "fwd and fwd+bwd, 64 x 64 grid (batch 8, 12 heads, d 64) and 14 x 14 windows (batch 8 x 25), bf16, "
         "TFLOP/s: the fused kernel, SDPA with the materialised bias, the bias folded into flash attention, "
         "unbiased flash attention (the speed of light)",
         "imports 5 s; 21 Triton compiles (7 fwd, 6 dk/dv, 6 dq configs and 2 delta kernels over the two grids, "
         "~1 CPU s each) 21 s cold, under 1 s from a carried cache; their launchers (gcc) 5 s; the autotuner "
         "times 19 configs (0.15 s each) 3 s; 16 rows at 25 + 100 ms of do_bench plus a memory run and an "
         "accuracy probe 8 s; 5 s margin"),
    Part("e2e", 130, 90, _e2e_steps, ("e2e.csv",),
         f"batch 8, bf16: the merged model (fused kernels; CLIP head on all tokens and on 2 x 2-pooled ones), "
         f"SAM on fastsamclip's kernels + CLIP, segment_anything + open_clip {CLIP} (eager), each with its fp32 "
         f"reference; then one compiled pair on the image encoder: merged fused + compiled against SAM bf16 + "
         f"compile + SDPA",
         f"imports 8 s; SAM ViT-B, CLIP {CLIP} and the merged model built on the CPU 10 s; 9 eager rows of 12 "
         f"batches (8 images x ~1.2 TFLOP bf16, fp32 ~8x slower) with their meta-device FLOP counts 30 s; the "
         f"32 x 32 grid's attention tuned 3 s; two cold Inductor graphs of a ViT-B at 1024 px (trace, lowering, "
         f"~50 Triton kernels on 16 compile workers) 35 s each"),
    Part("train", 45, 80, _train_steps, ("train.csv",),
         "one stage-2 training step (CLIP batches at 224 and 448 px, 4 SA-1B images x 32 prompts at 1024 px), "
         "plain torch against fused: img/s, peak memory, the loss against plain",
         "imports 7 s; teachers, student and data built 12 s; 2 configurations x 4 steps of ~45 TFLOP (teachers "
         "and student fwd+bwd) 6 s; the fused step's new attention keys tuned (training batches, the 28 x 28 grid "
         "at 448 px) 8 s, +10 s of compiles without a carried cache"),
    Part("inference", 30, 60, _inference_steps, ("inference.csv",),
         "single-request p50 / p99 of the predictor in bf16, with its agreement with fp32",
         "imports 7 s; a random merged checkpoint (SAM ViT-B + CLIP ViT-L-14 built on the CPU, 10 s) written and "
         "loaded 4 s; 3 + 20 requests in bf16 and the fp32 agreement run 4 s; batch-1 attention keys tuned 4 s"),
    Part("losses", 25, 60, _loss_steps, ("losses.csv",),
         "the fused distillation losses against eager and compiled torch, bf16",
         "imports 5 s; 3 losses x (eager, Inductor-compiled fwd+bwd ~5 s to compile, fused) 20 s"),
    Part("flex", 20, 40, _flex_steps, ("attention.csv",),
         "FlexAttention on the attention benchmark's shapes (compiled; slow to compile: last)",
         "4 flex graphs compile for 1.5-4 minutes in all: it gets 20 s plus what the parts before left unused, "
         "and is cut when that ends"),
    Part("tests", 45, 60, _test_steps, ("tests.csv",),
         "the GPU correctness tests, cut to the shapes the benchmarks ran: the fused attention on the 64 x 64 "
         "and 14 x 14 grids in bf16 and fp16 against float64, the losses in bf16, the CUDA preprocessing and "
         "postprocessing against torch, autotune kept across processes; then the compiled-graph tests",
         "4 pytest-xdist workers start in 10 s; float64 references of the full-size cases 10 s; the second-"
         "process test 2 x 8 s; 5 compiled-graph tests (small Inductor graphs) 15 s on 4 workers"),
]
BUDGET_S = sum(p.budget_s for p in PARTS)  # 360: at most 6 minutes, compiles included


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


def run_part(ctx: Context, part: Part, end: float, extra_s: float = 0.0) -> Outcome:
    """Run a part's steps under its deadline (its budget plus ``extra_s`` the parts before left
    unused, never past ``end``)."""
    budget = part.quick_budget_s if ctx.quick else part.budget_s
    start = time.time()
    deadline = min(start + budget + extra_s, end - RESERVE_S)
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
            out.status = f"overran its {deadline - start:.0f} s deadline before {step.label}"
            break
        rc = run_step(ctx, step, log, deadline)
        if rc is None:
            out.status = f"overran its {deadline - start:.0f} s deadline in {step.label}"
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
    _write_pairs(os.path.join(ctx.out, "environment.csv"), env)
    return env


def _write_pairs(path: str, pairs: Dict[str, object]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "value"])
        w.writerows(sorted(pairs.items()))


def triton_cache_dir() -> str:
    """Where Triton keeps compiled kernels and autotune choices in this environment."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(
        os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def triton_cache_entries(path: str) -> Tuple[set, set, set]:
    """(the package's compiled kernels, Inductor's, autotune choices): the cache's entry folders
    holding a cubin, split by kernel name (Inductor names its kernels ``triton_*``), and those
    holding an ``.autotune.json``."""
    ours, inductor, tuned = set(), set(), set()
    if os.path.isdir(path):
        for name in os.listdir(path):
            files = os.listdir(os.path.join(path, name)) if os.path.isdir(os.path.join(path, name)) else []
            cubins = [f for f in files if f.endswith(".cubin")]
            if cubins:
                (inductor if cubins[0].startswith("triton_") else ours).add(name)
            if any(f.endswith(".autotune.json") for f in files):
                tuned.add(name)
    return ours, inductor, tuned


def pack(out: str) -> str:
    """Every file under ``out`` in one archive, ``out/ARCHIVE`` (paths relative to ``out``)."""
    path = os.path.join(out, ARCHIVE)
    tmp = path + ".part"
    with tarfile.open(tmp, "w:gz") as tar:
        for folder, _, files in os.walk(out):
            for f in sorted(files):
                full = os.path.join(folder, f)
                if full not in (path, tmp):
                    tar.add(full, arcname=os.path.relpath(full, out))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ plan, cache
def plan_text(quick: bool = False) -> str:
    """The plan, without running anything: each part in order, its deadline, what it runs, how
    the deadline was estimated, and their sum."""
    ctx = Context(out="DIR", quick=quick, xdist=True, pytest_timeout=True)
    total = sum(p.quick_budget_s if quick else p.budget_s for p in PARTS)
    lines = [f"fastsamclip bench gpu{' --quick' if quick else ''}: the plan (nothing runs; "
             f"{'tiny shapes on the CPU' if quick else 'one H100 / H200, compiles included'})", ""]
    head = f"{'#':>2}  {'part':12s} {'deadline':>8s}  what"
    lines += [head, "-" * len(head)]
    for i, p in enumerate(PARTS, 1):
        what = textwrap.wrap(p.what, 90) or [""]
        lines.append(f"{i:>2}  {p.name:12s} {p.quick_budget_s if quick else p.budget_s:>6.0f} s  {what[0]}")
        lines += [f"{'':26s}{w}" for w in what[1:]]
        for s in p.steps(ctx):
            lines.append(f"{'':26s}step {s.label!r}: python {' '.join(s.argv[:4])} ...")
    lines += ["", f"sum of the deadlines: {total:.0f} s ({total / 60:.1f} min), plus {RESERVE_S} s for the summary "
                  "and the archive; a part's unused time passes to the next one.", ""]
    if not quick:
        lines.append("How each deadline was estimated:")
        for p in PARTS:
            lines += textwrap.wrap(f"{p.name}: {p.estimate}", 110, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def warm_triton_cache(cache_dir: str, jobs: int = 2, target: str = "sm_90a") -> aot.Warmed:
    """Compile every attention kernel the run launches on ``target`` into ``cache_dir`` (see
    ``fastsamclip.kernels.aot.warm``): on a machine without a GPU, with the Triton of the GPU machine."""
    shapes = [(dtype, shape) for dtype, group in WARM_SHAPES.items() for shape in group]
    return aot.warm(cache_dir, shapes, target=target, jobs=jobs)


# ------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for the CSVs, summary.md, logs and the archive (created)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, the same files (CI)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parts, order, deadlines, sum) and exit")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"the whole command's wall time (default: the sum of the deadlines, {BUDGET_S:.0f} s; "
                        f"quick {QUICK_BUDGET_S} s)")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS), help="a subset of the parts, in order")
    p.add_argument("--warm-triton-cache", metavar="DIR", default=None,
                   help="compile the run's attention kernels for sm_90a into DIR (no GPU needed) and exit")
    p.add_argument("--jobs", type=int, default=2, help="compile processes of --warm-triton-cache")
    args = p.parse_args(argv)
    names = [n for n in args.parts.split(",") if n]
    known = {x.name: x for x in PARTS}
    for n in names:
        if n not in known:
            p.error(f"unknown part {n!r}; parts: {', '.join(known)}")
    if args.dry_run:
        print(plan_text(args.quick))
        return 0
    if args.warm_triton_cache:
        w = warm_triton_cache(args.warm_triton_cache, jobs=args.jobs)
        print(w.describe())
        return 0 if not w.errors else 1
    if not args.out:
        p.error("--out DIR is required (or --dry-run / --warm-triton-cache DIR)")
    if os.path.exists(os.path.join(args.out, ARCHIVE)):
        p.error(f"{args.out} holds an earlier run ({ARCHIVE}): give another --out folder")
    if not args.quick and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible: this command measures a GPU (use --quick for the CPU smoke run)")
    started = time.time()
    end = started + (args.budget_s or (QUICK_BUDGET_S if args.quick else BUDGET_S + RESERVE_S))
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    ctx = Context(out=os.path.abspath(args.out), quick=args.quick,
                  xdist=importlib.util.find_spec("xdist") is not None,
                  pytest_timeout=importlib.util.find_spec("pytest_timeout") is not None)
    cache = triton_cache_dir()
    before = triton_cache_entries(cache)
    outcomes: List[Outcome] = []
    unused = 0.0
    for name in names:
        part = known[name]
        if time.time() >= end - RESERVE_S:
            outcomes.append(Outcome(name, "overran: no time left in the command's budget", 0.0, part.budget_s))
            continue
        print(f"[bench gpu] {name} ...", flush=True)
        o = run_part(ctx, part, end, unused)
        unused = max(0.0, unused + o.budget_s - o.seconds)
        print(f"[bench gpu] {name}: {o.status} ({o.seconds:.0f} s)", flush=True)
        outcomes.append(o)
    after = triton_cache_entries(cache)
    _write_pairs(os.path.join(ctx.out, "triton_cache.csv"), {
        "dir": cache, "kernels_before": len(before[0]), "kernels_compiled": len(after[0] - before[0]),
        "inductor_kernels_compiled": len(after[1] - before[1]), "autotune_written": len(after[2] - before[2])})
    with open(os.path.join(ctx.out, "parts.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "status", "seconds", "budget_s", "logs"])
        for o in outcomes:
            w.writerow([o.part, o.status, f"{o.seconds:.1f}", f"{o.budget_s:.0f}", " ".join(o.logs)])
    text = summary(ctx.out, outcomes, started)
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(text)
    archive = pack(ctx.out)
    print(text)
    print(f"[bench gpu] wrote {ctx.out}/summary.md and every file in {archive} in {time.time() - started:.0f} s")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
