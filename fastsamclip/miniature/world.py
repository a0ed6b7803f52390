"""The miniature world: canvases of named objects on photo backgrounds, each object with its exact
mask, generated offline and deterministically, and written in the layouts the real data comes in.

A canvas is ``side`` x ``side`` pixels (128 by default): a crop of a photo that ships with
scikit-image, its contrast halved toward grey, with one to ``max_objects`` objects that do not
overlap. An object is one of 16 classes, named as a caption names it (``CLASSES``):

- the ten handwritten digits of scikit-learn's ``load_digits`` (8 x 8 scans of 0..16 ink),
  upsampled bicubically to the object's side and thresholded at 30% of the full ink: the mask;
- six shapes (circle, square, triangle, star, cross, ring), drawn rotated;

each filled with a saturated random colour, shaded by the digit's ink. Train and held-out canvases
share nothing but the classes: digits 0..1299 of the file and the ``TRAIN_BACKGROUNDS`` photos for
training, digits 1300..1796 and the ``HELDOUT_BACKGROUNDS`` photos for the held-out split
(scikit-learn's copy does not label the writers; its file is the UCI test set of 13 writers,
so a cut by position is the nearest to a cut by writer it allows).

Every canvas is a pure function of ``(seed, split, index)``: any subset renders the same, in any
order, on any machine.

:func:`write_world` writes one folder::

    world.json                          the config, the classes, what was written where
    clip/{00000..}.tar                  D_CLIP (img2dataset shards): canvases and object crops + captions
    sa1b/sa_N.jpg, sa_N.json            D_SAM (SA-1B layout): canvases, every object's mask as COCO RLE
    heldout/crops/val/<class>/*.jpg     an ImageNet-style folder of object crops (eval classify --dataset folder)
    heldout/VOC2012/                    VOC-style semantic split (JPEGImages, SegmentationClass, ImageSets,
                                        class_names.txt: background + the 16 classes)
    heldout/coco/                       COCO instances (annotations/instances_val2017.json, val2017/): every
                                        object's mask as RLE, categories named as the captions name them
    heldout/dataset_coco.json           Karpathy-style retrieval split over the same canvases (split "test")

The held-out canvases are the same in the VOC, COCO and retrieval layouts; the crops are their
objects. ``python -m fastsamclip.miniature.world DIR --train 200 --heldout 40`` writes a reduced world.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import skimage.data
from PIL import Image, ImageDraw
from sklearn.datasets import load_digits

from fastsamclip.data.samples import write_clip_shards, write_sa1b
from fastsamclip.eval.datasets import VOC_PALETTE
from fastsamclip.eval.instances import encode_masks
from fastsamclip.files import write_json

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
CLASSES: Tuple[str, ...] = DIGITS + SHAPES
TRAIN_BACKGROUNDS = ("astronaut", "brick", "camera", "cat", "coins", "grass", "hubble_deep_field",
                     "immunohistochemistry", "moon", "retina", "rocket", "cell")
HELDOUT_BACKGROUNDS = ("chelsea", "gravel", "coffee", "horse", "clock", "page")
DIGIT_SPLIT = 1300  # digits [0, 1300) train, [1300, 1797) held out
SPLITS = {"train": 0, "heldout": 1}
INK_THRESHOLD = 0.3  # of a digit's full ink (16): inside the mask above it
CAPTION_TEMPLATES = ("a photo of {}.", "a picture of {}.", "{}.", "an image showing {}.", "a drawing of {}.")


@dataclass(frozen=True)
class WorldConfig:
    side: int = 128  # canvas side in pixels
    min_object: int = 30  # object side range in pixels
    max_object: int = 58
    max_objects: int = 3  # one to this many objects per canvas
    background_contrast: float = 0.5  # the photo's contrast toward mid-grey (1: as shot)
    crop_side: int = 64  # object crops (D_CLIP and the held-out folder) are resized to this side
    crop_margin: float = 0.25  # crops take this fraction of the object's side around it
    seed: int = 0


@dataclass
class Canvas:
    image: np.ndarray  # (side, side, 3) uint8
    masks: np.ndarray  # (n, side, side) bool, one per object, disjoint
    classes: List[int]  # class index of each object

    @property
    def names(self) -> List[str]:
        return [CLASSES[c] for c in self.classes]


# ------------------------------------------------------------------------------------ sources
@functools.lru_cache(maxsize=None)
def _digits() -> Tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _backgrounds(split: str) -> Tuple[np.ndarray, ...]:
    out = []
    for name in (TRAIN_BACKGROUNDS if split == "train" else HELDOUT_BACKGROUNDS):
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        a = np.ascontiguousarray(a[:, :, :3])
        scale = 384 / min(a.shape[:2])  # the largest crop resized per canvas stays cheap
        if scale < 1:
            a = np.asarray(Image.fromarray(a).resize((round(a.shape[1] * scale), round(a.shape[0] * scale)),
                                                     Image.BILINEAR))
        out.append(a)
    return tuple(out)


def digit_indices(split: str, digit: int) -> np.ndarray:
    """Indices into scikit-learn's digits of one digit in one split."""
    _, target = _digits()
    idx = np.flatnonzero(target == digit)
    return idx[idx < DIGIT_SPLIT] if split == "train" else idx[idx >= DIGIT_SPLIT]


# ------------------------------------------------------------------------------------ drawing
def _shape_mask(kind: str, s: int, angle: float) -> np.ndarray:
    """(s, s) bool mask of a shape filling most of the square, rotated by ``angle`` radians."""
    c, r = (s - 1) / 2.0, s * 0.46
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)

    def poly(points):
        pts = [(c + x * math.cos(angle) - y * math.sin(angle), c + x * math.sin(angle) + y * math.cos(angle))
               for x, y in points]
        d.polygon(pts, fill=255)

    if kind in ("circle", "ring"):
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        if kind == "ring":
            r2 = r * 0.55
            d.ellipse([c - r2, c - r2, c + r2, c + r2], fill=0)
    elif kind == "square":
        a = r * 0.8
        poly([(-a, -a), (a, -a), (a, a), (-a, a)])
    elif kind == "triangle":
        poly([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    elif kind == "star":
        poly([((r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
               (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)])
    elif kind == "cross":
        a, b = r, r * 0.32
        poly([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(im) > 127


def _digit_ink(index: int, s: int) -> np.ndarray:
    """(s, s) float ink in 0..1 of one scanned digit, upsampled bicubically."""
    img = _digits()[0][index]
    up = np.asarray(Image.fromarray(img, mode="F").resize((s, s), Image.BICUBIC))
    return np.clip(up, 0.0, 1.0)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB colour (HSV with S, V in [0.7, 1])."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255


def _background(rng: np.random.Generator, split: str, side: int, contrast: float) -> np.ndarray:
    photos = _backgrounds(split)
    a = photos[int(rng.integers(len(photos)))]
    h, w = a.shape[:2]
    s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    crop = np.asarray(Image.fromarray(a[y:y + s, x:x + s]).resize((side, side), Image.BILINEAR), np.float32)
    return 128.0 + contrast * (crop - 128.0)


def render_object(rng: np.random.Generator, split: str, cls: int, s: int) -> Tuple[np.ndarray, np.ndarray]:
    """One object of class ``cls`` at side ``s``: ((s, s) bool mask, (s, s) shading in 0..1)."""
    if cls < len(DIGITS):
        pool = digit_indices(split, cls)
        ink = _digit_ink(int(pool[rng.integers(len(pool))]), s)
        mask = ink > INK_THRESHOLD
        shade = 0.55 + 0.45 * ink
    else:
        mask = _shape_mask(CLASSES[cls], s, float(rng.uniform(0, 2 * math.pi)))
        shade = np.ones((s, s), np.float32)
    return mask, shade


def render_canvas(cfg: WorldConfig, split: str, index: int) -> Canvas:
    """Canvas ``index`` of a split: a pure function of (cfg.seed, split, index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    side = cfg.side
    img = _background(rng, split, side, cfg.background_contrast)
    n = int(rng.integers(1, cfg.max_objects + 1))
    taken = np.zeros((side, side), bool)
    masks, classes = [], []
    for _ in range(n):
        cls = int(rng.integers(len(CLASSES)))
        s = int(rng.integers(cfg.min_object, cfg.max_object + 1))
        mask, shade = render_object(rng, split, cls, s)
        colour = _colour(rng)
        for _try in range(20):  # a free spot (2 px apart from the others), or the object is dropped
            y, x = int(rng.integers(0, side - s + 1)), int(rng.integers(0, side - s + 1))
            full = np.zeros((side, side), bool)
            full[y:y + s, x:x + s] = mask
            grown = np.zeros((side, side), bool)
            grown[max(0, y - 2):y + s + 2, max(0, x - 2):x + s + 2] = True
            if not (grown & taken).any() and full.any():
                break
        else:
            continue
        taken |= full
        region = img[y:y + s, x:x + s]
        region[mask] = (colour[None, :] * shade[mask][:, None])
        masks.append(full)
        classes.append(cls)
    if not masks:  # the first object always fits an empty canvas; kept for safety
        raise RuntimeError("a canvas without objects")
    return Canvas(np.clip(img, 0, 255).astype(np.uint8), np.stack(masks), classes)


def caption(names: Sequence[str], rng: np.random.Generator) -> str:
    """Names joined as a caption names them: 'a photo of a three and a circle.'"""
    order = [names[i] for i in rng.permutation(len(names))]
    listed = " and ".join(f"a {n}" for n in order) if len(order) <= 2 else \
        ", ".join(f"a {n}" for n in order[:-1]) + f" and a {order[-1]}"
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(listed)


def object_crop(image: np.ndarray, mask: np.ndarray, side: int, margin: float = 0.25,
                jitter: Optional[np.random.Generator] = None) -> np.ndarray:
    """A square crop around one object (its box grown by ``margin`` of its side, clipped to the
    canvas), resized to ``side``; ``jitter`` moves and scales the square a little (training)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    s = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    if jitter is not None:
        s *= jitter.uniform(0.85, 1.2)
        cy += jitter.uniform(-0.1, 0.1) * s
        cx += jitter.uniform(-0.1, 0.1) * s
    h, w = mask.shape
    s = min(s, h, w)
    top = int(round(min(max(cy - s / 2, 0), h - s)))
    left = int(round(min(max(cx - s / 2, 0), w - s)))
    s = int(round(s))
    crop = image[top:top + s, left:left + s]
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.BICUBIC))


def semantic_map(c: Canvas) -> np.ndarray:
    """(side, side) uint8: 0 background, 1 + class index on each object's pixels."""
    out = np.zeros(c.masks.shape[1:], np.uint8)
    for m, k in zip(c.masks, c.classes):
        out[m] = 1 + k
    return out


# ------------------------------------------------------------------------------------ writing
def _write_jpeg(path: str, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=95)


def write_world(root: str, train: int = 4000, heldout: int = 300, cfg: WorldConfig = WorldConfig(),
                shard_size: int = 1000, overwrite: bool = False, progress=None) -> Dict[str, object]:
    """Write ``train`` training canvases (D_CLIP shards with their object crops, D_SAM) and
    ``heldout`` held-out canvases (crops folder, VOC, COCO, retrieval) under ``root``.

    Returns ``world.json``'s content: the config, the classes and the path of every layout.
    A folder that holds a world already is refused unless ``overwrite``; a world with the same
    config and sizes is returned as it is (writing is deterministic, so it would be identical).
    ``progress(done, total)`` is called as canvases are written.
    """
    meta_path = os.path.join(root, "world.json")
    want = {"config": asdict(cfg), "train": train, "heldout": heldout}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return have
        if not overwrite:
            raise FileExistsError(f"{root} holds a world of other settings (see world.json); pass overwrite=True "
                                  "(--overwrite) to replace it, or choose another folder")
    if overwrite:
        for sub in ("clip", "sa1b", "heldout", "world.json"):
            p = os.path.join(root, sub)
            shutil.rmtree(p) if os.path.isdir(p) else (os.remove(p) if os.path.exists(p) else None)
    os.makedirs(root, exist_ok=True)
    total, done = train + heldout, 0

    # Training split: D_CLIP (each canvas, then each of its object crops) and D_SAM.
    clip_images, clip_captions, sam_items = [], [], []
    for i in range(train):
        c = render_canvas(cfg, "train", i)
        rng = np.random.default_rng([cfg.seed, 2, i])
        clip_images.append(c.image)
        clip_captions.append(caption(c.names, rng))
        for m, name in zip(c.masks, c.names):
            clip_images.append(object_crop(c.image, m, cfg.crop_side, cfg.crop_margin))
            clip_captions.append(caption([name], rng))
        sam_items.append((c.image, c.masks))
        done += 1
        if progress:
            progress(done, total)
    shards = write_clip_shards(os.path.join(root, "clip"), clip_images, shard_size, clip_captions)
    write_sa1b(os.path.join(root, "sa1b"), sam_items, seed=cfg.seed)

    # Held-out split: one set of canvases in every evaluation layout.
    ho = os.path.join(root, "heldout")
    voc = os.path.join(ho, "VOC2012")
    coco = os.path.join(ho, "coco")
    for d in (os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass"),
              os.path.join(voc, "ImageSets", "Segmentation"), os.path.join(coco, "val2017"),
              os.path.join(coco, "annotations")):
        os.makedirs(d, exist_ok=True)
    for name in CLASSES:
        os.makedirs(os.path.join(ho, "crops", "val", name), exist_ok=True)
    images, annotations, karpathy, stems = [], [], [], []
    ann_id = 1
    for i in range(heldout):
        c = render_canvas(cfg, "heldout", i)
        rng = np.random.default_rng([cfg.seed, 3, i])
        stem = f"{i:06d}"
        stems.append(stem)
        _write_jpeg(os.path.join(voc, "JPEGImages", stem + ".jpg"), c.image)
        label = Image.fromarray(semantic_map(c), mode="P")
        label.putpalette(VOC_PALETTE)
        label.save(os.path.join(voc, "SegmentationClass", stem + ".png"))
        _write_jpeg(os.path.join(coco, "val2017", stem + ".jpg"), c.image)
        images.append({"id": i + 1, "file_name": stem + ".jpg", "height": cfg.side, "width": cfg.side})
        for k, (m, cls) in enumerate(zip(c.masks, c.classes)):
            rle = encode_masks(m[None])[0]
            ys, xs = np.nonzero(m)
            annotations.append({"id": ann_id, "image_id": i + 1, "category_id": cls + 1, "iscrowd": 0,
                                "segmentation": rle, "area": int(m.sum()),
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                                         float(ys.max() + 1 - ys.min())]})
            ann_id += 1
            _write_jpeg(os.path.join(ho, "crops", "val", CLASSES[cls], f"{stem}_{k}.jpg"),
                        object_crop(c.image, m, cfg.crop_side, cfg.crop_margin))
        karpathy.append({"filename": stem + ".jpg", "filepath": "coco/val2017", "split": "test", "imgid": i,
                         "sentences": [{"raw": caption(c.names, rng)} for _ in range(5)]})
        done += 1
        if progress:
            progress(done, total)
    with open(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("".join(s + "\n" for s in stems))
    with open(os.path.join(voc, "class_names.txt"), "w") as f:
        f.write("".join(n + "\n" for n in ("background",) + CLASSES))
    categories = [{"id": k + 1, "name": n, "supercategory": "digit" if k < len(DIGITS) else "shape"}
                  for k, n in enumerate(CLASSES)]
    write_json(os.path.join(coco, "annotations", "instances_val2017.json"),
               {"info": {"description": "fastsamclip miniature world, held-out split"}, "images": images,
                "annotations": annotations, "categories": categories})
    write_json(os.path.join(ho, "dataset_coco.json"), {"dataset": "coco", "images": karpathy})

    meta = dict(want, classes=list(CLASSES), clip_samples=len(clip_images), clip_shards=len(shards),
                paths={"clip_data": os.path.join(root, "clip", "{00000..%05d}.tar" % (len(shards) - 1)),
                       "sam_data": os.path.join(root, "sa1b"), "crops": os.path.join(ho, "crops"),
                       "voc": ho, "voc_class_names": os.path.join(voc, "class_names.txt"),
                       "coco": coco, "retrieval": ho})
    write_json(meta_path, meta)
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastsamclip.miniature.world", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=4000, help="training canvases")
    p.add_argument("--heldout", type=int, default=300, help="held-out canvases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    meta = write_world(a.out, a.train, a.heldout, WorldConfig(seed=a.seed), overwrite=a.overwrite)
    print(json.dumps(meta["paths"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
