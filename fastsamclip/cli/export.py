"""``fastsamclip export``: ONNX files, AOTInductor packages and label embeddings of a merged checkpoint.

    fastsamclip export --checkpoint merged.safetensors --format onnx --out deploy/
    fastsamclip export --checkpoint merged.safetensors --format aoti --resolution 448 1024 --out deploy/
    fastsamclip export --checkpoint merged.safetensors --labels "cat,dog,grass" --out deploy/

Each writes its files and its section of ``deploy/export.json``, and prints what it wrote with the
errors measured against the torch model. ``export.json`` names the checkpoint (path and sha256)
and holds the sha256 of every file of the folder; a folder is filled by exports of one checkpoint
only, never with a file replaced (``--overwrite`` replaces the folder whole), and files appear in
it only once their export is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from typing import Iterator, List

from fastsamclip.checkpoint import read_merged_config
from fastsamclip.cli.common import one_line_errors, require
from fastsamclip.errors import OutputError, check_range
from fastsamclip.export import (
    DECODER_FILE,
    ENCODER_FILE,
    LABELS_FILE,
    METADATA_FILE,
    export_aoti,
    export_onnx,
    export_text_embeddings,
    package_name,
    update_metadata,
)
from fastsamclip.files import check_output_dir, sha256_file, staged_dir, staged_folder, writable_dir
from fastsamclip.predictor import SAMCLIPPredictor


def _errors(section: dict) -> str:
    verified = section.get("verified")
    if not isinstance(verified, dict):
        return f" (not checked: {verified})" if verified else ""
    errs = ", ".join(f"{k} {v:.1e}" for k, v in verified["max_rel_err"].items())
    runtime = f"onnxruntime {verified['onnxruntime']}" if "onnxruntime" in verified else "eager model"
    return f"\n  max relative error against torch ({runtime}): {errs}"


def owned(name: str) -> bool:
    """The files an export writes into its folder (what --overwrite may replace)."""
    return name in (METADATA_FILE, ENCODER_FILE, ENCODER_FILE + ".data", DECODER_FILE, LABELS_FILE) or bool(
        re.fullmatch(r"encoder_\d+\.(pt2|json)", name))


def planned_files(args, resolutions: List[int]) -> List[str]:
    """The files this export writes into the folder (besides export.json)."""
    files = []
    if args.format == "onnx":
        files += [ENCODER_FILE, ENCODER_FILE + ".data", DECODER_FILE]
    elif args.format == "aoti":
        files += [n for r in resolutions for n in (package_name(r), package_name(r).replace(".pt2", ".json"))]
    if args.labels is not None:
        files.append(LABELS_FILE)
    return files


def check_export_out(out: str, checkpoint: dict, planned: List[str], overwrite: bool) -> bool:
    """Whether the export goes into a new folder (or replaces ``out`` whole, with ``overwrite``):
    True; or adds files to an export of the SAME checkpoint (``export.json`` names it by sha256)
    that lacks every file this export writes: False. Anything else would mix two models' files (a
    text side of one model beside the encoder of another) and is refused."""
    check_output_dir(out, overwrite, owned) if overwrite else None
    if overwrite or not os.path.isdir(out) or not os.listdir(out):
        if not os.path.isdir(out):
            check_output_dir(out, overwrite, owned)  # a file where the folder should be
        return True
    try:
        with open(os.path.join(out, METADATA_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise OutputError(f"--out {out} holds files but no readable {METADATA_FILE}: not an export folder; choose "
                          "another --out") from None
    theirs = meta.get("checkpoint") if isinstance(meta.get("checkpoint"), dict) else {}
    if theirs.get("sha256") != checkpoint["sha256"]:
        named = theirs.get("path") or "one its export.json does not name"
        raise OutputError(f"--out {out} holds the export of another checkpoint ({named}); exporting "
                          f"{checkpoint['path']} there would mix two models' files: pass --overwrite to replace the "
                          "folder whole, or choose another --out")
    clash = [f for f in planned if os.path.exists(os.path.join(out, f))]
    if clash:
        raise OutputError(f"--out {out} has {clash[0]} already: pass --overwrite to replace the folder whole (an "
                          "export never mixes two runs), or choose another --out")
    writable_dir(out, "--out")
    return False


@contextlib.contextmanager
def export_folder(out: str, checkpoint: dict, planned: List[str], overwrite: bool) -> Iterator[str]:
    """A hidden folder to export into, whose files land in ``out`` only once the export is complete
    (:func:`check_export_out` says where): the staged folder becomes ``out``, or its files are
    added to ``out``, ``export.json`` last."""
    if check_export_out(out, checkpoint, planned, overwrite):
        with staged_dir(out, replace=overwrite, owned=owned) as stage:
            yield stage
        return
    with staged_folder(out, last=(METADATA_FILE,)) as stage:
        shutil.copy2(os.path.join(out, METADATA_FILE), os.path.join(stage, METADATA_FILE))
        yield stage


@one_line_errors("export", (ValueError, RuntimeError, OSError))  # CheckpointError: a ValueError
def cmd_export(args) -> int:
    if args.format is None and args.labels is None:
        raise ValueError("nothing to export: give --format onnx|aoti and/or --labels \"cat,dog\"")
    labels = None
    if args.labels is not None:
        labels = [lab.strip() for lab in args.labels.split(",") if lab.strip()]
        if not labels:
            raise ValueError(f"--labels {args.labels!r} names no class; give e.g. --labels \"cat,dog,grass\"")
    for r in args.resolution or ():
        check_range("--resolution", r, 1, integer=True)
    if args.format == "onnx":
        if args.resolution and len(args.resolution) > 1:
            raise ValueError("--format onnx writes one encoder.onnx: give one --resolution (the batch is dynamic)")
        require("onnx", "onnxscript")  # torch's dynamo exporter
    # Everything that can be refused, before the model loads: sizes, and where the files go.
    backbone = read_merged_config(args.checkpoint).sam.backbone
    resolutions = list(args.resolution or [int(backbone.img_size)])
    for r in resolutions:
        if r % int(backbone.patch_size):
            raise ValueError(f"--resolution {r}: must be a multiple of the patch size {backbone.patch_size}")
    checkpoint = {"path": os.path.abspath(args.checkpoint), "sha256": sha256_file(args.checkpoint)}
    out = os.path.normpath(args.out)
    planned = planned_files(args, resolutions)
    check_export_out(out, checkpoint, planned, args.overwrite)
    device = args.device or ("cpu" if args.format == "onnx" else None)
    predictor = SAMCLIPPredictor(args.checkpoint, device=device, dtype="fp32")  # the files are fp32
    model = predictor.model
    with export_folder(out, checkpoint, planned, args.overwrite) as stage:
        update_metadata(stage, "checkpoint", checkpoint)
        if args.format == "onnx":
            t = time.perf_counter()
            section = export_onnx(model, stage, resolutions[0], return_single_mask=not args.multimask,
                                  check=not args.no_check)
            enc = section["encoder"]
            print(f"{os.path.join(out, enc['file'])}: image (batch, 3, {enc['resolution']}, {enc['resolution']}) "
                  f"-> sam_embedding, clip_embedding, clip_patches; opset {enc['opset']}")
            print(f"{os.path.join(out, section['decoder']['file'])}: segment_anything's ONNX decoder interface; "
                  f"opset {section['decoder']['opset']} ({time.perf_counter() - t:.0f} s){_errors(section)}")
        elif args.format == "aoti":
            infos = export_aoti(model, stage, resolutions, device=predictor.device, check=not args.no_check,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
            for info in infos.values():
                print(f"{os.path.join(out, info['file'])}: {info['device']}, {info['resolution']} px, batch 1.."
                      f"{info['max_batch']}, attention {info['attention']}{_errors(info)}")
                for name, why in info["attention_not_used"].items():
                    print(f"  not {name}: {why}")
        if labels is not None:
            summary = export_text_embeddings(predictor, labels, os.path.join(stage, LABELS_FILE), args.templates)
            print(f"{os.path.join(out, LABELS_FILE)}: {len(labels)} labels x {summary['shape'][1]} "
                  f"({args.templates} templates), logit scale {summary['logit_scale']:.4g}")
            update_metadata(stage, "labels", summary)
        # The integrity record of the folder: every file's sha256, the earlier export's included.
        with open(os.path.join(stage, METADATA_FILE)) as f:
            files = dict(json.load(f).get("files") or {})
        files.update({n: sha256_file(os.path.join(stage, n)) for n in sorted(os.listdir(stage)) if n != METADATA_FILE})
        update_metadata(stage, "files", files)
    print(f"metadata: {os.path.join(out, METADATA_FILE)}")
    return 0
