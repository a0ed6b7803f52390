"""COCO RLE of the server's masks: byte-equal to pycocotools' encoder, read back by the package's parser."""

import numpy as np
import pytest

from fastsamclip.data.sa1b import rle_run_lengths
from fastsamclip.serve import encode_rle


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (100, 151), (64, 64)])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.5, 1.0])
def test_encode_rle_equals_pycocotools(shape, density):
    mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is optional; CI installs it")
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    mask[: shape[0] // 2, : shape[1] // 3] = rng.random() < 0.5  # a blob: long runs, large deltas
    ours = encode_rle(mask)
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == list(shape) and ours["counts"] == theirs["counts"].decode("ascii")
    runs = rle_run_lengths(ours["counts"])
    decoded = np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(shape[1], shape[0]).T
    assert (decoded == mask).all()


def test_encode_rle_takes_one_mask():
    with pytest.raises(ValueError, match="one"):
        encode_rle(np.zeros((2, 3, 4), bool))
