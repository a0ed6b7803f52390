"""``fastsamclip info``: versions, the device, and every op's backends with the reason each one
cannot run, where it cannot."""

from __future__ import annotations

import platform

import torch

from fastsamclip import __version__
from fastsamclip.cli.common import package_version
from fastsamclip.kernels import backend_table

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
    print("\nattention backends (priority order; first able one is used):")
    for dtype in (torch.bfloat16, torch.float16, torch.float32) if device == "cuda" else (torch.float32,):
        for grad in (False, True):
            rows = backend_table(device=device, dtype=dtype, needs_grad=grad, head_dim=args.head_dim)
            print(f"  {device} {str(dtype).replace('torch.', '')} head_dim={args.head_dim} {'fwd+bwd' if grad else 'fwd'}:")
            for r in rows:
                status = "available" if r["ok"] else f"no: {r['why']}"
                print(f"    {r['name']:10s} {status:50s} {r['description']}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("info", help="versions, device and every op's backends")
    s.add_argument("--head-dim", type=int, default=64)
    s.set_defaults(fn=cmd_info)
