"""The ``fastsamclip`` command: ``info``, ``demo``, ``merge``, ``distill``, ``cache-teachers``, ``predict``,
``bench``."""

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
    if args.merge_only:
        from fastsamclip.demo import run_demo

        report = run_demo(out_dir=args.out, sam_type=args.sam_type)
        ok = report["reload_identical"] and report["text_equals_teacher"] and report["mask_max_abs_diff_vs_sam"] < 1e-4
        if not ok:
            print("demo: the merged model does not match its teachers (see above)", file=sys.stderr)
        return 0 if ok else 1
    from fastsamclip.demo import run_distill_demo

    report = run_distill_demo(out_dir=args.out, sam_type=args.sam_type)
    if not report["distillation_worked"]:
        print("demo: distillation did not raise the student-teacher CLIP agreement (see the table)", file=sys.stderr)
        return 1
    return 0


def _train_config_from_args(args):
    """Defaults < --config file < options given on the command line."""
    from fastsamclip.train import config_from_dict, load_config_file

    given = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS and v is not None}
    base = load_config_file(args.config) if args.config else {}
    return config_from_dict({**base, **given})


def cmd_distill(args) -> int:
    import logging

    from fastsamclip.train import TrainingStopped, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _train_config_from_args(args)
    try:
        report = train(cfg)
    except TrainingStopped as e:
        print(f"distill: {e}", file=sys.stderr)
        return 2
    if "eval" in report:
        ev = report["eval"]
        print("held-out agreement with the teachers: CLIP cosine "
              + ", ".join(f"{r}px {v:.4f}" for r, v in ev["clip_cosine"].items())
              + f"; mask IoU {ev['mask_iou']:.4f}; merged model {report['merged']}")
    return 0


def cmd_cache_teachers(args) -> int:
    import logging

    from fastsamclip.train import cache_teachers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = _train_config_from_args(args)
    path = cache_teachers(cfg, out=args.cache_out, batch_size=args.batch_size)
    print(f"teacher cache written to {path}; train with --teacher-cache {path}")
    return 0


def _add_train_options(s) -> None:
    """One option per TrainConfig field (--stage2-lr, --clip-resolutions 224,448, ...); absent
    options keep the config file's or the default value."""
    import dataclasses

    from fastsamclip.train import TrainConfig

    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{comments.get(f.name, '')} (default: {shown})".replace("%", "%%")
        if f.name == "resume":
            s.add_argument("--resume", action="store_const", const=True, default=None, help=help_text)
            continue
        s.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                       help=help_text)
    s.add_argument("--config", default=None, help="JSON or YAML file of the same options (command line wins)")


def _field_comments() -> dict:
    """The comment after each TrainConfig field, for --help."""
    import inspect
    import re

    from fastsamclip.train import TrainConfig

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _train_fields() -> set:
    import dataclasses

    from fastsamclip.train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


_TRAIN_FIELDS: set = set()


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


def _floats(text: str, n: int, what: str) -> List[float]:
    parts = text.replace(" ", "").split(",")
    try:
        vals = [float(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ValueError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return vals


def cmd_predict(args) -> int:
    """Each --points entry and each --boxes entry is one prompt; masks, overlays and a JSON per image."""
    try:
        return _predict(args)
    except (ValueError, RuntimeError, OSError) as e:  # CheckpointError and ImageReadError are ValueErrors
        print(f"predict: {e}".splitlines()[0], file=sys.stderr)
        return 2


def _predict(args) -> int:
    import json
    import os
    import time

    import numpy as np
    from PIL import Image

    from fastsamclip.demo import draw_overlay
    from fastsamclip.predictor import SAMCLIPPredictor, to_rgb_uint8

    points = [_floats(p, 2, "point") for p in args.points or []]
    boxes = [_floats(b, 4, "box") for b in args.boxes or []]
    labels = None
    if args.labels is not None:
        labels = [lab.strip() for lab in args.labels.split(",") if lab.strip()]
        if not labels:
            raise ValueError(f"--labels {args.labels!r} names no class; give e.g. --labels \"cat,dog,grass\"")
    if not points and not boxes and labels is None:
        raise ValueError("nothing to predict: give --points, --boxes and/or --labels")
    t0 = time.perf_counter()
    predictor = SAMCLIPPredictor(args.checkpoint, device=args.device)
    load_ms = (time.perf_counter() - t0) * 1e3
    os.makedirs(args.out, exist_ok=True)
    ms = lambda t: round((time.perf_counter() - t) * 1e3, 2)  # noqa: E731
    for path in args.images:
        stem = os.path.splitext(os.path.basename(path))[0]
        timings = {"load_checkpoint": round(load_ms, 2)}
        t = time.perf_counter()
        image = to_rgb_uint8(path)
        timings["read"] = ms(t)
        t = time.perf_counter()
        predictor.set_image(image)
        timings["set_image"] = ms(t)
        report = {"image": path, "size_hw": list(image.shape[:2]), "prompts": [], "timings_ms": timings}
        masks, names, drawn = [], [], []
        t = time.perf_counter()
        for kind, prompts in (("point", points), ("box", boxes)):
            if not prompts:
                continue
            arr = np.array(prompts)
            if kind == "point":
                m, s, _ = predictor.segment(points=arr[:, None, :], point_labels=np.ones((len(arr), 1)))
            else:
                m, s, _ = predictor.segment(boxes=arr, multimask_output=False)
            for i, (pm, ps) in enumerate(zip(m, s)):
                best = int(ps.argmax())  # SAM's rule for ambiguous single points: highest predicted IoU
                name = f"{stem}_{kind}{i}"
                Image.fromarray(pm[best].astype(np.uint8) * 255).save(os.path.join(args.out, name + ".png"))
                masks.append(pm[best])
                names.append(f"{kind} {i} (score {ps[best]:.2f})")
                drawn.append({kind: tuple(prompts[i])})
                report["prompts"].append({"kind": kind, "coords": prompts[i], "scores": ps.tolist(),
                                          "best": best, "mask": name + ".png"})
        if masks:
            timings["segment"] = ms(t)
            draw_overlay(image, masks, names, os.path.join(args.out, f"{stem}_overlay.png"),
                         title=os.path.basename(path), prompts=drawn)
        if labels is not None:
            t = time.perf_counter()
            probs = predictor.classify([image], labels)[0]
            timings["classify"] = ms(t)
            t = time.perf_counter()
            sem = predictor.semantic_segment(image if args.mode == "clip" else None, labels, mode=args.mode,
                                             resolution=args.resolution, threshold=args.threshold)
            timings["semantic_segment"] = ms(t)
            present = [c for c in range(len(labels)) if (sem.label_map == c).any()]
            Image.fromarray((sem.label_map + 1).astype(np.uint16)).save(
                os.path.join(args.out, f"{stem}_semantic_labels.png"))
            draw_overlay(image, [sem.label_map == c for c in present], [labels[c] for c in present],
                         os.path.join(args.out, f"{stem}_semantic.png"),
                         title=f"{os.path.basename(path)}: semantic ({args.mode})")
            report["labels"] = labels
            report["classification"] = {lab: float(p) for lab, p in zip(labels, probs)}
            report["semantic"] = {"mode": args.mode, "label_map": f"{stem}_semantic_labels.png (0 = background, "
                                  "i = labels[i-1])",
                                  "pixel_fraction": {labels[c]: float((sem.label_map == c).mean()) for c in present},
                                  "class_scores": {lab: float(v) for lab, v in zip(labels, sem.class_scores)}}
        timings["total_image"] = round(sum(v for k, v in timings.items() if k != "load_checkpoint"), 2)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(f"{path}: {len(masks)} masks" + (f", labels {labels}" if labels else "")
              + f" -> {args.out} ({timings['total_image']:.0f} ms)")
    return 0


BENCHMARKS = {
    "e2e": "the merged model against SAM + CLIP run separately, end to end (img/s, latency, memory, energy)",
    "train": "one training step of each distillation stage: plain torch vs fused vs fused + compiled",
    "attention": "the relative-position attention kernels against every alternative",
    "losses": "the fused distillation losses against eager and compiled torch",
    "inference": "single-request latency and time to first result, cold and warm",
    "report": "the latest e2e run as Markdown, with the product's claims checked",
}
# `bench all`: every benchmark that needs no input, in this order.
BENCH_ALL = ("attention", "losses", "train", "inference", "e2e")


def cmd_bench(args) -> int:
    """Runs ``fastsamclip.bench.<name>.main`` with the remaining arguments (see each one's --help)."""
    import importlib

    names = BENCH_ALL if args.benchmark == "all" else (args.benchmark,)
    if args.benchmark == "all" and [a for a in args.args if a != "--quick"]:
        print("bench all: only --quick is shared by every benchmark; run them one by one for other options",
              file=sys.stderr)
        return 2
    worst = 0
    for name in names:
        module = "report" if name == "report" else ("e2e" if name == "e2e" else f"bench_{name}")
        if len(names) > 1:
            print(f"\n==== fastsamclip bench {name} {' '.join(args.args)}", flush=True)
        rc = importlib.import_module(f"fastsamclip.bench.{module}").main(list(args.args))
        worst = max(worst, rc if isinstance(rc, int) else 0)
    return worst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsamclip", description="SAM-CLIP: one ViT for masks and semantics")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, device and attention backends")
    s.add_argument("--head-dim", type=int, default=64)
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("demo", help="distil small teachers into one student on CPU (all three stages) and "
                                      "print the agreement table; --merge-only: merge, save, reload, run")
    s.add_argument("--out", default=None, help="output folder (default ./fastsamclip-demo)")
    s.add_argument("--sam-type", default="vit_tiny")
    s.add_argument("--merge-only", action="store_true",
                   help="only merge small teachers, save, reload and run on a sample picture (no training)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("merge", help="initialise the merged model from a SAM and a CLIP teacher")
    s.add_argument("--sam-checkpoint", required=True, help="official SAM .pth (e.g. sam_vit_b_01ec64.pth)")
    s.add_argument("--sam-type", default="vit_b", help="vit_b | vit_l | vit_h")
    s.add_argument("--clip-model", required=True, help="open_clip model name, or local-dir:/folder")
    s.add_argument("--clip-pretrained", default=None, help="open_clip tag or a local checkpoint file")
    s.add_argument("--head-hidden", type=int, default=None, help="CLIP head MLP width (default: backbone width)")
    s.add_argument("--out", required=True, help="merged .safetensors file to write")
    s.set_defaults(fn=cmd_merge)

    _TRAIN_FIELDS.update(_train_fields())
    s = sub.add_parser("distill", help="train the merged model: the paper's three stages (torchrun for many GPUs)")
    _add_train_options(s)
    s.set_defaults(fn=cmd_distill)

    s = sub.add_parser("cache-teachers", help="run the teachers once over the data and store their outputs "
                                              "(train with --teacher-cache FOLDER)")
    _add_train_options(s)
    s.add_argument("--cache-out", default=None, help="cache folder (default: --teacher-cache, else OUT/teacher-cache)")
    s.add_argument("--batch-size", type=int, default=32, help="images per teacher forward pass")
    s.set_defaults(fn=cmd_cache_teachers)

    s = sub.add_parser("predict", help="masks for point/box prompts, zero-shot labels and semantic maps "
                                       "with a merged checkpoint")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--checkpoint", required=True, help="merged .safetensors (from `fastsamclip merge` or distill)")
    s.add_argument("--labels", default=None, help='comma-separated class names, e.g. "cat,dog,grass"')
    s.add_argument("--points", nargs="*", default=None, metavar="X,Y",
                   help="foreground points in image pixels; each one is its own prompt")
    s.add_argument("--boxes", nargs="*", default=None, metavar="X0,Y0,X1,Y1",
                   help="boxes in image pixels; each one is its own prompt")
    s.add_argument("--mode", choices=("clip", "composed"), default="clip",
                   help="semantic segmentation: CLIP head only, or CLIP maps prompting the SAM head")
    s.add_argument("--resolution", type=int, default=448, help="CLIP-head resolution of --mode clip")
    s.add_argument("--threshold", type=float, default=0.5, help="class score that prompts the SAM head (composed)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("bench", help="benchmarks: results appended to bench/results/*.csv, with plots",
                       description="Run a benchmark; arguments after its name go to it (e.g. `fastsamclip bench "
                                   "e2e --quick`, `fastsamclip bench train --help`).\n\n"
                                   + "\n".join(f"  {k:10s} {v}" for k, v in BENCHMARKS.items())
                                   + "\n  all        " + ", ".join(BENCH_ALL) + " in turn (optionally --quick)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("benchmark", nargs="?", default="e2e", choices=list(BENCHMARKS) + ["all"],
                   help="which one (default e2e)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    s.set_defaults(fn=cmd_bench)
    __import__("fastsamclip.eval.cli", fromlist=["add_parser"]).add_parser(sub)  # `fastsamclip eval TASK`
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
