"""Shared fixtures of the data tests: small real pictures (skimage.data), their masks, corrupt files."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from fastsamclip.data import samples as S


@pytest.fixture(scope="module")
def images():
    # 160 px keeps the whole file fast while leaving masks with hundreds of pixels.
    return S.load_sample_images(max_side=160)


@pytest.fixture(scope="module")
def masks(images):
    return {n: S.synthetic_masks(a) for n, a in list(images.items())[:5]}


def jpeg_bytes(a, quality=95):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corrupt(images):
    """Bytes that must be skipped: a truncated jpeg and garbage that is no image at all."""
    good = jpeg_bytes(images["coffee"])
    return {"truncated": good[: len(good) // 2], "garbage": os.urandom(3000)}


def mean_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())




@pytest.fixture()
def sa1b(tmp_path, images, masks):
    pairs = [(images[n], masks[n]) for n in masks]
    stems = S.write_sa1b(tmp_path, pairs)
    return tmp_path, stems, pairs


def check_boxes_contain(masks, boxes, tight):
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        ys, xs = np.nonzero(m)
        assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() and y1 >= ys.max()
        if tight:
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def check_points_on(masks, points):
    for m, pts in zip(masks, points):
        for x, y in pts:
            assert x == int(x) and y == int(y) and m[int(y), int(x)]
