"""preprocess: the CUDA C++ kernel (kernels/csrc/preprocess.cu) and its plain-torch reference.

On a machine without a GPU: the .cu compiles and exports its C API, the reference matches
segment_anything's ResizeLongestSide.apply_image_torch and torchvision's Resize + CenterCrop,
and the backend choice says why the kernel cannot run. The CUDA-vs-reference comparisons run only
on a GPU. Against the application's own transforms: tests/test_transforms_vs_kernels.py.
"""

import ctypes
import logging
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from fastsamclip.kernels import OPS, _cuda_library, postprocess_masks, preprocess, preprocess_reference
from fastsamclip.kernels.preprocess import _clip_geometry

from ..conftest import requires_cuda
from ..helpers import assert_close_verbose, tolerance

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU_FILE = os.path.join(REPO, "kernels", "csrc", "preprocess.cu")
NVCC = shutil.which("nvcc")
OP = OPS["preprocess"]
GPU_ATOL, _ = tolerance("cuda_vs_reference", torch.float32)

# SAM's pixel statistics (segment_anything's Sam defaults, 0..255) and OpenAI CLIP's (0..1):
# the op takes them as arguments; these are the values the model passes.
SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def sam_hw(h, w, side):
    """SAM's resized size before padding (ResizeLongestSide.get_preprocess_shape)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(h, w, side)


def args(image, sam_side=1024, clip_side=224, **kw):
    """The op's keyword arguments for ``image`` at these sides, SAM's and CLIP's statistics."""
    out = dict(sam_side=sam_side, sam_hw=sam_hw(image.shape[0], image.shape[1], sam_side), sam_mean=SAM_MEAN,
               sam_std=SAM_STD, clip_side=clip_side, clip_mean=CLIP_MEAN, clip_std=CLIP_STD)
    out.update(kw)
    return out


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
def test_cu_compiles_loads_and_exports_without_a_stack_frame(tmp_path):
    lib_path = tmp_path / "libpre.so"
    # sm_80 and sm_90 SASS keep this a few seconds; CMake adds sm_89 and compute_75 PTX
    # (test_cmake_default_architectures). ptxas -v: registers and stack frame per kernel.
    out = subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                          "-O3", "--use_fast_math", "-gencode=arch=compute_80,code=sm_80",
                          "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-std=c++17", CU_FILE, "-o",
                          str(lib_path)], check=True, capture_output=True, text=True, timeout=180)
    frames = {}
    kernel = None
    for line in out.stderr.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes stack frame", line)
        if m and kernel:
            frames.setdefault(kernel, []).append(int(m.group(1)))
    names = " ".join(frames)
    assert "preprocess_kernel" in names and "postprocess_kernel" in names, out.stderr
    # The preprocess kernel once picked its target through a reference (144-byte stack frame).
    assert all(f == 0 for fs in frames.values() for f in fs) and all(len(fs) == 2 for fs in frames.values()), frames
    lib = ctypes.CDLL(str(lib_path))  # static cudart: loads with no driver / GPU
    for sym in _cuda_library.SYMBOLS:
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
    if not torch.cuda.is_available():
        # The probe says why the kernels cannot run: no driver here (or one too old for the runtime).
        why = _cuda_library.probe(lib)
        assert why and "cannot run here" in why and "CUDA runtime 13" in why, why
    # Only the C API is exported (hidden visibility for everything else).
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", str(lib_path)], capture_output=True,
                             text=True, check=True).stdout
        exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
        assert set(_cuda_library.SYMBOLS) <= exported
        assert not any("preprocess_kernel" in s or "make_target" in s for s in exported), exported


@pytest.mark.skipif(NVCC is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_cmake_default_architectures(tmp_path):
    """Configure only (~3 s): SASS for sm_80/89/90 and compute_75 PTX, not the compiler's default."""
    env = {k: v for k, v in os.environ.items() if k != "CUDAARCHS"}
    subprocess.run(["cmake", "-S", REPO, "-B", str(tmp_path), f"-DCMAKE_CUDA_COMPILER={NVCC}",
                    f"-DFASTSAMCLIP_LIB_DIR={tmp_path / 'lib'}"], check=True, capture_output=True,
                   env=env, timeout=120)
    flags = (tmp_path / "CMakeFiles" / "fastsamclip_cuda.dir" / "flags.make").read_text()
    for arch in ("80", "89", "90"):  # machine code for A100, Ada, H100/H200
        assert f"arch=compute_{arch},code=[sm_{arch}]" in flags, flags
    assert "arch=compute_75,code=[compute_75]" in flags, flags  # PTX any newer GPU can JIT


def test_built_library_exports_symbols_if_built():
    if not os.path.exists(_cuda_library.library_path()):
        pytest.skip(f"not built: {_cuda_library.library_path()}")
    lib = ctypes.CDLL(_cuda_library.library_path())
    assert hasattr(lib, "fsc_preprocess_u8") and hasattr(lib, "fsc_postprocess_masks")


def test_is_available_says_why():
    why = OP["cuda"].is_available()
    if not torch.cuda.is_available() or not os.path.exists(_cuda_library.library_path()):
        assert why
        with pytest.raises(RuntimeError, match="'cuda' was forced"):
            preprocess(rand_image(4, 4), **args(rand_image(4, 4)), backend="cuda")
    else:
        assert why is None


def test_unloadable_library_falls_back_with_the_reason(tmp_path, monkeypatch, caplog):
    """A library that is missing, does not load, or lacks a symbol: the cuda backend says why,
    and the automatic choice runs the reference, saying so once."""
    not_elf = tmp_path / "not_elf.so"
    not_elf.write_bytes(b"not an ELF file")
    cases = ((str(tmp_path / "missing.so"), "is not built"), (str(not_elf), "cannot load"),
             (torch._C.__file__, "lacks fsc_preprocess_u8"))  # a real library without the C API
    img = rand_image(5, 7)
    for path, match in cases:
        monkeypatch.setattr(_cuda_library, "library_path", lambda p=path: p)
        monkeypatch.setattr(_cuda_library, "_LIB", None)
        monkeypatch.setattr(_cuda_library, "_LIB_ERROR", None)
        monkeypatch.setattr(OP, "_logged", set())
        assert match in OP["cuda"].is_available()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
            for _ in range(2):
                sam, clip = preprocess(img, **args(img, sam_side=16, clip_side=8))
        assert torch.equal(sam, preprocess_reference(img, **args(img, sam_side=16, clip_side=8))[0])
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 1 and match in msgs[0] and "'reference'" in msgs[0], msgs


FAILING_LIBRARY = r"""
// A build of the C API that cannot run here: what an old driver or a GPU without a kernel image
// makes of the real one (cudaErrorInsufficientDriver from the probe, no kernel image at launch).
int fsc_probe(int* rt, int* drv) { if (rt) *rt = 13000; if (drv) *drv = 12040; return 35; }
int fsc_preprocess_u8() { return 209; }
int fsc_postprocess_masks() { return 209; }
"""


@pytest.fixture
def failing_library(tmp_path, monkeypatch):
    """The library replaced by one whose probe and launches fail (built with the C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "failing.c"
    src.write_text(FAILING_LIBRARY)
    so = tmp_path / "libfailing.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(so)], check=True, capture_output=True)
    monkeypatch.setattr(_cuda_library, "library_path", lambda: str(so))
    for name, value in (("_LIB", None), ("_LIB_ERROR", None), ("_PROBED", False)):
        monkeypatch.setattr(_cuda_library, name, value)
    monkeypatch.setattr(OP, "_logged", set())
    monkeypatch.setattr(OPS["postprocess_masks"], "_logged", set())
    return so


def test_a_library_that_cannot_run_here_says_why(failing_library, monkeypatch):
    """The probe's error becomes the cuda backends' reason (once a GPU is visible), naming the
    runtime the library links and the CUDA version the driver supports; launch errors of that
    kind mark the library unusable, argument errors stay errors."""
    monkeypatch.setattr(_cuda_library.torch.cuda, "is_available", lambda: True)
    why = _cuda_library.unavailable()
    assert "cudaErrorInsufficientDriver" in why and "runtime 13.0" in why and "CUDA 12.4" in why, why
    assert OP["cuda"].is_available() == why == OPS["postprocess_masks"]["cuda"].is_available()
    with pytest.raises(RuntimeError, match="unavailable: the CUDA library cannot run here"):
        _cuda_library.require()
    monkeypatch.setattr(_cuda_library, "_LIB_ERROR", None)
    with pytest.raises(_cuda_library.LibraryUnusable, match="NoKernelImageForDevice"):
        _cuda_library.check_rc(209, "fsc_preprocess_u8")
    assert "fsc_preprocess_u8 failed to launch" in _cuda_library.unavailable()
    with pytest.raises(RuntimeError, match="invalid argument") as e:
        _cuda_library.check_rc(1, "fsc_preprocess_u8")
    assert not isinstance(e.value, _cuda_library.LibraryUnusable)


@requires_cuda
def test_a_launch_that_fails_falls_back_to_torch_logged_once(failing_library, monkeypatch, caplog):
    """A library that loads and probes fine but fails at launch (no kernel image): the call is
    computed in plain torch, and the fallback is logged once for all later calls."""
    monkeypatch.setattr(_cuda_library, "probe", lambda lib: None)
    img = rand_image(40, 30).cuda()
    kw = args(img, sam_side=64, clip_side=32)
    low = torch.randn(1, 3, 16, 16, device="cuda")
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        for _ in range(3):
            sam, clip = preprocess(img, **kw)
            logits, masks = postprocess_masks(low, (12, 16), 64, (30, 40))
    ref_sam, ref_clip = preprocess_reference(img, **kw)
    assert torch.equal(sam, ref_sam) and torch.equal(clip, ref_clip)
    ref_logits, ref_masks = postprocess_masks(low, (12, 16), 64, (30, 40), backend="reference")
    assert torch.equal(logits, ref_logits) and torch.equal(masks, ref_masks)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("failed to launch" in m and "'reference'" in m for m in msgs), msgs


def test_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(OP, "_logged", set())
    img = rand_image(5, 7)
    with caplog.at_level(logging.INFO, logger="fastsamclip.kernels"):
        preprocess(img, **args(img, sam_side=16, clip_side=8))
        preprocess(img, **args(img, sam_side=16, clip_side=8))
    msgs = [r.getMessage() for r in caplog.records if r.name == "fastsamclip.kernels"]
    assert len(msgs) == 1 and "plain torch" in msgs[0], msgs


# ---------------------------------------------------------------------------------------------
# The reference against segment_anything and torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [256, 1024])  # shrink and enlarge
def test_antialias_matches_apply_image_torch(astronaut, side):
    from segment_anything.utils.transforms import ResizeLongestSide

    img = astronaut[:400, :301]  # non-square
    h, w = sam_hw(400, 301, side)
    t = ResizeLongestSide(side)
    # apply_image_torch takes its target from image.shape[0], shape[1] of a BCHW tensor (batch
    # and channels, upstream bug); give it the right shape so the resize itself is compared.
    t.get_preprocess_shape = lambda *_: (h, w)
    upstream = t.apply_image_torch(img.permute(2, 0, 1)[None].float())[0]
    mean = torch.tensor(SAM_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_STD).view(3, 1, 1)
    expected = F.pad((upstream - mean) / std, (0, side - w, 0, side - h))
    sam, _ = preprocess_reference(img, **args(img, sam_side=side), antialias=True)
    assert torch.equal(sam, expected)
    # The default (no antialias) is the same resize when enlarging, and aliases when shrinking.
    sam_plain, _ = preprocess(img, **args(img, sam_side=side))
    diff = (sam_plain - expected).abs().max().item()
    assert diff < 1e-4 if side > 400 else 0.1 < diff < 2.0, diff


def test_clip_vs_torchvision(astronaut):
    import torchvision.transforms.functional as TF

    img = astronaut[:300, :451]  # wide, odd crop offset
    _, clip = preprocess(img, **args(img, sam_side=64, clip_side=224))
    # Same convention through torchvision's tensor ops: exact (also checks the crop offsets).
    x = img.permute(2, 0, 1).float()
    x = TF.center_crop(TF.resize(x, 224, TF.InterpolationMode.BILINEAR, antialias=False), 224)
    expected = TF.normalize(x / 255.0, list(CLIP_MEAN), list(CLIP_STD))
    assert_close_verbose(clip, expected, 1e-6, 0.0, "clip vs torchvision bilinear")


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 2), (1, 5), (7, 1), (225, 224), (97, 1025)])
def test_clip_geometry_matches_torchvision(size):
    import torchvision.transforms.functional as TF

    h, w = size
    rh, rw, top, left = _clip_geometry(h, w, 224)
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
    kw = args(gray, sam_side=48, clip_side=16)
    out_gray = preprocess(gray, **kw)
    out_rgba = preprocess(rgba, **kw)
    out_rgb = preprocess(gray.expand(-1, -1, 3).contiguous(), **kw)
    for a, b, c in zip(out_gray, out_rgba, out_rgb):
        assert torch.equal(a, c) and torch.equal(b, c)
    sam, clip = out_rgb
    assert sam.shape == (3, 48, 48) and clip.shape == (3, 16, 16)
    h, w = kw["sam_hw"]
    assert torch.isfinite(sam).all() and torch.isfinite(clip).all()
    # the padding, and only the padding, is zero
    assert (sam[:, h:] == 0).all() and (sam[:, :, w:] == 0).all()


def test_bad_input_errors():
    good = rand_image(8, 8)
    kw = args(good)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(good.float(), **kw)
    with pytest.raises(TypeError, match="tensor"):
        preprocess([[1, 2]], **kw)
    with pytest.raises(ValueError, match="looks like CHW"):
        preprocess(good.permute(2, 0, 1).contiguous()[:, :, :5], **kw)
    with pytest.raises(ValueError, match="image\\[..., None\\]"):
        preprocess(good[..., 0], **kw)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        preprocess(rand_image(8, 8, c=5), **kw)
    with pytest.raises(ValueError, match="empty"):
        preprocess(torch.zeros(0, 8, 3, dtype=torch.uint8), **kw)
    with pytest.raises(ValueError, match="too elongated"):
        preprocess(rand_image(1, 3000), **args(rand_image(1, 3000)))
    with pytest.raises(ValueError, match="fit in sam_side"):
        preprocess(good, **args(good, sam_hw=(1025, 1024)))
    with pytest.raises(ValueError, match="3 values"):
        preprocess(good, **args(good, sam_mean=(1.0, 2.0)))
    with pytest.raises(ValueError, match="positive"):
        preprocess(good, **args(good, clip_std=(1.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="backend"):
        preprocess(good, **kw, backend="triton")
    with pytest.raises(TypeError, match="sam_hw"):
        preprocess(good, sam_side=1024, sam_mean=SAM_MEAN, sam_std=SAM_STD, clip_side=224, clip_mean=CLIP_MEAN,
                   clip_std=CLIP_STD)  # sizes and statistics have no defaults


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA kernel against the reference on the same device
# ---------------------------------------------------------------------------------------------

requires_kernel = pytest.mark.skipif(OP["cuda"].is_available() is not None,
                                     reason=f"CUDA path unavailable: {OP['cuda'].is_available()}")


@requires_cuda
@requires_kernel
@pytest.mark.parametrize("size,c", [((512, 512), 3), ((300, 451), 3), ((1500, 999), 4),
                                    ((37, 5), 1), ((1, 1), 3), ((2048, 3000), 3)])
def test_cuda_preprocess_equals_torch(size, c):
    img = rand_image(*size, c=c, seed=3).cuda()
    for sam_side, clip_side in ((1024, 224), (257, 97)):
        kw = args(img, sam_side=sam_side, clip_side=clip_side)
        sam, clip = preprocess(img, **kw, backend="cuda")
        sam_r, clip_r = preprocess(img, **kw, backend="reference")
        assert_close_verbose(sam, sam_r, GPU_ATOL, 0.0, f"sam {size} {c}")
        assert_close_verbose(clip, clip_r, GPU_ATOL, 0.0, f"clip {size} {c}")


@requires_cuda
@requires_kernel
def test_cuda_raw_call_writes_every_element():
    """Outputs poisoned with NaN before the raw C call: an unwritten element fails."""
    img = rand_image(123, 77, seed=4).cuda()
    lib = _cuda_library.load()
    sam = torch.full((3, 160, 160), float("nan"), device="cuda")
    clip = torch.full((3, 50, 50), float("nan"), device="cuda")
    f3 = _cuda_library.floats3
    h, w = sam_hw(123, 77, 160)
    rc = lib.fsc_preprocess_u8(img.data_ptr(), 123, 77, 3, sam.data_ptr(), 160, h, w, f3(SAM_MEAN), f3(SAM_STD),
                               clip.data_ptr(), 50, f3(CLIP_MEAN), f3(CLIP_STD),
                               torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert rc == 0
    ref_sam, ref_clip = preprocess_reference(img, **args(img, sam_side=160, clip_side=50))
    assert_close_verbose(sam, ref_sam, GPU_ATOL, 0.0, "raw sam")
    assert_close_verbose(clip, ref_clip, GPU_ATOL, 0.0, "raw clip")


@requires_cuda
@requires_kernel
def test_cuda_op_compiles_fullgraph():
    img = rand_image(300, 451, seed=5).cuda()
    kw = args(img, sam_side=256, clip_side=96)

    def f(img):
        return preprocess(img, **kw, backend="cuda")

    eager = f(img)
    compiled = torch.compile(f, fullgraph=True)(img)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    torch.library.opcheck(torch.ops.fastsamclip.preprocess_u8.default,
                          (img, 256, *kw["sam_hw"], list(SAM_MEAN), list(SAM_STD), 96, list(CLIP_MEAN),
                           list(CLIP_STD)))
