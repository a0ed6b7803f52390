"""Image geometry and pixel conventions against segment_anything and torchvision, on real pictures."""

import inspect

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # an independent source
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from fastsamclip import transforms as TR
from fastsamclip.data import samples


@pytest.fixture(scope="module")
def images():
    return samples.load_sample_images(["chelsea", "page", "rocket", "coffee", "astronaut"], max_side=160)


ODD_SIZES = [(160, 107), (97, 1025), (1500, 2250), (333, 333), (64, 1000)]


@pytest.mark.parametrize("hw", ODD_SIZES)
def test_coordinate_mapping_matches_resize_longest_side(hw):
    t = ResizeLongestSide(1024)
    h, w = hw
    assert TR.get_preprocess_shape(h, w) == t.get_preprocess_shape(h, w, 1024)
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, [w, h], size=(5, 3, 2))
    boxes = rng.uniform(0, [w, h, w, h], size=(7, 4))
    np.testing.assert_array_equal(TR.apply_coords(coords, hw), t.apply_coords(coords, hw))
    np.testing.assert_array_equal(TR.apply_boxes(boxes, hw), t.apply_boxes(boxes, hw))
    ct = torch.from_numpy(coords).float()
    assert torch.equal(TR.apply_coords(ct, hw), t.apply_coords_torch(ct, hw))
    bt = torch.from_numpy(boxes).float()
    assert torch.equal(TR.apply_boxes(bt, hw), t.apply_boxes_torch(bt, hw))


@pytest.mark.parametrize("name", ["chelsea", "page"])
@pytest.mark.parametrize("size", [128, 1024])
def test_sam_geometry_and_normalisation_equal_segment_anything(name, size, images):
    a = images[name][:150]
    sam = Sam.__new__(Sam)  # only its buffers and preprocess are needed
    torch.nn.Module.__init__(sam)
    sam.register_buffer("pixel_mean", torch.tensor(TR.SAM_PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(TR.SAM_PIXEL_STD).view(-1, 1, 1), False)
    sam.image_encoder = type("E", (), {"img_size": size})()
    ref = ResizeLongestSide(size).apply_image(a)
    ref_t = sam.preprocess(torch.from_numpy(ref).permute(2, 0, 1).float())  # normalise, then pad with 0
    for inp in (a, torch.from_numpy(a), Image.fromarray(a)):
        pixels, (h, w) = TR.sam_pixels(inp, size)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, size, size) and (h, w) == ref.shape[:2]
        x = TR.normalize(pixels, TR.SAM_PIXEL_MEAN, TR.SAM_PIXEL_STD, (h, w))
        assert torch.equal(x, ref_t)
        batch = TR.normalize(torch.stack([pixels, pixels]), TR.SAM_PIXEL_MEAN, TR.SAM_PIXEL_STD, [(h, w), (h, w)])
        assert torch.equal(batch[1], ref_t)
    with pytest.raises(ValueError, match="too elongated"):
        TR.sam_pixels(np.zeros((1, 3000, 3), np.uint8), 1024)


@pytest.mark.parametrize("res", [224, 448, 97])
def test_clip_geometry_matches_torchvision_clip_transform(res, images):
    ref_tf = T.Compose([T.Resize(res, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(res),
                        T.ToTensor(), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)])
    a = images["rocket"]
    ref = ref_tf(Image.fromarray(a))
    for inp in (a, torch.from_numpy(a)):
        pixels = TR.clip_pixels(inp, res)
        assert pixels.shape == (3, res, res) and pixels.dtype == torch.uint8
        x = TR.normalize(pixels, TR.OPENAI_CLIP_MEAN, TR.OPENAI_CLIP_STD, scale=1 / 255)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        TR.clip_pixels(a.astype(np.float32), res)


def test_lowres_masks_follow_sam_decoder_frame(images):
    ms = samples.synthetic_masks(images["coffee"])  # 107 x 160 image -> 171 x 256 valid block of the 256 grid
    h, w = ms.shape[1:]
    low = TR.masks_to_lowres(ms, 256)
    nh, nw = TR.get_preprocess_shape(h, w, 256)
    assert low.shape == (len(ms), 256, 256) and set(low.unique().tolist()) <= {0.0, 1.0}
    assert (low[:, nh:] == 0).all() and (low[:, :, nw:] == 0).all()
    # Back to the original frame as Sam.postprocess_masks does: agrees with the mask it came from.
    back = TR.postprocess_masks(low[:, None], TR.get_preprocess_shape(h, w), (h, w), 1024, threshold=0.5)[:, 0]
    m = torch.from_numpy(ms)
    big = m.flatten(1).sum(1) > 400
    iou = (back & m).flatten(1).sum(1) / (back | m).flatten(1).sum(1)
    assert iou[big].min() > 0.85, iou[big].min()


def test_normalisation_constants_are_the_teachers():
    sig = inspect.signature(Sam.__init__).parameters
    assert list(TR.SAM_PIXEL_MEAN) == sig["pixel_mean"].default
    assert list(TR.SAM_PIXEL_STD) == sig["pixel_std"].default
    assert TR.OPENAI_CLIP_MEAN == tuple(OPENAI_DATASET_MEAN) and TR.OPENAI_CLIP_STD == tuple(OPENAI_DATASET_STD)


def test_normalize_keeps_statistics_exact_for_low_precision_models():
    """The merged model's statistics are plain numbers: a bf16 copy normalises as the fp32 one."""
    from fastsamclip.modeling import build_samclip, get_sam_config, SAMCLIPConfig

    model = build_samclip(SAMCLIPConfig(sam=get_sam_config("vit_micro")))
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ref = model.preprocess(pixels, [(64, 40), (30, 64)])
    assert torch.equal(model.to(torch.bfloat16).preprocess(pixels, [(64, 40), (30, 64)]), ref)
    assert not ref[0, :, :, 40:].any() and not ref[1, :, 30:].any() and ref[0, :, :, :40].abs().min() > 0
