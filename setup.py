"""Build for fastsamclip.

``kernels/`` is installed as ``fastsamclip.kernels`` (package_dir mapping; works for regular and
editable installs). CUDA C++ sources in ``kernels/csrc/*.cu`` are built by ``CMakeLists.txt``
into a torch-free shared library when ``nvcc`` and ``cmake`` are found; set
``FASTSAMCLIP_NO_CUDA=1`` to skip that step (the same functions then run in plain torch).
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_sources():
    return sorted(glob.glob(os.path.join(HERE, "kernels", "csrc", "*.cu")))


class BuildWithCMake(build_py):
    """Build the CUDA library with CMake, then the ordinary Python build.

    CMake writes the library into ``kernels/lib/`` of the source tree, where the package is
    imported from in editable installs (``pip install -e .`` maps ``fastsamclip.kernels`` to
    ``kernels/``); for regular installs it is also copied into the build tree.
    """

    def run(self):
        self._build_cuda()
        super().run()
        out_dir = os.path.join(HERE, "kernels", "lib")
        if os.path.isdir(out_dir) and not getattr(self, "editable_mode", False):
            # package_data's lib/*.so glob may have been expanded before the library existed.
            shutil.copytree(out_dir, os.path.join(self.build_lib, "fastsamclip", "kernels", "lib"),
                            dirs_exist_ok=True)

    def _build_cuda(self):
        if os.environ.get("FASTSAMCLIP_NO_CUDA", "0") == "1":
            print("fastsamclip: FASTSAMCLIP_NO_CUDA=1, skipping the CUDA C++ build")
            return
        if not _cuda_sources():
            return
        nvcc, cmake = shutil.which("nvcc"), shutil.which("cmake")
        if nvcc is None or cmake is None:
            print(f"fastsamclip: CUDA C++ build skipped (nvcc: {nvcc}, cmake: {cmake}); "
                  "plain-torch fallbacks will be used")
            return
        build_dir = os.path.join(HERE, "build", "cmake")
        out_dir = os.path.join(HERE, "kernels", "lib")
        os.makedirs(build_dir, exist_ok=True)
        try:
            subprocess.check_call([cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                                   f"-DCMAKE_CUDA_COMPILER={nvcc}",
                                   f"-DFASTSAMCLIP_LIB_DIR={out_dir}"])
            subprocess.check_call([cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)])
        except subprocess.CalledProcessError as e:
            # A broken toolchain should not silently give a CPU-only install: fail, and say how
            # to opt out.
            raise RuntimeError(f"fastsamclip: the CUDA C++ build failed ({e}); set "
                               "FASTSAMCLIP_NO_CUDA=1 to install without it") from e

setup(
    name="fastsamclip",
    version="0.1.0",
    description="SAM-CLIP (one ViT for promptable masks and image-text semantics) with fused "
    "Triton attention and distillation kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastsamclip", "fastsamclip.modeling", "fastsamclip.data", "fastsamclip.train", "fastsamclip.predictor",
              "fastsamclip.eval", "fastsamclip.export", "fastsamclip.serve", "fastsamclip.cli", "fastsamclip.kernels",
              "fastsamclip.bench", "fastsamclip.miniature"],
    package_dir={"fastsamclip": "fastsamclip", "fastsamclip.kernels": "kernels",
                 "fastsamclip.bench": "bench"},
    # The miniature world's teachers (fastsamclip miniature teachers), used by fastsamclip demo.
    package_data={"fastsamclip.kernels": ["lib/*.so", "csrc/*.cu", "csrc/*.h"],
                  "fastsamclip.miniature": ["teachers/*.pth", "teachers/*.json", "teachers/clip/*"],
                  # The page of `fastsamclip serve` (plain HTML, CSS and JavaScript; nothing fetched elsewhere).
                  "fastsamclip.serve": ["static/*"]},
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "numpy",
        "pillow",
        "packaging",
        "safetensors>=0.4",
        "open_clip_torch>=2.24",
        "segment-anything>=1.0",
        "scikit-image",
        # The miniature world (fastsamclip demo): scikit-learn's digits, scipy's distance transform.
        "scikit-learn",
        "scipy",
        "tqdm",
    ],
    extras_require={
        "train": ["webdataset>=0.2", "pycocotools", "tensorboard"],
        "bench": ["pytest-benchmark", "nvidia-ml-py", "matplotlib", "webdataset>=0.2", "pycocotools"],
        "test": ["pytest>=7", "pytest-benchmark", "webdataset>=0.2", "pycocotools", "matplotlib", "torchmetrics",
                 # the export and serve tests (the two extras below, and the tests' HTTP client)
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3", "litserve>=0.2.10", "python-multipart",
                 "httpx",
                 # the page's test drives Debian's chromium (never a browser download: .ci/run installs it)
                 "playwright",
                 # clip_benchmark's zero-shot metrics (clip-benchmark itself: pip install --no-deps)
                 "scikit-learn"],
        # `fastsamclip export --format onnx`: torch's dynamo exporter needs onnxscript; onnxruntime
        # checks the files against the torch model.
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        # `fastsamclip serve`: LitServe (FastAPI + uvicorn), multipart uploads; httpx for the benchmark's client.
        "serve": ["litserve>=0.2.10", "python-multipart", "httpx"],
        # `fastsamclip eval instances` scores masks with pycocotools' COCOeval.
        "eval": ["pycocotools"],
        # Optional baselines for the kernel benchmarks; both need a CUDA torch.
        "baselines": ["xformers", "flash-attn"],
    },
    entry_points={"console_scripts": ["fastsamclip=fastsamclip.cli:main"]},
    cmdclass={"build_py": BuildWithCMake},
)
