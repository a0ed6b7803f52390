"""The ``fastsamclip`` command: ``info``, ``demo``, ``merge``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    from fastsamclip import __version__
    from fastsamclip.kernels import backend_table

    print(f"fastsamclip {__version__}")
    print(f"python {platform.python_version()} on {platform.machine()}")
    for pkg in ("torch", "triton", "torchvision", "open_clip_torch", "segment-anything", "safetensors",
                "xformers", "flash-attn"):
        print(f"  {pkg:18s} {_version(pkg)}")
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


def cmd_demo(args) -> int:
    from fastsamclip.demo import run_demo

    report = run_demo(out_dir=args.out, sam_type=args.sam_type)
    ok = report["reload_identical"] and report["text_equals_teacher"] and report["mask_max_abs_diff_vs_sam"] < 1e-4
    if not ok:
        print("demo: the merged model does not match its teachers (see above)", file=sys.stderr)
    return 0 if ok else 1


def cmd_merge(args) -> int:
    from fastsamclip.checkpoint import save_merged
    from fastsamclip.modeling.samclip import SAMCLIP, CLIPHeadConfig
    from fastsamclip.teachers import load_clip_teacher, load_sam_teacher

    sam = load_sam_teacher(args.sam_checkpoint, args.sam_type)
    clip = load_clip_teacher(args.clip_model, args.clip_pretrained)
    head = CLIPHeadConfig(out_dim=clip.embed_dim, hidden_dim=args.head_hidden)
    model = SAMCLIP.from_teachers(sam, clip, clip_head=head, sam_config=args.sam_type)
    save_merged(model, args.out)
    print(f"wrote {args.out}: {model.num_parameters() / 1e6:.1f}M parameters "
          f"(backbone {model.num_parameters('image_encoder') / 1e6:.1f}M, CLIP head "
          f"{model.num_parameters('clip_head') / 1e6:.1f}M, text {model.num_parameters('text') / 1e6:.1f}M)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsamclip", description="SAM-CLIP: one ViT for masks and semantics")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, device and attention backends")
    s.add_argument("--head-dim", type=int, default=64)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("demo", help="merge small teachers, save, reload, run on a sample picture")
    s.add_argument("--out", default=None, help="output folder (default ./fastsamclip-demo)")
    s.add_argument("--sam-type", default="vit_tiny")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("merge", help="initialise the merged model from a SAM and a CLIP teacher")
    s.add_argument("--sam-checkpoint", required=True, help="official SAM .pth (e.g. sam_vit_b_01ec64.pth)")
    s.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h")
    s.add_argument("--clip-model", required=True, help="open_clip model name, or local-dir:/folder")
    s.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file")
    s.add_argument("--head-hidden", type=int, default=None, help="CLIP head MLP width (default: backbone width)")
    s.add_argument("--out", required=True, help="merged .safetensors file to write")
    s.set_defaults(fn=cmd_merge)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
