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
    """scripts/cuda_emu/mutations.py finds each fault's site by a `[mut:NAME]` marker comment in
    the kernel source: a kernel edit that drops or duplicates a marker must fail here, not
    silently retire the mutation; and every marker in csrc/ belongs to a mutation."""
    mutations = _mutations()
    csrc = os.path.join(ROOT, "csrc")
    found = mutations.markers_in(csrc)
    used = {e.marker: m.file for m in mutations.MUTATIONS for e in m.edits}
    assert {k: v for k, v in found.items() if len(v) != 1} == {}, "markers that occur more than once"
    assert sorted(set(found) - set(used)) == [], "markers in csrc/ that no mutation uses"
    assert {k: f for k, f in used.items() if found.get(k) != [f]} == {}, "mutations whose marker is not in their file"
    shutil.copytree(csrc, tmp_path / "csrc")
    for m in mutations.MUTATIONS:
        mutations.apply(m, str(tmp_path / "csrc"))  # raises if a marker or its site's text is not there once
        assert (tmp_path / "csrc" / m.file).read_text() != open(os.path.join(csrc, m.file)).read()
        shutil.copy(os.path.join(csrc, m.file), tmp_path / "csrc" / m.file)


def test_a_missing_or_doubled_marker_fails_loudly(tmp_path):
    mutations = _mutations()
    m = mutations.MUTATIONS[0]
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    path = tmp_path / "csrc" / m.file
    text = path.read_text()
    tag = f"[mut:{m.edits[0].marker}]"
    for broken, count in ((text.replace(tag, ""), 0), (text.replace(tag, tag + " " + tag), 2)):
        path.write_text(broken)
        with pytest.raises(ValueError, match=rf"occurs {count} times"):
            mutations.apply(m, str(tmp_path / "csrc"))


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
