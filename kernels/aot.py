"""The GPU builds of every Triton kernel of the package, made ahead of time on any machine.

Triton compiles for a GPU it does not see: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
gives the TTGIR, PTX and cubin of a kernel, and ptxas's log (``TRITON_DUMP_PTXAS_LOG``) its
registers, spills and stack. This module compiles every kernel the package launches, for every
config its autotuner may pick on that GPU (the autotune space of the GPU's family, duplicates
dropped, as the pruner does), at the shapes that matter, for sm_90a (H100 / H200) and sm_80
(A100), and reads from each build:

* registers per thread, spill stores and stack frame (ptxas), shared memory (Triton's
  ``metadata.shared``, the figure it checks against the device's limit at launch);
* the MMA kind of the tensor-core products: ``wgmma`` (``ttng.warp_group_dot`` in the TTGIR,
  HGMMA in SASS), ``mma`` (``mma.sync``, HMMA) or ``fma`` (no tensor cores);
* for the attention kernels that stream key tiles (fwd, dq): the global loads of the key loop
  whose value is used in the iteration that issues them (synchronous: their latency is
  exposed every iteration); K and V ride cp.async, the next tile's rel_h is prefetched.

Each build is specialised as the launcher's call would be (the arguments come from the same
code: ``Launch`` lists of each kernel module): tensors 16-byte aligned, ints equal to 1 as
constants, divisibility-by-16 hints on the ints that have it, Triton's own binder doing it.

Findings (``Row.findings``; ``check`` fails on any): a compile error, spilled registers or a
stack frame, shared memory over the target's limit, an sm_90 fp16/bf16 build whose products do
not all run on wgmma, a synchronous load in a key loop. ``fastsamclip info --kernels`` prints
the table; ``tests/kernels/test_aot.py`` runs it in CI.

``warm`` fills a Triton cache with the kernels a GPU would compile for given launches, through
the launch path itself (the autotuner's pruner, ``warmup``) under a stand-in for that GPU's
driver: carried to the GPU machine with the same Triton, the run finds them there.

Builds run in worker processes (``WORKER``: JSON in and out)
without ``TRITON_INTERPRET`` and with a fresh Triton cache (so ptxas runs and logs every build),
spread over ``jobs`` processes. Uses Triton's JIT binder (``create_function_from_signature`` and
``JITFunction._pack_args``, present in Triton 3.6 and 3.8); another Triton says so in every row.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import cosine_distill, focal_dice
from . import relpos_attention_triton as attn

__all__ = ["TARGETS", "SHAPES", "Target", "Build", "Row", "Warmed", "builds", "run", "check", "format_table",
           "warm"]


class Target(NamedTuple):
    name: str  # "sm_90a"
    capability: int  # 90
    family: str  # the autotune space it gets (relpos_attention_triton.family_of)
    smem_limit: int  # bytes of shared memory a block may have (opt-in maximum)
    device: str  # what it stands for


TARGETS: Dict[str, Target] = {
    # cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on H100/H200, 163 KB on A100.
    "sm_90a": Target("sm_90a", 90, "sm90", 227 * 1024, "H100 / H200"),
    "sm_80": Target("sm_80", 80, "sm80", 163 * 1024, "A100"),
}

# Attention shapes that matter, as (label, batch of calls, heads, H, W, head dim): ViT-B/L at
# 1024 px (8 images: 8 x 25 windows of 14 x 14, the 64 x 64 global grid), CLIP-side 448 px (28 x
# 28), and ViT-H's head dim 80 (16 heads) on its windows and its 1024 px global grid.
SHAPES: List[Tuple[str, int, int, int, int, int]] = [
    ("windows 14x14 d64", 200, 12, 14, 14, 64),
    ("grid 28x28 d64", 8, 12, 28, 28, 64),
    ("grid 64x64 d64", 8, 12, 64, 64, 64),
    ("windows 14x14 d80", 200, 16, 14, 14, 80),
    ("grid 64x64 d80", 8, 16, 64, 64, 80),
]
# Loss shapes: cosine rows (rows, features) at the CLIP embedding widths (ViT-B/16 512, ViT-L/14
# 768, the dense SAM-side 256, 1024); focal-dice (masks, pixels) at SAM's 32 x 32 masks of 256 x 256.
COSINE_SHAPES = [("cosine D256", 8 * 4096, 256), ("cosine D512", 256, 512), ("cosine D1024", 256, 1024)]
FOCAL_SHAPES = [("focal 32x32 masks 256x256", 32 * 32, 256 * 256)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Build:
    """One compile: which op's launches at which shape, which of them, which config, which target."""

    op: str  # "attention", "cosine", "focal"
    shape: list  # the op's shape arguments (see _launches)
    label: str  # the shape's label
    dtype: str  # "fp16", "bf16", "fp32" (attention fp32 also "fp32-ieee")
    index: int  # which launch of the op's list
    config: dict  # BLOCK_M / BH / num_warps / num_stages of an autotuned launch ({} for a fixed one)
    target: str


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    config: str
    target: str
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None  # ptxas's spill stores
    stack_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    smem_limit: int = 0
    mma: str = "-"  # "wgmma", "mma", "fma", mixtures as "wgmma+mma", "-" without a product
    sync_loads: Optional[int] = None  # synchronous global loads in the key loop (fwd, dq); None: not checked
    tuned: bool = False
    seconds: float = 0.0
    error: str = ""
    findings: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ the builds
def _launches(op: str, shape: Sequence[int], dtype: str):
    """The op's ``Launch`` list at this shape (meta tensors; the kernel modules' own code)."""
    dt = DTYPES[dtype.split("-")[0]]
    if op == "attention":
        # "fp32" builds take TF32 (torch's "high" precision), "fp32-ieee" the exact dots.
        prec = {"fp32": "tf32", "fp32-ieee": "ieee"}.get(dtype)
        return attn.aot_launches(*attn.sam_layout(*shape, dt), dot_prec=prec)
    if op == "cosine":
        return cosine_distill.aot_launches(*shape, dt)
    if op == "focal":
        return focal_dice.aot_launches(*shape, dt)
    raise ValueError(op)


def _config_label(launch, config: dict) -> str:
    if config:
        return attn.config_label(config)
    keys = [k for k in ("BLOCK_R", "BLOCK_D", "BLOCK", "BLOCK_M", "BLOCK_B") if k in launch.meta or k in launch.options]
    vals = {**launch.meta, **launch.options}
    return "/".join(f"{k.split('_')[-1]}{vals[k]}" for k in keys) + f"/w{launch.options.get('num_warps', 4)}"


def builds(targets: Iterable[str] = tuple(TARGETS), dtypes: Iterable[str] = ("fp16", "bf16"),
           shapes: Sequence = tuple(SHAPES), losses: bool = True) -> List[Build]:
    """Every build: each launch of each op at each shape, dtype and target; an autotuned launch
    once per config of the target's space (deduplicated by grid rows per tile, as the pruner
    does). ``dtypes`` may include "fp32" (TF32) and "fp32-ieee" (exact) for the attention."""
    out = []
    for target in targets:
        tgt = TARGETS[target]
        for dtype in dtypes:
            ops = [("attention", list(s[1:]), s[0]) for s in shapes]
            if losses and not dtype.startswith("fp32"):
                ops += [("cosine", [r, d], lab) for lab, r, d in COSINE_SHAPES]
                ops += [("focal", [m, hw], lab) for lab, m, hw in FOCAL_SHAPES]
            for op, shape, label in ops:
                launches = _launches(op, shape, dtype)
                for i, launch in enumerate(launches):
                    if launch.tuned is None:
                        out.append(Build(op, shape, label, dtype, i, {}, target))
                        continue
                    dclass = attn.dtype_class(DTYPES[dtype.split("-")[0]], launch.meta["DOT_PREC"], launch.meta["D0"],
                                              launch.meta["D1"])
                    for c in attn.select_configs(launch.tuned, attn._autotune_configs(launch.tuned, interpret=False), tgt.family,
                                                 dclass, launch.meta["W_PAD"]):
                        out.append(Build(op, shape, label, dtype, i, dict(c.kwargs, num_warps=c.num_warps,
                                                                           num_stages=c.num_stages), target))
    return out


# ------------------------------------------------------------------------------------ compiling
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _mma_kind(ttgir: str) -> str:
    kinds = []
    if "ttng.warp_group_dot " in ttgir:
        kinds.append("wgmma")
    dots = [line for line in ttgir.splitlines() if " = tt.dot " in line]
    if any("#mma" in line.rsplit("->", 1)[-1] for line in dots):
        kinds.append("mma")
    if any("#mma" not in line.rsplit("->", 1)[-1] for line in dots):
        kinds.append("fma")
    return "+".join(kinds) or "-"


def key_loop_sync_loads(ttgir: str) -> Optional[int]:
    """Global loads in the key loop (the ``scf.for`` that copies K/V with cp.async) whose value is
    used inside the iteration that issued them; None when no loop copies asynchronously."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            body.append(lines[j])
            if depth <= 0 and j > i:
                break
        text = "\n".join(body)
        if "async_copy_global_to_local" not in text:
            continue
        count = 0
        for b in body[1:]:
            m = re.match(r"\s*(%[\w.]+)(?::\d+)? = tt\.load ", b)
            if not m:
                continue
            name = re.escape(m.group(1))
            uses = [u for u in body[1:] if u is not b and re.search(name + r"(?![\w.])", u)]
            if any("scf.yield" not in u for u in uses):
                count += 1
        return count
    return None


def _compile(build: Build) -> Row:
    """Compile one build in this process (TRITON_INTERPRET unset, ptxas logging on)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    tgt = TARGETS[build.target]
    launch = _launches(build.op, build.shape, build.dtype)[build.index]
    row = Row(kernel=launch.kernel, shape=build.label, dtype=build.dtype, config=_config_label(launch, build.config),
              target=build.target, smem_limit=tgt.smem_limit, tuned=launch.tuned is not None)
    fn = launch.fn
    target = GPUTarget("cuda", tgt.capability, 32)
    backend = make_backend(target)
    options = dict(build.config) if build.config else dict(launch.options)
    kw = {**launch.meta, **options}
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    t0 = time.perf_counter()
    log = io.StringIO()  # what Triton prints while compiling: the ptxas log
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        opts, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    except Exception as e:  # a compile error is a finding of this row
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        row.seconds = time.perf_counter() - t0
        return row
    row.seconds = time.perf_counter() - t0
    m, r = _PTXAS.search(log.getvalue()), _REGS.search(log.getvalue())
    if m and r:
        row.stack_bytes, row.spill_bytes, row.regs = int(m.group(1)), int(m.group(2)), int(r.group(1))
    row.smem_bytes = int(kernel.metadata.shared)
    ttgir = kernel.asm["ttgir"]
    row.mma = _mma_kind(ttgir)
    if launch.kernel in ("attention fwd", "attention dq"):
        row.sync_loads = key_loop_sync_loads(ttgir)
    return row


def findings(row: Row) -> List[str]:
    """What is wrong with a build (empty: nothing)."""
    out = []
    if row.error:
        return [f"compile error: {row.error}"]
    if row.regs is None:
        out.append("no ptxas log (a cached build?)")
    if row.spill_bytes:
        out.append(f"spills {row.spill_bytes} B")
    if row.stack_bytes:
        out.append(f"{row.stack_bytes} B stack frame")
    if row.smem_bytes is not None and row.smem_bytes > row.smem_limit:
        out.append(f"shared memory {row.smem_bytes / 1024:.0f} KB > {row.smem_limit // 1024} KB")
    if row.target == "sm_90a" and row.dtype in ("fp16", "bf16") and row.mma not in ("wgmma", "-"):
        out.append(f"products on {row.mma}, not wgmma")
    if row.sync_loads:
        out.append(f"{row.sync_loads} synchronous load(s) in the key loop")
    return out


# ------------------------------------------------------------------------------------ workers
def _worker_env(cache_dir: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _split(items: List[Build], jobs: int) -> List[List[Build]]:
    # Attention builds dominate; deal them out round-robin so each worker gets a fair share.
    return [items[i::jobs] for i in range(jobs) if items[i::jobs]]


def run(items: Sequence[Build], jobs: int = 2, timeout: Optional[float] = None) -> List[Row]:
    """Compile every build in ``jobs`` worker processes; rows in the order of ``items``, each
    with its findings."""
    items = list(items)
    if not items:
        return []
    tmp = tempfile.mkdtemp(prefix="fastsamclip-aot-")
    procs = []
    try:
        for k, chunk in enumerate(_split(items, max(1, jobs))):
            env = _worker_env(os.path.join(tmp, f"cache{k}"))
            p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            procs.append((p, chunk, json.dumps([asdict(b) for b in chunk])))
        for p, _, payload in procs:  # all are running: feed each its list
            p.stdin.write(payload)
            p.stdin.close()
            p.stdin = None  # fed: communicate() below only reads, both pipes at once
        rows: Dict[int, Row] = {}
        for p, chunk, _ in procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                err = f"timed out after {timeout} s; {err}"
            got = [Row(**json.loads(line)) for line in out.splitlines() if line.startswith("{")]
            for b, r in zip(chunk, got):
                rows[id(b)] = r
            for b in chunk[len(got):]:
                rows[id(b)] = Row(kernel=f"{b.op} #{b.index}", shape=b.label, dtype=b.dtype, config=str(b.config),
                                  target=b.target, error=f"worker exited {p.returncode}: {err.strip()[-300:]}")
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    ordered = [rows[id(b)] for b in items]
    for r in ordered:
        r.findings = findings(r)
    return ordered


# A worker: compiles the builds it reads (JSON) from stdin, prints one JSON row per build.
WORKER = "import sys; from fastsamclip.kernels import aot; sys.exit(aot.worker_main())"


def worker_main() -> int:
    for d in json.loads(sys.stdin.read()):
        row = _compile(Build(**d))
        print(json.dumps(asdict(row)), flush=True)
    return 0


# ------------------------------------------------------------------------------------ warming a cache
class _StandInDriver:
    """What Triton's JIT asks of the active driver before it compiles (the target, a device and a
    stream id), for a GPU that is not here: the launch path then compiles exactly as on that GPU
    (its binder, options and cache key) and stops before loading anything onto a device."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Warmed:
    """What :func:`warm` did: kernels compiled or found (``kernels``), new cache entries (0 when the
    cache already held every one: the launch path would compile nothing), the cache's entries after."""

    cache_dir: str
    target: str
    kernels: int = 0
    new_entries: int = 0
    entries: int = 0
    seconds: float = 0.0
    errors: List[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.target} Triton cache {self.cache_dir} ({versions()}): {self.kernels} kernels of the "
                 f"attention launches, {self.new_entries} compiled into it now, {self.entries} compiled kernels in "
                 f"it, {self.seconds:.0f} s"]
        return "\n".join(lines + [f"  error: {e}" for e in self.errors])


def _kernel_entries(cache_dir: str) -> set:
    if not os.path.isdir(cache_dir):
        return set()
    return {d for d in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, d))
            and any(f.endswith(".cubin") for f in os.listdir(os.path.join(cache_dir, d)))}


def warm(cache_dir: str, shapes: Sequence[Tuple[str, Sequence]], target: str = "sm_90a", jobs: int = 2,
         timeout: Optional[float] = None, kernels: Optional[Sequence[str]] = None) -> Warmed:
    """Compile, into the Triton cache ``cache_dir``, every attention kernel a ``target`` GPU compiles
    for these launches (``shapes``: (dtype, (label, batch, heads, H, W, d)) as ``SHAPES``): each
    autotuned launch through its own pruner (every config of the target's space it keeps), the
    fixed ones through ``warmup``, under a stand-in for the GPU's driver; nothing runs. The GPU
    machine hits these entries when its Triton, the kernels' source, the target and the launch's
    specialisation are the same (a cache key covers all four); run it again on a copy of the cache
    to see that nothing new is compiled. ``kernels``: only these launches (e.g. ["attention dq"]).
    Worker processes, ``TRITON_*`` variables but the cache's unset (the GPU run sets none either)."""
    t0 = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    before = _kernel_entries(cache_dir)
    items = [{"dtype": dtype, "shape": list(shape[1:]), "label": shape[0], "target": target,
              "kernels": list(kernels) if kernels else None} for dtype, shape in shapes]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_") or k == "TRITON_HOME"}
    env.update(TRITON_CACHE_DIR=os.path.abspath(cache_dir), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    out = Warmed(os.path.abspath(cache_dir), target)
    procs = []
    for chunk in (items[i::max(1, jobs)] for i in range(max(1, jobs))):
        if chunk:
            p = subprocess.Popen([sys.executable, "-c", WARM_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
            procs.append((p, chunk))
    try:
        for p, chunk in procs:
            p.stdin.write(json.dumps(chunk))
            p.stdin.close()
            p.stdin = None
        for p, chunk in procs:
            try:
                stdout, stderr = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, stderr = p.communicate()
            done = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            out.kernels += sum(d["kernels"] for d in done)
            out.errors += [f"{d['label']} {d['dtype']}: {d['error']}" for d in done if d["error"]]
            if len(done) < len(chunk) or p.returncode:
                out.errors.append(f"worker exited {p.returncode} after {len(done)} of {len(chunk)} shapes: "
                                  f"{stderr.strip()[-500:]}")
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    after = _kernel_entries(cache_dir)
    out.new_entries, out.entries = len(after - before), len(after)
    out.seconds = time.perf_counter() - t0
    return out


WARM_WORKER = "import sys; from fastsamclip.kernels import aot; sys.exit(aot.warm_worker_main())"


def warm_worker_main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    for d in json.loads(sys.stdin.read()):
        tgt = TARGETS[d["target"]]
        triton.runtime.driver.set_active(_StandInDriver(GPUTarget("cuda", tgt.capability, 32)))
        # The pruner asks the device for its family and shared memory: the target's figures.
        attn._device_limits = lambda device, tgt=tgt: ((tgt.capability // 10, tgt.capability % 10), tgt.smem_limit)
        n, error = 0, ""
        try:
            for launch in attn.aot_launches(*attn.sam_layout(*d["shape"], DTYPES[d["dtype"]])):
                if d["kernels"] and launch.kernel not in d["kernels"]:
                    continue
                if launch.tuned:
                    named = dict(zip(launch.fn.arg_names, launch.args))
                    prune = attn._make_pruner(launch.tuned, launch.fn)
                    n += len(prune(attn._autotune_configs(launch.tuned, interpret=False), named, **launch.meta))
                else:
                    launch.fn.warmup(*launch.args, grid=(1,), **launch.meta, **launch.options)
                    n += 1
        except Exception as e:  # reported with the shape; the other shapes still warm
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        print(json.dumps({"label": d["label"], "dtype": d["dtype"], "kernels": n, "error": error}), flush=True)
    return 0


# ------------------------------------------------------------------------------------ reporting
def check(rows: Sequence[Row]) -> List[str]:
    """Every finding, one line each (empty: the builds are clean)."""
    return [f"{r.kernel} [{r.config}] {r.shape} {r.dtype} {r.target}: {'; '.join(r.findings)}" for r in rows if r.findings]


def format_table(rows: Sequence[Row]) -> str:
    """kernel, shape, dtype, config, target, registers, spills, shared memory, MMA kind, key-loop
    sync loads, and what is wrong."""
    head = ["kernel", "shape", "dtype", "config", "target", "regs", "spill B", "smem KB", "limit KB", "mma",
            "sync ld", "findings"]
    body = []
    for r in rows:
        body.append([r.kernel, r.shape, r.dtype, r.config + ("" if r.tuned else " (fixed)"), r.target,
                     "-" if r.regs is None else str(r.regs), "-" if r.spill_bytes is None else str(r.spill_bytes),
                     "-" if r.smem_bytes is None else f"{r.smem_bytes / 1024:.1f}", str(r.smem_limit // 1024), r.mma,
                     "-" if r.sync_loads is None else str(r.sync_loads), "; ".join(r.findings) or "ok"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except Exception as e:  # triton missing or broken: every row will say so too
        tv = f"not importable ({type(e).__name__})"
    return f"triton {tv}, torch {torch.__version__}"


if __name__ == "__main__":
    rows = run(builds(), jobs=int(os.environ.get("FASTSAMCLIP_AOT_JOBS", "2")))
    print(versions())
    print(format_table(rows))
    problems = check(rows)
    print(f"\n{len(rows)} builds, {len(problems)} with findings")
    sys.exit(1 if problems else 0)
