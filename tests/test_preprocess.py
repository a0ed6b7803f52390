"""GPU preprocessing / mask postprocessing (kernels/csrc/preprocess.cu, kernels/preprocess.py).

On a machine without a GPU: the .cu compiles and exports its C API, the torch references match
segment_anything and fastsamclip.data (measured differences kept as data below), and the index
arithmetic of the fused postprocess kernel is checked by a torch emulation. The CUDA-vs-torch
comparisons run only on a GPU.
"""

import ctypes
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsamclip import data as D
from fastsamclip.kernels import preprocess as pp
from tests.conftest import requires_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILE = os.path.join(REPO, "kernels", "csrc", "preprocess.cu")
NVCC = shutil.which("nvcc")

# Measured differences (max abs, normalised units) between this module's bilinear convention
# (float F.interpolate, no antialias) and SAM's PIL uint8 resize / CLIP's bicubic resize, on
# skimage's astronaut (512x512), torch 2.14.1, pillow's BILINEAR. Upscaling to 1024 only differs
# by PIL's rounding to uint8: at most one level, 1 / min(SAM std) = 1 / 57.12 = 0.0175.
# Shrinking differs by the antialias PIL applies and this convention does not.
MEASURED = {
    "sam_up_1024": (0.0176, 0.006),   # (max, mean): measured 0.0175, 0.0054
    "sam_down_256": (0.85, 0.035),    # measured 0.779, 0.032 (shrink x2, no antialias)
    "clip_224": (1.2, 0.034),         # measured 1.111, 0.031 (bicubic+antialias vs bilinear)
}
GPU_ATOL = 1e-5  # CUDA kernel vs torch on the same GPU: same formula, float rounding only


def assert_close_verbose(actual, expected, atol, rtol=0.0, what=""):
    """torch.testing.assert_close with the worst element's index and values in the message."""
    diff = (actual.double() - expected.double()).abs()
    idx = np.unravel_index(int(diff.argmax()), tuple(diff.shape)) if diff.numel() else ()
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol,
        msg=lambda m: f"{what}: {m}\nworst at {idx}: {actual[idx].item()} vs {expected[idx].item()}")


@pytest.fixture(scope="module")
def astronaut():
    skd = pytest.importorskip("skimage.data")
    return torch.from_numpy(skd.astronaut().copy())  # (512, 512, 3) uint8


def rand_image(h, w, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, c), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Build: the .cu compiles, loads without a GPU, exports the C API, rejects bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cu_compiles_loads_and_exports(tmp_path):
    lib_path = tmp_path / "libpre.so"
    # One architecture keeps this ~3 s; CMake builds 80/89/90 (test_cmake_default_architectures).
    subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                    "-O3", "--use_fast_math", "-arch=sm_80", "-std=c++17", CU_FILE, "-o",
                    str(lib_path)], check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(lib_path))  # static cudart: loads with no driver / GPU
    for sym in ("fsc_preprocess_u8", "fsc_postprocess_masks"):
        assert hasattr(lib, sym), sym
    # Argument checks run before any CUDA call, so they answer without a GPU:
    # cudaErrorInvalidValue (1) for a null image / bad channel count / null logits.
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fsc_preprocess_u8.argtypes = [p, i, i, i, p, i, i, i, p, p, p, i, p, p, p]
    lib.fsc_postprocess_masks.argtypes = [p, i, i, i, i, i, i, i, i, i, f, p, p, p]
    m3 = (ctypes.c_float * 3)(1, 1, 1)
    assert lib.fsc_preprocess_u8(None, 8, 8, 3, 16, 16, 16, 16, m3, m3, 16, 8, m3, m3, None) == 1
    assert lib.fsc_preprocess_u8(16, 8, 8, 2, 16, 16, 16, 16, m3, m3, 16, 8, m3, m3, None) == 1
    assert lib.fsc_preprocess_u8(16, 8, 8, 3, 16, 16, 17, 16, m3, m3, None, 8, m3, m3, None) == 1
    assert lib.fsc_postprocess_masks(None, 1, 1, 4, 4, 8, 8, 16, 8, 8, 0.0, None, 16, None) == 1
    assert lib.fsc_postprocess_masks(16, 1, 1, 4, 4, 17, 8, 16, 8, 8, 0.0, None, 16, None) == 1
    # Only the C API is exported (hidden visibility for everything else).
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", str(lib_path)], capture_output=True,
                             text=True, check=True).stdout
        exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
        assert {"fsc_preprocess_u8", "fsc_postprocess_masks"} <= exported
        assert not any("preprocess_kernel" in s or "make_target" in s for s in exported), exported


@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cmake_default_architectures(tmp_path):
    """Configure only (~3 s): the default must be sm_80/89/90, not the compiler's default."""
    env = {k: v for k, v in os.environ.items() if k != "CUDAARCHS"}
    subprocess.run(["cmake", "-S", REPO, "-B", str(tmp_path), f"-DCMAKE_CUDA_COMPILER={NVCC}",
                    f"-DFASTSAMCLIP_LIB_DIR={tmp_path / 'lib'}"], check=True, capture_output=True,
                   env=env, timeout=120)
    flags = (tmp_path / "CMakeFiles" / "fastsamclip_cuda.dir" / "flags.make").read_text()
    for arch in ("80", "89", "90"):
        assert f"sm_{arch}" in flags, flags


def test_built_library_exports_symbols_if_built():
    if not os.path.exists(pp.library_path()):
        pytest.skip(f"not built: {pp.library_path()}")
    lib = ctypes.CDLL(pp.library_path())
    assert hasattr(lib, "fsc_preprocess_u8") and hasattr(lib, "fsc_postprocess_masks")


def test_is_available_says_why():
    avail = pp.is_available()
    if not torch.cuda.is_available() or not os.path.exists(pp.library_path()):
        assert not avail and avail.reason
        with pytest.raises(RuntimeError, match="CUDA backend unavailable"):
            pp.preprocess(rand_image(4, 4), backend="cuda")
    else:
        assert avail and avail.reason == ""


def test_fallback_is_logged_once(caplog):
    pp._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger=pp.__name__):
        pp.preprocess(rand_image(5, 7), sam_side=16, clip_side=8)
        pp.preprocess(rand_image(5, 7), sam_side=16, clip_side=8)
    msgs = [r.getMessage() for r in caplog.records if r.name == pp.__name__]
    assert len(msgs) == 1 and "plain torch" in msgs[0], msgs


# ---------------------------------------------------------------------------------------------
# Torch path against segment_anything and fastsamclip.data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [256, 1024])  # shrink and enlarge
def test_antialias_matches_apply_image_torch(astronaut, side):
    from segment_anything.utils.transforms import ResizeLongestSide

    img = astronaut[:400, :301]  # non-square
    h, w = D.get_preprocess_shape(400, 301, side)
    t = ResizeLongestSide(side)
    # apply_image_torch takes its target from image.shape[0], shape[1] of a BCHW tensor (batch
    # and channels, upstream bug); give it the right shape so the resize itself is compared.
    t.get_preprocess_shape = lambda *_: (h, w)
    upstream = t.apply_image_torch(img.permute(2, 0, 1)[None].float())[0]
    mean = torch.tensor(D.SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(D.SAM_PIXEL_STD).view(3, 1, 1)
    expected = F.pad((upstream - mean) / std, (0, side - w, 0, side - h))
    sam, hw, _ = pp.preprocess(img, sam_side=side, antialias=True)
    assert hw == (h, w)
    assert torch.equal(sam, expected)
    # The default (no antialias) is the same resize when enlarging, and aliases when shrinking.
    sam_plain, _, _ = pp.preprocess(img, sam_side=side)
    diff = (sam_plain - expected).abs().max().item()
    assert diff < 1e-4 if side > 400 else 0.1 < diff < 2.0, diff


def test_sam_vs_data_preprocess_sam_image(astronaut):
    """Documented difference to SAM's PIL uint8 resize (MEASURED)."""
    for side, key in ((1024, "sam_up_1024"), (256, "sam_down_256")):
        ref, ref_hw = D.preprocess_sam_image(astronaut.numpy(), side)
        sam, hw, _ = pp.preprocess(astronaut, sam_side=side)
        assert hw == ref_hw
        d = (sam - ref).abs()
        max_bound, mean_bound = MEASURED[key]
        assert d.max().item() < max_bound and d.mean().item() < mean_bound, (key, d.max(), d.mean())
        # Padding is exactly zero in both.
        assert torch.equal(sam[:, hw[0]:], ref[:, hw[0]:]) and torch.equal(sam[:, :, hw[1]:], ref[:, :, hw[1]:])


def test_clip_vs_torchvision_and_data(astronaut):
    import torchvision.transforms.functional as TF

    img = astronaut[:300, :451]  # wide, odd crop offset
    _, _, clip = pp.preprocess(img, sam_side=64, clip_side=224)
    # Same convention through torchvision's tensor ops: exact (also checks the crop offsets).
    x = img.permute(2, 0, 1).float()
    x = TF.center_crop(TF.resize(x, 224, TF.InterpolationMode.BILINEAR, antialias=False), 224)
    expected = TF.normalize(x / 255.0, list(D.OPENAI_CLIP_MEAN), list(D.OPENAI_CLIP_STD))
    assert_close_verbose(clip, expected, atol=1e-6, what="clip vs torchvision bilinear")
    # Documented difference to open_clip's bicubic eval transform (MEASURED).
    _, _, clip_sq = pp.preprocess(astronaut, sam_side=64, clip_side=224)
    d = (clip_sq - D.preprocess_clip_image(astronaut.numpy(), 224)).abs()
    max_bound, mean_bound = MEASURED["clip_224"]
    assert d.max().item() < max_bound and d.mean().item() < mean_bound, (d.max(), d.mean())


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 2), (1, 5), (7, 1), (225, 224), (97, 1025)])
def test_clip_geometry_matches_torchvision(size):
    import torchvision.transforms.functional as TF

    h, w = size
    rh, rw, top, left = pp._clip_geometry(h, w, 224)
    # torchvision's own arithmetic, on a tensor of that size
    x = torch.zeros(1, h, w)
    resized = TF.resize(x, 224, antialias=False)
    assert (rh, rw) == tuple(resized.shape[1:])
    marked = torch.arange(rh * rw, dtype=torch.float32).view(1, rh, rw)
    crop = TF.center_crop(marked, 224)
    assert crop[0, 0, 0].item() == top * rw + left


# ---------------------------------------------------------------------------------------------
# Channels, shapes, bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 1), (31, 17), (64, 200)])
def test_gray_and_rgba_equal_rgb(size):
    gray = rand_image(*size, c=1, seed=1)
    rgba = torch.cat([gray.expand(-1, -1, 3), rand_image(*size, c=1, seed=2)], dim=2)
    out_gray = pp.preprocess(gray, sam_side=48, clip_side=16)
    out_rgba = pp.preprocess(rgba, sam_side=48, clip_side=16)
    out_rgb = pp.preprocess(gray.expand(-1, -1, 3).contiguous(), sam_side=48, clip_side=16)
    for a, b, c in zip(out_gray, out_rgba, out_rgb):
        if isinstance(a, tuple):
            assert a == b == c
        else:
            assert torch.equal(a, c) and torch.equal(b, c)
    sam, (h, w), clip = out_rgb
    assert sam.shape == (3, 48, 48) and clip.shape == (3, 16, 16)
    assert (h, w) == D.get_preprocess_shape(*size, 48)
    assert torch.isfinite(sam).all() and torch.isfinite(clip).all()


def test_bad_input_errors():
    good = rand_image(8, 8)
    with pytest.raises(TypeError, match="uint8"):
        pp.preprocess(good.float())
    with pytest.raises(TypeError, match="tensor"):
        pp.preprocess([[1, 2]])
    with pytest.raises(ValueError, match="looks like CHW"):
        pp.preprocess(good.permute(2, 0, 1).contiguous()[:, :, :5])
    with pytest.raises(ValueError, match="image\\[..., None\\]"):
        pp.preprocess(good[..., 0])
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        pp.preprocess(rand_image(8, 8, c=5))
    with pytest.raises(ValueError, match="empty"):
        pp.preprocess(torch.zeros(0, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too elongated"):
        pp.preprocess(rand_image(1, 3000))
    with pytest.raises(ValueError, match="3 values"):
        pp.preprocess(good, sam_mean=(1.0, 2.0))
    with pytest.raises(ValueError, match="positive"):
        pp.preprocess(good, clip_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="backend"):
        pp.preprocess(good, backend="triton")
    low = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="\\(P, K, lh, lw\\)"):
        pp.postprocess_masks(low[0], (16, 16), 32, (20, 20))
    with pytest.raises(ValueError, match="exceeds pad_side"):
        pp.postprocess_masks(low, (33, 16), 32, (20, 20))
    with pytest.raises(TypeError, match="floating"):
        pp.postprocess_masks(low.to(torch.int32), (16, 16), 32, (20, 20))


# ---------------------------------------------------------------------------------------------
# Mask postprocessing
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sam():
    from fastsamclip.teachers import build_sam

    return build_sam("vit_tiny")


@pytest.mark.parametrize("original", [(333, 517), (97, 1025), (1, 7), (640, 480)])
def test_postprocess_reference_equals_sam(tiny_sam, original):
    pad = tiny_sam.image_encoder.img_size
    input_hw = D.get_preprocess_shape(*original, pad)
    low = torch.randn(2, 3, pad // 4, pad // 4)
    expected = tiny_sam.postprocess_masks(low, input_hw, original)
    logits, masks = pp.postprocess_masks(low, input_hw, pad, original)
    assert torch.equal(logits, expected)
    assert torch.equal(masks, expected > tiny_sam.mask_threshold)
    none, masks2 = pp.postprocess_masks(low, input_hw, pad, original, threshold=0.5,
                                        return_logits=False)
    assert none is None and torch.equal(masks2, expected > 0.5)


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
    ref, _ = pp.postprocess_masks_reference(low[None], (h, w), pad, (oh, ow))
    assert_close_verbose(fused, ref[0], atol=1e-5, what=f"fused {case}")


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernels against the torch path on the same device
# ---------------------------------------------------------------------------------------------

requires_kernel = pytest.mark.skipif(not pp.is_available(),
                                     reason=f"CUDA path unavailable: {pp.is_available().reason}")


@requires_cuda
@requires_kernel
@pytest.mark.parametrize("size,c", [((512, 512), 3), ((300, 451), 3), ((1500, 999), 4),
                                    ((37, 5), 1), ((1, 1), 3), ((2048, 3000), 3)])
def test_cuda_preprocess_equals_torch(size, c):
    img = rand_image(*size, c=c, seed=3).cuda()
    for sam_side, clip_side in ((1024, 224), (257, 97)):
        sam, hw, clip = pp.preprocess(img, sam_side, clip_side, backend="cuda")
        sam_r, hw_r, clip_r = pp.preprocess(img, sam_side, clip_side, backend="torch")
        assert hw == hw_r
        assert_close_verbose(sam, sam_r, GPU_ATOL, what=f"sam {size} {c}")
        assert_close_verbose(clip, clip_r, GPU_ATOL, what=f"clip {size} {c}")


@requires_cuda
@requires_kernel
def test_cuda_raw_call_writes_every_element():
    """Outputs poisoned with NaN before the raw C call: an unwritten element fails."""
    img = rand_image(123, 77, seed=4).cuda()
    lib = pp._load_library()
    sam = torch.full((3, 160, 160), float("nan"), device="cuda")
    clip = torch.full((3, 50, 50), float("nan"), device="cuda")
    m3 = pp._floats3(D.SAM_PIXEL_MEAN)
    s3 = pp._floats3(D.SAM_PIXEL_STD)
    cm, cs = pp._floats3(D.OPENAI_CLIP_MEAN), pp._floats3(D.OPENAI_CLIP_STD)
    h, w = D.get_preprocess_shape(123, 77, 160)
    rc = lib.fsc_preprocess_u8(img.data_ptr(), 123, 77, 3, sam.data_ptr(), 160, h, w, m3, s3,
                               clip.data_ptr(), 50, cm, cs, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert rc == 0
    ref_sam, _, ref_clip = pp.preprocess_reference(img, 160, 50)
    assert_close_verbose(sam, ref_sam, GPU_ATOL, what="raw sam")
    assert_close_verbose(clip, ref_clip, GPU_ATOL, what="raw clip")


@requires_cuda
@requires_kernel
@pytest.mark.parametrize("case", [((2, 3, 256, 256), (1024, 683), 1024, (1537, 1025)),
                                  ((1, 1, 64, 64), (256, 171), 256, (1000, 667)),
                                  ((5, 3, 32, 48), (97, 128), 128, (61, 83))])
def test_cuda_postprocess_equals_torch(case):
    shape, input_hw, pad, original = case
    low = torch.randn(shape, device="cuda") * 4
    logits, masks = pp.postprocess_masks(low, input_hw, pad, original, backend="cuda")
    ref, ref_masks = pp.postprocess_masks(low, input_hw, pad, original, backend="torch")
    assert_close_verbose(logits, ref, GPU_ATOL, what=f"postprocess {case}")
    # Masks agree except where the logit is within rounding of the threshold.
    assert masks.dtype == torch.bool
    assert ((masks != ref_masks) & (ref.abs() > 1e-4)).sum().item() == 0
    none, masks2 = pp.postprocess_masks(low, input_hw, pad, original, backend="cuda",
                                        return_logits=False)
    assert none is None and torch.equal(masks2, masks)


@requires_cuda
@requires_kernel
def test_cuda_ops_compile_fullgraph():
    img = rand_image(300, 451, seed=5).cuda()
    low = torch.randn(2, 3, 64, 64, device="cuda")

    def f(img, low):
        sam, _, clip = pp.preprocess(img, 256, 96, backend="cuda")
        logits, masks = pp.postprocess_masks(low, (171, 256), 256, (300, 451), backend="cuda")
        return sam, clip, logits, masks

    eager = f(img, low)
    compiled = torch.compile(f, fullgraph=True)(img, low)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    torch.library.opcheck(pp._preprocess_op, (img, 256, 171, 256, list(D.SAM_PIXEL_MEAN),
                                              list(D.SAM_PIXEL_STD), 96, list(D.OPENAI_CLIP_MEAN),
                                              list(D.OPENAI_CLIP_STD)))
