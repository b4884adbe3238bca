"""The CUDA kernels' own source, run on the CPU under scripts/cuda_emu's thread-level
emulator (PTX fragments as the ISA defines them): for the attention kernels the 2x
error rule, the deterministic backward, NaN propagation; the Hopper wgmma building
blocks' conformance tile (descriptors, swizzle, fragments; csrc/common/cuda/sm90_wgmma.cuh);
the optimizer's kernels against the CPU backend, bit for bit. With an adversarial
schedule (one group per block runs behind), so missing barriers fail too. Catches
indexing, masking and synchronization bugs between GPU runs; real PTX semantics and
timing still need the GPU (scripts/device_check.sh)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")
def test_attention_kernels_under_the_emulator():
    env = dict(os.environ)
    # --laggard: one warp / warpgroup per block runs behind, so a missing barrier fails.
    script = os.path.join(ROOT, "scripts", "cuda_emu", "run_emu.py")
    out = subprocess.run([sys.executable, script, "--quick", "--laggard"], capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "\n0 failed" in out.stdout, out.stdout[-4000:]


def _mutations():
    sys.path.insert(0, os.path.join(ROOT, "scripts", "cuda_emu"))
    try:
        import mutations
    finally:
        sys.path.pop(0)
    return mutations


def test_each_planted_fault_still_applies_to_the_sources(tmp_path):
    """scripts/cuda_emu/mutations.py edits kernel sources by exact text: a kernel edit that
    moves that text must update the mutation, not silently retire it."""
    mutations = _mutations()
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    for m in mutations.MUTATIONS:
        mutations.apply(m, str(tmp_path / "csrc"))  # raises if the text is not there exactly once
        assert (tmp_path / "csrc" / m.file).read_text() != open(os.path.join(ROOT, "csrc", m.file)).read()
        shutil.copy(os.path.join(ROOT, "csrc", m.file), tmp_path / "csrc" / m.file)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the emulator")
def test_the_emulator_catches_every_planted_fault():
    """Each planted fault (a dropped barrier, proxy fence or wgmma fence, a stage freed
    early, a wrong swizzle or fragment) makes the emulator fail with the message that
    names it, while the unmutated sources pass the same runs (mutations.py)."""
    env = dict(os.environ)
    script = os.path.join(ROOT, "scripts", "cuda_emu", "mutations.py")
    # The default work tree is one fixed path, so ccache (when installed) serves the units a mutation leaves alone.
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=2400, cwd=ROOT, env=env)
    assert out.returncode == 0 and "\n0 failed" in out.stdout, out.stdout[-6000:] + out.stderr[-3000:]
