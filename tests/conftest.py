"""Shared test settings. CUDA tests carry the `cuda` marker and skip without a GPU.

COGKERN_CUDA_TESTS_DEVICE=cpu runs the CUDA tests' logic against the CPU
backend, so the test code itself is checked before the rare GPU run: in the
modules that set CPU_DRY_RUN = True and take their device from
GPU_TEST_DEVICE (tests that need a real GPU skip themselves there).
"""
import os

import pytest
import torch

GPU_TEST_DEVICE = os.environ.get("COGKERN_CUDA_TESTS_DEVICE", "cuda")

# A kernel that fails its first-use check (cogkern._guard) must fail the tests, not pass them
# quietly through the composite fallback. test_guard.py sets its own values.
os.environ.setdefault("COGKERN_VALIDATE", "strict")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        dry_run = GPU_TEST_DEVICE != "cuda" and getattr(item.module, "CPU_DRY_RUN", False)
        if "cuda" in item.keywords and not dry_run:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
