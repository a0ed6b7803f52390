#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as wheels for it (Python 3.12, x86-64 Linux), in one folder.
#
#   bash bench/gpu_wheels.sh [FOLDER]        # default ./gpu-wheels; on any machine that reaches PyPI
#
# The GPU machine (torch 2.11, triton 3.6, no internet) has torch, torchvision, timm, regex,
# safetensors, huggingface_hub, tqdm, numpy, pyyaml, pytest, pytest-xdist, nvidia-ml-py, cmake
# and nvcc; it lacks the packages below. Each is pinned, fetched without dependencies, and each
# one's own dependencies are either here or already on that machine:
#   open_clip_torch  torch, torchvision, regex, ftfy, tqdm, huggingface-hub, safetensors, timm
#   ftfy             wcwidth
#   webdataset       braceexpand, numpy, pyyaml
#   pycocotools      numpy                     (a cp312 manylinux build)
#   segment-anything, wcwidth, braceexpand     none
# segment-anything-fast: the PyTorch team's package is not on PyPI (the PyPI project of that name
# is FastSAM, which pulls in ultralytics and gradio); it is built from its git source when git and
# GitHub are reachable, and its benchmark row says "skipped" on the GPU machine otherwise.
# Then, there: see the README section "Measuring on a GPU machine without internet".
set -euo pipefail
OUT="${1:-gpu-wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
PACKAGES=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 segment-anything==1.0 webdataset==1.0.2
          braceexpand==0.1.7 pycocotools==2.0.11)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "${PACKAGES[@]}"
SAM_FAST_GIT="${SAM_FAST_GIT:-https://github.com/pytorch-labs/segment-anything-fast.git}"
if command -v git >/dev/null && "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" "git+$SAM_FAST_GIT" \
    >/dev/null 2>&1; then
  echo "segment-anything-fast: built from $SAM_FAST_GIT"
else
  echo "segment-anything-fast: not built (needs git and $SAM_FAST_GIT); its row will be skipped"
fi
ls -1 "$OUT"
du -sh "$OUT"
