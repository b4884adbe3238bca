"""Shared test settings. CUDA tests carry the `cuda` marker and skip without a GPU.

COGKERN_CUDA_TESTS_DEVICE=cpu runs the CUDA tests' logic against the CPU
backend (tests that need a real GPU skip themselves), so the test code itself is
checked before the rare GPU run.
"""
import os

import pytest
import torch

GPU_TEST_DEVICE = os.environ.get("COGKERN_CUDA_TESTS_DEVICE", "cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or GPU_TEST_DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
