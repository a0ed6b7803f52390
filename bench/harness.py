"""Shared benchmark harness: timing, memory, environment stamp, CSV results, plots.

Every benchmark in ``bench/`` uses it so that results are comparable and land in one format:
one CSV row per (benchmark, case, competitor, mode), stamped with the device, driver, torch and
triton versions, the commit and the date.

Timing rules: CUDA events through ``triton.testing.do_bench`` (warm-up first, median of the
repeats, L2 flushed between repeats); compile happens in the warm-up, never in the timed part;
inputs are random, never zeros.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import datetime as _dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# bench/results in a source checkout; ./fastsamclip-results from an installed copy; the variable wins.
RESULTS_DIR = os.environ.get("FASTSAMCLIP_RESULTS_DIR") or (
    os.path.join(_HERE, "results") if os.path.isfile(os.path.join(_HERE, "..", "setup.py"))
    else os.path.join(os.getcwd(), "fastsamclip-results"))


def scratch_dir(prefix: str) -> str:
    """A temporary folder for a benchmark's checkpoints and data, removed when the process exits
    (a benchmark called in-process, by ``bench all`` or a test, leaves nothing behind either)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# The 20 class names of the semantic workloads (e2e, inference): everyday things, COCO-like.
LABELS = ["person", "cat", "dog", "car", "tree", "grass", "sky", "road", "building", "water", "chair", "table",
          "cup", "bottle", "book", "clock", "flower", "bird", "horse", "boat"]


@dataclass
class Result:
    bench: str  # which benchmark script, e.g. "attention"
    case: str  # the shape/config, e.g. "global-4096 B8 h12 d64 bf16"
    impl: str  # the competitor, e.g. "triton", "sdpa-bias", "flex"
    mode: str  # "fwd", "bwd", "fwd+bwd"
    ms: Optional[float] = None  # median time per call, milliseconds
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mem_mb: Optional[float] = None  # peak allocated during one call, above the inputs
    status: str = "ok"  # "ok", or "skipped: <reason>", or "failed: <error>"
    extra: Dict[str, object] = field(default_factory=dict)


def _git_commit() -> str:
    """The short commit id, with ``+dirty`` when tracked sources differ from it (results excluded);
    a copy carried without its ``.git`` (a lent GPU machine) says ``$FASTSAMCLIP_COMMIT``."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=_HERE,
                                         stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return os.environ.get("FASTSAMCLIP_COMMIT") or "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)bench/results"],
                           cwd=os.path.dirname(_HERE), stderr=subprocess.DEVNULL).returncode
    return commit + ("+dirty" if dirty == 1 else "")


def environment() -> Dict[str, str]:
    """The stamp each result row carries."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "driver": "",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda or ""
        try:
            import pynvml

            pynvml.nvmlInit()
            drv = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        except Exception:
            env["driver"] = "unknown (nvidia-ml-py missing)"
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def full_size_device(parser, device: Optional[str], quick: bool) -> str:
    """The device of a model benchmark: ``device`` if given; the CPU for ``--quick`` (tiny
    models); else CUDA, and without a GPU an argument error rather than hours on the CPU."""
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--device {device}: no CUDA device is visible")
        return device
    if quick:
        return "cpu"
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: the full-size models would take hours on the CPU; use --quick "
                     "(tiny models), or --device cpu to run them anyway")
    return "cuda"


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()``: device events on CUDA, wall clock elsewhere."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (and compile, if any)
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while True:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


def time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> Tuple[List[float], float]:
    """Call ``fn`` ``iters`` times, each timed on its own: (per-call ms, seconds of the whole loop).

    On CUDA each call is bracketed by device events and followed by a synchronise (a single
    request's latency, nothing queued behind it); elsewhere the wall clock. Warm up before.
    """
    if device.type != "cuda":
        times = []
        t_start = time.perf_counter()
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, time.perf_counter() - t_start
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for a, b in zip(starts, ends):
        a.record()
        fn()
        b.record()
        b.synchronize()
    return [a.elapsed_time(b) for a, b in zip(starts, ends)], starts[0].elapsed_time(ends[-1]) / 1e3


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PowerSampler:
    """Samples GPU board power through NVML in a background thread while the timed loop runs;
    ``reason`` says why not where it cannot (no GPU, no nvidia-ml-py, NVML refusing)."""

    def __init__(self, device: torch.device, period_s: float = 0.01):
        self.reason: Optional[str] = None
        self.samples: List[Tuple[float, float]] = []
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if device.type != "cuda":
            self.reason = "n/a: no GPU (NVML power needs one)"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetPowerUsage(self._handle)
        except ImportError:
            self.reason = "n/a: nvidia-ml-py not installed"
        except Exception as e:  # NVML present but refusing (containers without power access)
            self.reason = f"n/a: NVML: {type(e).__name__}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            mw = self._nvml.nvmlDeviceGetPowerUsage(self._handle)
            self.samples.append((time.perf_counter(), mw / 1e3))
            time.sleep(self.period_s)

    def __enter__(self):
        if self.reason is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def joules(self, seconds: float) -> Optional[float]:
        if self.reason is not None or len(self.samples) < 2:
            return None
        return statistics.mean(w for _, w in self.samples) * seconds


def measure_batches(fn, images: torch.Tensor, device: torch.device, warmup: int, iters: int):
    """Warm-up (compiles there), then ``iters`` batches, each timed by device events and
    synchronised. Returns (outputs, sorted per-batch ms, total seconds, peak MB or None, PowerSampler)."""
    with torch.no_grad():
        for _ in range(warmup):
            out = fn(images)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        last = {}

        def call():
            last["out"] = fn(images)

        with PowerSampler(device) as power:
            times, total = time_calls(call, iters, device)
        out = last["out"]
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    # Compiled functions may hand back buffers a later call reuses: keep copies for agreement.
    return {k: v.detach().clone() for k, v in out.items()}, sorted(times), total, peak, power


def nbytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def fmt_num(v: Optional[float], digits: int = 3) -> str:
    """A number to ``digits`` significant digits for a table, "-" for none."""
    return "-" if v is None else f"{v:.{digits}g}"


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in [0, 1])."""
    return sorted_ms[min(len(sorted_ms) - 1, int(round(q * (len(sorted_ms) - 1))))]


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak CUDA memory allocated by one call above what was live before it (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(bench: str, case: str, impl: str, mode: str, fn: Optional[Callable[[], object]],
             flops: Optional[float] = None, bytes_moved: Optional[float] = None,
             skip_reason: Optional[str] = None, **extra) -> Result:
    """Time one competitor; a missing competitor is a row with its reason, never a silent gap."""
    r = Result(bench=bench, case=case, impl=impl, mode=mode, extra=dict(extra))
    if skip_reason is not None or fn is None:
        r.status = f"skipped: {skip_reason or 'not available'}"
        return r
    try:
        r.ms = bench_ms(fn)
        r.peak_mem_mb = peak_memory_mb(fn)
    except torch.cuda.OutOfMemoryError:
        r.status = "failed: out of memory"
        torch.cuda.empty_cache()
        return r
    except Exception as e:  # a competitor that breaks is reported, not fatal to the table
        r.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return r
    if flops is not None:
        r.tflops = flops / (r.ms * 1e-3) / 1e12
    if bytes_moved is not None:
        r.gbps = bytes_moved / (r.ms * 1e-3) / 1e9
    return r


CSV_FIELDS = ["date", "commit", "device", "driver", "torch", "triton", "bench", "case", "impl",
              "mode", "ms", "tflops", "gbps", "peak_mem_mb", "status", "extra"]


def append_csv(results: Iterable[Result], path: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> str:
    """Append rows (with the environment stamp) to ``bench/results/<bench>.csv``. A benchmark that
    writes its rows as they are measured passes one ``env = environment()`` to every call, so
    the rows of one run share one date stamp (what ``report`` groups a run by)."""
    results = list(results)
    if not results:
        raise ValueError("append_csv: no results to write")
    path = path or os.path.join(RESULTS_DIR, f"{results[0].bench}.csv")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    env = env or environment()
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in results:
            row = {**env, **asdict(r)}
            row["extra"] = ";".join(f"{k}={v}" for k, v in r.extra.items())
            for k in ("ms", "tflops", "gbps", "peak_mem_mb"):
                if row[k] is not None:
                    row[k] = f"{row[k]:.4g}"
            w.writerow(row)
    return path


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parse_extra(field_: str) -> Dict[str, str]:
    """The ``extra`` column (``k=v;k=v``) of a CSV row as a dict of strings."""
    out = {}
    for part in (field_ or "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def row_value(row: Dict[str, str], metric: str) -> Optional[float]:
    """A number from a CSV row: a column (``ms``, ``peak_mem_mb``) or an ``extra`` key (``img_s``)."""
    v = row.get(metric) if metric in CSV_FIELDS else parse_extra(row.get("extra", "")).get(metric)
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:  # an extra that holds a reason instead of a number
        return None


def _row_key(bench: str, case: str, impl: str, mode: str, extra: Dict[str, object]) -> Tuple[str, ...]:
    return (bench, case, impl, mode, str(extra.get("dtype", "")))


def earlier_rows(ref: str, default_csv: str) -> List[Dict[str, str]]:
    """The rows ``--compare REF`` means: every row of a CSV file, or the rows of ``default_csv``
    written at commit ``REF`` (a prefix of the commit id in the ``commit`` column)."""
    if os.path.isfile(ref):
        return read_csv(ref)
    if not os.path.isfile(default_csv):
        raise SystemExit(f"--compare {ref!r}: not a file, and there is no {default_csv} to look the commit up in")
    rows = [r for r in read_csv(default_csv) if r["commit"] and (r["commit"].startswith(ref) or ref.startswith(r["commit"]))]
    if not rows:
        commits = sorted({r["commit"] for r in read_csv(default_csv)})
        raise SystemExit(f"--compare {ref!r}: no CSV file of that name, and no row of {default_csv} has that commit "
                         f"(it has: {', '.join(commits) or 'none'})")
    return rows


def compare(results: Sequence[Result], before: Sequence[Dict[str, str]], metric: str = "ms",
            higher_is_better: bool = False, tolerance: float = 0.05) -> str:
    """This run against the latest earlier row of the same benchmark, case, impl, mode and dtype on
    the same device: old, new, their ratio (> 1: better now), and a mark past ``tolerance``."""
    device = environment()["device"]
    latest: Dict[Tuple[str, ...], Dict[str, str]] = {}
    for row in before:  # CSV rows are in time order: the last one of a key wins
        if row["device"] == device and row["status"] == "ok":
            latest[_row_key(row["bench"], row["case"], row["impl"], row["mode"], parse_extra(row["extra"]))] = row
    lines = [f"{'case':<28} {'impl':<30} {'dtype':<5} {'before':>10} {'now':>10} {'gain':>7}  (" + metric
             + (", higher is better)" if higher_is_better else ", lower is better)")]
    matched = 0
    for r in results:
        if r.status != "ok":
            continue
        old = latest.get(_row_key(r.bench, r.case, r.impl, r.mode, r.extra))
        now = r.extra.get(metric) if metric not in CSV_FIELDS else getattr(r, metric)
        was = row_value(old, metric) if old else None
        if was is None or not isinstance(now, (int, float)) or not now:
            continue
        matched += 1
        gain = now / was if higher_is_better else was / now
        mark = "  slower" if gain < 1 - tolerance else ("  faster" if gain > 1 + tolerance else "")
        lines.append(f"{r.case:<28} {r.impl:<30} {str(r.extra.get('dtype', '')):<5} {was:>10.4g} {now:>10.4g} "
                     f"{gain:>6.2f}x{mark}  (was {old['commit']}, {old['date'][:10]})")
    if not matched:
        return f"compare: no earlier row on {device} matches a row of this run"
    return "\n".join(lines)


def format_table(results: Iterable[Result], baseline: Optional[str] = None) -> str:
    """A plain-text table; with ``baseline``, a column of speed-up over that impl per case/mode."""
    results = list(results)
    base = {(r.case, r.mode): r.ms for r in results if r.impl == baseline and r.ms}
    header = ["case", "mode", "impl", "ms", "TFLOP/s", "GB/s", "peak MB", "speed-up" if baseline else "", "status"]
    rows = []
    for r in results:
        b = base.get((r.case, r.mode))
        rows.append([
            r.case, r.mode, r.impl,
            f"{r.ms:.3f}" if r.ms else "-",
            f"{r.tflops:.1f}" if r.tflops else "-",
            f"{r.gbps:.0f}" if r.gbps else "-",
            f"{r.peak_mem_mb:.0f}" if r.peak_mem_mb is not None else "-",
            f"{b / r.ms:.2f}x" if (b and r.ms and baseline) else "",
            r.status,
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (said once) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _said_no_matplotlib:
            _said_no_matplotlib.append(True)
            print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    return plt


_said_no_matplotlib: List[bool] = []


def format_extras(results: Iterable[Result], keys: Sequence[Tuple[str, str]]) -> str:
    """A plain-text table of the measured rows' ``extra`` values: ``keys`` as (header, extra key)."""
    rows = [[r.case, r.impl] + [str(r.extra.get(k, "-")) for _, k in keys] for r in results if r.status == "ok"]
    header = ["case", "impl"] + [h for h, _ in keys]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot_csv(path: str, out_png: Optional[str] = None, metric: str = "ms", last_commit_only: bool = True) -> Optional[str]:
    """Bar chart of ``metric`` per case and impl from a results CSV (latest commit by default)."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in read_csv(path) if r["status"] == "ok" and row_value(r, metric) is not None]
    if not rows:
        return None
    if last_commit_only:
        last = rows[-1]["date"]
        rows = [r for r in rows if r["date"] == last]
    cases = list(dict.fromkeys(f"{r['case']} {r['mode']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) * max(1, len(impls)) / 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        vals = {f"{r['case']} {r['mode']}": row_value(r, metric) for r in rows if r["impl"] == impl}
        xs = [i + j * width for i, c in enumerate(cases) if c in vals]
        ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{rows[0]['bench']} on {rows[0]['device']} ({rows[0]['commit']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = out_png or path.rsplit(".", 1)[0] + f"_{metric}.png"
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------
# The loss benchmarks (bench_cosine_distill, bench_linear_cosine_distill, bench_focal_dice)
# ---------------------------------------------------------------------------------------------
def use_triton_interpreter_without_gpu() -> None:
    """Without a GPU the Triton kernels can only run in the interpreter, which reads
    TRITON_INTERPRET when triton is first imported: call before importing fastsamclip.kernels."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


LOSS_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LossCase:
    name: str
    make: Callable[[], tuple]  # -> (args, indices of the inputs that take a gradient)
    fused: Callable
    reference: Callable
    flops: Optional[float]  # fwd + bwd
    bytes_moved: Optional[float]  # fwd + bwd, the fused kernels' minimum traffic


def random_tensor(shape, dtype, device, scale=1.0, requires_grad=False) -> torch.Tensor:
    """Random normal values (never zeros: a zero tensor would time the kernels' easy paths)."""
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(requires_grad)


def _fwd_bwd(fn: Callable, args: Sequence, grad_idx: Sequence[int]) -> Callable[[], object]:
    leaves = [args[i] for i in grad_idx]

    def step():
        return torch.autograd.grad(fn(*args), leaves)

    return step


def _rel_err(fn: Callable, args: Sequence, ref32: torch.Tensor) -> float:
    with torch.no_grad():
        out = fn(*args).float()
    return float((out - ref32).abs().item() / max(ref32.abs().item(), 1e-12))


def run_loss_cases(bench: str, cases: Sequence[LossCase], dtype: torch.dtype, compile_backend: str) -> List[Result]:
    """fwd + bwd of each case's ``fused`` op, its plain-torch ``eager`` reference and the reference
    under ``torch.compile`` (compiled in the warm-up, never timed); each row carries the loss's
    relative error against an fp32 reference of the same inputs (quality beside speed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for case in cases:
        torch.manual_seed(0)
        args, grad_idx = case.make()
        ref32 = case.reference(*[a.detach().float() for a in args]).detach()
        # dynamic=False: cases of one benchmark share one reference function; without it the second
        # shape would recompile with symbolic sizes, while training runs one static shape per graph.
        compiled = torch.compile(case.reference, fullgraph=True, dynamic=False, backend=compile_backend)
        competitors = [("eager", case.reference), ("fused", case.fused), ("compiled", compiled)]
        for impl, fn in competitors:
            try:
                err = f"{_rel_err(fn, args, ref32):.2e}"
            except Exception as e:  # reported in the row by run_case's own failure below
                err = f"n/a ({type(e).__name__})"
            results.append(run_case(bench, f"{case.name} {str(dtype).replace('torch.', '')}", impl, "fwd+bwd",
                                    _fwd_bwd(fn, args, grad_idx), flops=case.flops, bytes_moved=case.bytes_moved,
                                    loss_rel_err_vs_fp32=err,
                                    **({"compile_backend": compile_backend} if impl == "compiled" else {})))
        del args
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def loss_bench_main(bench: str, description: str, make_cases: Callable[[torch.dtype, str, bool], List[LossCase]],
                    argv: Optional[Sequence[str]] = None) -> int:
    """The command line of a loss benchmark: parse, run, append to the CSV, print, plot."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", default="bf16", choices=sorted(LOSS_DTYPES),
                   help="input dtype (default bf16; on CPU use fp32/fp16: the interpreter's bf16 math is wrong)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run; seconds in the interpreter)")
    p.add_argument("--out", default=None, help=f"CSV to append to (default {RESULTS_DIR}/{bench}.csv)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the 'compiled' competitor (aot_eager: no codegen, fast warm-up)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.quick:
        print("no CUDA GPU: the full-size cases would take hours in the Triton interpreter; use --quick",
              file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = LOSS_DTYPES[a.dtype]
    results = run_loss_cases(bench, make_cases(dtype, device, a.quick), dtype, a.compile_backend)
    path = append_csv(results, a.out)
    print(format_table(results, baseline="eager"))
    print(f"\nappended {len(results)} rows to {path}")
    if not a.no_plot:
        png = plot_csv(path)
        if png:
            print(f"plot: {png}")
    return 0
