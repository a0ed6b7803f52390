"""SAMCLIPPredictor and `fastsamclip predict`: every method against the parts run by hand, and
the promptable path against segment_anything's own SamPredictor with the teacher's weights."""

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsamclip.checkpoint import save_merged
from fastsamclip.cli import main
from fastsamclip.data.samples import sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.modeling import CheckpointError, load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.kernels import native_bf16
from fastsamclip.predictor import ImageReadError, SAMCLIPPredictor, engine, to_rgb_uint8
from fastsamclip.transforms import apply_boxes, apply_coords, clip_pixels, postprocess_masks, sam_pixels

from .helpers import assert_close_verbose

ATOL = 2e-4  # fp32, two implementations of the same network (different attention kernels)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    sam_path = write_sam_checkpoint(str(d / "sam_vit_tiny.pth"), "vit_tiny")
    sam = load_sam_teacher(sam_path, "vit_tiny")
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    merged = str(d / "merged.safetensors")
    save_merged(samclip_from_teachers(sam, clip, sam_config="vit_tiny"), merged)
    predictor = SAMCLIPPredictor(merged, device="cpu", dtype="fp32")  # exact comparisons; "auto" tested below
    # A non-square picture, downscaled so the tests stay fast (the resize still runs).
    image = np.asarray(Image.fromarray(sample_image("chelsea")).resize((150, 100), Image.BILINEAR))
    return {"dir": d, "sam": sam, "sam_path": sam_path, "merged": merged, "predictor": predictor, "image": image}


def _mask_agreement(a: np.ndarray, b: np.ndarray, logits: np.ndarray) -> None:
    """Bool masks equal except where the logit is within float noise of SAM's threshold 0."""
    differ = a != b
    assert not (differ & (np.abs(logits) > 1e-3)).any(), f"{int(differ.sum())} mask pixels differ"


def test_set_image_is_one_pass_and_caches_both_heads(setup, monkeypatch):
    p, image = setup["predictor"], setup["image"]
    enc = p.model.image_encoder
    calls = []
    original = enc.forward_features
    monkeypatch.setattr(enc, "forward_features", lambda x: calls.append(tuple(x.shape)) or original(x))
    p.set_image(image)
    assert calls == [(1, 3, 128, 128)]  # ONE pass, native size
    monkeypatch.undo()
    x, hw = sam_pixels(image, 128)
    with torch.no_grad():
        ref = p.model(p.model.preprocess(x[None], hw), clip=True, sam=True, clip_patches=True)
    assert p.original_size == (100, 150) and p.input_size == hw == (85, 128)
    assert_close_verbose(p.features, ref["sam"], 0, 0, "sam embeddings")
    assert_close_verbose(p.clip_embedding, ref["clip"], 0, 0, "pooled clip")
    assert_close_verbose(p.clip_patches, ref["clip_patches"], 0, 0, "per-patch clip")
    p.reset_image()
    assert not p.is_image_set and p.features is None
    with pytest.raises(RuntimeError, match="set_image"):
        p.segment(points=[[10, 10]])


def test_token_pooled_clip_path_in_the_predictor(setup):
    # One pass: the SAM side as with all tokens, the CLIP head on 2 x 2-pooled tokens, its
    # per-patch map repeated over each cell's patches so every caller keeps the patch grid.
    full, image = setup["predictor"], setup["image"]
    p = SAMCLIPPredictor(full.model, device="cpu", clip_token_pool=2)
    p.set_image(image)
    full.set_image(image)
    x, hw = sam_pixels(image, 128)
    with torch.no_grad():
        ref = p.model(p.model.preprocess(x[None], hw), clip=True, sam=True, clip_patches=True, clip_token_pool=2)
    assert torch.equal(p.features, full.features)
    assert_close_verbose(p.clip_embedding, ref["clip"], 0, 0, "pooled-path clip")
    assert p.clip_patches.shape == full.clip_patches.shape == (1, 8, 8, ref["clip_patches"].shape[-1])
    for i, j in ((0, 0), (3, 5), (7, 7)):
        assert torch.equal(p.clip_patches[0, i, j], ref["clip_patches"][0, i // 2, j // 2]), (i, j)
    res = p.semantic_segment(image, ["cat", "dog", "grass"], mode="composed")
    assert res.label_map.shape == image.shape[:2]
    with pytest.raises(ValueError, match="clip_token_pool must be a positive integer"):
        SAMCLIPPredictor(full.model, device="cpu", clip_token_pool=0)


def test_segment_equals_segment_anything_predictor(setup):
    from segment_anything import SamPredictor

    p, image, sam = setup["predictor"], setup["image"], setup["sam"]
    ref = SamPredictor(sam)
    assert ref.transform.target_length == 128  # it uses the encoder's own size, like ours
    ref.set_image(image)
    p.set_image(image)
    pts, lab = np.array([[40.0, 30.0], [110.0, 70.0]]), np.array([1, 0])
    box = np.array([20.0, 10.0, 130.0, 90.0])
    cases = [dict(point_coords=pts, point_labels=lab, multimask_output=True),
             dict(box=box, multimask_output=False),
             dict(point_coords=pts[:1], point_labels=lab[:1], box=box, multimask_output=True)]
    for kw in cases:
        m_ref, s_ref, low_ref = ref.predict(**kw)
        mine = dict(points=kw.get("point_coords"), point_labels=kw.get("point_labels"), boxes=kw.get("box"))
        m, s, low = p.segment(**mine, multimask_output=kw["multimask_output"])
        logits, _, _ = p.segment(**mine, multimask_output=kw["multimask_output"], return_logits=True)
        assert m.shape == (1, *m_ref.shape) and m.dtype == bool and m.shape[-2:] == (100, 150)
        assert_close_verbose(torch.from_numpy(low[0]), torch.from_numpy(low_ref), ATOL, ATOL, f"low-res {list(kw)}")
        assert_close_verbose(torch.from_numpy(s[0]), torch.from_numpy(s_ref), ATOL, ATOL, f"scores {list(kw)}")
        _mask_agreement(m[0], m_ref, logits[0])
        assert m_ref.any() and not m_ref.all(), "degenerate reference mask would make this test vacuous"
    # A mask prompt from the previous low-res output, as SamPredictor users feed it back.
    m_ref, s_ref, low_ref2 = ref.predict(point_coords=pts, point_labels=lab, mask_input=low_ref[:1],
                                         multimask_output=False)
    m, s, low2 = p.segment(points=pts, point_labels=lab, mask_input=low[0, :1], multimask_output=False)
    assert_close_verbose(torch.from_numpy(low2[0]), torch.from_numpy(low_ref2), ATOL, ATOL, "mask prompt")
    # Batched: P boxes at once equals predict_torch with the same boxes.
    boxes = np.array([[20.0, 10.0, 130.0, 90.0], [0, 0, 150, 100], [60.5, 20.25, 90, 99]])
    tb = ref.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), image.shape[:2])
    _, s_ref, low_ref = ref.predict_torch(None, None, boxes=tb, multimask_output=True)
    m, s, low = p.segment(boxes=boxes)
    assert m.shape == (3, 3, 100, 150)
    assert_close_verbose(torch.from_numpy(low), low_ref, ATOL, ATOL, "batched boxes")


def test_segment_equals_predict_masks_by_hand(setup):
    p, image = setup["predictor"], setup["image"]
    p.set_image(image)
    pts = np.array([[[40.0, 30.0]], [[149.0, 99.0]]])  # two prompts, the second at the far corner
    m, s, low = p.segment(points=pts, point_labels=np.ones((2, 1)), return_logits=True)
    coords = torch.as_tensor(apply_coords(pts, (100, 150), 128), dtype=torch.float)
    with torch.no_grad():
        low_ref, s_ref = p.model.predict_masks(p.features, (128, 128), points=(coords, torch.ones(2, 1, dtype=torch.int)))
    full = F.interpolate(F.interpolate(low_ref, (128, 128), mode="bilinear")[..., :85, :128], (100, 150),
                         mode="bilinear")
    assert_close_verbose(torch.from_numpy(low), low_ref, 0, 0, "low-res")
    assert_close_verbose(torch.from_numpy(s), s_ref, 0, 0, "scores")
    assert_close_verbose(torch.from_numpy(m), full, 1e-5, 1e-5, "postprocessed logits")
    bx = torch.tensor([[10.0, 5, 100, 80]])
    _, _, low_b = p.segment(boxes=bx, multimask_output=False)
    with torch.no_grad():
        low_bref, _ = p.model.predict_masks(p.features, (128, 128), boxes=apply_boxes(bx, (100, 150), 128),
                                            multimask_output=False)
    assert_close_verbose(torch.from_numpy(low_b), low_bref, 1e-6, 1e-6, "box prompt")


@pytest.mark.parametrize("kwargs, match", [
    (dict(points=[[151.0, 10.0]]), r"point 0 of prompt 0 at \(x=151, y=10\) is outside the image of 150x100"),
    (dict(points=[[[5.0, 5.0], [5.0, -1.0]]]), r"point 1 of prompt 0 .* outside"),
    (dict(boxes=[[0, 0, 10, 10], [0, 0, 10, 101]]), r"box corner 1 of prompt 1 .* outside the image of 150x100"),
    (dict(boxes=[10, 10, 5, 20]), "x1 < x0"),
    (dict(points=[[1.0, 1.0]], point_labels=[2]), "point labels"),
    (dict(points=np.ones((2, 1, 2)), boxes=np.ones((3, 4))), "batch sizes differ"),
    (dict(), "at least one prompt"),
])
def test_bad_prompts_are_refused_clearly(setup, kwargs, match):
    p = setup["predictor"]
    p.set_image(setup["image"])
    with pytest.raises(ValueError, match=match):
        p.segment(**kwargs)
    # A padding point (label -1) may lie anywhere: SAM ignores it.
    p.segment(points=[[[5.0, 5.0], [-100.0, -100.0]]], point_labels=[[1, -1]])


def test_classify_and_embed_images_equal_the_parts_by_hand(setup):
    import open_clip.zero_shot_metadata as zsm

    p, image = setup["predictor"], setup["image"]
    labels = ["cat", "dog", "grass"]
    images = [image, image[:, ::-1].copy(), sample_image("astronaut")]
    probs = p.classify(images, labels, resolution=96, batch_size=2)  # 2 batches: 2 + 1
    m = p.model
    with torch.no_grad():
        tok = m.tokenizer([t(c) for c in labels for t in zsm.OPENAI_IMAGENET_TEMPLATES])
        text = F.normalize(m.encode_text(tok, normalize=True).view(3, 80, -1).mean(1), dim=-1)
        x = torch.stack([clip_pixels(im, 96) for im in images])  # CLIP geometry, as trained
        img = F.normalize(m(m.preprocess(x), sam=False)["clip"], dim=-1)
        ref = (m.text.logit_scale.exp() * img @ text.T).softmax(-1)
    assert probs.shape == (3, 3)
    assert_close_verbose(torch.from_numpy(probs), ref, 1e-4, 1e-4, "zero-shot probabilities")
    assert not np.allclose(probs[0], probs[2])  # different pictures, different answers
    # Text embeddings are cached per label tuple: a second call never tokenizes.
    def refuse(texts):
        raise AssertionError("tokenized again although the label tuple was cached")

    tokenizer, p.model._tokenizer = p.model._tokenizer, refuse
    try:
        assert np.allclose(p.classify(images[:1], labels, resolution=96), probs[:1], atol=1e-6)
    finally:
        p.model._tokenizer = tokenizer
    with pytest.raises(ValueError, match="empty"):
        p.classify(images, [])
    with pytest.raises(TypeError, match="list of class names"):
        p.classify(images, "cat,dog")

    out = p.embed_images(images, batch_size=2)
    views = [sam_pixels(im, 128) for im in images]
    with torch.no_grad():
        ref = m(m.preprocess(torch.stack([v for v, _ in views]), [hw for _, hw in views]),
                clip=True, sam=True, clip_patches=True)
    for k in ("sam", "clip", "clip_patches"):
        assert_close_verbose(out[k], ref[k], 1e-5, 1e-5, k)
    assert out["input_sizes"].tolist() == [[85, 128], [85, 128], [128, 128]]


def test_semantic_clip_mode_by_hand(setup):
    p, image = setup["predictor"], setup["image"]
    labels = ["cat", "dog", "grass"]
    res = p.semantic_segment(image, labels, mode="clip", resolution=96)
    text = p.text_embeddings(labels)
    x, hw = sam_pixels(image, 96)
    with torch.no_grad():
        patches = p.model(p.model.preprocess(x[None], hw), clip=False, sam=False, clip_patches=True)["clip_patches"][0]
    probs = (p.logit_scale() * F.normalize(patches, dim=-1) @ text.T).softmax(-1).permute(2, 0, 1)
    scores = postprocess_masks(probs[None], hw, (100, 150), 96)[0]
    assert res.label_map.shape == (100, 150) and res.scores.shape == (3, 100, 150)
    assert_close_verbose(torch.from_numpy(res.scores), scores, 1e-5, 1e-5, "clip score maps")
    assert (res.label_map == scores.argmax(0).numpy()).mean() > 0.999
    assert np.allclose(res.scores.sum(0), 1, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        p.semantic_segment(image, [], mode="clip")


def test_composed_mode_uses_the_sam_head(setup):
    p, image = setup["predictor"], setup["image"]
    labels = ["cat", "dog", "grass"]
    # threshold 0: every class prompts the SAM head (random weights give near-uniform scores).
    comp = p.semantic_segment(image, labels, mode="composed", threshold=0.0, points_per_class=3)
    clip = p.semantic_segment(image, labels, mode="clip", resolution=96)
    assert comp.prompted == [0, 1, 2] and comp.scores.shape == (3, 100, 150)
    for c, pts in comp.points.items():
        assert 1 <= len(pts) <= 3 and all(0 <= x <= 150 and 0 <= y <= 100 for x, y in pts)
    # The label map is the argmax of the class masks where one is positive, else background.
    logit = np.log(comp.scores) - np.log1p(-comp.scores)
    expect = np.where(logit.max(0) > 0, logit.argmax(0), -1)
    assert (comp.label_map == expect).mean() > 0.999

    other = SAMCLIPPredictor(copy.deepcopy(p.model), device="cpu")
    with torch.no_grad():
        for prm in other.model.mask_decoder.parameters():
            prm.add_(torch.randn_like(prm) * 0.2)
    comp2 = other.semantic_segment(image, labels, mode="composed", threshold=0.0)
    clip2 = other.semantic_segment(image, labels, mode="clip", resolution=96)
    assert np.abs(comp2.scores - comp.scores).max() > 1e-2  # the decoder shapes the composed output
    assert np.array_equal(clip2.scores, clip.scores) and np.array_equal(clip2.label_map, clip.label_map)
    # Nothing passes a threshold above 1: no prompt, all background, decoder not asked.
    none = p.semantic_segment(None, labels, mode="composed", threshold=1.01)
    assert none.prompted == [] and (none.label_map == -1).all() and not none.scores.any()


def test_composed_mode_prompts_the_sam_head_with_the_class_map_and_points_inside_it(setup, monkeypatch):
    """The SAM head gets, per prompted class, its coarse CLIP map as the mask prompt and points on
    that class's best patches: both recomputed here from the CLIP head's per-patch embeddings."""
    p, image = setup["predictor"], setup["image"]
    labels = ["cat", "dog", "grass"]
    calls = []
    real = p.decode

    def spy(coords, point_labels, boxes, masks, multimask_output):
        calls.append((coords.clone(), point_labels.clone(), boxes, masks))
        return real(coords, point_labels, boxes, masks, multimask_output)

    monkeypatch.setattr(p, "decode", spy)
    res = p.semantic_segment(image, labels, mode="composed", threshold=0.3, points_per_class=3)
    assert len(calls) == 1 and res.prompted
    coords, plabels, boxes, masks = calls[0]
    assert boxes is None and masks is not None and masks.shape == (len(res.prompted), 1, 32, 32)
    # The class maps, independently: softmax over classes of scale * cos(patch, class text).
    text = p.text_embeddings(labels)
    cos = F.normalize(p.clip_patches[0].float(), dim=-1) @ text.T  # (8, 8, L)
    probs = (p.logit_scale() * cos).softmax(-1).permute(2, 0, 1)
    vh, vw = (-(-s // 16) for s in p.input_size)  # patches holding image pixels
    for k, c in enumerate(res.prompted):
        cls = probs[c].clone()
        cls[vh:], cls[:, vw:] = 0.0, 0.0  # the padding carries no class
        up = F.interpolate(cls[None, None], scale_factor=4, mode="bilinear", align_corners=False)[0, 0]
        assert_close_verbose(masks[k, 0], torch.logit(up, eps=1e-3), 1e-5, 1e-5, f"mask prompt of {labels[c]}")
        valid = probs[c, :vh, :vw]
        pts = coords[k][plabels[k] == 1]
        assert len(pts) >= 1
        best = set(torch.argsort(valid.flatten(), descending=True)[:8].tolist())
        for x, y in pts.tolist():
            r, q = int(y // 16), int(x // 16)
            assert r < vh and q < vw, (x, y)  # inside the image
            assert r * vw + q in best and valid[r, q] >= 0.3, (labels[c], x, y)  # on the class's region


@pytest.mark.parametrize("kind", ["gray", "gray1", "rgba", "uint16", "float", "tiny", "tall", "pil_i16"])
def test_awkward_images(setup, kind):
    p = setup["predictor"]
    rgb = setup["image"]
    gray = rgb[..., 0]
    image, expect_rgb = {
        "gray": (gray, np.stack([gray] * 3, -1)),
        "gray1": (gray[..., None], np.stack([gray] * 3, -1)),
        "rgba": (np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], -1), rgb),
        "uint16": (rgb.astype(np.uint16) * 257, rgb),
        "float": (rgb / 255.0, rgb),
        "tiny": (rgb[:8, :8], rgb[:8, :8]),
        "tall": (rgb[:, :20], rgb[:, :20]),
        "pil_i16": (Image.fromarray(gray.astype(np.uint16) * 257), np.stack([gray] * 3, -1)),
    }[kind]
    assert np.array_equal(to_rgb_uint8(image), expect_rgb)
    p.set_image(image)
    h, w = expect_rgb.shape[:2]
    m, s, low = p.segment(points=[[w / 2, h / 2]], boxes=[0, 0, w, h])
    assert m.shape == (1, 3, h, w) and s.shape == (1, 3) and low.shape == (1, 3, 32, 32)
    ref = SAMCLIPPredictor(p.model, device="cpu")
    ref.set_image(expect_rgb)
    assert torch.equal(ref.features, p.features)  # the conversion is the only difference


def test_bad_files_and_checkpoints(setup, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        setup["predictor"].set_image(str(bad))
    with pytest.raises(ImageReadError, match="no such file"):
        to_rgb_uint8(str(tmp_path / "missing.jpg"))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(CheckpointError, match="fastsamclip merge"):
        SAMCLIPPredictor(setup["sam_path"])  # the SAM teacher's .pth is not a merged checkpoint


def test_compile_hook_matches_eager(setup):
    p = SAMCLIPPredictor(setup["predictor"].model, device="cpu", compile=True, compile_backend="aot_eager")
    p.set_image(setup["image"])
    e = setup["predictor"]
    e.set_image(setup["image"])
    assert_close_verbose(p.features, e.features, 1e-5, 1e-5, "compiled sam embeddings")
    assert len(p._compiled) == 1


def test_warmup_compiles_each_case_once_ahead_of_requests(setup, tmp_path, monkeypatch):
    before = str(tmp_path / "process-cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)  # restored after the test
    seen = []

    def backend(gm, example_inputs):  # a compiler that notes where Inductor would keep its cache
        seen.append(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return gm.forward

    p = SAMCLIPPredictor(setup["predictor"].model, device="cpu", compile=True, compile_backend=backend,
                         cache_dir=str(tmp_path / "inductor"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == before  # the process's setting is left alone
    times = p.warmup(resolutions=(64, 128), batch_sizes=(1, 2), outputs=("set_image", "clip"))
    # Each compile ran with the predictor's cache folder; the variable is restored after.
    assert len(seen) == 8 and set(seen) == {str(tmp_path / "inductor")}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == before
    assert sorted(times) == sorted(f"{o} {r}px batch {b}" for o in ("set_image", "clip")
                                   for r in (64, 128) for b in (1, 2))
    assert all(t > 0 for t in times.values())
    assert len(p._compiled) == 8
    p.set_image(setup["image"])  # the native 128 px batch-1 graph is reused, not compiled again
    assert len(p._compiled) == 8 and len(seen) == 8
    with pytest.raises(ValueError, match="not a multiple of 16"):
        p.warmup(resolutions=(100,))
    with pytest.raises(ValueError, match="warmup outputs must be among"):
        p.warmup(outputs=("everything",))


def test_gpu_preprocess_needs_cuda(setup):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="gpu_preprocess=True needs a CUDA device"):
        SAMCLIPPredictor(setup["predictor"].model, device="cpu", gpu_preprocess=True)


def test_dtype_defaults_and_low_precision_agrees_with_fp32(setup, monkeypatch):
    """dtype="auto" for a checkpoint is bf16 on CUDA and on a CPU with native bf16, else fp32; a
    model object keeps its dtype. bf16 / fp16 run the image side in that dtype, hand back fp32,
    keep the SAM decoder in fp32, and agree with fp32 to their precision."""
    model = setup["predictor"].model
    assert setup["predictor"].dtype == torch.float32
    assert next(model.image_encoder.parameters()).dtype == torch.float32
    here = torch.bfloat16 if native_bf16() is not None else torch.float32
    assert SAMCLIPPredictor(setup["merged"], device="cpu").dtype == here
    for isa, want in ((None, torch.float32), ("AMX-BF16", torch.bfloat16)):
        monkeypatch.setattr(engine, "native_bf16", lambda isa=isa: isa)
        assert SAMCLIPPredictor(setup["merged"], device="cpu").dtype == want, isa
        held = copy.deepcopy(model)
        assert SAMCLIPPredictor(held, device="cpu").dtype == torch.float32  # never cast unasked
        assert next(held.image_encoder.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        SAMCLIPPredictor(copy.deepcopy(model), device="cpu", dtype="int8")
    image = setup["image"]
    ref = SAMCLIPPredictor(copy.deepcopy(model), device="cpu", dtype="fp32")
    ref.set_image(image)
    box = [[20, 15, 120, 90]]
    ref_masks, _, ref_low = ref.segment(boxes=box, multimask_output=False)
    ref_probs = ref.classify([image], ["cat", "dog", "grass"])
    for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = SAMCLIPPredictor(copy.deepcopy(model), device="cpu", dtype=name)
        assert p.dtype == dt and next(p.model.image_encoder.parameters()).dtype == dt
        assert next(p.model.clip_head.parameters()).dtype == dt
        assert next(p.model.mask_decoder.parameters()).dtype == torch.float32
        p.set_image(image)
        assert p.features.dtype == p.clip_embedding.dtype == torch.float32
        err = ((p.features - ref.features).abs().max() / ref.features.abs().max()).item()
        assert err < (5e-2 if dt == torch.bfloat16 else 1e-2), f"{name}: SAM embedding rel err {err:.3g}"
        cos = F.cosine_similarity(p.clip_embedding, ref.clip_embedding).min().item()
        assert cos > 0.995, f"{name}: CLIP embedding cosine {cos:.4f}"
        masks, _, low = p.segment(boxes=box, multimask_output=False)
        iou = (masks & ref_masks).sum() / max(1, (masks | ref_masks).sum())
        assert iou > 0.9 or np.abs(ref_low).max() < 0.05, f"{name}: mask IoU {iou:.3f} against fp32"
        np.testing.assert_allclose(p.classify([image], ["cat", "dog", "grass"]), ref_probs, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_preprocess_and_cuda_graphs_agree_with_eager(setup):
    model = setup["predictor"].model
    eager = SAMCLIPPredictor(model, device="cuda")
    eager.set_image(setup["image"])
    fast = SAMCLIPPredictor(model, device="cuda", compile=True, gpu_preprocess=True)
    fast.warmup()
    fast.set_image(setup["image"])
    # Bilinear without antialias vs PIL: small input differences, same image.
    assert (fast.features - eager.features).abs().max() < 0.1 * eager.features.abs().max()


def test_cli_predict_writes_the_files(setup, tmp_path, capsys):
    img = tmp_path / "coffee.png"
    Image.fromarray(np.asarray(Image.fromarray(sample_image("coffee")).resize((120, 90)))).save(img)
    out = tmp_path / "out"
    rc = main(["predict", str(img), "--checkpoint", setup["merged"], "--labels", "cup, table,spoon",
               "--points", "60,45", "10,10", "--boxes", "5,5,100,80", "--mode", "composed", "--threshold", "0",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = set(os.listdir(out))
    for f in ("coffee_point0.png", "coffee_point1.png", "coffee_box0.png", "coffee_overlay.png",
              "coffee_semantic.png", "coffee_semantic_labels.png", "coffee.json"):
        assert f in names, names
    assert np.asarray(Image.open(out / "coffee_point0.png")).shape == (90, 120)
    rep = json.loads((out / "coffee.json").read_text())
    assert rep["labels"] == ["cup", "table", "spoon"]
    assert abs(sum(rep["classification"].values()) - 1) < 1e-5
    assert len(rep["prompts"]) == 3 and len(rep["prompts"][0]["scores"]) == 3
    for stage in ("read", "set_image", "segment", "classify", "semantic_segment", "load_checkpoint"):
        assert rep["timings_ms"][stage] >= 0
    labels_png = np.asarray(Image.open(out / "coffee_semantic_labels.png"))
    assert labels_png.shape == (90, 120) and labels_png.max() <= 3


@pytest.mark.parametrize("case, match", [
    ("unreadable", "cannot read image"),
    ("outside", "outside the image of 120x90"),
    ("empty_labels", "names no class"),
    ("not_merged", "not a merged fastsamclip checkpoint"),
    ("bad_point", "expected 2 comma-separated numbers"),
])
def test_cli_predict_errors_are_one_line(setup, tmp_path, capsys, case, match):
    img = tmp_path / "pic.png"
    Image.fromarray(setup["image"][:90, :120]).save(img)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    args = {"unreadable": [str(bad), "--points", "1,1"],
            "outside": [str(img), "--points", "121,5"],
            "empty_labels": [str(img), "--labels", " , "],
            "not_merged": [str(img), "--points", "1,1"],
            "bad_point": [str(img), "--points", "1;1"]}[case]
    ckpt = setup["sam_path"] if case == "not_merged" else setup["merged"]
    rc = main(["predict", *args, "--checkpoint", ckpt, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("predict: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
