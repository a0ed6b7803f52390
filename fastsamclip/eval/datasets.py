"""The evaluation datasets in the layouts people download them in.

Every reader checks its layout when it is opened and raises ``EvalInputError`` (one line naming
the file or folder and what is wrong) for a missing split file, a folder that belongs to another
dataset, an empty split; per-image problems (a label map whose size differs from its image,
label values outside the dataset's classes) are found when the image is read, and raise the
same error naming the label file.

Semantic segmentation (train ids 0..C-1 and 255 = ignore after reading):
- ``voc``: ``[VOCdevkit/]VOC2012/JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNG:
  0 = background .. 20, 255 = the ignored object borders), ``ImageSets/Segmentation/<split>.txt``.
- ``ade20k``: ``[ADEChallengeData2016/]images/validation/*.jpg``, ``annotations/validation/*.png``
  (0 = unlabelled -> ignored, 1..150 -> 0..149).
- ``pascal-context``: ``[VOCdevkit/]VOC2010/JPEGImages``, ``SegmentationClassContext/*.png`` and
  ``ImageSets/SegmentationContext/<split>.txt`` (the layout of mmsegmentation's converter from
  the Detail API's trainval_merged.json): 59 classes, 0 -> ignored, 1..59 -> 0..58.
- ``coco-stuff``: ``images/val2017/*.jpg`` and ``annotations/val2017/*.png`` (the official
  stuffthingmaps_trainval2017.zip unpacked into annotations/): values 0..181 with 11 unused
  ids, 255 unlabelled; mapped to 171 train ids (``classnames.coco_stuff_id_to_train_id``).
- ``coco-panoptic``: ``val2017/*.jpg``, ``annotations/panoptic_val2017.json`` and
  ``annotations/panoptic_val2017/*.png`` (RGB segment ids, id = R + 256 G + 256^2 B): each pixel
  takes its segment's category (crowd segments included, as MaskFormer's semantic conversion of
  COCO panoptic does), 133 classes; id 0 (VOID) is ignored.

Classification: ``imagenet`` (``<split>/n01440764/*.JPEG`` synset folders), ``imagenet-v2``
(``imagenetv2-matched-frequency-format-val/<class index>/*.jpeg``), ``places365``
(``places365_<split>.txt`` + ``categories_places365.txt`` + ``val_256/``), ``folder`` (any
``<split>/<class>/*`` tree) and ``csv`` (rows ``file,label``).

Instances: ``coco`` (``annotations/instances_val2017.json`` + ``val2017/``) and ``lvis``
(``lvis_v1_val.json``, images found through each image's ``coco_url`` under the COCO folders).

Retrieval: the Karpathy-split json (``dataset_flickr30k.json`` + ``flickr30k-images/``,
``dataset_coco.json`` + ``val2014/``...).

Every layout lives in this one module (~650 lines) so that they share one set of checks and
messages (split files, label PNG reading, value tables, the "looks like another dataset" hint).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from fastsamclip.eval import classnames as cn
from fastsamclip.eval.common import EvalInputError
from fastsamclip.eval.metrics import IGNORE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _first_dir(candidates: Sequence[str], required: Sequence[str]) -> Optional[str]:
    """The first candidate folder holding every ``required`` entry."""
    for c in candidates:
        if all(os.path.exists(os.path.join(c, r)) for r in required):
            return c
    return None


def _read_split_file(path: str, what: str) -> List[str]:
    if not os.path.isfile(path):
        raise EvalInputError(path, f"split file not found ({what}); --split names <split>.txt in this folder")
    with open(path) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise EvalInputError(path, "split file is empty: no image to evaluate")
    return names


def _read_label_png(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalInputError(path, f"cannot read the label PNG ({type(e).__name__}: {e})") from e
    if mode not in ("P", "L", "I", "I;16") or a.ndim != 2:
        raise EvalInputError(path, f"label PNG has mode {mode} and shape {a.shape}: expected one channel of class "
                                   "indices (palette or greyscale), not a colour rendering")
    return a


def _lut_map(raw: np.ndarray, lut: np.ndarray, path: str, valid_text: str) -> np.ndarray:
    """Map raw values through a 256-entry table (-1 = not a valid value)."""
    if raw.max(initial=0) >= len(lut):
        bad = sorted(set(np.unique(raw[raw >= len(lut)]).tolist()))[:8]
        raise EvalInputError(path, f"label values {bad} are out of range ({valid_text})")
    out = lut[raw]
    if (out < 0).any():
        bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:8]
        raise EvalInputError(path, f"label values {bad} are out of range ({valid_text})")
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------


@dataclass
class SegSample:
    index: int
    name: str  # the image's stem: predictions are saved as <name>.png
    image: str
    label: str
    extra: dict = field(default_factory=dict)


class SemanticDataset:
    """Base: ``classes`` (train-id order), ``prompts`` (their text), ``background`` (train id
    of a background class, or None), ``samples``; ``read_label`` gives (H, W) uint8 train ids
    with 255 = ignore; ``encode_prediction`` writes a prediction in the dataset's own encoding."""

    name = ""
    classes: Tuple[str, ...] = ()
    background: Optional[int] = None
    lut: np.ndarray
    valid_text = ""

    def __init__(self, root: str, split: str) -> None:
        self.root = os.fspath(root)
        self.split = split
        self.samples: List[SegSample] = []

    @property
    def prompts(self) -> Tuple[str, ...]:
        return cn.prompt_names(self.classes)

    def read_label(self, sample: SegSample) -> np.ndarray:
        return _lut_map(_read_label_png(sample.label), self.lut, sample.label, self.valid_text)

    def encode_prediction(self, pred: np.ndarray) -> Image.Image:
        """pred (H, W) train ids, -1 = no prediction -> a PNG in the dataset's label encoding:
        train ids as they are, 255 = none (the subclasses of files with another encoding say so)."""
        return Image.fromarray(np.where(pred < 0, IGNORE, pred).astype(np.uint8), mode="L")

    def _check_nonempty(self, where: str) -> None:
        if not self.samples:
            raise EvalInputError(where, f"no image in the {self.split!r} split of {self.name}: nothing to evaluate")


def _voc_palette() -> List[int]:
    """The Pascal VOC colour map (the devkit's bit-interleaving rule), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


VOC_PALETTE = _voc_palette()


def _lut(valid_raw: Sequence[int], train_ids: Sequence[int], ignore_raw: Sequence[int]) -> np.ndarray:
    lut = np.full(256, -1, np.int16)
    lut[list(valid_raw)] = list(train_ids)
    for v in ignore_raw:
        lut[v] = IGNORE
    return lut


class VOC2012(SemanticDataset):
    name = "voc"
    classes = cn.VOC_CLASSES
    background = 0
    lut = _lut(range(21), range(21), [255])
    valid_text = "VOC2012 classes are 0..20 and 255 = ignore"

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)
        need = ("JPEGImages", "SegmentationClass")
        base = _first_dir([self.root, os.path.join(self.root, "VOC2012"), os.path.join(self.root, "VOCdevkit", "VOC2012")],
                          need)
        if base is None:
            raise EvalInputError(self.root, "is not a Pascal VOC 2012 folder: --dataset voc expects VOC2012/ with "
                                            "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt"
                                 + _looks_like(self.root))
        split_file = os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt")
        for i, stem in enumerate(_read_split_file(split_file, "VOC2012 ImageSets/Segmentation")):
            self.samples.append(SegSample(i, stem, os.path.join(base, "JPEGImages", stem + ".jpg"),
                                          os.path.join(base, "SegmentationClass", stem + ".png")))
        self.base = base

    def encode_prediction(self, pred: np.ndarray) -> Image.Image:
        im = Image.fromarray(np.where(pred < 0, IGNORE, pred).astype(np.uint8), mode="P")
        im.putpalette(VOC_PALETTE)
        return im


class ADE20K(SemanticDataset):
    name = "ade20k"
    classes = cn.ADE20K_CLASSES
    lut = _lut(range(1, 151), range(150), [0])
    valid_text = "ADE20K values are 0 = unlabelled and 1..150"
    SPLITS = {"val": "validation", "validation": "validation", "train": "training", "training": "training"}

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)
        if split not in self.SPLITS:
            raise EvalInputError(self.root, f"ADE20K has splits 'val' (validation) and 'train', not {split!r}")
        folder = self.SPLITS[split]
        need = (os.path.join("images", folder), os.path.join("annotations", folder))
        base = _first_dir([self.root, os.path.join(self.root, "ADEChallengeData2016")], need)
        if base is None:
            raise EvalInputError(self.root, f"is not an ADE20K folder: --dataset ade20k expects ADEChallengeData2016/"
                                            f"images/{folder}/ and annotations/{folder}/" + _looks_like(self.root))
        img_dir, ann_dir = (os.path.join(base, d) for d in need)
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if _is_image(f))
        for i, stem in enumerate(stems):
            self.samples.append(SegSample(i, stem, os.path.join(img_dir, stem + ".jpg"), os.path.join(ann_dir, stem + ".png")))
        self._check_nonempty(img_dir)

    def encode_prediction(self, pred: np.ndarray) -> Image.Image:
        return Image.fromarray(np.where(pred < 0, 0, pred + 1).astype(np.uint8), mode="L")


class PascalContext59(SemanticDataset):
    name = "pascal-context"
    classes = cn.PASCAL_CONTEXT_59_CLASSES
    lut = _lut(range(1, 60), range(59), [0])
    valid_text = "Pascal Context 59 values are 0 = background/ignored and 1..59"

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)
        need = ("JPEGImages", "SegmentationClassContext")
        base = _first_dir([self.root, os.path.join(self.root, "VOC2010"), os.path.join(self.root, "VOCdevkit", "VOC2010")],
                          need)
        if base is None:
            raise EvalInputError(self.root, "is not a Pascal Context folder: --dataset pascal-context expects VOC2010/ "
                                            "with JPEGImages/, SegmentationClassContext/ and "
                                            "ImageSets/SegmentationContext/<split>.txt" + _looks_like(self.root))
        split_file = os.path.join(base, "ImageSets", "SegmentationContext", f"{split}.txt")
        for i, stem in enumerate(_read_split_file(split_file, "Pascal Context ImageSets/SegmentationContext")):
            self.samples.append(SegSample(i, stem, os.path.join(base, "JPEGImages", stem + ".jpg"),
                                          os.path.join(base, "SegmentationClassContext", stem + ".png")))

    def encode_prediction(self, pred: np.ndarray) -> Image.Image:
        return Image.fromarray(np.where(pred < 0, 0, pred + 1).astype(np.uint8), mode="L")


class COCOStuff164k(SemanticDataset):
    name = "coco-stuff"
    classes = cn.COCO_STUFF_CLASSES
    _map = cn.coco_stuff_id_to_train_id()
    lut = _lut(list(_map), list(_map.values()), [255])
    valid_text = "COCO-Stuff values are 0..181 less the unused ids 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90, and 255"

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)
        folder = split if split.endswith("2017") else f"{split}2017"
        need = (os.path.join("images", folder), os.path.join("annotations", folder))
        base = _first_dir([self.root, os.path.join(self.root, "coco_stuff164k"), os.path.join(self.root, "cocostuff")], need)
        if base is None:
            raise EvalInputError(self.root, f"is not a COCO-Stuff 164k folder: --dataset coco-stuff expects images/{folder}/ "
                                            f"and annotations/{folder}/ (stuffthingmaps_trainval2017.zip unpacked there)"
                                 + _looks_like(self.root))
        img_dir, ann_dir = (os.path.join(base, d) for d in need)
        # Label PNGs drive the split (the images folder may be all of COCO); converted
        # *_labelTrainIds.png files beside them are not the raw maps and are left out.
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(ann_dir)
                       if f.endswith(".png") and not f.endswith("_labelTrainIds.png"))
        for i, stem in enumerate(stems):
            self.samples.append(SegSample(i, stem, os.path.join(img_dir, stem + ".jpg"), os.path.join(ann_dir, stem + ".png")))
        self._check_nonempty(ann_dir)
        self._inverse = np.full(256, IGNORE, np.uint8)
        for raw, tid in self._map.items():
            self._inverse[tid] = raw

    def encode_prediction(self, pred: np.ndarray) -> Image.Image:
        return Image.fromarray(np.where(pred < 0, IGNORE, self._inverse[np.clip(pred, 0, 255)]).astype(np.uint8), mode="L")


class COCOPanopticSemantic(SemanticDataset):
    name = "coco-panoptic"
    classes = cn.COCO_PANOPTIC_CLASSES
    valid_text = "COCO panoptic categories"

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)
        folder = split if split.endswith("2017") else f"{split}2017"
        rel_json = os.path.join("annotations", f"panoptic_{folder}.json")
        base = _first_dir([self.root, os.path.join(self.root, "coco")], (rel_json,))
        if base is None:
            raise EvalInputError(os.path.join(self.root, rel_json),
                                 "not found: --dataset coco-panoptic expects annotations/panoptic_<split>2017.json, "
                                 "annotations/panoptic_<split>2017/*.png and <split>2017/*.jpg" + _looks_like(self.root))
        self.json_path = os.path.join(base, rel_json)
        png_dir = os.path.join(base, "annotations", f"panoptic_{folder}")
        if not os.path.isdir(png_dir):
            raise EvalInputError(png_dir, "not found: the panoptic PNG folder beside the json "
                                          "(panoptic_annotations_trainval2017.zip holds it as a zip of its own)")
        data = load_json(self.json_path)
        if not isinstance(data, dict) or "annotations" not in data or "categories" not in data:
            raise EvalInputError(self.json_path, "is not a COCO panoptic json (no 'annotations' / 'categories')")
        if data["annotations"] and "segments_info" not in data["annotations"][0]:
            raise EvalInputError(self.json_path, "has no 'segments_info': an instances json, not a panoptic one")
        self.cat_to_train = {cid: i for i, (cid, _) in enumerate(cn.COCO_PANOPTIC_CATEGORIES)}
        unknown = sorted({c["id"] for c in data["categories"]} - set(self.cat_to_train))
        if unknown:
            raise EvalInputError(self.json_path, f"category ids {unknown[:8]} are not among the 133 COCO panoptic categories")
        images = {im["id"]: im for im in data.get("images", [])}
        anns = sorted(data["annotations"], key=lambda a: a["image_id"])
        for i, ann in enumerate(anns):
            im = images.get(ann["image_id"])
            file_name = im["file_name"] if im else ann["file_name"].replace(".png", ".jpg")
            stem = os.path.splitext(os.path.basename(file_name))[0]
            self.samples.append(SegSample(i, stem, os.path.join(base, folder, file_name), os.path.join(png_dir, ann["file_name"]),
                                          extra={"segments": ann["segments_info"]}))
        self._check_nonempty(self.json_path)

    def read_label(self, sample: SegSample) -> np.ndarray:
        try:
            with Image.open(sample.label) as im:
                rgb = np.array(im.convert("RGB"), dtype=np.uint32)
        except (OSError, ValueError, SyntaxError) as e:
            raise EvalInputError(sample.label, f"cannot read the panoptic PNG ({type(e).__name__}: {e})") from e
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        out = np.full(ids.shape, IGNORE, np.uint8)
        known = {0}
        for seg in sample.extra["segments"]:
            tid = self.cat_to_train.get(seg["category_id"])
            if tid is None:
                raise EvalInputError(self.json_path, f"segment {seg['id']} of {os.path.basename(sample.label)} has category "
                                                     f"{seg['category_id']}, not one of the 133 COCO panoptic categories")
            out[ids == seg["id"]] = tid
            known.add(seg["id"])
        stray = set(np.unique(ids).tolist()) - known
        if stray:
            raise EvalInputError(sample.label, f"segment ids {sorted(stray)[:8]} are in the PNG but not in its "
                                               f"segments_info in {os.path.basename(self.json_path)}")
        return out

    # encode_prediction: the base's (COCO panoptic has no semantic label file of its own:
    # train ids 0..132, 255 = none).


SEMANTIC_DATASETS = {cls.name: cls for cls in (VOC2012, PascalContext59, ADE20K, COCOStuff164k, COCOPanopticSemantic)}


def _looks_like(root: str) -> str:
    """A hint for a folder given under the wrong --dataset name."""
    if not os.path.isdir(root):
        return f" ({root} does not exist)"
    marks = [("voc", ["SegmentationClass"]), ("pascal-context", ["SegmentationClassContext"]),
             ("ade20k", ["ADEChallengeData2016"]), ("ade20k", ["images/validation", "annotations/validation"]),
             ("coco-panoptic", ["annotations/panoptic_val2017.json"]), ("coco-stuff", ["images/val2017", "annotations/val2017"])]
    for base in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOC2010"), os.path.join(root, "VOCdevkit", "VOC2012"),
                 os.path.join(root, "VOCdevkit", "VOC2010")):
        for name, entries in marks:
            if all(os.path.exists(os.path.join(base, e)) for e in entries):
                return f"; it looks like a {name} folder (try --dataset {name})"
    return ""


def open_semantic(name: str, root: str, split: str = "val", class_names: Optional[str] = None) -> SemanticDataset:
    """A semantic split; ``class_names`` (voc only): a file of the label values' names, one per
    line from value 0 = background, for a dataset in VOC's layout with classes of its own."""
    if name not in SEMANTIC_DATASETS:
        raise EvalInputError(None, f"unknown semantic dataset {name!r}; known: {', '.join(SEMANTIC_DATASETS)}")
    if class_names is not None and name != "voc":
        raise EvalInputError(class_names, f"--class-names names the classes of a VOC-layout dataset, not of {name}")
    ds = SEMANTIC_DATASETS[name](root, split)
    if class_names is not None:
        ds.classes = read_class_names(class_names)
        ds.lut = _lut(range(len(ds.classes)), range(len(ds.classes)), [255])
        ds.valid_text = f"{os.path.basename(class_names)} names values 0..{len(ds.classes) - 1}, and 255 = ignore"
    return ds


def check_label_size(sample, rgb: np.ndarray, label: np.ndarray) -> None:
    if label.shape != rgb.shape[:2]:
        raise EvalInputError(sample.label, f"label map is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                                           f"{os.path.basename(sample.image)} is {rgb.shape[1]}x{rgb.shape[0]}",
                             index=sample.index)


def load_json(path: str):
    if not os.path.isfile(path):
        raise EvalInputError(path, "not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalInputError(path, f"is not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


@dataclass
class ClsSample:
    index: int
    image: str
    label: int


@dataclass
class ClassifyDataset:
    name: str
    split: str
    root: str
    classes: Tuple[str, ...]  # prompt text per class index
    samples: List[ClsSample]
    names_source: str  # where the class names came from (for the results file)


def read_class_names(path: str, expected: Optional[int] = None) -> Tuple[str, ...]:
    """One class name per line (line i = class i); blank lines and '#' comments skipped."""
    if not os.path.isfile(path):
        raise EvalInputError(path, "class-name file not found")
    with open(path, encoding="utf-8") as f:
        names = tuple(s.strip() for s in f if s.strip() and not s.lstrip().startswith("#"))
    if not names:
        raise EvalInputError(path, "class-name file is empty")
    if expected is not None and len(names) != expected:
        raise EvalInputError(path, f"has {len(names)} class names but the dataset has {expected} classes")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalInputError(path, f"class names repeat: {dup[:5]}")
    return names


def _images_in(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if _is_image(f))


def _class_tree(base: str) -> List[str]:
    return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and not d.startswith("."))


def open_classify(name: str, root: str, split: str = "val", class_names: Optional[str] = None,
                  csv_file: Optional[str] = None) -> ClassifyDataset:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise EvalInputError(root, "data root not found")
    if name == "imagenet":
        base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
        folders = _class_tree(base)
        index = {w: i for i, w in enumerate(cn.IMAGENET_SYNSETS)}
        bad = [f for f in folders if f not in index]
        if bad or not folders:
            what = f"{bad[0]!r} is not an ImageNet synset folder (n########)" if bad else "has no synset folders"
            raise EvalInputError(base, f"{what}: --dataset imagenet expects <split>/n01440764/*.JPEG "
                                       "(ImageNet val in class folders); use --dataset folder for other trees")
        names = cn.imagenet_classnames() if class_names is None else read_class_names(class_names, 1000)
        samples = [(p, index[f]) for f in folders for p in _images_in(os.path.join(base, f))]
        src = "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES" if class_names is None else class_names
        return _classify(name, split, base, names, samples, src)
    if name == "imagenet-v2":
        variant = split if split != "val" else "matched-frequency"
        cand = [os.path.join(root, f"imagenetv2-{variant}-format-val"), os.path.join(root, variant), root]
        base = next((c for c in cand if os.path.isdir(c) and any(d.isdigit() for d in _class_tree(c))), None)
        if base is None:
            raise EvalInputError(root, f"is not an ImageNet-v2 folder: --dataset imagenet-v2 expects "
                                       f"imagenetv2-{variant}-format-val/<class index 0..999>/*.jpeg")
        folders = _class_tree(base)
        bad = [f for f in folders if not f.isdigit() or int(f) >= 1000]
        if bad:
            raise EvalInputError(os.path.join(base, bad[0]), "is not an ImageNet-v2 class folder (0..999)")
        names = cn.imagenet_classnames() if class_names is None else read_class_names(class_names, 1000)
        samples = [(p, int(f)) for f in sorted(folders, key=int) for p in _images_in(os.path.join(base, f))]
        src = "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES" if class_names is None else class_names
        return _classify(name, f"{variant}", base, names, samples, src)
    if name == "places365":
        cats = os.path.join(root, "categories_places365.txt")
        listing = os.path.join(root, f"places365_{split}.txt")
        if not os.path.isfile(cats):
            raise EvalInputError(cats, "not found: --dataset places365 expects categories_places365.txt, "
                                       "places365_val.txt and val_256/ (or val_large/) from the Places365 devkit")
        if not os.path.isfile(listing):
            raise EvalInputError(listing, f"split file not found (places365_{split}.txt of the devkit)")
        names = _places_names(cats) if class_names is None else read_class_names(class_names, 365)
        img_dir = next((os.path.join(root, d) for d in (f"{split}_256", f"{split}_large", split)
                        if os.path.isdir(os.path.join(root, d))), None)
        if img_dir is None:
            raise EvalInputError(root, f"has no {split}_256/ or {split}_large/ image folder")
        samples = []
        with open(listing) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    raise EvalInputError(listing, f"line {line_no} is {line.strip()!r}: expected 'file label'")
                if int(parts[1]) >= len(names):
                    raise EvalInputError(listing, f"line {line_no}: class index {parts[1]} out of range 0..{len(names) - 1}")
                samples.append((os.path.join(img_dir, parts[0].lstrip("/")), int(parts[1])))
        return _classify(name, split, root, names, samples, cats if class_names is None else class_names)
    if name == "folder":
        base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
        folders = _class_tree(base)
        if not folders:
            raise EvalInputError(base, "has no class folders: --dataset folder expects <split>/<class name>/<images>")
        names = tuple(f.replace("_", " ") for f in folders) if class_names is None else read_class_names(class_names, len(folders))
        samples = [(p, i) for i, f in enumerate(folders) for p in _images_in(os.path.join(base, f))]
        return _classify(name, split, base, names, samples, "folder names" if class_names is None else class_names)
    if name == "csv":
        path = csv_file or os.path.join(root, f"{split}.csv")
        path = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(root, path)
        return _open_csv(root, split, path, class_names)
    raise EvalInputError(None, f"unknown classification dataset {name!r}; known: imagenet, imagenet-v2, places365, folder, csv")


def _places_names(path: str) -> Tuple[str, ...]:
    """'/a/apartment_building/outdoor 8' -> 'apartment building outdoor' (class index order)."""
    names: Dict[int, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise EvalInputError(path, f"line {line_no} is {line.strip()!r}: expected '/x/name index'")
            tag = re.sub(r"^/[a-z]/", "", parts[0])
            names[int(parts[1])] = tag.replace("/", " ").replace("_", " ")
    if sorted(names) != list(range(len(names))):
        raise EvalInputError(path, "class indices are not 0..N-1")
    return tuple(names[i] for i in range(len(names)))


def _open_csv(root: str, split: str, path: str, class_names: Optional[str]) -> ClassifyDataset:
    if not os.path.isfile(path):
        raise EvalInputError(path, "CSV file not found (rows 'file,label'; --csv FILE or <data-root>/<split>.csv)")
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise EvalInputError(path, f"line {line_no} has {len(row)} column(s): expected 'file,label'")
            if line_no == 1 and row[0].strip().lower() in ("file", "filename", "path", "image"):
                continue  # header
            rows.append((line_no, row[0].strip(), row[1].strip()))
    if not rows:
        raise EvalInputError(path, "has no rows: nothing to evaluate")
    numeric = all(lab.isdigit() for _, _, lab in rows)
    if class_names is not None:
        names = read_class_names(class_names)
    elif numeric:
        raise EvalInputError(path, "labels are class indices: give --class-names FILE (one name per line) to name them")
    else:
        names = tuple(sorted({lab for _, _, lab in rows}))
    index = {n: i for i, n in enumerate(names)}
    samples = []
    for line_no, file, lab in rows:
        if lab.isdigit():
            y = int(lab)
            if y >= len(names):
                raise EvalInputError(path, f"line {line_no}: class index {y} out of range 0..{len(names) - 1}")
        elif lab in index:
            y = index[lab]
        else:
            raise EvalInputError(path, f"line {line_no}: label {lab!r} is not a class name"
                                       + (f" in {class_names}" if class_names else ""))
        samples.append((file if os.path.isabs(file) else os.path.join(root, file), y))
    return _classify("csv", split, root, names, samples, class_names or f"labels of {path}")


def _classify(name, split, root, names, samples, source) -> ClassifyDataset:
    if not samples:
        raise EvalInputError(root, f"no image found for --dataset {name}: nothing to evaluate")
    return ClassifyDataset(name, split, root, tuple(names),
                           [ClsSample(i, p, y) for i, (p, y) in enumerate(samples)], source)


# ---------------------------------------------------------------------------------------------
# Instances (COCO / LVIS): annotation files read by pycocotools in instances.py
# ---------------------------------------------------------------------------------------------


def instances_paths(name: str, root: str, split: str = "val", annotations: Optional[str] = None) -> Tuple[str, str]:
    """(annotation json, image root) for COCO instances or LVIS v1."""
    root = os.fspath(root)
    folder = split if split.endswith("2017") else f"{split}2017"
    if name == "coco":
        ann = annotations or os.path.join(root, "annotations", f"instances_{folder}.json")
        if not os.path.isfile(ann):
            raise EvalInputError(ann, "not found: --dataset coco expects annotations/instances_<split>2017.json and "
                                      "<split>2017/*.jpg (or give --annotations FILE)")
        return ann, os.path.join(root, folder)
    if name == "lvis":
        short = split.replace("2017", "")
        cands = [annotations] if annotations else [os.path.join(root, f"lvis_v1_{short}.json"),
                                                   os.path.join(root, "annotations", f"lvis_v1_{short}.json"),
                                                   os.path.join(root, "lvis", f"lvis_v1_{short}.json")]
        ann = next((c for c in cands if c and os.path.isfile(c)), None)
        if ann is None:
            raise EvalInputError(cands[0], "not found: --dataset lvis expects lvis_v1_<split>.json (beside or in "
                                           "annotations/ under --data-root, or --annotations FILE) with the COCO "
                                           "train2017/ and val2017/ image folders under --data-root")
        return ann, root
    raise EvalInputError(None, f"unknown instance dataset {name!r}; known: coco, lvis")


def instance_image_path(image: dict, image_root: str) -> str:
    """COCO images carry ``file_name`` (in the split's folder, ``image_root``); LVIS v1 images
    carry only ``coco_url`` (``.../val2017/000000397133.jpg``), which names the COCO folder the
    file is in, under ``image_root`` = the COCO root."""
    if image.get("file_name"):
        return os.path.join(image_root, image["file_name"])
    parts = str(image.get("coco_url", "")).rstrip("/").split("/")
    if len(parts) < 2:
        raise EvalInputError(None, f"image {image.get('id')} has neither file_name nor coco_url")
    return os.path.join(image_root, parts[-2], parts[-1])


# ---------------------------------------------------------------------------------------------
# Retrieval (Karpathy splits)
# ---------------------------------------------------------------------------------------------


@dataclass
class RetrievalDataset:
    name: str
    split: str
    json_path: str
    images: List[str]  # paths
    captions: List[str]
    caption_image: List[int]  # image index of each caption


KARPATHY_FILES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}


def open_retrieval(name: str, root: str, split: str = "test", karpathy: Optional[str] = None,
                   images: Optional[str] = None, captions_per_image: int = 5) -> RetrievalDataset:
    if name not in KARPATHY_FILES:
        raise EvalInputError(None, f"unknown retrieval dataset {name!r}; known: {', '.join(KARPATHY_FILES)}")
    root = os.fspath(root)
    path = karpathy or os.path.join(root, KARPATHY_FILES[name])
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise EvalInputError(path, "is not a Karpathy-split json (no 'images' list)")
    if data.get("dataset") and data["dataset"] != name:
        raise EvalInputError(path, f"is the Karpathy split of {data['dataset']!r}, not of --dataset {name}")
    img_root = images or (os.path.join(root, "flickr30k-images") if name == "flickr30k" else root)
    if name == "flickr30k" and images is None and not os.path.isdir(img_root):
        img_root = next((os.path.join(root, d) for d in ("flickr30k_images", "Images", "images")
                         if os.path.isdir(os.path.join(root, d))), img_root)
    entries = [im for im in data["images"] if im.get("split") == split]
    if not entries:
        splits = sorted({im.get("split") for im in data["images"]} - {None})
        raise EvalInputError(path, f"has no image in split {split!r} (splits there: {splits})")
    paths, caps, owner = [], [], []
    for i, im in enumerate(entries):
        sents = [s["raw"].strip() for s in im.get("sentences", []) if s.get("raw", "").strip()]
        if not sents:
            raise EvalInputError(path, f"image {im.get('filename')} of split {split!r} has no caption")
        if captions_per_image > 0:
            sents = sents[:captions_per_image]
        paths.append(os.path.join(img_root, im.get("filepath", ""), im["filename"]))
        caps += sents
        owner += [i] * len(sents)
    return RetrievalDataset(name, split, path, paths, caps, owner)
