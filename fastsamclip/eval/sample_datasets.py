"""Tiny datasets written in each evaluation dataset's REAL layout, from pictures that ship offline.

For the tests (answers known in advance) and for trying ``fastsamclip eval`` without a download:

    python -m fastsamclip.eval.sample_datasets /tmp/fastsamclip-eval

writes every layout plus small teachers and a merged checkpoint there, and prints one command
per layout. Pictures are scikit-image's sample images (``fastsamclip.data.load_sample_images``);
label maps follow the picture (grey-level bands of the image), so they are not random noise.
Each writer returns what it wrote (paths, the classes present), for the tests to build on.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from skimage.measure import label as components

from fastsamclip.checkpoint import save_merged
from fastsamclip.data.samples import load_sample_images, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.eval import classnames as cn
from fastsamclip.eval.datasets import VOC_PALETTE
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers

PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "coins", "cat", "camera", "clock")


@lru_cache(maxsize=4)
def _pictures(max_side: int) -> Tuple[Tuple[str, np.ndarray], ...]:
    return tuple(load_sample_images(PICTURES, max_side=max_side).items())


def pictures(n: int, max_side: int = 48, offset: int = 0) -> List[Tuple[str, np.ndarray]]:
    """n (name, uint8 (H, W, 3)) real pictures, cycling through the sample set."""
    pics = _pictures(max_side)
    return [(f"{pics[(offset + i) % len(pics)][0]}{i}", pics[(offset + i) % len(pics)][1].copy()) for i in range(n)]


def regions(image: np.ndarray, k: int) -> np.ndarray:
    """(H, W) int region index 0..k-1: bands of the grey level (quantiles), so regions follow the picture."""
    grey = image.astype(np.float64).mean(-1)
    edges = np.quantile(grey, np.linspace(0, 1, k + 1)[1:-1])
    return np.digitize(grey, edges)


def label_map(image: np.ndarray, classes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Regions of the picture, each labelled with one of ``classes`` (distinct where possible)."""
    k = min(len(classes), 4)
    picks = rng.choice(np.asarray(classes), size=k, replace=len(classes) < k)
    return picks[regions(image, k)]


def borders(label: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (VOC marks such edges 255)."""
    b = np.zeros(label.shape, bool)
    b[:, :-1] |= label[:, :-1] != label[:, 1:]
    b[:-1, :] |= label[:-1, :] != label[1:, :]
    return b


def _save_jpg(path: str, rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)


def _save_png(path: str, a: np.ndarray, mode: str = "L", palette: Optional[List[int]] = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(a.astype(np.uint8), mode=mode)
    if palette is not None:
        im.putpalette(palette)
    im.save(path)


def _write_lines(path: str, lines: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# Semantic segmentation layouts
# ---------------------------------------------------------------------------------------------


def write_voc(root: str, n: int = 3, seed: int = 0) -> Dict:
    """``root/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}``;
    palette label PNGs with background 0, classes 1..20 and 255 on region borders."""
    base = os.path.join(root, "VOC2012")
    rng = np.random.default_rng(seed)
    stems = []
    for i, (_, rgb) in enumerate(pictures(n + 1)):
        stem = f"2007_{i:06d}"
        lab = label_map(rgb, [0] + list(rng.choice(np.arange(1, 21), 3, replace=False)), rng)
        lab = np.where(borders(lab), 255, lab)
        _save_jpg(os.path.join(base, "JPEGImages", stem + ".jpg"), rgb)
        _save_png(os.path.join(base, "SegmentationClass", stem + ".png"), lab, "P", VOC_PALETTE)
        stems.append(stem)
    _write_lines(os.path.join(base, "ImageSets", "Segmentation", "val.txt"), stems[:n])
    _write_lines(os.path.join(base, "ImageSets", "Segmentation", "train.txt"), stems[n:])
    return {"root": base, "val": stems[:n]}


def write_ade20k(root: str, n: int = 3, seed: int = 1) -> Dict:
    """``root/ADEChallengeData2016/{images,annotations}/validation/ADE_val_%08d.{jpg,png}``:
    0 = unlabelled, 1..150."""
    base = os.path.join(root, "ADEChallengeData2016")
    rng = np.random.default_rng(seed)
    for i, (_, rgb) in enumerate(pictures(n, offset=1), start=1):
        stem = f"ADE_val_{i:08d}"
        lab = label_map(rgb, [0] + list(rng.choice(np.arange(1, 151), 3, replace=False)), rng)
        _save_jpg(os.path.join(base, "images", "validation", stem + ".jpg"), rgb)
        _save_png(os.path.join(base, "annotations", "validation", stem + ".png"), lab)
    return {"root": base}


def write_pascal_context(root: str, n: int = 3, seed: int = 2) -> Dict:
    """``root/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/val.txt}``:
    0 = background (ignored), 1..59."""
    base = os.path.join(root, "VOC2010")
    rng = np.random.default_rng(seed)
    stems = []
    for i, (_, rgb) in enumerate(pictures(n, offset=2)):
        stem = f"2008_{i:06d}"
        lab = label_map(rgb, [0] + list(rng.choice(np.arange(1, 60), 3, replace=False)), rng)
        _save_jpg(os.path.join(base, "JPEGImages", stem + ".jpg"), rgb)
        _save_png(os.path.join(base, "SegmentationClassContext", stem + ".png"), lab)
        stems.append(stem)
    _write_lines(os.path.join(base, "ImageSets", "SegmentationContext", "val.txt"), stems)
    return {"root": base}


def write_coco_stuff(root: str, n: int = 3, seed: int = 3) -> Dict:
    """``root/{images,annotations}/val2017/%012d.{jpg,png}``: raw stuffthingmaps values
    (COCO category id - 1, 0..181 with gaps), 255 unlabelled."""
    rng = np.random.default_rng(seed)
    valid = np.array(sorted(cn.coco_stuff_id_to_train_id()))
    for i, (_, rgb) in enumerate(pictures(n, offset=3), start=1):
        stem = f"{i:012d}"
        lab = label_map(rgb, [255] + list(rng.choice(valid, 3, replace=False)), rng)
        _save_jpg(os.path.join(root, "images", "val2017", stem + ".jpg"), rgb)
        _save_png(os.path.join(root, "annotations", "val2017", stem + ".png"), lab)
    return {"root": root}


def write_coco_panoptic(root: str, n: int = 3, seed: int = 4) -> Dict:
    """``root/val2017/*.jpg``, ``root/annotations/panoptic_val2017.json`` and
    ``root/annotations/panoptic_val2017/*.png`` (RGB-encoded segment ids, 0 = VOID)."""
    rng = np.random.default_rng(seed)
    cats = cn.COCO_PANOPTIC_CATEGORIES
    images, anns = [], []
    for i, (_, rgb) in enumerate(pictures(n, offset=4), start=1):
        stem = f"{i:012d}"
        reg = regions(rgb, 4)
        seg_ids = np.zeros(reg.shape, np.int64)
        infos = []
        for r in range(1, 4):  # region 0 stays VOID
            sid = int(rng.integers(1, 256 ** 3 - 1))
            cat = int(cats[int(rng.integers(len(cats)))][0])
            seg_ids[reg == r] = sid
            ys, xs = np.nonzero(reg == r)
            infos.append({"id": sid, "category_id": cat, "iscrowd": int(r == 3),
                          "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                          "area": int((reg == r).sum())})
        png = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1).astype(np.uint8)
        _save_jpg(os.path.join(root, "val2017", stem + ".jpg"), rgb)
        os.makedirs(os.path.join(root, "annotations", "panoptic_val2017"), exist_ok=True)
        Image.fromarray(png, "RGB").save(os.path.join(root, "annotations", "panoptic_val2017", stem + ".png"))
        images.append({"id": i, "file_name": stem + ".jpg", "height": rgb.shape[0], "width": rgb.shape[1]})
        anns.append({"image_id": i, "file_name": stem + ".png", "segments_info": infos})
    categories = [{"id": cid, "name": name, "isthing": int(cid <= 90), "supercategory": "x"} for cid, name in cats]
    with open(os.path.join(root, "annotations", "panoptic_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return {"root": root}


# ---------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------


def _objects(rgb: np.ndarray, k: int = 3) -> List[np.ndarray]:
    """Up to k object masks of a picture: the largest connected parts of its grey-level bands."""
    reg = regions(rgb, 3)
    found = []
    for r in range(3):
        comp = components(reg == r, connectivity=1)
        for c in range(1, comp.max() + 1):
            m = comp == c
            if m.sum() >= 30:
                found.append(m)
    found.sort(key=lambda m: -int(m.sum()))
    return found[:k]


def _polygon(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons of a mask: the outline of each pixel run, exact when rasterised (rectangle
    per row run keeps it simple and lossless)."""
    polys = []
    for y in range(mask.shape[0]):
        xs = np.flatnonzero(mask[y])
        if xs.size == 0:
            continue
        starts = np.r_[xs[0], xs[1:][np.diff(xs) > 1]]
        ends = np.r_[xs[:-1][np.diff(xs) > 1], xs[-1]] + 1
        for x0, x1 in zip(starts, ends):
            polys.append([float(x0), float(y), float(x1), float(y), float(x1), float(y + 1), float(x0), float(y + 1)])
    return polys


def _instances_json(root: str, n: int, seed: int, lvis: bool) -> dict:
    from pycocotools import mask as mask_utils  # optional (the eval / test extras)

    rng = np.random.default_rng(seed)
    thing = [(cid, name) for cid, name in cn.COCO_PANOPTIC_CATEGORIES if cid <= 90]
    if lvis:
        categories = [{"id": i + 1, "name": name.replace(" ", "_"), "synset": f"{name.replace(' ', '_')}.n.01",
                       "frequency": "rcf"[i % 3], "image_count": 1, "instance_count": 1} for i, (_, name) in enumerate(thing[:12])]
    else:
        categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in thing]
    cat_ids = [c["id"] for c in categories]
    images, anns, ann_id = [], [], 1
    for i, (_, rgb) in enumerate(pictures(n, offset=5), start=1):
        file = f"{i:012d}.jpg"
        folder = "val2017" if (not lvis or i % 2) else "train2017"
        _save_jpg(os.path.join(root, folder, file), rgb)
        h, w = rgb.shape[:2]
        im = {"id": i, "height": h, "width": w}
        used = []
        for k, m in enumerate(_objects(rgb)):
            cat = int(rng.choice(cat_ids))
            used.append(cat)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ann = {"id": ann_id, "image_id": i, "category_id": cat, "area": float(mask_utils.area(rle)),
                   "bbox": [float(v) for v in mask_utils.toBbox(rle)]}
            crowd = (not lvis) and k == 2
            if crowd:  # crowd regions come as uncompressed RLE in COCO
                ann["segmentation"] = _uncompressed(m)
            else:
                ann["segmentation"] = _polygon(m)
            if not lvis:
                ann["iscrowd"] = int(crowd)
            anns.append(ann)
            ann_id += 1
        if lvis:
            im["coco_url"] = f"http://images.cocodataset.org/{folder}/{file}"
            others = [c for c in cat_ids if c not in used]
            im["neg_category_ids"] = others[:2]
            im["not_exhaustive_category_ids"] = used[:1]
        else:
            im["file_name"] = file
        images.append(im)
    return {"images": images, "annotations": anns, "categories": categories}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros), as crowd
    annotations store it."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def write_coco_instances(root: str, n: int = 3, seed: int = 5) -> Dict:
    """``root/annotations/instances_val2017.json`` (polygons, one crowd RLE per image) +
    ``root/val2017/*.jpg`` + ``root/detections_val2017.json`` (COCO results: the ground-truth
    boxes shifted by a pixel with scores, and one false positive per image)."""
    data = _instances_json(root, n, seed, lvis=False)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        json.dump(data, f)
    rng = np.random.default_rng(seed)
    dets = []
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": [x + 1.0, y, w, h + 0.5], "score": round(float(rng.uniform(0.5, 1.0)), 4)})
    for im in data["images"]:
        dets.append({"image_id": im["id"], "category_id": data["categories"][0]["id"], "bbox": [0.0, 0.0, 8.0, 8.0],
                     "score": 0.05})
    det_path = os.path.join(root, "detections_val2017.json")
    with open(det_path, "w") as f:
        json.dump(dets, f)
    return {"root": root, "annotations": os.path.join(root, "annotations", "instances_val2017.json"),
            "detections": det_path, "data": data}


def write_lvis(root: str, n: int = 3, seed: int = 6) -> Dict:
    """``root/lvis_v1_val.json`` (images by coco_url, neg / not-exhaustive category lists,
    categories with frequency) and the images under ``root/{val2017,train2017}/``."""
    data = _instances_json(root, n, seed, lvis=True)
    path = os.path.join(root, "lvis_v1_val.json")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return {"root": root, "annotations": path, "data": data}


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def write_imagenet(root: str, classes: Sequence[int] = (0, 1, 2), per_class: int = 1) -> Dict:
    """``root/val/<synset>/ILSVRC2012_val_%08d.JPEG`` (ImageNet val arranged in class folders)."""
    k = 1
    for j, c in enumerate(classes):
        for _, rgb in pictures(per_class, offset=j):
            _save_jpg(os.path.join(root, "val", cn.IMAGENET_SYNSETS[c], f"ILSVRC2012_val_{k:08d}.JPEG"), rgb)
            k += 1
    return {"root": root, "classes": list(classes)}


def write_imagenet_v2(root: str, classes: Sequence[int] = (0, 1, 2), per_class: int = 1) -> Dict:
    """``root/imagenetv2-matched-frequency-format-val/<class index>/<hash>.jpeg``."""
    for j, c in enumerate(classes):
        for i, (_, rgb) in enumerate(pictures(per_class, offset=j)):
            _save_jpg(os.path.join(root, "imagenetv2-matched-frequency-format-val", str(c), f"{j:04x}{i:036x}.jpeg"), rgb)
    return {"root": root, "classes": list(classes)}


PLACES_SAMPLE_CATEGORIES = ("/a/airfield", "/b/bakery/shop", "/c/coast", "/a/apartment_building/outdoor")


def write_places365(root: str, n: int = 4) -> Dict:
    """``root/categories_places365.txt``, ``root/places365_val.txt`` and ``root/val_256/`` (the
    devkit layout; a short category list here, the real one has 365 lines)."""
    _write_lines(os.path.join(root, "categories_places365.txt"),
                 [f"{c} {i}" for i, c in enumerate(PLACES_SAMPLE_CATEGORIES)])
    lines = []
    for i, (_, rgb) in enumerate(pictures(n), start=1):
        name = f"Places365_val_{i:08d}.jpg"
        _save_jpg(os.path.join(root, "val_256", name), rgb)
        lines.append(f"{name} {(i - 1) % len(PLACES_SAMPLE_CATEGORIES)}")
    _write_lines(os.path.join(root, "places365_val.txt"), lines)
    return {"root": root}


def write_image_folder(root: str, classes: Sequence[str] = ("cat", "coffee cup", "rocket"), per_class: int = 1,
                       split: str = "val") -> Dict:
    """``root/<split>/<class name with _>/<image>.jpg`` (any class-folder tree)."""
    for j, c in enumerate(classes):
        for i, (name, rgb) in enumerate(pictures(per_class, offset=j)):
            _save_jpg(os.path.join(root, split, c.replace(" ", "_"), f"{name}_{i}.jpg"), rgb)
    return {"root": root, "classes": list(classes)}


def write_csv_dataset(root: str, classes: Sequence[str] = ("cat", "coffee cup", "rocket"), split: str = "val") -> Dict:
    """``root/<split>.csv`` (file,label by class index) + ``root/images/*.jpg`` + ``root/classes.txt``."""
    rows = ["file,label"]
    for j, (name, rgb) in enumerate(pictures(len(classes))):
        _save_jpg(os.path.join(root, "images", f"{name}.jpg"), rgb)
        rows.append(f"images/{name}.jpg,{j}")
    _write_lines(os.path.join(root, f"{split}.csv"), rows)
    _write_lines(os.path.join(root, "classes.txt"), list(classes))
    return {"root": root, "csv": os.path.join(root, f"{split}.csv"), "class_names": os.path.join(root, "classes.txt")}


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def write_karpathy(root: str, dataset: str = "flickr30k", n_test: int = 3, n_train: int = 1) -> Dict:
    """``root/dataset_<name>.json`` (the Karpathy-split format: images with split, filename,
    [filepath,] sentences[raw, tokens]) and the images (``flickr30k-images/`` or ``val2014/``)."""
    images = []
    for i, (name, rgb) in enumerate(pictures(n_test + n_train)):
        word = "".join(c for c in name if not c.isdigit())
        if dataset == "coco":
            filepath, filename = "val2014", f"COCO_val2014_{i:012d}.jpg"
        else:
            filepath, filename = "", f"{1000 + i}.jpg"
        folder = os.path.join(root, filepath) if dataset == "coco" else os.path.join(root, "flickr30k-images")
        _save_jpg(os.path.join(folder, filename), rgb)
        sents = [f"a photo of {word} number {i}", f"{word} {i} in a picture", f"an image showing {word}",
                 f"the {word} of sample {i}", f"{word}, seen close up"]
        entry = {"filename": filename, "imgid": i, "split": "test" if i < n_test else "train",
                 "sentences": [{"raw": s, "tokens": s.split(), "imgid": i, "sentid": 5 * i + k} for k, s in enumerate(sents)],
                 "sentids": [5 * i + k for k in range(5)]}
        if dataset == "coco":
            entry.update({"filepath": filepath, "cocoid": i})
        images.append(entry)
    path = os.path.join(root, f"dataset_{dataset}.json")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": dataset}, f)
    return {"root": root, "json": path}


# ---------------------------------------------------------------------------------------------
# Everything, for trying the command
# ---------------------------------------------------------------------------------------------


def write_models(root: str) -> Dict[str, str]:
    """Tiny SAM and CLIP teachers in their official formats and the merged checkpoint of the two."""
    sam_path = write_sam_checkpoint(os.path.join(root, "sam_vit_tiny.pth"), "vit_tiny")
    clip_name = write_clip_local_dir(os.path.join(root, "clip"))
    merged = os.path.join(root, "merged.safetensors")
    save_merged(samclip_from_teachers(load_sam_teacher(sam_path, "vit_tiny"), load_clip_teacher(clip_name),
                                      sam_config="vit_tiny"), merged)
    return {"sam": sam_path, "clip": clip_name, "merged": merged}


def write_all(root: str) -> Dict[str, Dict]:
    root = os.path.abspath(root)
    return {
        "voc": write_voc(os.path.join(root, "VOCdevkit")),
        "ade20k": write_ade20k(root),
        "pascal-context": write_pascal_context(os.path.join(root, "VOCdevkit")),
        "coco-stuff": write_coco_stuff(os.path.join(root, "coco_stuff164k")),
        "coco-panoptic": write_coco_panoptic(os.path.join(root, "coco_panoptic")),
        "coco": write_coco_instances(os.path.join(root, "coco")),
        "lvis": write_lvis(os.path.join(root, "lvis")),
        "imagenet": write_imagenet(os.path.join(root, "imagenet")),
        "imagenet-v2": write_imagenet_v2(os.path.join(root, "imagenet-v2")),
        "places365": write_places365(os.path.join(root, "places365")),
        "folder": write_image_folder(os.path.join(root, "folder")),
        "csv": write_csv_dataset(os.path.join(root, "csv")),
        "flickr30k": write_karpathy(os.path.join(root, "flickr30k"), "flickr30k"),
        "coco-retrieval": write_karpathy(os.path.join(root, "coco-karpathy"), "coco"),
        "models": write_models(os.path.join(root, "models")),
    }


def commands(root: str) -> List[str]:
    """One ``fastsamclip eval`` command per sample layout under ``root`` (as ``write_all`` lays them out)."""
    r = os.path.abspath(root)
    m = f"--checkpoint {r}/models/merged.safetensors"
    return [
        f"fastsamclip eval classify {m} --data-root {r}/imagenet --dataset imagenet",
        f"fastsamclip eval classify {m} --data-root {r}/imagenet-v2 --dataset imagenet-v2",
        f"fastsamclip eval classify {m} --data-root {r}/places365 --dataset places365",
        f"fastsamclip eval classify {m} --data-root {r}/folder --dataset folder",
        f"fastsamclip eval classify {m} --data-root {r}/csv --dataset csv --class-names {r}/csv/classes.txt",
        f"fastsamclip eval classify --teacher clip --clip-model local-dir:{r}/models/clip --data-root {r}/imagenet "
        "--dataset imagenet",
        f"fastsamclip eval semantic {m} --data-root {r}/VOCdevkit --dataset voc",
        f"fastsamclip eval semantic {m} --data-root {r}/VOCdevkit --dataset voc --mode composed",
        f"fastsamclip eval semantic {m} --data-root {r}/VOCdevkit --dataset pascal-context",
        f"fastsamclip eval semantic {m} --data-root {r} --dataset ade20k",
        f"fastsamclip eval semantic {m} --data-root {r}/coco_stuff164k --dataset coco-stuff",
        f"fastsamclip eval semantic {m} --data-root {r}/coco_panoptic --dataset coco-panoptic",
        f"fastsamclip eval instances {m} --data-root {r}/coco --dataset coco --detections {r}/coco/detections_val2017.json",
        f"fastsamclip eval instances --teacher sam --sam-checkpoint {r}/models/sam_vit_tiny.pth --sam-type vit_tiny "
        f"--data-root {r}/coco --dataset coco --detections {r}/coco/detections_val2017.json",
        f"fastsamclip eval instances {m} --data-root {r}/lvis --dataset lvis",
        f"fastsamclip eval retrieval {m} --data-root {r}/flickr30k --dataset flickr30k",
        f"fastsamclip eval retrieval {m} --data-root {r}/coco-karpathy --dataset coco",
    ]


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m fastsamclip.eval.sample_datasets OUT_FOLDER", file=sys.stderr)
        return 2
    write_all(argv[0])
    print(f"tiny datasets in every evaluation layout and tiny models written under {os.path.abspath(argv[0])}; try:")
    for c in commands(argv[0]):
        print("  " + c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
