"""``fastsamclip predict``: masks for point/box prompts, every mask of the image with its name,
zero-shot labels and semantic maps with a merged checkpoint; PNGs, overlays and one JSON per image.

Prompts as people write them: each ``--points`` value is ONE prompt of one or more points,
``x,y`` (foreground) or ``x,y,label`` (1 foreground, 0 background), separated by ``;``; each
``--boxes`` value is ONE prompt of a box ``x0,y0,x1,y1`` optionally followed by points of the
same prompt (``"10,10,200,150;120,80,1;60,40,0"``). A single point is ambiguous, so its prompt
asks for SAM's three masks and keeps the best-scored; any other prompt asks for one mask.

Each image is computed whole before any of its files is written, so an image whose prompt does
not fit it (or that cannot be read) is reported on one line and skipped, the others are still
done, and the command exits 2 at the end. Two inputs with the same file name get distinct
output names (``photo``, ``photo-2``; the JSON names its image).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from segment_anything.utils.amg import rle_to_mask

from fastsamclip.cli.common import INPUT_ERRORS, one_line_errors
from fastsamclip.draw import draw_named_masks, draw_overlay
from fastsamclip.errors import check_range
from fastsamclip.files import check_output_dir, staged_dir, writable_dir, write_json
from fastsamclip.predictor import SAMCLIPPredictor, to_rgb_uint8
from fastsamclip.predictor.everything import EverythingParams, coco_rle


def parse_prompt(text: str, kind: str) -> dict:
    """One ``--points`` / ``--boxes`` value -> {"points": [[x, y], ...], "labels": [1|0, ...], "box": [4] or None}."""
    items = [t for t in text.replace(" ", "").split(";") if t]
    if not items:
        raise ValueError(f"{kind} prompt {text!r} is empty")
    box: Optional[List[float]] = None
    points: List[List[float]] = []
    labels: List[int] = []
    for k, item in enumerate(items):
        try:
            vals = [float(v) for v in item.split(",")]
        except ValueError:
            vals = []
        if kind == "box" and k == 0:
            if len(vals) != 4:
                raise ValueError(f"box {item!r}: expected 4 comma-separated numbers x0,y0,x1,y1 (then optional "
                                 f"';x,y,label' points), in {text!r}")
            box = vals
            continue
        if len(vals) not in (2, 3):
            raise ValueError(f"point {item!r}: expected 2 comma-separated numbers x,y (or 3: x,y,label), "
                             f"in {text!r}")
        if len(vals) == 3 and vals[2] not in (0.0, 1.0):
            raise ValueError(f"point {item!r}: the label must be 1 (foreground) or 0 (background)")
        if not all(np.isfinite(vals)):
            raise ValueError(f"point {item!r}: coordinates must be finite numbers")
        points.append(vals[:2])
        labels.append(int(vals[2]) if len(vals) == 3 else 1)
    return {"points": points, "labels": labels, "box": box}


def unique_stems(paths: Sequence[str]) -> List[str]:
    """Output name stems, one per input: the file name without extension, ``-2``, ``-3``... for repeats."""
    stems: List[str] = []
    taken = set()
    plain = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    for stem in plain:
        name, k = stem, 1
        while name in taken or (name != stem and name in plain):
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        stems.append(name)
    return stems


def _segment_prompts(predictor: SAMCLIPPredictor, prompts: List[Tuple[str, int, dict]]):
    """Masks of every prompt, prompts of one shape batched in one decoder call.

    Returns per prompt (masks (K, H, W), scores (K,)), in the order given.
    """
    groups: Dict[tuple, List[int]] = {}
    for j, (_, _, pr) in enumerate(prompts):
        groups.setdefault((len(pr["points"]), pr["box"] is not None), []).append(j)
    out: List[Optional[tuple]] = [None] * len(prompts)
    for (n_points, has_box), members in groups.items():
        kw = {}
        if n_points:
            kw["points"] = np.array([prompts[j][2]["points"] for j in members], dtype=np.float64)
            kw["point_labels"] = np.array([prompts[j][2]["labels"] for j in members])
        if has_box:
            kw["boxes"] = np.array([prompts[j][2]["box"] for j in members], dtype=np.float64)
        multimask = n_points == 1 and not has_box  # SAM's advice: three masks for an ambiguous point
        m, s, _ = predictor.segment(multimask_output=multimask, **kw)
        for k, j in enumerate(members):
            out[j] = (m[k], s[k])
    return out


# The options of SamAutomaticMaskGenerator's parameters; absent ones keep EverythingParams' defaults.
EVERYTHING_OPTIONS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                      "box_nms_thresh", "crop_n_layers", "min_mask_region_area")


def _everything_params(args) -> EverythingParams:
    given = {k: getattr(args, k) for k in EVERYTHING_OPTIONS if getattr(args, k) is not None}
    return EverythingParams(output_mode="uncompressed_rle", **given)


def _predict_one(predictor: SAMCLIPPredictor, path: str, stem: str, args, prompts, labels, params, load_ms,
                 folder: str) -> str:
    """Everything for one image, computed first, then written into ``folder``; returns the summary line."""
    ms = lambda t: round((time.perf_counter() - t) * 1e3, 2)  # noqa: E731
    timings = {"load_checkpoint": round(load_ms, 2)}
    t = time.perf_counter()
    image = to_rgb_uint8(path)
    timings["read"] = ms(t)
    t = time.perf_counter()
    predictor.set_image(image)
    timings["set_image"] = ms(t)
    report: dict = {"image": path, "size_hw": list(image.shape[:2]), "prompts": [], "timings_ms": timings}
    pngs: Dict[str, np.ndarray] = {}  # file name -> picture, written at the end
    overlays = []  # (draw function, args, kwargs)
    masks, names, drawn = [], [], []
    if prompts:
        t = time.perf_counter()
        results = _segment_prompts(predictor, prompts)
        timings["segment"] = ms(t)
        for (kind, i, pr), (pm, ps) in zip(prompts, results):
            best = int(ps.argmax())  # one mask, or SAM's rule for an ambiguous point: highest predicted IoU
            name = f"{stem}_{kind}{i}.png"
            pngs[name] = pm[best].astype(np.uint8) * 255
            masks.append(pm[best])
            names.append(f"{kind} {i} (score {ps[best]:.2f})")
            drawn.append({"name": f"{kind} {i}", "points": [(*xy, lab) for xy, lab in zip(pr["points"], pr["labels"])],
                          "box": pr["box"]})
            report["prompts"].append({"kind": kind, "points": pr["points"], "point_labels": pr["labels"],
                                      "box": pr["box"], "scores": ps.tolist(), "best": best, "mask": name})
        overlays.append((draw_overlay, (image, masks, names, f"{stem}_overlay.png"),
                         dict(title=os.path.basename(path), prompts=drawn)))
    if args.everything:
        t = time.perf_counter()
        records = predictor.generate(None, labels=labels, label_threshold=args.label_threshold,
                                     **{k: getattr(params, k) for k in EverythingParams.__dataclass_fields__})
        timings["everything"] = ms(t)
        t = time.perf_counter()
        rles = [r["segmentation"] for r in records]
        for r in records:
            r["segmentation"] = coco_rle(r["segmentation"])
        timings["everything_encode"] = ms(t)
        # Decoded one at a time while drawing, each reduced at once: never all masks at full size.
        everything_masks = (rle_to_mask(rle) for rle in rles)
        report["everything"] = {"params": {k: getattr(params, k) for k in EverythingParams.__dataclass_fields__
                                           if k not in ("point_grids", "output_mode")},
                                "output_mode": "coco_rle", "labels": list(labels) if labels else None,
                                "label_threshold": args.label_threshold if labels else None, "masks": records}
        overlays.append((draw_named_masks, (image, everything_masks,
                                            [r.get("label") for r in records] if labels else [None] * len(records),
                                            f"{stem}_everything.png"),
                         dict(title=f"{os.path.basename(path)}: {len(records)} masks")))
    elif labels is not None:
        t = time.perf_counter()
        probs = predictor.classify([image], labels)[0]
        timings["classify"] = ms(t)
        t = time.perf_counter()
        sem = predictor.semantic_segment(image if args.mode == "clip" else None, labels, mode=args.mode,
                                         resolution=args.resolution, threshold=args.threshold)
        timings["semantic_segment"] = ms(t)
        present = [c for c in range(len(labels)) if (sem.label_map == c).any()]
        pngs[f"{stem}_semantic_labels.png"] = (sem.label_map + 1).astype(np.uint16)
        overlays.append((draw_overlay, (image, [sem.label_map == c for c in present], [labels[c] for c in present],
                                        f"{stem}_semantic.png"),
                         dict(title=f"{os.path.basename(path)}: semantic ({args.mode})")))
        report["labels"] = labels
        report["classification"] = {lab: float(p) for lab, p in zip(labels, probs)}
        report["semantic"] = {"mode": args.mode, "label_map": f"{stem}_semantic_labels.png (0 = background, "
                              "i = labels[i-1])",
                              "pixel_fraction": {labels[c]: float((sem.label_map == c).mean()) for c in present},
                              "class_scores": {lab: float(v) for lab, v in zip(labels, sem.class_scores)}}
    # Everything is computed: only writing is left.
    t = time.perf_counter()
    for name, pic in pngs.items():
        Image.fromarray(pic).save(os.path.join(folder, name))
    for fn, a, kw in overlays:
        fn(*a[:-1], os.path.join(folder, a[-1]), **kw)
    timings["write"] = ms(t)
    timings["total_image"] = round(sum(v for k, v in timings.items() if k != "load_checkpoint"), 2)
    write_json(os.path.join(folder, f"{stem}.json"), report)
    what = [f"{len(masks)} prompt masks"] if prompts else []
    if args.everything:
        what.append(f"{len(report['everything']['masks'])} masks of everything")
    if labels is not None:
        what.append(f"labels {labels}")
    return f"{path}: {', '.join(what)} -> {os.path.join(os.path.normpath(args.out), stem + '.json')} " \
           f"({timings['total_image']:.0f} ms)"


class _NothingDone(Exception):
    """Every image failed (each said why): the output folder is left as it was."""


def owned(name: str) -> bool:
    """The files predict writes into its folder (what --overwrite may replace)."""
    return name.endswith((".png", ".json"))


def check_numbers(args) -> None:
    """Every numeric flag, before the checkpoint loads (the everything parameters: params.grids())."""
    check_range("--resolution", args.resolution, 1, integer=True)
    check_range("--threshold", args.threshold)
    check_range("--label-threshold", args.label_threshold, 0.0, 1.0)
    check_range("--clip-token-pool", args.clip_token_pool, 1, integer=True)


@one_line_errors("predict", INPUT_ERRORS + (ValueError, OSError))  # a bad flag value is a ValueError
def cmd_predict(args) -> int:
    """Prompts, everything and/or labels for each image; an image that fails is reported and skipped.
    The files go to a hidden folder beside --out that becomes --out at the end: never a mix of
    two runs, never a half-written folder."""
    prompts = [("point", i, parse_prompt(p, "point")) for i, p in enumerate(args.points or [])]
    prompts += [("box", i, parse_prompt(b, "box")) for i, b in enumerate(args.boxes or [])]
    labels = None
    if args.labels is not None:
        labels = [lab.strip() for lab in args.labels.split(",") if lab.strip()]
        if not labels:
            raise ValueError(f"--labels {args.labels!r} names no class; give e.g. --labels \"cat,dog,grass\"")
    if not prompts and labels is None and not args.everything:
        raise ValueError("nothing to predict: give --points, --boxes, --everything and/or --labels")
    params = _everything_params(args)
    params.grids()  # bad --everything parameters fail before the checkpoint is loaded
    check_numbers(args)
    check_output_dir(args.out, args.overwrite, owned)
    writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out", create=False)
    t0 = time.perf_counter()
    predictor = SAMCLIPPredictor(args.checkpoint, device=args.device, dtype=args.dtype,
                                 clip_token_pool=args.clip_token_pool)
    load_ms = (time.perf_counter() - t0) * 1e3
    if labels is not None and not args.everything and args.mode == "clip" and args.resolution % predictor.patch_size:
        raise ValueError(f"--resolution {args.resolution}: must be a multiple of the patch size {predictor.patch_size}")
    failed = []
    try:
        with staged_dir(args.out, replace=args.overwrite, owned=owned) as folder:
            for path, stem in zip(args.images, unique_stems(args.images)):
                try:
                    print(_predict_one(predictor, path, stem, args, prompts, labels, params, load_ms, folder),
                          flush=True)
                except INPUT_ERRORS + (OSError,) as e:  # this image's input: say so, go on with the others
                    failed.append(path)
                    print(f"predict: {path}: {e}".splitlines()[0], file=sys.stderr, flush=True)
            if len(failed) == len(args.images):
                raise _NothingDone()
    except _NothingDone:
        pass
    if failed and len(args.images) > 1:
        print(f"predict: {len(failed)} of {len(args.images)} images failed: {', '.join(failed)}".splitlines()[0],
              file=sys.stderr)
    return 2 if failed else 0
