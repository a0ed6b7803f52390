"""``fastsamclip info``: versions, the device, and every op's backends with the reason each one
cannot run, where it cannot; ``--kernels``: the GPU builds of every Triton kernel, compiled here
ahead of time (registers, spills, shared memory, MMA kind per kernel, config and target)."""

from __future__ import annotations

import os
import platform
import sys

import torch

from fastsamclip import __version__
from fastsamclip.cli.common import package_version
from fastsamclip.kernels import OPS, aot, native_bf16, op_table

PACKAGES = ("torch", "triton", "torchvision", "open_clip_torch", "segment-anything", "safetensors", "xformers",
            "flash-attn")


def cmd_kernels(args) -> int:
    """The ahead-of-time build table; exit 1 when a build has a finding (as the CI test)."""
    targets = [t for t in (args.targets or ",".join(aot.TARGETS)).split(",") if t]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for t in targets:
        if t not in aot.TARGETS:
            print(f"info --kernels: unknown target {t!r}; known: {', '.join(aot.TARGETS)}", file=sys.stderr)
            return 2
    for d in dtypes:
        if d not in aot.DTYPES and d != "fp32-ieee":
            print(f"info --kernels: unknown dtype {d!r}; known: {', '.join(aot.DTYPES)}, fp32-ieee", file=sys.stderr)
            return 2
    builds = aot.builds(targets, dtypes)
    print(f"{aot.versions()}: compiling {len(builds)} builds for {', '.join(targets)} "
          f"in {args.jobs} processes ...", flush=True)
    rows = aot.run(builds, jobs=args.jobs)
    print(aot.format_table(rows))
    print("\nconfig: queries per block x grid rows per key tile (r) / warps / pipeline stages (autotuned), or the "
          "launcher's fixed blocks; spill: ptxas's spill stores; mma: wgmma (Hopper), mma (mma.sync), fma (no "
          "tensor cores); sync ld: loads of the key loop used in the iteration that issues them")
    problems = aot.check(rows)
    print(f"\n{len(rows)} builds, {len(problems)} with findings"
          + ("" if not problems else ":\n  " + "\n  ".join(problems)))
    return 1 if problems else 0


def cmd_info(args) -> int:
    if args.kernels:
        return cmd_kernels(args)
    print(f"fastsamclip {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for pkg in PACKAGES:
        print(f"  {pkg:18s} {package_version(pkg)}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: cuda:0 {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}")
    else:
        print("device: cpu (no CUDA GPU visible)")
    isa = native_bf16()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch kernels "
          f"{torch.backends.cpu.get_cpu_capability()}; native bf16: "
          + (f"{isa} (the predictor's default dtype on the CPU: bf16)" if isa else
             "no (the predictor's default dtype on the CPU: fp32)"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = op_table(device) + [dict(r, op="relpos_attention") for r in
                               OPS["relpos_attention"].table(device, head_dim=args.head_dim)
                               if args.head_dim != 64]
    print("\nops and their backends (priority order; the first able one runs; a fallback is logged once, shown with -v):")
    shown = set()
    for r in rows:
        key = (r["op"], r["probe"])
        if key not in shown:
            shown.add(key)
            print(f"  {r['op']} [{device} {r['probe']}]:")
        status = "available" if r["ok"] else f"no: {r['why']}"
        print(f"    {r['backend']:10s} {status:60s} {r['description']}")
        if r.get("notes") and r["forced_ok"]:
            print(f"    {'':10s} ({r['notes']})")
    return 0
