"""``fastsamclip predict``: masks for point/box prompts, zero-shot labels and semantic maps with a
merged checkpoint, written as PNGs, overlays and one JSON per image."""

from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

from fastsamclip.cli.common import floats, one_line_errors
from fastsamclip.draw import draw_overlay
from fastsamclip.files import write_json
from fastsamclip.predictor import SAMCLIPPredictor, to_rgb_uint8


@one_line_errors("predict", (ValueError, RuntimeError, OSError))  # CheckpointError, ImageReadError: ValueErrors
def cmd_predict(args) -> int:
    """Each --points entry and each --boxes entry is one prompt; masks, overlays and a JSON per image."""
    points = [floats(p, 2, "point") for p in args.points or []]
    boxes = [floats(b, 4, "box") for b in args.boxes or []]
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
        write_json(os.path.join(args.out, f"{stem}.json"), report)
        print(f"{path}: {len(masks)} masks" + (f", labels {labels}" if labels else "")
              + f" -> {args.out} ({timings['total_image']:.0f} ms)")
    return 0



def register(sub) -> None:
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
