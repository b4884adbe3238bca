"""The installed extension: build facts, and a clear refusal under the wrong torch."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cogkern


def test_build_info():
    info = cogkern.build_info()
    assert set(info) == {"torch_version", "torch_cuda", "cuda_kernels", "cuda_version", "cuda_archs", "cpu_threads",
                         "cuda_attention_head_dims", "cuda_dtypes"}
    # csrc/common/dispatch.h's lists, as the attention module and the CUDA tests read them.
    assert info["cuda_attention_head_dims"] == list(cogkern.attention.CUDA_HEAD_DIMS) == [64, 128]
    assert info["cuda_dtypes"] == ["float16", "bfloat16"]
    assert cogkern.attention.CUDA_DTYPES == (torch.float16, torch.bfloat16)
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cuda_version"]
        assert torch.ops.cogkern.rope3d.default.has_kernel_for_dispatch_key("CUDA")
    else:
        assert info["cuda_archs"] == []
    expected = os.environ.get("COGKERN_EXPECT_CUDA_ARCH")  # set by .ci/run, which builds for sm_90a
    if expected:
        assert info["cuda_kernels"] and any(a.startswith(expected) for a in info["cuda_archs"]), info


def test_cpu_kernels_use_torch_threads():
    """at::parallel_for in the extension runs on torch's threads (serial if built without OpenMP)."""
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(threads)
            assert cogkern.build_info()["cpu_threads"] == threads
    finally:
        torch.set_num_threads(before)


def test_cpu_fp16_conversions_match_c10_half():
    """The optimizer's vectorizable fp16 conversions (common/cpu/fp16_bits.h) give c10::Half's bits."""
    assert cogkern._C.fp16_conversion_mismatches() == 0


def test_ops_registered_for_cpu():
    for name in ("rope3d", "rope3d_", "rope_table", "rope_table_"):
        assert getattr(torch.ops.cogkern, name).default.has_kernel_for_dispatch_key("CPU")


def test_import_under_other_torch_is_a_clear_import_error():
    code = "import torch; torch.__version__ = '1.0.0+other'\ntry:\n import cogkern\nexcept ImportError as e:\n print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "built against torch" in out.stdout and "1.0.0+other" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


NVCC = next((os.path.join(d, "bin", "nvcc") for d in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")
             if d and os.path.exists(os.path.join(d, "bin", "nvcc"))), None)


def _cmake_version(exe):
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    m = re.search(r"cmake version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_cmake():
    """The cmake this Python's environment builds with (the `test` extra installs one >= 3.26 next to
    the interpreter, as pip's build does), else one on PATH; None when no cmake >= 3.26 is found."""
    candidates = [os.path.join(os.path.dirname(sys.executable), "cmake")]
    try:
        import cmake  # the PyPI package's binary

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except ImportError:
        pass
    candidates.append(shutil.which("cmake"))
    for exe in candidates:
        if exe and os.path.exists(exe) and (_cmake_version(exe) or (0, 0)) >= (3, 26):
            return exe
    return None


CMAKE = find_cmake()
needs_cmake_and_nvcc = pytest.mark.skipif(
    CMAKE is None or NVCC is None,
    reason="needs nvcc and cmake >= 3.26 (pip install '.[test]' brings cmake into this environment)")


def cmake_configure(build_dir, env):
    return subprocess.run([CMAKE, "-S", ROOT, "-B", str(build_dir), "-DCOGKERN_CUDA=ON",
                           f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


@needs_cmake_and_nvcc
@pytest.mark.parametrize("archs, message", [
    # Which of sm_90 and sm_90a code an H100 would run is the runtime's choice; only 9.0a has the Hopper kernels.
    ("9.0;9.0a", "names both 9.0 and 9.0a"),
    ("8.0;nine", "cannot read 'nine' in TORCH_CUDA_ARCH_LIST"),
])
def test_cmake_refuses_a_bad_arch_list(tmp_path, archs, message):
    out = cmake_configure(tmp_path, {"TORCH_CUDA_ARCH_LIST": archs})
    assert out.returncode != 0
    assert message in " ".join((out.stdout + out.stderr).split()), out.stdout[-2000:] + out.stderr[-2000:]


@needs_cmake_and_nvcc
def test_cmake_refuses_cuda_older_than_12_5(tmp_path):
    """The tensor maps need cudaGetDriverEntryPointByVersion (CUDA 12.5): an older nvcc is named, not a compile error."""
    fake = tmp_path / "nvcc"  # the real nvcc, but it says it is 12.4
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.4, V12.4.131"; '
                    f'exit 0; fi\nexec {NVCC} "$@"\n')
    fake.chmod(0o755)
    out = cmake_configure(tmp_path / "build", {"CUDACXX": str(fake), "TORCH_CUDA_ARCH_LIST": "9.0a"})
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode != 0 and "is CUDA 12.4; the kernels need CUDA 12.5 or newer" in text, text[-3000:]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("config", ["FwdConfig", "BwdConfig", "Sm90FwdConfig", "Sm90WsFwdConfig"])
def test_a_head_dim_off_the_list_has_no_tile_config(tmp_path, config):
    """csrc/common/dispatch.h lists the head dims; each tile config exists for exactly those, so an
    unlisted one (96) fails to compile instead of falling into another's tiles. 64 compiles (the control)."""
    def compile_with(d):
        src = tmp_path / f"{config}_{d}.cu"
        src.write_text('#include "attention/flash/flash_fwd_kernel.cuh"\n'
                       '#include "attention/flash/flash_bwd_kernel.cuh"\n'
                       '#include "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh"\n'
                       f"int probe = cogkern::flash::{config}<{d}>::kBM;\n")
        return subprocess.run([NVCC, "-std=c++20", "--expt-relaxed-constexpr", "-arch=sm_90a", "-I",
                               os.path.join(ROOT, "csrc"), "-c", str(src), "-o", str(tmp_path / f"{d}.o")],
                              capture_output=True, text=True, timeout=300)

    assert compile_with(64).returncode == 0, compile_with(64).stderr[-2000:]
    bad = compile_with(96)
    assert bad.returncode != 0 and f"{config}<96>" in bad.stderr, bad.stderr[-2000:]
