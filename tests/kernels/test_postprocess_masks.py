"""postprocess_masks: the fused CUDA C++ kernel (kernels/csrc/preprocess.cu) and its plain-torch
reference, which is exactly segment_anything's ``Sam.postprocess_masks`` plus the threshold.

On a machine without a GPU the index arithmetic of the fused kernel is checked by a torch
emulation; the CUDA-vs-reference comparisons run only on a GPU.
"""

import types

import pytest
import torch

from fastsamclip.kernels import OPS, postprocess_masks, postprocess_masks_reference

from ..conftest import requires_cuda
from ..helpers import assert_close_verbose, tolerance

OP = OPS["postprocess_masks"]
GPU_ATOL, _ = tolerance("cuda_vs_reference", torch.float32)


def sam_hw(h, w, side):
    """SAM's resized size before padding (ResizeLongestSide.get_preprocess_shape)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(h, w, side)


@pytest.fixture(scope="module")
def sam_postprocess():
    """segment_anything's own ``Sam.postprocess_masks`` of a model with 128 px inputs (the
    method reads nothing else of the model), and its mask threshold."""
    from segment_anything.modeling import Sam

    model = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=128))
    return (lambda low, input_hw, original: Sam.postprocess_masks(model, low, input_hw, original)), 128, \
        Sam.mask_threshold


@pytest.mark.parametrize("original", [(333, 517), (97, 1025), (1, 7), (640, 480)])
def test_postprocess_reference_equals_sam(sam_postprocess, original):
    sam_fn, pad, threshold = sam_postprocess
    input_hw = sam_hw(*original, pad)
    low = torch.randn(2, 3, pad // 4, pad // 4)
    expected = sam_fn(low, input_hw, original)
    logits, masks = postprocess_masks(low, input_hw, pad, original)
    assert torch.equal(logits, expected)
    assert torch.equal(masks, expected > threshold)
    none, masks2 = postprocess_masks(low, input_hw, pad, original, threshold=0.5, return_logits=False)
    assert none is None and torch.equal(masks2, expected > 0.5)
    ref_logits, ref_masks = postprocess_masks_reference(low, input_hw, pad, original)
    assert torch.equal(ref_logits, expected) and torch.equal(ref_masks, masks)


def test_bad_input_errors():
    low = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="\\(P, K, lh, lw\\)"):
        postprocess_masks(low[0], (16, 16), 32, (20, 20))
    with pytest.raises(ValueError, match="exceeds pad_side"):
        postprocess_masks(low, (33, 16), 32, (20, 20))
    with pytest.raises(TypeError, match="floating"):
        postprocess_masks(low.to(torch.int32), (16, 16), 32, (20, 20))
    with pytest.raises(ValueError, match="unknown backend 'torch' for postprocess_masks; known: cuda, reference"):
        postprocess_masks(low, (16, 16), 32, (20, 20), backend="torch")


def _taps(n_out, scale, n_in):
    """linear_taps of preprocess.cu in torch (no fused multiply-add, as torch's CPU kernel)."""
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    i0 = src.long()
    i1 = i0 + (i0 < n_in - 1).long()
    w1 = src - i0.float()
    return i0, i1, 1 - w1, w1


@pytest.mark.parametrize("case", [((64, 64), (256, 171), 256, (1000, 667)),
                                  ((32, 48), (97, 128), 128, (61, 83)),
                                  ((16, 16), (64, 3), 64, (5, 200))])
def test_fused_postprocess_index_math(case):
    """The kernel's per-pixel composition (16 taps, no intermediate) equals the two resizes.

    Emulates postprocess_kernel's arithmetic in torch so that the composition itself (crop
    indices, per-stage scales and clamps) is checked on machines without a GPU.
    """
    (lh, lw), (h, w), pad, (oh, ow) = case
    low = torch.randn(2, lh, lw)
    f32 = lambda a, b: torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32)
    ay0, ay1, ayw0, ayw1 = _taps(oh, f32(h, oh), h)
    ax0, ax1, axw0, axw1 = _taps(ow, f32(w, ow), w)
    r_i0, r_i1, r_w0, r_w1 = _taps(pad, f32(lh, pad), lh)  # stage-1 taps per padded row
    c_i0, c_i1, c_w0, c_w1 = _taps(pad, f32(lw, pad), lw)

    def stage1(rows, cols):  # (oh,) padded rows x (ow,) padded cols -> (2, oh, ow)
        R0, R1, RW0, RW1 = r_i0[rows], r_i1[rows], r_w0[rows][:, None], r_w1[rows][:, None]
        C0, C1, CW0, CW1 = c_i0[cols], c_i1[cols], c_w0[cols], c_w1[cols]
        g = lambda R, C: low[:, R][:, :, C]
        return RW0 * (CW0 * g(R0, C0) + CW1 * g(R0, C1)) + RW1 * (CW0 * g(R1, C0) + CW1 * g(R1, C1))

    v00, v01, v10, v11 = stage1(ay0, ax0), stage1(ay0, ax1), stage1(ay1, ax0), stage1(ay1, ax1)
    fused = ayw0[:, None] * (axw0 * v00 + axw1 * v01) + ayw1[:, None] * (axw0 * v10 + axw1 * v11)
    ref, _ = postprocess_masks_reference(low[None], (h, w), pad, (oh, ow))
    assert_close_verbose(fused, ref[0], 1e-5, 0.0, f"fused {case}")


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernel against the reference on the same device
# ---------------------------------------------------------------------------------------------

requires_kernel = pytest.mark.skipif(OP["cuda"].is_available() is not None,
                                     reason=f"CUDA path unavailable: {OP['cuda'].is_available()}")


@requires_cuda
@requires_kernel
@pytest.mark.parametrize("case", [((2, 3, 256, 256), (1024, 683), 1024, (1537, 1025)),
                                  ((1, 1, 64, 64), (256, 171), 256, (1000, 667)),
                                  ((5, 3, 32, 48), (97, 128), 128, (61, 83))])
def test_cuda_postprocess_equals_torch(case):
    shape, input_hw, pad, original = case
    low = torch.randn(shape, device="cuda") * 4
    logits, masks = postprocess_masks(low, input_hw, pad, original, backend="cuda")
    ref, ref_masks = postprocess_masks(low, input_hw, pad, original, backend="reference")
    assert_close_verbose(logits, ref, GPU_ATOL, 0.0, f"postprocess {case}")
    # Masks agree except where the logit is within rounding of the threshold.
    assert masks.dtype == torch.bool
    assert ((masks != ref_masks) & (ref.abs() > 1e-4)).sum().item() == 0
    none, masks2 = postprocess_masks(low, input_hw, pad, original, backend="cuda", return_logits=False)
    assert none is None and torch.equal(masks2, masks)


@requires_cuda
@requires_kernel
def test_cuda_op_compiles_fullgraph():
    low = torch.randn(2, 3, 64, 64, device="cuda")

    def f(low):
        return postprocess_masks(low, (171, 256), 256, (300, 451), backend="cuda")

    eager = f(low)
    compiled = torch.compile(f, fullgraph=True)(low)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
