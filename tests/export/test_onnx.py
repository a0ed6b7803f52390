"""`fastsamclip export --format onnx --labels`: both ONNX files in onnxruntime against the torch
model, the decoder against segment_anything's own exported decoder on the same weights, the
README's onnxruntime example against the predictor, and the label embeddings file."""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel

from fastsamclip.cli import main
from fastsamclip.export import DECODER_INPUTS, DECODER_OUTPUTS, load_text_embeddings, max_rel_err, zero_shot_probs
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.transforms import sam_pixels

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional (extra 'export'); CI installs it")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript (extra 'export')")

RTOL = 1e-4  # max |ort - torch| / max |torch|, fp32 (the bound; measured ~1e-6)
LABELS = ["cat", "dog", "grass"]
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


@pytest.fixture(scope="module")
def exported(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--checkpoint", micro["merged"], "--format", "onnx", "--labels", ",".join(LABELS),
                 "--out", str(out)]) == 0
    predictor = SAMCLIPPredictor(micro["merged"], device="cpu", dtype="fp32")  # the files are fp32
    return {"out": str(out), "meta": json.load(open(out / "export.json")), "predictor": predictor, **micro}


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_files_and_metadata(exported):
    meta = exported["meta"]["onnx"]
    assert meta["encoder"]["opset"] == 18 and meta["decoder"]["opset"] == 17
    enc = _session(os.path.join(exported["out"], "encoder.onnx"))
    assert [i.name for i in enc.get_inputs()] == ["image"]
    assert enc.get_inputs()[0].shape[0] == "batch" and enc.get_inputs()[0].shape[1:] == [3, 64, 64]
    assert [o.name for o in enc.get_outputs()] == ["sam_embedding", "clip_embedding", "clip_patches"]
    dec = _session(os.path.join(exported["out"], "decoder.onnx"))
    assert tuple(i.name for i in dec.get_inputs()) == DECODER_INPUTS
    assert tuple(o.name for o in dec.get_outputs()) == DECODER_OUTPUTS
    # The export checked itself in onnxruntime and wrote the errors down.
    errors = meta["verified"]["max_rel_err"]
    assert set(errors) == {"sam_embedding", "clip_embedding", "clip_patches", *DECODER_OUTPUTS}
    assert max(errors.values()) < RTOL, errors
    assert not os.path.exists(os.path.join(exported["out"], "encoder.onnx.data"))  # small: weights inline


def test_encoder_equals_the_predictor_on_a_picture_batch(exported):
    """Three real pictures through the predictor's own preprocessing: dynamic batch, same outputs."""
    p = exported["predictor"]
    images = [exported["image"], exported["image"][::-1, ::2].copy(), exported["image"][:200, :120].copy()]
    ref = p.embed_images(images)
    prepped = [sam_pixels(im, p.img_size) for im in images]
    x = p.model.preprocess(torch.stack([q[0] for q in prepped]), [q[1] for q in prepped])
    sam, clip, patches = _session(os.path.join(exported["out"], "encoder.onnx")).run(None, {"image": x.numpy()})
    for name, got, want in (("sam", sam, ref["sam"]), ("clip", clip, ref["clip"]), ("patches", patches, ref["clip_patches"])):
        err = max_rel_err(got, want)
        assert err < RTOL, f"{name}: max relative error {err:.2e}"


def _upstream_decoder(sam, path):
    """segment_anything's scripts/export_onnx_model.py, as its main() exports (return_single_mask)."""
    onnx_model = SamOnnxModel(model=sam, return_single_mask=True, use_stability_score=False,
                              return_extra_metrics=False)
    embed_dim = sam.prompt_encoder.embed_dim
    embed_size = sam.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    dummy_inputs = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(onnx_model, tuple(dummy_inputs.values()), path, export_params=True, verbose=False,
                          opset_version=17, do_constant_folding=True, input_names=list(dummy_inputs),
                          output_names=["masks", "iou_predictions", "low_res_masks"],
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          dynamo=False)


def test_decoder_equals_segment_anythings_own_export(exported, tmp_path):
    """Same weights (the merged model's SAM side is the teacher at initialisation), same inputs."""
    upstream = str(tmp_path / "sam_decoder.onnx")
    _upstream_decoder(exported["sam"], upstream)
    ours, theirs = _session(os.path.join(exported["out"], "decoder.onnx")), _session(upstream)
    rng = np.random.default_rng(0)
    g = exported["meta"]["onnx"]["encoder"]["grid"]
    emb = rng.standard_normal((1, 16, g, g)).astype(np.float32)
    cases = [  # points with SAM's padding point; a box; box + point; a mask prompt
        (np.array([[[10.0, 20.0], [40.0, 30.0], [0.0, 0.0]]]), np.array([[1, 0, -1]])),
        (np.array([[[5.0, 8.0], [50.0, 40.0]]]), np.array([[2, 3]])),
        (np.array([[[30.0, 30.0], [5.0, 8.0], [50.0, 40.0]]]), np.array([[1, 2, 3]])),
    ]
    for k, (coords, labels) in enumerate(cases + [cases[0]]):
        has_mask = np.array([1.0 if k == 3 else 0.0], np.float32)
        feeds = {"image_embeddings": emb, "point_coords": coords.astype(np.float32),
                 "point_labels": labels.astype(np.float32),
                 "mask_input": rng.standard_normal((1, 1, 4 * g, 4 * g)).astype(np.float32),
                 "has_mask_input": has_mask, "orig_im_size": np.array([300, 451], np.float32)}
        a, b = ours.run(None, feeds), theirs.run(None, feeds)
        for name, x, y in zip(DECODER_OUTPUTS, a, b):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            assert max_rel_err(x, y) < 1e-5, f"case {k} {name}: {max_rel_err(x, y):.2e}"


def _readme_snippet() -> str:
    text = open(README).read()
    section = text[text.index("## Export"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Export section has one Python example"
    return blocks[0]


def test_readme_onnxruntime_example_segments_and_classifies_like_the_predictor(exported, capsys):
    code = _readme_snippet()
    assert len(code.strip().splitlines()) <= 16
    code = code.replace("deploy/", exported["out"] + "/").replace("photo.jpg", exported["photo"])
    scope = {}
    exec(compile(code, "README.md (Export)", "exec"), scope)
    assert "mask:" in capsys.readouterr().out
    p = exported["predictor"]
    p.set_image(exported["image"])
    masks, scores, _ = p.segment(boxes=[100, 80, 400, 290], multimask_output=True, return_logits=True)
    best = int(scores[0].argmax())  # SamOnnxModel's single-mask rule for two points (a box): best IoU
    onnx_logits = scope["masks"][0, 0]
    assert max_rel_err(onnx_logits, masks[0, best]) < RTOL
    assert abs(float(scope["iou"][0, 0]) - float(scores[0, best])) < 1e-5
    clip = p.embed_images(exported["image"])["clip"]
    text = load_text_embeddings(os.path.join(exported["out"], "text_embeddings.npz"))
    np.testing.assert_allclose(scope["probs"], zero_shot_probs(clip.numpy(), text)[0], atol=1e-5)


def test_text_embeddings_file_equals_the_predictors(exported):
    p = exported["predictor"]
    data = load_text_embeddings(os.path.join(exported["out"], "text_embeddings.npz"))
    assert data["labels"] == LABELS and data["templates"] == "openai"
    np.testing.assert_allclose(data["embeddings"], p.text_embeddings(LABELS).numpy(), atol=1e-6)
    assert data["logit_scale"] == pytest.approx(p.logit_scale())
    assert exported["meta"]["labels"]["labels"] == LABELS
    # The file reads with numpy alone, no pickle.
    with np.load(os.path.join(exported["out"], "text_embeddings.npz"), allow_pickle=False) as f:
        assert f["embeddings"].dtype == np.float32 and np.allclose(np.linalg.norm(f["embeddings"], axis=1), 1)


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to export"),
    (["--format", "onnx", "--resolution", "64", "128"], "one --resolution"),
    (["--labels", " , "], "names no class"),
    (["--format", "onnx", "--resolution", "100"], "multiple of the patch size 16"),
])
def test_bad_export_arguments_are_one_line_and_exit_2(exported, tmp_path, capsys, argv, message):
    assert main(["export", "--checkpoint", exported["merged"], "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
