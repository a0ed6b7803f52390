"""The kernel op ``preprocess`` against the application's own transforms (fastsamclip.transforms):
SAM's PIL uint8 resize and CLIP's bicubic eval transform differ from the op's bilinear float
convention by the amounts measured below, and the sizes agree exactly."""

import pytest
import torch

from fastsamclip import transforms as D
from fastsamclip.kernels import preprocess

# Measured differences (max abs, normalised units) between the op's bilinear convention
# (float F.interpolate, no antialias) and SAM's PIL uint8 resize / CLIP's bicubic resize, on
# skimage's astronaut (512x512), torch 2.14.1, pillow's BILINEAR. Upscaling to 1024 only differs
# by PIL's rounding to uint8: at most one level, 1 / min(SAM std) = 1 / 57.12 = 0.0175.
# Shrinking differs by the antialias PIL applies and this convention does not.
MEASURED = {
    "sam_up_1024": (0.0176, 0.006),   # (max, mean): measured 0.0175, 0.0054
    "sam_down_256": (0.85, 0.035),    # measured 0.779, 0.032 (shrink x2, no antialias)
    "clip_224": (1.2, 0.034),         # measured 1.111, 0.031 (bicubic+antialias vs bilinear)
}


def args(image, sam_side, clip_side=224):
    return dict(sam_side=sam_side, sam_hw=D.get_preprocess_shape(image.shape[0], image.shape[1], sam_side),
                sam_mean=D.SAM_PIXEL_MEAN, sam_std=D.SAM_PIXEL_STD, clip_side=clip_side,
                clip_mean=D.OPENAI_CLIP_MEAN, clip_std=D.OPENAI_CLIP_STD)


@pytest.fixture(scope="module")
def astronaut():
    skd = pytest.importorskip("skimage.data")
    return torch.from_numpy(skd.astronaut().copy())  # (512, 512, 3) uint8


def test_sam_vs_data_preprocess_sam_image(astronaut):
    """Documented difference to SAM's PIL uint8 resize (MEASURED)."""
    for side, key in ((1024, "sam_up_1024"), (256, "sam_down_256")):
        pixels, ref_hw = D.sam_pixels(astronaut.numpy(), side)
        ref = D.normalize(pixels, D.SAM_PIXEL_MEAN, D.SAM_PIXEL_STD, ref_hw)
        kw = args(astronaut, side)
        hw = kw["sam_hw"]
        sam, _ = preprocess(astronaut, **kw)
        assert hw == ref_hw
        d = (sam - ref).abs()
        max_bound, mean_bound = MEASURED[key]
        assert d.max().item() < max_bound and d.mean().item() < mean_bound, (key, d.max(), d.mean())
        # Padding is exactly zero in both.
        assert torch.equal(sam[:, hw[0]:], ref[:, hw[0]:]) and torch.equal(sam[:, :, hw[1]:], ref[:, :, hw[1]:])


def test_clip_vs_data_preprocess_clip_image(astronaut):
    """Documented difference to open_clip's bicubic eval transform (MEASURED)."""
    _, clip_sq = preprocess(astronaut, **args(astronaut, sam_side=64, clip_side=224))
    ref = D.normalize(D.clip_pixels(astronaut.numpy(), 224), D.OPENAI_CLIP_MEAN, D.OPENAI_CLIP_STD, scale=1 / 255)
    d = (clip_sq - ref).abs()
    max_bound, mean_bound = MEASURED["clip_224"]
    assert d.max().item() < max_bound and d.mean().item() < mean_bound, (d.max(), d.mean())

