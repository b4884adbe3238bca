"""The benchmark suite's CPU path (it must produce its tables and files) and its counters."""
import json
import os

import pytest

from benchmarks import run as bench_run
from cogkern import _counters as counters


def test_attention_flops_by_hand():
    # CogVideoX-5B, one layer, batch 1: 4 * 17776^2 * 48 * 64 = 3.88e12 (shared/REFERENCE.md)
    assert counters.attention_flops(1, 17776, 48, 64) == 4 * 17776**2 * 48 * 64
    assert counters.attention_flops(1, 17776, 48, 64) == pytest.approx(3.88e12, rel=1e-3)
    assert counters.attention_flops(2, 10, 3, 8, causal=True) == 2 * 2 * 100 * 3 * 8
    assert counters.attention_flops(1, 10, 1, 8, pass_="bwd") == 2.5 * 4 * 100 * 8
    assert counters.attention_flops(1, 10, 1, 8, pass_="fwd_bwd") == 3.5 * 4 * 100 * 8
    with pytest.raises(ValueError, match="pass_"):
        counters.attention_flops(1, 1, 1, 1, pass_="both")


def test_rope_and_adamw_bytes_by_hand():
    # 5B shape, bf16, out-of-place: read + write 17776 * 48 * 64 elements of 2 bytes
    assert counters.rope_bytes(1, 17776, 48, 64, "bfloat16") == 2 * 17776 * 48 * 64 * 2
    assert counters.rope_bytes(1, 17776, 48, 64, "bfloat16", text_len=226, inplace=True) == 2 * 17550 * 48 * 64 * 2
    assert counters.adamw_bytes(10, "fp32") == 280  # 28 B/param (shared/REFERENCE.md)
    assert counters.adamw_bytes(10, "fp16-master") == 280
    assert counters.adamw_bytes(10, "bf16-master", with_overflow_check=True) == 300
    assert counters.adamw_bytes(10, "bf16-sr") == 220
    assert counters.adamw_bytes(10, "fp16-plain") == 220  # no masters, round to nearest: what SR moves
    assert counters.adamw_bytes(10, "bf16-plain") == 220
    assert counters.adamw_bytes(10, "bf16-remainders") == 260  # r: g p rem m v, w: p rem m v
    assert counters.adamw_bytes(10, "fp32-bf16m") == 200  # m, v 2 bytes each, read and written
    # p, g: 12 B; m, v codes 1 B each read and written; one block: 2 fp32 scales read and written
    assert counters.adamw_bytes(256, "fp32-int8m") == 256 * 12 + 256 * 4 + 2 * 8
    assert counters.adamw_bytes(10, "fp32", with_overflow_check=True) == 320  # fp32 grads read again
    with pytest.raises(ValueError, match="mode"):
        counters.adamw_bytes(1, "fp8")


@pytest.mark.slow
def test_quick_suite_on_cpu_writes_tables_and_files(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench_run.main(["--device", "cpu", "--quick", "--only", "rope,train", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "Ceilings" in printed and "3D RoPE" in printed and "Training step" in printed
    for f in ("ceilings.json", "rope.json", "train.json", "results.csv", "rope.png", "train.png"):
        assert (out / f).stat().st_size > 0, f
    rows = json.load(open(out / "rope.json"))["rows"]
    assert any(r["impl"].startswith("cogkern") and r["GBps"] > 0 for r in rows)
    ceilings = json.load(open(out / "ceilings.json"))
    assert ceilings["copy_GBps"] > 0 and ceilings["matmul_TFLOPs"] > 0


def test_unknown_benchmark_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--only", "rope,warp"])
    assert exc.value.code == 2 and "warp" in capsys.readouterr().err


def test_profile_step_writes_a_chrome_trace_on_cpu(tmp_path):
    import subprocess
    import sys

    trace = tmp_path / "trace.json"
    out = subprocess.run([sys.executable, "profiling/profile_step.py", "--what", "rope", "--small", "--device", "cpu",
                          "--trace", str(trace)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cogkern::rope3d_" in out.stdout  # the op shows in the profile table
    assert json.load(open(trace))["traceEvents"]
