"""Code written for segment_anything runs on the merged model with only its constructor changed:
segment_anything's own predictor walkthrough (notebooks/predictor_example.ipynb, its calls in its
order) once with ``SamPredictor(sam)`` and once with ``SAMCLIPPredictor`` on the model merged from
that SAM (whose SAM side is the SAM teacher at initialisation), outputs compared; and
``SamAutomaticMaskGenerator``'s parameters on ``generate``."""

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from fastsamclip.data.samples import sample_image, write_clip_local_dir, write_sam_checkpoint
from fastsamclip.errors import InputError
from fastsamclip.modeling import load_clip_teacher, load_sam_teacher, samclip_from_teachers
from fastsamclip.predictor import EverythingParams, SAMCLIPPredictor

from .helpers import assert_close_verbose

# fp32 on both sides; the backbones are two implementations of one network (segment_anything's
# materialised attention against this package's attention backends), which reorder the sums.
# Measured on the CPU: max |diff| 1.4e-6 on the embedding, 1.5e-7 on the low-res logits, 6e-8 on
# the scores, no mask pixel different; the bound is fp32's "value" tolerance of tests/helpers.py.
ATOL = 2e-5
# The notebook's picture (truck.jpg) is 1800 x 1200; its prompts are scaled to ours.
NOTEBOOK_WIDTH = 1800


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam-compat")
    sam = load_sam_teacher(write_sam_checkpoint(str(d / "sam_vit_tiny.pth"), "vit_tiny"), "vit_tiny")
    clip = load_clip_teacher(write_clip_local_dir(str(d / "clip")))
    merged = samclip_from_teachers(sam, clip, sam_config="vit_tiny")
    # 3:2 like the notebook's picture, small so that the tiny model's 128 px input still downscales it.
    image = np.asarray(Image.fromarray(sample_image("chelsea")).resize((180, 120), Image.BILINEAR))
    return {"sam": sam, "merged": merged, "image": image}


def walkthrough(predictor, image: np.ndarray) -> list:
    """segment_anything's predictor notebook, call for call; returns every output in order."""
    s = image.shape[1] / NOTEBOOK_WIDTH
    out = []
    predictor.set_image(image)
    out.append(("embedding", predictor.get_image_embedding().cpu().numpy()))

    input_point = np.array([[500, 375]]) * s
    input_label = np.array([1])
    masks, scores, logits = predictor.predict(point_coords=input_point, point_labels=input_label,
                                              multimask_output=True)
    out.append(("one point", (masks, scores, logits)))

    input_point = np.array([[500, 375], [1125, 625]]) * s
    input_label = np.array([1, 1])
    mask_input = logits[np.argmax(scores), :, :]  # Choose the model's best mask
    out.append(("two points + mask", predictor.predict(point_coords=input_point, point_labels=input_label,
                                                       mask_input=mask_input[None, :, :], multimask_output=False)))

    input_label = np.array([1, 0])
    out.append(("fg + bg point + mask", predictor.predict(point_coords=input_point, point_labels=input_label,
                                                          mask_input=mask_input[None, :, :], multimask_output=False)))

    input_box = np.array([425, 600, 700, 875]) * s
    out.append(("box", predictor.predict(point_coords=None, point_labels=None, box=input_box[None, :],
                                         multimask_output=False)))

    input_point = np.array([[575, 750]]) * s
    input_label = np.array([0])
    out.append(("box + point", predictor.predict(point_coords=input_point, point_labels=input_label, box=input_box,
                                                 multimask_output=False)))

    input_boxes = torch.tensor([[75, 275, 1725, 850], [425, 600, 700, 875], [1375, 550, 1650, 800],
                                [1240, 675, 1400, 750]], device=predictor.device) * s
    transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    masks, iou, low_res = predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed_boxes,
                                                  multimask_output=False)
    out.append(("batched boxes", tuple(t.cpu().numpy() for t in (masks, iou, low_res))))
    return out


def test_the_predictor_walkthrough_gives_samPredictors_outputs(setup):
    image = setup["image"]
    ref = walkthrough(SamPredictor(setup["sam"]), image)
    mine = walkthrough(SAMCLIPPredictor(setup["merged"], device="cpu"), image)
    assert [name for name, _ in mine] == [name for name, _ in ref]
    assert_close_verbose(torch.from_numpy(mine[0][1]), torch.from_numpy(ref[0][1]), ATOL, ATOL, "embedding")
    informative = 0
    for (name, (m, s, low)), (_, (m_ref, s_ref, low_ref)) in zip(mine[1:], ref[1:]):
        for got, want, what in ((m, m_ref, "masks"), (s, s_ref, "scores"), (low, low_ref, "low-res logits")):
            assert got.shape == want.shape and got.dtype == want.dtype, (name, what, got.shape, want.shape,
                                                                        got.dtype, want.dtype)
        assert_close_verbose(torch.from_numpy(s), torch.from_numpy(s_ref), ATOL, ATOL, f"{name}: scores")
        assert_close_verbose(torch.from_numpy(low), torch.from_numpy(low_ref), ATOL, ATOL, f"{name}: low-res")
        # Bool masks equal except where the upscaled logit is within float noise of SAM's threshold 0.
        differ = m != m_ref
        assert differ.mean() < 1e-3, f"{name}: {int(differ.sum())} mask pixels differ"
        informative += bool(m_ref.any() and not m_ref.all())
    assert informative >= 4, "most reference masks are empty or full: the comparison would say little"
    # SamPredictor's shapes: (C, H, W) per prompt, a leading batch axis from predict_torch.
    assert mine[1][1][0].shape == (3, 120, 180) and mine[1][1][2].shape == (3, 32, 32)
    assert mine[2][1][0].shape == (1, 120, 180) and mine[-1][1][0].shape == (4, 1, 120, 180)


def test_image_state_as_samPredictor_keeps_it(setup):
    image = setup["image"]
    ref, p = SamPredictor(setup["sam"]), SAMCLIPPredictor(setup["merged"], device="cpu")
    for predictor in (ref, p):
        with pytest.raises(RuntimeError, match="An image must be set"):
            predictor.get_image_embedding()
    assert isinstance(p.transform, ResizeLongestSide) and p.transform.target_length == ref.transform.target_length
    ref.set_image(image)
    p.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")  # channels flipped back
    assert p.is_image_set and p.original_size == ref.original_size and p.input_size == ref.input_size
    assert_close_verbose(p.features, ref.features, ATOL, ATOL, "BGR input")
    # set_torch_image: the resized tensor SamPredictor users build themselves.
    resized = torch.as_tensor(p.transform.apply_image(image)).permute(2, 0, 1).contiguous()[None]
    p.set_torch_image(resized, image.shape[:2])
    assert_close_verbose(p.get_image_embedding(), ref.get_image_embedding(), ATOL, ATOL, "set_torch_image")
    assert p.input_size == ref.input_size and p.original_size == ref.original_size
    with pytest.raises(InputError, match="image_format must be 'RGB' or 'BGR'"):
        p.set_image(image, image_format="rgb")
    with pytest.raises(InputError, match=r"longest side is 128"):
        p.set_torch_image(resized[..., :100], image.shape[:2])
    with pytest.raises(InputError, match="predict: give at least one prompt"):
        p.predict()
    with pytest.raises(InputError, match="predict takes one prompt"):
        p.predict(box=np.array([[0, 0, 50, 50], [10, 10, 60, 60]]))
    with pytest.raises(InputError, match=r"boxes must be a \(B, 4\) tensor"):
        p.predict_torch(None, None, boxes=torch.zeros(4))
    with pytest.raises(InputError, match="point_labels"):
        p.predict_torch(torch.zeros(2, 3, 2), torch.ones(2, 2))
    p.reset_image()
    with pytest.raises(RuntimeError, match="before mask prediction"):
        p.predict_torch(None, None, boxes=torch.zeros(1, 4))


def test_generate_takes_the_mask_generators_parameters_and_defaults():
    """generate(image, **params) for SamAutomaticMaskGenerator(sam, **params).generate(image): the
    same names and defaults (the outputs are compared in tests/test_everything.py)."""
    upstream = {name: p.default for name, p in inspect.signature(SamAutomaticMaskGenerator.__init__).parameters.items()
                if name not in ("self", "model")}
    ours = {f.name: f.default for f in dataclasses.fields(EverythingParams)}
    assert ours == upstream
