"""Test set-up: offline model hubs, and the Triton interpreter when there is no GPU.

Both variables must be set before open_clip / triton are first imported, hence here.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # open_clip otherwise retries an unreachable hub for ~1 min

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter (fp32/fp16 numerics only: its
    # bf16 arithmetic is wrong, so bf16 tests are GPU-only).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
