"""``SAMCLIPPredictor.segment_text``: every instance of each phrase and nothing else, on a scene
whose answer is known (per-patch CLIP embeddings and text embeddings injected, SAM's decoder
replaced by one that returns the object under each prompt), and the plumbing on a real tiny model."""

import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsamclip.checkpoint import save_merged
from fastsamclip.cli import main
from fastsamclip.cli.parsers import build_parser
from fastsamclip.cli.predict import _concept_params
from fastsamclip.data.samples import sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.predictor.concepts import MAX_PHRASES, ConceptParams, find_prompts, mask_nms, phrase_maps
from fastsamclip.predictor.everything import mask_patch_weights, name_masks
from fastsamclip.predictor.text import TextEmbeddings

H, W = 96, 128  # the scene: the tiny model's native side is 128, so the input frame is the image's
# Objects (x0, y0, x1, y1) in pixels. cat 2 is off the 16 px patch grid on purpose.
OBJECTS = {"cat 1": (0, 0, 32, 32), "cat 2": (84, 44, 116, 76), "dog": (16, 64, 48, 96)}
PHRASE_OF = {"cat 1": "a cat", "cat 2": "a cat", "dog": "a dog"}
TEXTS = ("a cat", "a dog", "a unicorn", "background", "grass")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam.pth"), "vit_tiny"), "vit_tiny")
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    return SAMCLIPPredictor(samclip_from_teachers(sam, clip, sam_config="vit_tiny"), device="cpu")


def _box_mask(box, shape, cell=1):
    x0, y0, x1, y1 = (v / cell for v in box)
    m = np.zeros(shape, bool)
    m[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = True
    return m


class Scene:
    """The known answer: a patch's embedding is its majority object's text (noise added), the
    decoder returns the object under a point (whole, left half, a small blob: SAM's three
    granularities) and the object best matching a box."""

    def __init__(self, predictor, sloppy_dog_box=False, objects=OBJECTS):
        self.p, self.objects, self.sloppy = predictor, objects, sloppy_dog_box
        g = torch.Generator().manual_seed(1)
        dim = predictor.clip_patches.shape[-1]
        self.text = dict(zip(TEXTS, torch.linalg.qr(torch.randn(dim, len(TEXTS), generator=g))[0].T))
        grid = predictor.clip_patches.shape[1]
        patches = torch.empty(grid, grid, dim)
        for r in range(grid):
            for c in range(grid):
                cover = {n: _box_mask(b, (H, W))[16 * r:16 * r + 16, 16 * c:16 * c + 16].mean()
                         for n, b in objects.items()} if 16 * r < H else {}
                name = max(cover, key=cover.get) if cover and max(cover.values()) > 0.5 else None
                t = self.text[PHRASE_OF[name]] if name else self.text["background"]
                patches[r, c] = 3 * t + 0.05 * torch.randn(dim, generator=g)
        self.calls = []
        predictor.set_pass({"sam": predictor.features, "clip": predictor.clip_embedding, "clip_patches": patches[None]},
                           (H, W), (H, W))

    def text_embeddings(self, texts, templates="openai"):
        return torch.stack([self.text[t] for t in texts])

    def _logits(self, box):
        return torch.where(torch.as_tensor(_box_mask(box, (32, 32), cell=4)), 8.0, -8.0)

    def decode(self, coords, labels, boxes, masks, multimask_output):
        self.calls.append((None if coords is None else coords.shape[0], None if boxes is None else boxes.shape[0]))
        low, iou = [], []
        if coords is not None:
            for (x, y), in coords.tolist():
                name = next(n for n, (x0, y0, x1, y1) in self.objects.items() if x0 <= x <= x1 and y0 <= y <= y1)
                x0, y0, x1, y1 = self.objects[name]
                low.append(torch.stack([self._logits((x0, y0, x1, y1)), self._logits((x0, y0, (x0 + x1) / 2, y1)),
                                        self._logits((x - 4, y - 4, x + 4, y + 4))]))
                iou.append(torch.tensor([0.9, 0.8, 0.4]))
        else:
            for b in boxes.tolist():
                name = max(self.objects, key=lambda n: _iou(_box_mask(self.objects[n], (H, W)), _box_mask(b, (H, W))))
                obj = self.objects[name]
                if self.sloppy and name == "dog":  # the dog and three times its area of background
                    obj = (obj[0], 0, obj[2] + 64, obj[3])
                low.append(self._logits(obj)[None])
                iou.append(torch.tensor([0.92]))
        return torch.stack(low), torch.stack(iou)


def _iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture
def scene(predictor, monkeypatch):
    predictor.set_image(np.zeros((H, W, 3), np.uint8))

    def make(**kw):
        s = Scene(predictor, **kw)
        monkeypatch.setattr(predictor, "text_embeddings", s.text_embeddings)
        monkeypatch.setattr(predictor, "decode", s.decode)
        return s
    yield make
    predictor.reset_image()


def test_every_instance_is_found_and_nothing_else(predictor, scene):
    s = scene()
    out = predictor.segment_text(None, ["a cat", "a unicorn", "a dog"])
    assert [r["phrase"] for r in out] == ["a cat", "a cat", "a dog"]  # phrase order, then score
    found = {}
    for r in out:
        m = r["segmentation"]
        assert m.shape == (H, W) and m.dtype == bool and r["area"] == int(m.sum())
        name = max(OBJECTS, key=lambda n: _iou(m, _box_mask(OBJECTS[n], (H, W))))
        assert _iou(m, _box_mask(OBJECTS[name], (H, W))) > 0.95, name  # the whole object, not a part
        assert PHRASE_OF[name] == r["phrase"] and name not in found
        found[name] = r
        x0, y0, x1, y1 = OBJECTS[name]
        assert np.allclose(r["bbox"], [x0, y0, x1 - x0 - 1, y1 - y0 - 1], atol=1.5)
        assert r["phrase_score"] > 0.99 and r["similarity"] > 0.9  # cat 2's mask covers some background patches
        assert abs(r["score"] - (min(r["predicted_iou"], 1) * r["phrase_score"]) ** 0.5) < 1e-6
    assert set(found) == set(OBJECTS)
    # The box around each region wins over the point's whole mask (0.92 > 0.9), which it suppresses.
    assert all(list(r["prompt"]) == ["box"] for r in out)
    cat2 = found["cat 2"]["prompt"]["box"]
    assert cat2 == [80, 48, 112, 80]  # the patches that are mostly cat 2
    # All phrases' prompts in one decoder batch per prompt kind: 3 peaks, then 3 regions.
    assert s.calls == [(3, None), (None, 3)]


def test_a_mask_that_is_mostly_something_else_is_not_the_phrase(predictor, scene):
    scene(sloppy_dog_box=True)
    out = predictor.segment_text(None, ["a cat", "a dog"])
    dog = [r for r in out if r["phrase"] == "a dog"]
    # The box's mask (predicted IoU 0.92, but 3/4 background) is vetoed by its pooled name; the
    # point's whole mask is the instance.
    assert len(dog) == 1 and list(dog[0]["prompt"]) == ["point"]
    assert _iou(dog[0]["segmentation"], _box_mask(OBJECTS["dog"], (H, W))) > 0.95
    assert predictor.segment_text(None, ["a cat", "a dog"], score_threshold=0.99) == []  # the score's own veto
    # The name's veto on its own: with the score's and the suppression's off, no kept mask is mostly not its phrase.
    loose = predictor.segment_text(None, ["a cat", "a dog"], score_threshold=0.0, nms_thresh=1.0)
    assert loose and all(r["phrase_score"] >= 0.5 for r in loose)
    # Without the suppression of contained masks, the half and the blob of each point come back.
    assert len(predictor.segment_text(None, ["a cat", "a dog"], nms_thresh=1.0)) > 3 * len(OBJECTS)


def test_absent_phrases_give_no_instances(predictor, scene):
    scene()
    assert predictor.segment_text(None, ["a unicorn", "a cat"])[0]["phrase"] == "a cat"
    assert not [r for r in predictor.segment_text(None, ["a unicorn", "a cat", "a dog"]) if r["phrase"] == "a unicorn"]
    s = scene(objects={})  # a scene of background only: a phrase alone finds nothing
    assert predictor.segment_text(None, ["a unicorn"]) == [] and predictor.segment_text(None, "a cat") == []
    assert s.calls == []  # no prompt reached the decoder


def test_bad_phrases_and_parameters_are_one_value_error(predictor):
    image = np.zeros((H, W, 3), np.uint8)
    cases = [([], "the list is empty"), ([""], r"phrases\[0\] is empty"), (["a cat", "  "], r"phrases\[1\] is empty"),
             ([f"thing {i}" for i in range(10_000)], f"10000 phrases in one call; at most {MAX_PHRASES}"),
             ([1, 2], r"phrases\[0\] must be a string, got int"), (None, "got NoneType"),
             (b"a cat", "got bytes"), (["a cat", "a cat"], r"phrases repeat: \['a cat'\]"),
             (["x" * 301], "at most 300")]
    for phrases, match in cases:
        with pytest.raises(ValueError, match=match):
            predictor.segment_text(image, phrases)
    for params, match in [(dict(threshold=1.5), r"threshold 1.5: must be a number in \[0, 1\]"),
                          (dict(nms_thresh=float("nan")), "nms_thresh nan: must be a number"),
                          (dict(max_peaks=0), "max_peaks 0: must be an integer in"),
                          (dict(output_mode="png"), "output_mode must be one of"),
                          (dict(background=()), "background must name"),
                          (dict(thresh=0.5), r"unknown parameters \['thresh'\]")]:
        with pytest.raises(ValueError, match=match):
            predictor.segment_text(image, ["a cat"], **params)
    fresh = SAMCLIPPredictor(predictor.model, device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.segment_text(None, ["a cat"])


def test_mask_nms_drops_contained_masks_of_the_same_phrase_only():
    m = torch.zeros(4, 10, 10, dtype=torch.bool)
    m[0, :, :6] = True  # whole
    m[1, :, :3] = True  # its left half: IoU 0.5, but all inside
    m[2, :, :3] = True  # the same half, another phrase
    m[3, :, 5:] = True  # a neighbour overlapping by 1 column of 5 (0.2)
    keep = mask_nms(m, torch.tensor([0.9, 0.95, 0.5, 0.8]), torch.tensor([0, 0, 1, 0]), 0.5)
    assert keep.tolist() == [1, 3, 2]  # the half outscored its whole, which it suppresses
    assert mask_nms(m, torch.tensor([0.9, 0.8, 0.5, 0.7]), torch.tensor([0, 0, 1, 0]), 0.5).tolist() == [0, 3, 2]
    assert mask_nms(m[:0], torch.zeros(0), torch.zeros(0), 0.5).tolist() == []


def test_one_backbone_pass_and_batches_that_do_not_change_the_answer(predictor, monkeypatch):
    image = np.asarray(sample_image("chelsea")[::3, ::3])
    enc = predictor.model.image_encoder
    calls = []
    original = enc.forward_features
    monkeypatch.setattr(enc, "forward_features", lambda x: calls.append(1) or original(x))
    # Random weights: thresholds off, so every peak and region becomes a scored mask.
    kw = dict(threshold=0.0, score_threshold=0.0, max_peaks=4, templates="simple")
    phrases = ["a cat", "a dog", "grass"]
    out = predictor.segment_text(image, phrases, **kw)
    assert len(calls) == 1 and predictor.is_image_set and predictor.original_size == image.shape[:2]
    again = predictor.segment_text(None, phrases, points_per_batch=1, **kw)
    assert len(calls) == 1  # the current image's pass, not a second
    assert len(out) > 3 and {r["phrase"] for r in out} <= set(phrases)
    (ih, iw), (oh, ow) = predictor.input_size, image.shape[:2]
    points = [r["prompt"]["point"] for r in out if "point" in r["prompt"]]
    assert points and ow != iw
    for x, y in points:  # in original pixels: mapped to the input frame, a patch centre (inside the image)
        assert abs((x * iw / ow) % 16 - 8) < 0.1 or x * iw / ow > iw - 16
        assert abs((y * ih / oh) % 16 - 8) < 0.1 or y * ih / oh > ih - 16
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in out], abs=1e-5)
    for a, b in zip(out, again):
        assert np.array_equal(a["segmentation"], b["segmentation"]) and a["prompt"] == b["prompt"]
    rle = predictor.segment_text(None, phrases, output_mode="coco_rle", **kw)
    mask_util = pytest.importorskip("pycocotools.mask")
    for a, b in zip(out, rle):
        assert np.array_equal(mask_util.decode(b["segmentation"]).astype(bool), a["segmentation"])
    # Phrases share the text encodings across calls: a second call encodes only its new phrase.
    seen = []
    enc_text = predictor.model.encode_text
    monkeypatch.setattr(predictor.model, "encode_text", lambda t, **k: seen.append(len(t)) or enc_text(t, **k))
    predictor.segment_text(None, ["a cat", "a bird"], **kw)
    assert seen == [7]  # "a bird" in the 7 simple templates, nothing else


def test_text_cache_is_per_name_and_bounded(predictor, monkeypatch):
    text = TextEmbeddings(predictor.model, predictor.device, max_cached=3)
    seen = []
    enc_text = predictor.model.encode_text
    monkeypatch.setattr(predictor.model, "encode_text", lambda t, **k: seen.append(len(t)) or enc_text(t, **k))
    ab = text(["a", "b"], "simple")
    bc = text(["b", "c"], "simple")
    assert seen == [14, 7] and torch.equal(ab[1], bc[0])  # "b" computed once, reused
    text(["a"], "simple")  # used again: now the most recent
    text(["d"], "simple")
    assert seen == [14, 7, 7]
    assert list(text._cache) == [("c", "simple"), ("a", "simple"), ("d", "simple")]  # "b", least recent, went
    assert torch.allclose(F.normalize(text(["b"], "simple"), dim=-1), ab[1:], atol=1e-6)  # recomputed the same


# ------------------------------------------------------------------------------------ the command
def test_predict_text_writes_every_instance_as_coco_rle_and_an_outlined_overlay(predictor, tmp_path, capsys):
    ckpt = tmp_path / "merged.safetensors"
    save_merged(predictor.model, str(ckpt))
    image = tmp_path / "chelsea.png"
    Image.fromarray(sample_image("chelsea")[::3, ::3]).save(image)
    out = tmp_path / "out"
    rc = main(["predict", str(image), "--checkpoint", str(ckpt), "--dtype", "fp32", "--text", "a cat", "--text",
               "grass", "--text-threshold", "0", "--text-score-threshold", "0", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert {"chelsea.json", "chelsea_text.png"} <= set(os.listdir(out))
    rep = json.loads((out / "chelsea.json").read_text())["text"]
    assert rep["phrases"] == ["a cat", "grass"] and rep["background"] == ["background"]
    want = predictor.segment_text(np.asarray(Image.open(image)), ["a cat", "grass"], threshold=0.0, score_threshold=0.0,
                                  output_mode="coco_rle")
    assert len(rep["instances"]) == len(want) > 2 and sum(rep["counts"].values()) == len(want)
    for got, ref in zip(rep["instances"], want):
        assert got["segmentation"] == ref["segmentation"] and got["phrase"] == ref["phrase"]
        assert got["bbox"] == ref["bbox"] and got["score"] == pytest.approx(ref["score"], abs=1e-5)
    assert f"{len(want)} instances of 2 phrases" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--text", ""], r"--text\[0\] is empty"),
    ([a for i in range(300) for a in ("--text", f"thing {i}")], "300 phrases in one call"),
    (["--text", "a cat", "--text", "a cat"], "repeat"),
    (["--text", "a cat", "--text-threshold", "2"], r"--text-threshold 2.0: must be a number in \[0, 1\]"),
    (["--text", "a cat", "--background", " , "], "background must name")])
def test_predict_bad_text_is_one_line_and_exit_2_before_loading(tmp_path, capsys, argv, match):
    rc = main(["predict", str(tmp_path / "none.png"), "--checkpoint", str(tmp_path / "missing.safetensors"), *argv,
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("predict: ") and err.count("\n") == 1 and re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_predict_text_options_default_to_segment_texts_own():
    """The parser leaves the text options unset (it imports no model code); predict fills them from
    ConceptParams, so the command's defaults are the API's."""
    base = ["predict", "x.png", "--checkpoint", "c.safetensors", "--out", "o", "--text", "a cat"]
    assert _concept_params(build_parser().parse_args(base)) == ConceptParams(output_mode="uncompressed_rle")
    given = _concept_params(build_parser().parse_args([*base, "--text-threshold", "0.25", "--text-score-threshold",
                                                       "0", "--background", "sky, grass,"]))
    assert (given.threshold, given.score_threshold, given.background) == (0.25, 0.0, ("sky", "grass"))


# ------------------------------------------------------------------------------------ the ONNX recipe
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_numpy_recipe_gives_segment_texts_peaks_and_phrase_scores(predictor):
    text = open(README).read()
    section = text[text.index("## Segment by text"):]
    section = section[section.index("**From the ONNX export,"):section.index("\n## ", 5)]
    scope = {}
    exec(compile(re.findall(r"```python\n(.*?)```", section, re.S)[0], "README.md (Segment by text)", "exec"), scope)
    image = np.asarray(sample_image("astronaut")[::5, ::4])  # 103 x 128: padding rows on the patch grid
    predictor.set_image(image)
    texts = ("a person", "a rocket", "background")
    emb = predictor.text_embeddings(texts, "simple")
    ih, iw = predictor.input_size
    vh, vw = -(-ih // 16), -(-iw // 16)
    probs = phrase_maps(predictor.clip_patches[0], emb, predictor.logit_scale())[:2, :vh, :vw]
    threshold = float(probs.median())  # random weights: a threshold with peaks above and patches below it
    peaks, _ = find_prompts(probs, threshold, 10**6, False)
    got = scope["where"](predictor.clip_patches.numpy(), emb.numpy(), predictor.logit_scale(), (vh, vw), 2, threshold)
    assert [sorted(map(tuple, g.tolist())) for g in got] == [sorted(pk) for pk in peaks]
    assert 0 < sum(map(len, peaks)) < vh * vw
    low, _ = predictor.decode(torch.tensor([[[40.0, 30.0]], [[100.0, 90.0]]]), torch.ones(2, 1, dtype=torch.int),
                              None, None, True)
    low = low.flatten(0, 1)
    valid = (-(-ih // 4), -(-iw // 4))
    weights = mask_patch_weights(low, (8, 8), valid)
    want, _ = name_masks(weights, predictor.clip_patches[0], emb, predictor.logit_scale())
    for m in range(low.shape[0]):
        if (low[m, :valid[0], :valid[1]] > 0).any():
            for k in range(2):
                np.testing.assert_allclose(scope["phrase_score"](low[m].numpy(), predictor.clip_patches.numpy(),
                                                                 emb.numpy(), predictor.logit_scale(), k, valid),
                                           float(want[m, k]), rtol=1e-4, atol=1e-6)
