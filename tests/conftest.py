"""Test harness: picks the device and makes Triton's kernels runnable on a machine without a GPU.

With CUDA the real kernels run on the GPU. Without it TRITON_INTERPRET=1 is set here, before any test module
imports fastbert's kernels (fastbert itself imports Triton lazily), so the same Triton code runs on CPU tensors
through Triton's interpreter. Tests marked `gpu` need CUDA and are skipped, with that reason, elsewhere.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
# Kernel outputs start as NaN (fastbert.kernels.common.empty): an element a kernel forgets to write fails.
os.environ["FASTBERT_POISON"] = "1"

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
