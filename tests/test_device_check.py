"""scripts/device_check.sh on this CPU machine: DEVICE_CHECK_DRY_RUN=1 runs every step's
logic with the CPU backend, and the GPU-only tools (the build, compute-sanitizer, ncu)
are skipped and say so. What must hold on the GPU machine, where a run can be killed at
any moment: summary.txt and logs.tgz are there after every step, a step past its limit
is stopped and the others go on, and a warp-specialized kernel that hung is left out of
every later step."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import COGKERN_PARENT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
SELECT = ROOT / "scripts" / "device_check_select.py"
STEPS = ("preflight", "build", "selftest", "wgmma_probe", "cuda_tests", "sm90_tests", "sm90_ws_tests", "memcheck",
         "ncu", "bench_optimizer")


def dry_run_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICE_CHECK_", "COGKERN_"))}
    env.update(DEVICE_CHECK_DRY_RUN="1", DEVICE_CHECK_WORK=str(tmp_path / "work"),
               PYTHONPATH=COGKERN_PARENT, DEVICE_CHECK_PYTHONPATH=COGKERN_PARENT)
    env.update(extra)
    return env


def run_check(tmp_path: Path, timeout: float = 600, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], env=dry_run_env(tmp_path, **extra), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, out


def summary_rows(out: Path) -> dict[str, list[str]]:
    """step name -> its summary.txt row's words (the last row of that name)."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and not line.startswith(("====", "----", "step ")):
            rows[words[0]] = words[1:]
    return rows


def logs_in(out: Path) -> set[str]:
    with tarfile.open(out / "logs.tgz") as tar:
        return {Path(name).name for name in tar.getnames()}


def kill_session(sid: int) -> None:
    """SIGKILL every process of session sid: the script under test, and the steps that
    `timeout` put in process groups of their own."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def selftest_json(path: Path, ws_forward_timed_out: bool) -> Path:
    """A selftest.json as python -m cogkern.selftest writes it: speed rows of the Hopper kernels
    (the warp-specialized ones fastest), and, if asked, the warp-specialized forward's family
    killed at its timeout."""
    def speed(kernel, direction, tflops):
        return {"name": f"speed attention.{direction}[{kernel}] bfloat16 D=64", "family": f"attention.{direction}:{kernel}",
                "kind": "speed", "kernel": kernel, "direction": direction, "dtype": "bfloat16", "head_dim": 64,
                "passed": True, "error": None, "figures": {"tflops": tflops, "ms": 1.0}}

    checks = [speed("wgmma", "forward", 310.0), speed("wgmma-ws-pingpong", "forward", 520.0),
              speed("wgmma-2wg", "backward", 240.0), speed("wgmma-ws", "backward", 410.0)]
    if ws_forward_timed_out:
        checks.append({"name": "attention.forward:wgmma-ws (subprocess)", "family": "attention.forward:wgmma-ws",
                       "kind": "process", "kernel": None, "direction": None, "dtype": None, "head_dim": None,
                       "passed": False, "error": "timeout after 45 s", "figures": {}})
    path = path / ("hung.json" if ws_forward_timed_out else "fine.json")
    path.write_text(json.dumps({"build_info": {}, "device": {}, "torch": {}, "checks": checks}))
    return path


def test_a_spent_budget_skips_every_step_and_still_publishes(tmp_path):
    proc, out = run_check(tmp_path, timeout=120, DEVICE_CHECK_BUDGET="1")
    assert proc.returncode == 0, proc.stderr
    rows = summary_rows(out)
    for step in STEPS:
        assert rows[step][0] == "SKIPPED" and "budget" in " ".join(rows[step]), (step, rows.get(step))
    assert "summary.txt" in logs_in(out)


def test_a_step_past_its_limit_is_stopped_and_the_next_steps_run(tmp_path):
    # The CUDA tests' step has 3 s (collecting the suite alone takes longer): stopped, and
    # memcheck after it still runs (nothing failed, so it has nothing to check).
    start = time.monotonic()
    proc, out = run_check(tmp_path, timeout=300, DEVICE_CHECK_STEPS="preflight,cuda_tests,memcheck",
                          DEVICE_CHECK_LIMIT_cuda_tests="3")
    assert proc.returncode == 0, proc.stderr
    rows = summary_rows(out)
    assert rows["preflight"][0] == "PASS", rows
    assert rows["cuda_tests"][0] == "TIMEOUT" and "killed at its 3s limit" in " ".join(rows["cuda_tests"]), rows
    assert int(rows["cuda_tests"][1].rstrip("s")) <= 3 + 10 + 5  # the limit, the kill grace, slack
    assert rows["memcheck"][0] == "SKIPPED" and "no kernel failed" in " ".join(rows["memcheck"]), rows
    assert {"preflight.log", "cuda_tests.log", "memcheck.log", "summary.txt"} <= logs_in(out)
    assert time.monotonic() - start < 200


def test_a_run_killed_midway_leaves_the_finished_steps_summary_and_logs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--out", str(out)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dry_run_env(tmp_path, DEVICE_CHECK_STEPS="preflight,build,cuda_tests"))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
            if any(line.startswith("cuda_tests") and "RUNNING" in line for line in text.splitlines()):
                break
            assert proc.poll() is None, "the run ended before its CUDA tests' step started"
            time.sleep(0.2)
        else:
            pytest.fail("the CUDA tests' step never started")
    finally:
        kill_session(proc.pid)  # as the device tool does at its timeout: no chance to clean up
        proc.wait()
    rows = summary_rows(out)
    assert rows["preflight"][0] == "PASS" and rows["build"][0] == "DRY-RUN", rows
    assert rows["cuda_tests"][0] == "RUNNING", rows
    assert {"preflight.log", "build.log", "summary.txt"} <= logs_in(out)


def test_a_hung_warp_specialized_kernel_is_left_out_of_the_later_steps(tmp_path):
    # The ws tests of a file without any: the control reaches pytest, which selects none.
    steps = dict(DEVICE_CHECK_STEPS="sm90_ws_tests,memcheck,ncu", DEVICE_CHECK_TESTS="tests/rope3d/test_rope3d_cuda.py")
    proc, out = run_check(tmp_path / "hung", timeout=120, DEVICE_CHECK_SELFTEST_JSON=str(selftest_json(tmp_path, True)),
                          **steps)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "hung" / "work"
    assert "attention.forward:wgmma-ws" in (work / "ws_hung.txt").read_text()
    rows = summary_rows(out)
    assert rows["sm90_ws_tests"][0] == "SKIPPED" and "hung" in " ".join(rows["sm90_ws_tests"]), rows
    # memcheck: the hung family is the failure, and the sanitizer run leaves the ws kernels out.
    memcheck = (work / "memcheck.log").read_text()
    assert "--only wgmma --skip-ws" in memcheck and "SKIPPED (no GPU)" in memcheck
    # ncu: the fastest kernels that are not warp-specialized.
    ncu = (work / "ncu.log").read_text()
    assert "COGKERN_ATTENTION_SM90=1 COGKERN_ATTENTION_SM90_BWD=1" in ncu, ncu
    assert rows["ncu"][0] == "SKIPPED" and "forward wgmma 1, backward wgmma-2wg 1" in " ".join(rows["ncu"]), rows

    # The control: the same speeds without the timeout; the warp-specialized ones are the fastest.
    proc, out = run_check(tmp_path / "fine", timeout=120, DEVICE_CHECK_SELFTEST_JSON=str(selftest_json(tmp_path, False)),
                          **steps)
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "fine" / "work"
    assert not (work / "ws_hung.txt").exists()
    assert summary_rows(out)["sm90_ws_tests"][0] == "SKIPPED"
    assert "no test selected" in (work / "sm90_ws_tests.log").read_text()
    assert "COGKERN_ATTENTION_SM90=4 COGKERN_ATTENTION_SM90_BWD=3" in (work / "ncu.log").read_text()
    assert summary_rows(out)["memcheck"][0] == "SKIPPED" and "no kernel failed" in (work / "memcheck.log").read_text()


def test_failed_groups_names_a_test_that_hung(tmp_path):
    log = tmp_path / "sm90_ws_tests.log"
    log.write_text("tests/attention/test_attention_cuda.py::test_sm90_backward_error_rule[x] PASSED\n"
                   "TIMEOUT: tests/attention/test_attention_cuda.py::test_sm90_warp_specialized_forward_reads_every_"
                   "v_layout[2-3-3] ran past 30 s (COGKERN_TEST_TIMEOUT); ending the test process\n")
    rope_log = tmp_path / "cuda_tests.log"
    rope_log.write_text("TIMEOUT: tests/rope3d/test_rope3d_cuda.py::test_rope_matches[fp16] ran past 30 s\n")
    found = subprocess.run([sys.executable, str(SELECT), "failed-groups", "--test-log", str(log), str(rope_log),
                            str(tmp_path / "absent.log")], capture_output=True, text=True, check=True).stdout
    lines = found.splitlines()
    assert lines[0] == "rope,wgmma"
    assert any("test_sm90_warp_specialized_forward_reads_every_v_layout[2-3-3] hung" in ln for ln in lines[1:])


@pytest.mark.slow
def test_the_whole_dry_run(tmp_path):
    """Every step, in order, on the CPU: the CUDA tests against the CPU backend (the module
    that supports it), the selftest's RoPE family, the probe's dry run, the benchmark small."""
    # The steps' limits are the GPU machine's; a shared 2-core box needs more.
    limits = {f"DEVICE_CHECK_LIMIT_{step}": "600" for step in STEPS}
    proc, out = run_check(tmp_path, timeout=2400, DEVICE_CHECK_TESTS="tests/rope3d/test_rope3d_cuda.py",
                          DEVICE_CHECK_SELFTEST_ARGS="--only rope", DEVICE_CHECK_BUDGET="2400",
                          DEVICE_CHECK_TEST_TIMEOUT="300", **limits)
    assert proc.returncode == 0, proc.stderr
    rows = summary_rows(out)
    expected = {"preflight": "PASS", "build": "DRY-RUN", "wgmma_probe": "PASS", "cuda_tests": "PASS",
                "sm90_tests": "SKIPPED", "sm90_ws_tests": "SKIPPED", "memcheck": "SKIPPED", "ncu": "SKIPPED",
                "bench_optimizer": "PASS"}
    if importlib.util.find_spec("cogkern.selftest") is not None:
        expected["selftest"] = "PASS"
        assert (out / "selftest.txt").read_text().strip() and json.loads((out / "selftest.json").read_text())["checks"]
    for step, status in expected.items():
        assert rows[step][0] == status, (step, rows[step])
    assert "no Hopper kernel passed" in " ".join(rows["ncu"]) or "no GPU" in " ".join(rows["ncu"])
    assert {f"{step}.log" for step in expected} | {"summary.txt"} <= logs_in(out)


def test_the_per_test_timeout_fails_a_slow_test_and_ends_a_hung_process(tmp_path):
    """tests/conftest.py's COGKERN_TEST_TIMEOUT, which the CUDA test steps set: a test still in
    Python fails with a TimeoutError and the next one runs; a test whose main thread never
    comes back (here: SIGALRM blocked, as in a CUDA call that never returns) ends the process
    with exit status 124 after a line naming it, the later tests not run."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_slow.py").write_text(
        "import signal, time\n"
        "def test_a_sleeper():\n    time.sleep(30)\n"
        "def test_quick():\n    assert 1 + 1 == 2\n"
        "def test_b_stuck():\n    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n    time.sleep(60)\n"
        "def test_c_never_reached():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGKERN_")}
    env.update(COGKERN_TEST_TIMEOUT="1", PYTHONPATH=COGKERN_PARENT)

    def pytest_run(*args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_slow.py", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    start = time.monotonic()
    rc, output = pytest_run("-k", "not stuck")
    assert rc == 1, output
    assert "test_a_sleeper FAILED" in output and "ran past COGKERN_TEST_TIMEOUT=1 s" in output, output
    assert "test_quick PASSED" in output and "test_c_never_reached PASSED" in output, output
    rc, output = pytest_run()
    assert rc == 124, output
    assert "TIMEOUT: test_slow.py::test_b_stuck ran past 1 s" in output, output
    assert "test_c_never_reached" not in output.split("TIMEOUT: ")[1], output
    assert time.monotonic() - start < 90


def test_fastest_leaves_out_a_kernel_whose_family_did_not_finish(tmp_path):
    path = selftest_json(tmp_path, ws_forward_timed_out=False)
    doc = json.loads(path.read_text())
    fast = dict(doc["checks"][0], kernel="wgmma-pipelined", family="attention.forward:wgmma-pipelined",
                figures={"tflops": 450.0, "ms": 1.0})
    fastest = [sys.executable, str(SELECT), "fastest", "--json", str(path), "--direction", "forward", "--skip-ws"]
    path.write_text(json.dumps(dict(doc, checks=doc["checks"] + [fast])))
    assert subprocess.run(fastest, capture_output=True, text=True, check=True).stdout.split() == \
        ["wgmma-pipelined", "2", "450.0"]
    # The same speed row, but the family's subprocess was killed after it (a later probe hung).
    crashed = {"name": "attention.forward:wgmma-pipelined (subprocess)", "family": "attention.forward:wgmma-pipelined",
               "kind": "process", "passed": False, "error": "exit code -11 (SIGSEGV)", "figures": {}}
    path.write_text(json.dumps(dict(doc, checks=doc["checks"] + [fast, crashed])))
    assert subprocess.run(fastest, capture_output=True, text=True, check=True).stdout.split() == ["wgmma", "1", "310.0"]
