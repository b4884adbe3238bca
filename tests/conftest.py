"""Shared test settings. CUDA tests carry the `cuda` marker and skip without a GPU.

COGKERN_CUDA_TESTS_DEVICE=cpu runs the CUDA tests' logic against the CPU
backend, so the test code itself is checked before the rare GPU run: in the
modules that set CPU_DRY_RUN = True and take their device from
GPU_TEST_DEVICE (tests that need a real GPU skip themselves there).

COGKERN_TEST_TIMEOUT=S gives each test S seconds (scripts/device_check.sh sets
it; pytest-timeout is not everywhere): past S the test fails with a
TimeoutError if Python still has control, and S + 10 s later, as when a kernel
hangs and the main thread never returns from a CUDA call, the whole process
ends with exit status 124 after a line naming the test and every thread's stack.

This is the only conftest.py: test modules `from conftest import ...`, and a
second conftest.py in a subfolder would shadow this one under that name.
"""
import faulthandler
import os
import signal
import sys
import threading

import pytest
import torch

GPU_TEST_DEVICE = os.environ.get("COGKERN_CUDA_TESTS_DEVICE", "cuda")

# Where the cogkern under test lives (the installed package in CI, python/ in a dev tree):
# subprocesses get it on PYTHONPATH so they import the same build.
import cogkern as _cogkern  # noqa: E402

COGKERN_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(_cogkern.__file__)))
TEST_TIMEOUT_S = float(os.environ.get("COGKERN_TEST_TIMEOUT") or 0)
TEST_TIMEOUT_EXIT = 124  # as timeout(1): the caller reads it as "timed out"

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


@pytest.fixture
def one_thread():
    # torch's single-tensor AdamW reference is pathologically slow with 2 threads on a busy 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _raise_test_timeout(signum, frame):
    raise TimeoutError(f"the test ran past COGKERN_TEST_TIMEOUT={TEST_TIMEOUT_S:g} s")


def _uncaptured_stderr(config):
    """The process's real stderr: pytest's fd capture redirects fd 2 while a test runs."""
    capman = config.pluginmanager.getplugin("capturemanager")
    err = getattr(getattr(capman, "_global_capturing", None), "err", None)
    fd = getattr(err, "targetfd_save", None)
    return os.fdopen(os.dup(fd), "w") if isinstance(fd, int) else sys.__stderr__


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if TEST_TIMEOUT_S <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    finished = threading.Event()
    stderr = _uncaptured_stderr(item.config)

    def end_the_process():
        if finished.wait(TEST_TIMEOUT_S + 10):
            return
        stderr.write(f"\nTIMEOUT: {item.nodeid} ran past {TEST_TIMEOUT_S:g} s (COGKERN_TEST_TIMEOUT); "
                     "ending the test process\n")
        stderr.flush()
        faulthandler.dump_traceback(file=stderr, all_threads=True)
        os._exit(TEST_TIMEOUT_EXIT)

    # The last resort, from a C thread: for a main thread that blocks while holding the GIL.
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 25, exit=True, file=stderr)
    watchdog = threading.Thread(target=end_the_process, name="cogkern-test-timeout", daemon=True)
    watchdog.start()
    previous = signal.signal(signal.SIGALRM, _raise_test_timeout)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        finished.set()
        faulthandler.cancel_dump_traceback_later()
        if stderr is not sys.__stderr__:
            stderr.close()
