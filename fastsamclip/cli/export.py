"""``fastsamclip export``: ONNX files, AOTInductor packages and label embeddings of a merged checkpoint.

    fastsamclip export --checkpoint merged.safetensors --format onnx --out deploy/
    fastsamclip export --checkpoint merged.safetensors --format aoti --resolution 448 1024 --out deploy/
    fastsamclip export --checkpoint merged.safetensors --labels "cat,dog,grass" --out deploy/

Each writes its files and its section of ``deploy/export.json``, and prints what it wrote with the
errors measured against the torch model.
"""

from __future__ import annotations

import os
import sys
import time

from fastsamclip.cli.common import one_line_errors
from fastsamclip.export import (
    LABELS_FILE,
    METADATA_FILE,
    export_aoti,
    export_onnx,
    export_text_embeddings,
    update_metadata,
)
from fastsamclip.predictor import SAMCLIPPredictor


def _errors(section: dict) -> str:
    verified = section.get("verified")
    if not isinstance(verified, dict):
        return f" (not checked: {verified})" if verified else ""
    errs = ", ".join(f"{k} {v:.1e}" for k, v in verified["max_rel_err"].items())
    runtime = f"onnxruntime {verified['onnxruntime']}" if "onnxruntime" in verified else "eager model"
    return f"\n  max relative error against torch ({runtime}): {errs}"


@one_line_errors("export", (ValueError, RuntimeError, OSError))  # CheckpointError: a ValueError
def cmd_export(args) -> int:
    if args.format is None and args.labels is None:
        raise ValueError("nothing to export: give --format onnx|aoti and/or --labels \"cat,dog\"")
    labels = None
    if args.labels is not None:
        labels = [lab.strip() for lab in args.labels.split(",") if lab.strip()]
        if not labels:
            raise ValueError(f"--labels {args.labels!r} names no class; give e.g. --labels \"cat,dog,grass\"")
    resolutions = args.resolution or [None]
    if args.format == "onnx" and len(resolutions) > 1:
        raise ValueError("--format onnx writes one encoder.onnx: give one --resolution (the batch is dynamic)")
    device = args.device or ("cpu" if args.format == "onnx" else None)
    predictor = SAMCLIPPredictor(args.checkpoint, device=device, dtype="fp32")  # the files are fp32
    model = predictor.model
    if args.format == "onnx":
        t = time.perf_counter()
        section = export_onnx(model, args.out, resolutions[0], return_single_mask=not args.multimask,
                              check=not args.no_check)
        enc = section["encoder"]
        print(f"{os.path.join(args.out, enc['file'])}: image (batch, 3, {enc['resolution']}, {enc['resolution']}) "
              f"-> sam_embedding, clip_embedding, clip_patches; opset {enc['opset']}")
        print(f"{os.path.join(args.out, section['decoder']['file'])}: segment_anything's ONNX decoder interface; "
              f"opset {section['decoder']['opset']} ({time.perf_counter() - t:.0f} s){_errors(section)}")
    elif args.format == "aoti":
        # Every size or none: the packages land in --out together once all have compiled and passed.
        infos = export_aoti(model, args.out, args.resolution, device=predictor.device, check=not args.no_check,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
        for info in infos.values():
            print(f"{os.path.join(args.out, info['file'])}: {info['device']}, {info['resolution']} px, batch 1.."
                  f"{info['max_batch']}, attention {info['attention']}{_errors(info)}")
            for name, why in info["attention_not_used"].items():
                print(f"  not {name}: {why}")
    if labels is not None:
        summary = export_text_embeddings(predictor, labels, os.path.join(args.out, LABELS_FILE), args.templates)
        print(f"{os.path.join(args.out, LABELS_FILE)}: {len(labels)} labels x {summary['shape'][1]} "
              f"({args.templates} templates), logit scale {summary['logit_scale']:.4g}")
        update_metadata(args.out, "labels", summary)
    print(f"metadata: {os.path.join(args.out, METADATA_FILE)}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("export", help="ONNX / AOTInductor exports and label embeddings for deployment",
                       description=__doc__.split("\n\n")[0])
    s.add_argument("--checkpoint", required=True, help="merged .safetensors checkpoint")
    s.add_argument("--format", choices=("onnx", "aoti"), help="onnx: encoder.onnx + decoder.onnx; aoti: "
                   "encoder_<R>.pt2 per resolution (compiled for this machine's device)")
    s.add_argument("--resolution", type=int, nargs="+", help="input side(s), multiples of 16 (default: the model's "
                   "native size, 1024 for ViT-B; onnx takes one)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--labels", help="comma-separated class names: their text embeddings to text_embeddings.npz")
    s.add_argument("--templates", default="openai", choices=("openai", "simple"),
                   help="prompt templates for --labels (openai: the 80 of the CLIP paper)")
    s.add_argument("--device", help="aoti: the device to compile for (default: cuda when available); onnx: cpu")
    s.add_argument("--multimask", action="store_true",
                   help="onnx decoder returns all 4 masks (default: one, chosen as SAM's ONNX export does)")
    s.add_argument("--no-check", action="store_true", help="skip running the exports against the torch model")
    s.set_defaults(fn=cmd_export)
