"""The bad-input and fault campaign, kept: the Python API's cases and the checkpoint's integrity.
Each case gave a wrong answer without a word (a damaged weight, weights that overflow, a NaN mask
prompt, a fractional grid, an unrotated JPEG) or a misleading traceback, before its fix."""

import json
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastsamclip.checkpoint import load_merged, save_merged
from fastsamclip.cli import main
from fastsamclip.errors import InputError, NonFiniteOutputError
from fastsamclip.modeling import CheckpointError
from fastsamclip.predictor import SAMCLIPPredictor
from fastsamclip.serve import Engine, Geometry, Limits, make_task
from fastsamclip.serve.requests import decode_image
from fastsamclip.transforms import to_rgb_uint8

from .export.conftest import session_micro_model

LABELS = ["cat", "dog"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return session_micro_model(tmp_path_factory)


@pytest.fixture(scope="module")
def predictor(micro):
    return SAMCLIPPredictor(micro["merged"], device="cpu", dtype="fp32")


def tensor_bytes(path: str, name: str):
    """(offset, size) of tensor ``name``'s bytes in a safetensors file (its header is JSON)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    start, end = header[name]["data_offsets"]
    return 8 + n + start, end - start


# ------------------------------------------------------------------------------- the integrity record
def test_a_flipped_byte_inside_a_weight_is_refused_naming_the_tensor(micro, tmp_path, capsys):
    path = str(tmp_path / "flipped.safetensors")
    data = bytearray(open(micro["merged"], "rb").read())
    offset, size = tensor_bytes(micro["merged"], "text.token_embedding.weight")
    data[offset + size // 2] ^= 0x10  # a mantissa bit: still a finite number, a different model
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="tensor text.token_embedding.weight does not match the file's "
                                              "integrity record"):
        load_merged(path)
    rc = main(["predict", micro["photo"], "--checkpoint", path, "--labels", "cat,dog", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "text.token_embedding.weight" in err, err


def test_a_checkpoint_without_the_record_loads_with_one_warning(micro, tmp_path, caplog):
    path = str(tmp_path / "old.safetensors")
    with safe_open(micro["merged"], framework="pt") as st:
        meta = {k: v for k, v in st.metadata().items() if k in ("format", "format_version", "config")}
    save_file(load_file(micro["merged"]), path, metadata=meta)  # as written before the record
    with caplog.at_level(logging.WARNING, logger="fastsamclip.checkpoint"):
        a = load_merged(path)
        load_merged(path)
    warned = [r for r in caplog.records if "no integrity record" in r.getMessage()]
    assert len(warned) == 1 and path in warned[0].getMessage()
    b = load_merged(micro["merged"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_weights_that_are_not_finite_are_never_written(micro, tmp_path):
    model = load_merged(micro["merged"])
    with torch.no_grad():
        model.clip_head.projection.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to write .*: tensor clip_head\S+ holds 1 NaN"):
        save_merged(model, str(tmp_path / "nan.safetensors"))
    assert not (tmp_path / "nan.safetensors").exists()


# ------------------------------------------------------------------------------- outputs that are not finite
@pytest.fixture(scope="module")
def overflowing(micro, tmp_path_factory):
    """A checkpoint of finite weights (3e38, near float32's largest) whose outputs overflow."""
    model = load_merged(micro["merged"])
    with torch.no_grad():
        model.image_encoder.patch_embed.proj.weight.fill_(3e38)
    path = str(tmp_path_factory.mktemp("overflow") / "overflow.safetensors")
    save_merged(model, path)
    return path


def test_outputs_that_are_not_finite_are_an_error_not_an_answer(micro, overflowing, tmp_path, capsys):
    p = SAMCLIPPredictor(overflowing, device="cpu", dtype="fp32")
    with pytest.raises(NonFiniteOutputError, match="holds NaN or Infinity"):
        p.classify(micro["image"], LABELS)
    with pytest.raises(NonFiniteOutputError):
        p.set_image(micro["image"])
    rc = main(["predict", micro["photo"], "--checkpoint", overflowing, "--labels", "cat,dog", "--device", "cpu",
               "--dtype", "fp32", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds NaN or Infinity" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_the_server_answers_a_json_500_for_an_overflowing_model(micro, overflowing):
    engine = Engine(SAMCLIPPredictor(overflowing, device="cpu", dtype="fp32"), max_batch=2)
    geometry = Geometry(img_size=64, patch_size=16)
    png = open(micro["photo"], "rb").read()
    tasks = [make_task("classify", {"image": png, "labels": LABELS}, Limits(), geometry),
             make_task("segment", {"image": png, "boxes": [[10, 10, 60, 50]]}, Limits(), geometry)]
    for answer in engine.run(tasks):
        assert answer["status"] == 500 and "NaN or Infinity" in answer["error"]
        json.dumps(answer, allow_nan=False)


def test_a_decoder_that_overflows_is_an_error(micro):
    model = load_merged(micro["merged"])
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].weight.fill_(3e38)  # finite weights, scores overflow
        model.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(3e38)
    p = SAMCLIPPredictor(model, device="cpu")
    p.set_image(micro["image"])
    with pytest.raises(NonFiniteOutputError, match="mask decoder"):
        p.segment(boxes=[10, 10, 60, 50])


# ------------------------------------------------------------------------------- the API's bad input
def test_a_mask_prompt_of_nan_is_refused(predictor, micro):
    predictor.set_image(micro["image"])
    _, _, low = predictor.segment(boxes=[10, 10, 60, 50], multimask_output=False)
    with pytest.raises(InputError, match="mask_input holds NaN"):
        predictor.segment(boxes=[10, 10, 60, 50], mask_input=np.full_like(low, np.nan))


@pytest.mark.parametrize("params, match", [
    (dict(points_per_side=2.5), "points_per_side must be an integer, got 2.5"),
    (dict(points_per_side=True), "points_per_side must be an integer"),
    (dict(crop_n_layers=0.5), "crop_n_layers must be an integer"),
])
def test_generate_refuses_a_grid_it_cannot_build(predictor, micro, params, match):
    with pytest.raises(ValueError, match=match):
        predictor.generate(micro["image"], **params)


def test_semantic_segment_before_set_image_says_so(micro):
    p = SAMCLIPPredictor(micro["merged"], device="cpu", dtype="fp32")
    for mode in ("clip", "composed"):
        with pytest.raises(RuntimeError, match="no image is set: call set_image"):
            p.semantic_segment(None, LABELS, mode=mode)


@pytest.mark.parametrize("call, match", [
    (lambda p, im: p.semantic_segment(im, LABELS, mode="composed", threshold=float("nan")), "threshold nan"),
    (lambda p, im: p.classify(im, LABELS, resolution=0), "resolution 0"),
    (lambda p, im: p.classify(im, LABELS, resolution=40), "multiple of the patch size 16"),
    (lambda p, im: p.embed_images(im, resolution=-16), "resolution -16"),
    (lambda p, im: p.semantic_segment(im, LABELS, points_per_class=1.5, mode="composed"), "points_per_class 1.5"),
])
def test_numbers_of_the_api_are_checked_with_their_name(predictor, micro, call, match):
    with pytest.raises(InputError, match=match):
        call(predictor, micro["image"])


# ------------------------------------------------------------------------------- EXIF orientation
def test_a_rotated_jpeg_is_read_as_viewed_and_prompted_in_that_frame(predictor, micro, tmp_path):
    stored = np.ascontiguousarray(micro["image"][:120, :200])  # 200 x 120 (W x H) as stored
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a phone's portrait photo
    path = str(tmp_path / "portrait.jpg")
    im.save(path, exif=exif.tobytes(), quality=95)
    viewed = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    got = to_rgb_uint8(path)
    assert got.shape == (200, 120, 3) and np.array_equal(got, viewed)
    assert decode_image(open(path, "rb").read(), Limits()).shape == (200, 120, 3)  # the server reads it so too
    predictor.set_image(path)
    masks, scores, _ = predictor.segment(points=[[100, 180]])  # inside the viewed picture only (y > 120)
    predictor.set_image(viewed)
    ref, ref_scores, _ = predictor.segment(points=[[100, 180]])
    assert masks.shape[-2:] == (200, 120) and np.array_equal(masks, ref) and np.allclose(scores, ref_scores)
