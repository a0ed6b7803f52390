"""``fastsamclip info``: versions, the device, and every op's backends with the reason each one
cannot run, where it cannot."""

from __future__ import annotations

import platform

import torch

from fastsamclip import __version__
from fastsamclip.cli.common import package_version
from fastsamclip.kernels import OPS, op_table

PACKAGES = ("torch", "triton", "torchvision", "open_clip_torch", "segment-anything", "safetensors", "xformers",
            "flash-attn")


def cmd_info(args) -> int:
    print(f"fastsamclip {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for pkg in PACKAGES:
        print(f"  {pkg:18s} {package_version(pkg)}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: cuda:0 {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, CUDA {torch.version.cuda}")
    else:
        print("device: cpu (no CUDA GPU visible)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = op_table(device) + [dict(r, op="relpos_attention") for r in
                               OPS["relpos_attention"].table(device, head_dim=args.head_dim)
                               if args.head_dim != 64]
    print("\nops and their backends (priority order; the first able one runs, a fallback is logged once):")
    shown = set()
    for r in rows:
        key = (r["op"], r["probe"])
        if key not in shown:
            shown.add(key)
            print(f"  {r['op']} [{device} {r['probe']}]:")
        status = "available" if r["ok"] else f"no: {r['why']}"
        print(f"    {r['backend']:10s} {status:60s} {r['description']}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("info", help="versions, device and every op's backends")
    s.add_argument("--head-dim", type=int, default=64, help="also probe attention at this head dim (ViT-H: 80)")
    s.set_defaults(fn=cmd_info)
