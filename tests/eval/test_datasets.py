"""The dataset readers on each real layout, and the one-line errors for bad input."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fastsamclip.eval import classnames as cn
from fastsamclip.eval import sample_datasets as sd
from fastsamclip.eval.common import EvalInputError
from fastsamclip.eval.datasets import (check_label_size, open_classify, open_retrieval, open_semantic)
from fastsamclip.eval.instances import InstanceSet


def _one_line(e):
    text = str(e.value)
    assert "\n" not in text
    return text


def test_class_lists_have_the_datasets_sizes_and_clean_unique_prompts():
    assert len(cn.VOC_CLASSES) == 21 and len(cn.ADE20K_CLASSES) == 150 and len(cn.PASCAL_CONTEXT_59_CLASSES) == 59
    assert len(cn.COCO_STUFF_CLASSES) == 171 and len(cn.COCO_PANOPTIC_CLASSES) == 133
    assert len(cn.IMAGENET_SYNSETS) == 1000 and list(cn.IMAGENET_SYNSETS) == sorted(cn.IMAGENET_SYNSETS)
    assert cn.IMAGENET_SYNSETS[0] == "n01440764" and cn.IMAGENET_SYNSETS[999] == "n15075141"
    for names in (cn.ADE20K_CLASSES, cn.COCO_STUFF_CLASSES, cn.COCO_PANOPTIC_CLASSES, cn.PASCAL_CONTEXT_59_CLASSES):
        cn.prompt_names(names)  # raises on collisions
    assert cn.prompt_name("sky-other-merged") == "sky" and cn.prompt_name("floor-wood") == "floor wood"
    # Spot values of mmsegmentation's coco_stuff164k.py table (raw stuffthingmaps id -> train id).
    table = cn.coco_stuff_id_to_train_id()
    assert len(table) == 171
    assert {k: table[k] for k in (0, 10, 12, 26, 30, 66, 69, 71, 83, 91, 181)} == {
        0: 0, 10: 10, 12: 11, 26: 24, 30: 26, 66: 60, 69: 61, 71: 62, 83: 73, 91: 80, 181: 170}
    assert 11 not in table and 90 not in table


def test_voc_reads_palette_pngs_with_ignored_borders(data):
    ds = open_semantic("voc", os.path.dirname(data["voc"]["root"]))  # VOCdevkit/ is found as well as VOC2012/
    assert [s.name for s in ds.samples] == data["voc"]["val"]
    raw = np.array(Image.open(ds.samples[0].label))
    lab = ds.read_label(ds.samples[0])
    assert (lab == raw).all() and 255 in lab and lab[lab != 255].max() <= 20
    assert ds.background == 0 and ds.prompts[0] == "background"
    train = open_semantic("voc", data["voc"]["root"], "train")
    assert len(train.samples) == 1


def test_ade_context_stuff_panoptic_map_raw_values_to_train_ids(data):
    ade = open_semantic("ade20k", data["root"])
    s = ade.samples[0]
    raw = np.array(Image.open(s.label))
    lab = ade.read_label(s)
    assert ((raw == 0) == (lab == 255)).all() and (lab[raw > 0] == raw[raw > 0] - 1).all()
    ctx = open_semantic("pascal-context", os.path.join(data["root"], "VOCdevkit"))
    raw = np.array(Image.open(ctx.samples[0].label))
    assert (ctx.read_label(ctx.samples[0])[raw > 0] == raw[raw > 0] - 1).all()
    stuff = open_semantic("coco-stuff", data["coco-stuff"]["root"])
    raw = np.array(Image.open(stuff.samples[0].label))
    lab = stuff.read_label(stuff.samples[0])
    table = cn.coco_stuff_id_to_train_id()
    for v in np.unique(raw):
        assert (lab[raw == v] == (255 if v == 255 else table[int(v)])).all()
    pan = open_semantic("coco-panoptic", data["coco-panoptic"]["root"])
    s = pan.samples[0]
    rgb = np.array(Image.open(s.label)).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    lab = pan.read_label(s)
    train = {cid: i for i, (cid, _) in enumerate(cn.COCO_PANOPTIC_CATEGORIES)}
    assert (lab[ids == 0] == 255).all()
    for seg in s.extra["segments"]:  # crowd segments keep their category
        assert (lab[ids == seg["id"]] == train[seg["category_id"]]).all()


def test_encoded_predictions_read_back_as_the_same_train_ids(data, tmp_path):
    for name, root in (("voc", data["voc"]["root"]), ("ade20k", data["root"]),
                       ("pascal-context", os.path.join(data["root"], "VOCdevkit")),
                       ("coco-stuff", data["coco-stuff"]["root"]), ("coco-panoptic", data["coco-panoptic"]["root"])):
        ds = open_semantic(name, root)
        gt = ds.read_label(ds.samples[0])
        pred = np.where(gt == 255, 0, gt).astype(np.int64)
        path = tmp_path / f"{name}.png"
        ds.encode_prediction(pred).save(path)
        back = ds.read_label(type(ds.samples[0])(0, "x", ds.samples[0].image, str(path), ds.samples[0].extra)) \
            if name != "coco-panoptic" else np.array(Image.open(path))
        assert (back == pred).all(), name


def test_semantic_bad_inputs_are_one_line_naming_the_file(data, tmp_path):
    voc = data["voc"]["root"]
    with pytest.raises(EvalInputError, match="ImageSets/Segmentation/val2.txt: ") as e:
        open_semantic("voc", voc, "val2")
    assert "split file not found" in _one_line(e)
    with pytest.raises(EvalInputError, match="is not an ADE20K folder.*looks like a voc folder") as e:
        open_semantic("ade20k", voc)
    _one_line(e)
    with pytest.raises(EvalInputError, match="not a Pascal VOC 2012 folder"):
        open_semantic("voc", data["root"] + "/coco_stuff164k")
    # Class indices out of range, and a label map of another size than its image.
    bad = tmp_path / "VOC2012"
    shutil.copytree(voc, bad)
    ds = open_semantic("voc", str(bad))
    s = ds.samples[0]
    lab = np.array(Image.open(s.label))
    lab[0, 0] = 37
    im = Image.fromarray(lab, "P")
    im.putpalette(sd.VOC_PALETTE)  # without a full palette PIL renumbers the indices it writes
    im.save(s.label)
    with pytest.raises(EvalInputError, match=r"label values \[37\] are out of range") as e:
        ds.read_label(s)
    assert s.label in _one_line(e)
    rgb = np.zeros((lab.shape[0] + 1, lab.shape[1], 3), np.uint8)
    with pytest.raises(EvalInputError, match="label map is .* but its image") as e:
        check_label_size(s, rgb, lab)
    assert e.value.path == s.label
    # An empty split.
    open(os.path.join(str(bad), "ImageSets", "Segmentation", "empty.txt"), "w").close()
    with pytest.raises(EvalInputError, match="split file is empty"):
        open_semantic("voc", str(bad), "empty")
    with pytest.raises(EvalInputError, match="colour rendering"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(s.label)
        ds.read_label(s)


def test_panoptic_json_problems_name_the_json(data, tmp_path):
    root = tmp_path / "pan"
    shutil.copytree(data["coco-panoptic"]["root"], root)
    js = root / "annotations" / "panoptic_val2017.json"
    d = json.loads(js.read_text())
    d["annotations"][0]["segments_info"][0]["category_id"] = 12  # a retired COCO id
    js.write_text(json.dumps(d))
    ds = open_semantic("coco-panoptic", str(root))
    with pytest.raises(EvalInputError, match="category 12") as e:
        ds.read_label(ds.samples[0])
    assert str(js) in _one_line(e)


def test_classification_layouts(data):
    inet = open_classify("imagenet", data["imagenet"]["root"])
    assert [s.label for s in inet.samples] == [0, 1, 2] and inet.classes[0] == "tench" and len(inet.classes) == 1000
    v2 = open_classify("imagenet-v2", data["imagenet-v2"]["root"])
    assert [s.label for s in v2.samples] == [0, 1, 2] and v2.split == "matched-frequency"
    places = open_classify("places365", data["places365"]["root"])
    assert places.classes == ("airfield", "bakery shop", "coast", "apartment building outdoor")
    assert [s.label for s in places.samples] == [0, 1, 2, 3]
    folder = open_classify("folder", data["folder"]["root"])
    assert folder.classes == ("cat", "coffee cup", "rocket")
    c = open_classify("csv", data["csv"]["root"], class_names=data["csv"]["class_names"])
    assert c.classes == ("cat", "coffee cup", "rocket") and [s.label for s in c.samples] == [0, 1, 2]


def test_classification_bad_inputs(data, tmp_path):
    with pytest.raises(EvalInputError, match="is not an ImageNet synset folder"):
        open_classify("imagenet", data["folder"]["root"])
    with pytest.raises(EvalInputError, match="class indices: give --class-names"):
        open_classify("csv", data["csv"]["root"])
    csvf = tmp_path / "val.csv"
    csvf.write_text("file,label\nimages/a.jpg,5\n")
    with pytest.raises(EvalInputError, match="line 2: class index 5 out of range 0..2") as e:
        open_classify("csv", str(tmp_path), class_names=data["csv"]["class_names"])
    assert str(csvf) in _one_line(e)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    with pytest.raises(EvalInputError, match="has 2 class names but the dataset has 3 classes"):
        open_classify("folder", data["folder"]["root"], class_names=str(names))
    (tmp_path / "emptyfolder" / "val" / "cls").mkdir(parents=True)
    with pytest.raises(EvalInputError, match="no image found"):
        open_classify("folder", str(tmp_path / "emptyfolder"))
    with pytest.raises(EvalInputError, match="places365_test.txt"):
        open_classify("places365", data["places365"]["root"], "test")


def test_retrieval_karpathy_split(data, tmp_path):
    ds = open_retrieval("flickr30k", data["flickr30k"]["root"])
    assert len(ds.images) == 3 and len(ds.captions) == 15 and ds.caption_image[:6] == [0] * 5 + [1]
    assert all(os.path.isfile(p) for p in ds.images)
    coco = open_retrieval("coco", data["coco-retrieval"]["root"])
    assert coco.images[0].endswith(os.path.join("val2014", "COCO_val2014_000000000000.jpg"))
    with pytest.raises(EvalInputError, match="is the Karpathy split of 'flickr30k', not of --dataset coco"):
        open_retrieval("coco", data["flickr30k"]["root"], karpathy=data["flickr30k"]["json"])
    with pytest.raises(EvalInputError, match="no image in split 'val'"):
        open_retrieval("flickr30k", data["flickr30k"]["root"], "val")
    with pytest.raises(EvalInputError, match="dataset_coco.json: not found"):
        open_retrieval("coco", str(tmp_path))


def test_instances_sets_and_their_checks(data, tmp_path):
    coco = InstanceSet("coco", data["coco"]["root"])
    assert coco.image_ids == [1, 2, 3] and os.path.isfile(coco.image_path(1))
    lvis = InstanceSet("lvis", data["lvis"]["root"])
    assert all(os.path.isfile(lvis.image_path(i)) for i in lvis.image_ids)
    assert "train2017" in lvis.image_path(2)  # found through coco_url
    with pytest.raises(EvalInputError, match="is a LVIS annotation file, not one for --dataset coco"):
        InstanceSet("coco", data["lvis"]["root"], annotations=data["lvis"]["annotations"])
    dets = json.loads(open(data["coco"]["detections"]).read())
    dets[0]["image_id"] = 4242
    other = tmp_path / "dets.json"
    other.write_text(json.dumps(dets))
    with pytest.raises(EvalInputError, match="image id.* not in instances_val2017.json .first: 4242.: a detections file "
                                             "for another image set") as e:
        coco.detections(str(other))
    assert str(other) in _one_line(e)
    per_image = coco.detections(data["coco"]["detections"])
    assert all(scores == sorted(scores, reverse=True) for scores in ([t[2] for t in v] for v in per_image.values()))


def test_sample_writer_main_writes_every_layout(tmp_path, capsys):
    assert sd.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("fastsamclip eval ") == len(sd.commands(str(tmp_path)))
    assert os.path.isfile(tmp_path / "models" / "merged.safetensors")
