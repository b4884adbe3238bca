"""python -m cogkern.selftest on the CPU, as CI runs it: exit status 0, every row there, the JSON
well formed; and its runner: a crashing or hanging family is a failed row, not a lost run."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import COGKERN_PARENT

from cogkern import _counters, _validate, selftest

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (COGKERN_PARENT, env.get("PYTHONPATH")) if p)
    return env


def _expected_rows() -> set[tuple[str, str | None, str | None, str | None, int | None]]:
    """(kind, kernel, direction, dtype, head_dim) of every row the CPU run must print."""
    dtypes = [str(d).replace("torch.", "") for d in selftest.CPU_DTYPES]
    rows = {("ceiling", "matmul", None, d, None) for d in dtypes} | {("ceiling", "copy", None, None, None)}
    for d in dtypes:
        for head_dim in (64, 128):
            for direction in ("forward", "backward"):
                rows |= {(kind, "cpu", direction, d, head_dim) for kind in ("check", "speed")}
        rows.add(("check", "rope3d", "forward+backward", d, _validate.ROPE_CASE["head_dim"]))
    rows.add(("speed", "rope3d", "forward", dtypes[0], 64))
    for name, param_dtype, _ in selftest.OPTIMIZER_MODES:
        dtype = str(param_dtype).replace("torch.", "")
        rows |= {(kind, f"adamw[{name}]", "step", dtype, None) for kind in ("check", "speed")}
    return rows


@pytest.mark.slow
def test_quick_cpu_selftest_passes_with_every_row_and_a_well_formed_json(tmp_path):
    out_json = tmp_path / "selftest.json"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cogkern.selftest", "--quick", "--device", "cpu", "--json",
                           str(out_json)], capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS ", "FAIL "))]
    assert "build_info:" in proc.stdout and "device: CPU" in proc.stdout and "all passed" in proc.stdout

    doc = json.loads(out_json.read_text())
    assert doc["complete"] is True and doc["passed"] is True
    assert doc["build_info"]["torch_version"] and doc["device"]["type"] == "cpu" and doc["torch"]["version"]
    records = doc["checks"]
    # One record per printed row, in the printed order.
    assert [r["name"] for r in records] == [ln[6:].split("  ")[0].rstrip() for ln in printed]
    assert len({(r["family"], r["name"]) for r in records}) == len(records)
    got = {(r["kind"], r["kernel"], r["direction"], r["dtype"], r["head_dim"]) for r in records}
    assert got == _expected_rows()
    for r in records:
        assert r["passed"] is True and r["error"] is None, r
        assert isinstance(r["name"], str) and r["family"] and r["seconds"] >= 0
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r["figures"].values()), r
        if r["kind"] in ("speed", "ceiling"):
            rate = r["figures"].get("tflops", r["figures"].get("gbps"))
            assert rate is not None and rate > 0, r
        if r["kind"] == "speed":  # judged against the ceiling of the same run
            assert 0 < r["figures"]["pct_of_ceiling"], r
        if r["kind"] == "speed" and r["kernel"].startswith("adamw["):
            mode = r["kernel"][len("adamw["):-1]
            assert r["figures"]["bytes_per_param"] == _counters.adamw_bytes_per_param(mode)
    print(f"CPU selftest --quick: {len(records)} rows in {seconds:.1f} s")


def _record_line(name):
    return selftest._RECORD + json.dumps(dict(name=name, kind="check", passed=True, error=None, figures={}, seconds=0))


def test_run_child_keeps_the_rows_of_a_child_that_crashes():
    got = []
    code = f"import os, sys; print({_record_line('first')!r}, flush=True); sys.stderr.write('dying\\n'); " \
           "sys.stderr.flush(); os.kill(os.getpid(), 11)"
    result = selftest.run_child([sys.executable, "-c", code], dict(os.environ), 60, got.append)
    assert result.returncode == -11 and "dying" in result.stderr_tail
    assert [r["name"] for r in got] == ["first"]
    assert selftest._exit_text(result.returncode) == "exit code -11 (SIGSEGV)"


def test_run_child_kills_a_hanging_child_at_the_timeout():
    got, notes = [], []
    code = f"import time; print({_record_line('before the hang')!r}, flush=True); " \
           f"print({selftest._NOTE + 'a note'!r}, flush=True); print('library chatter', flush=True); time.sleep(120)"
    start = time.monotonic()
    result = selftest.run_child([sys.executable, "-c", code], dict(os.environ), 3, got.append, notes.append)
    assert result.returncode is None and time.monotonic() - start < 30
    assert [r["name"] for r in got] == ["before the hang"] and notes == ["a note"]


def test_run_child_kills_a_child_that_hangs_after_closing_its_stdout():
    # As a process stuck in its exit (a CUDA context teardown, say) looks from outside.
    got = []
    code = f"import os, time; print({_record_line('done')!r}, flush=True); os.close(1); time.sleep(120)"
    start = time.monotonic()
    result = selftest.run_child([sys.executable, "-c", code], dict(os.environ), 3, got.append)
    assert result.returncode is None and time.monotonic() - start < 30 and [r["name"] for r in got] == ["done"]


def test_a_crashed_family_is_a_failed_row_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run_child(argv, env, timeout, on_record, on_note=None):
        family = argv[argv.index("--child") + 1]
        ran.append(family)
        assert env["COGKERN_VALIDATE"] == "0"
        on_record(dict(name=f"{family} row", kind="check", passed=True, error=None, figures={}, seconds=0.0))
        if family == "rope":
            return selftest.ChildResult(-11, "Fatal Python error: Segmentation fault\n", 1.0)
        if family == "optimizer":
            return selftest.ChildResult(None, "", timeout)
        return selftest.ChildResult(0, "", 1.0)

    monkeypatch.setattr(selftest, "run_child", fake_run_child)
    out_json = tmp_path / "out.json"
    rc = selftest.main(["--device", "cpu", "--json", str(out_json), "--timeout", "7"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert ran == [f.name for f in selftest.plan_families("cpu")]
    records = {r["name"]: r for r in json.loads(out_json.read_text())["checks"]}
    assert all(records[f"{family} row"]["passed"] for family in ran)
    assert records["rope (subprocess)"]["error"].startswith("exit code -11 (SIGSEGV); stderr:\nFatal Python error")
    assert records["optimizer (subprocess)"]["error"] == "timeout after 7 s"
    assert "2 FAILED: rope (subprocess); optimizer (subprocess)" in printed


def test_only_selects_families_by_prefix_and_names_the_choices_when_none_match(capsys):
    assert selftest.main(["--device", "cpu", "--only", "rope,attention", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["ceilings", "attention:cpu", "rope"]
    with pytest.raises(SystemExit) as exc:
        selftest.main(["--device", "cpu", "--only", "warp"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "warp" in err and "optimizer" in err


def test_gpu_plan_lists_a_hopper_mode_only_when_attention_kernels_confirms_it(monkeypatch):
    """The planning logic on a (pretended) Hopper GPU whose build runs forward modes 1-3 and
    backward modes 1 and 3: mode 4 and backward 2 silently mean mma.sync there, so no family."""
    import cogkern
    import torch

    confirmed = {"forward": {1: "wgmma", 2: "wgmma-pipelined", 3: "wgmma-ws"},
                 "backward": {1: "wgmma-2wg", 3: "wgmma-ws"}}

    def fake_kernels(q):
        fwd, bwd = int(os.environ["COGKERN_ATTENTION_SM90"]), int(os.environ["COGKERN_ATTENTION_SM90_BWD"])
        return {"forward": confirmed["forward"].get(fwd, "mma.sync"),
                "backward": confirmed["backward"].get(bwd, "mma.sync")}

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: real_empty(*a, **kw))
    monkeypatch.setattr(cogkern, "attention_kernels", fake_kernels)
    monkeypatch.setenv("COGKERN_ATTENTION_SM90", "4")  # the caller's own setting survives planning
    monkeypatch.delenv("COGKERN_ATTENTION_SM90_BWD", raising=False)
    names = [f.name for f in selftest.plan_families("cuda")]
    assert names == ["ceilings", "attention:mma.sync", "attention.forward:wgmma", "attention.forward:wgmma-pipelined",
                     "attention.forward:wgmma-ws", "attention.backward:wgmma-2wg", "attention.backward:wgmma-ws",
                     "rope", "optimizer"]
    assert os.environ["COGKERN_ATTENTION_SM90"] == "4" and "COGKERN_ATTENTION_SM90_BWD" not in os.environ
    families = {f.name: f for f in selftest.plan_families("cuda", skip_ws=True)}
    assert not any("ws" in name for name in families)
    assert families["attention.backward:wgmma-2wg"].env == {"COGKERN_ATTENTION_SM90": "0",
                                                            "COGKERN_ATTENTION_SM90_BWD": "1"}
    assert families["attention.backward:wgmma-2wg"].directions == ("backward",)

    def broken(q):
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(cogkern, "attention_kernels", broken)
    problems = []
    names = [f.name for f in selftest.plan_families("cuda", problems=problems)]
    assert names == ["ceilings", "attention:mma.sync", "rope", "optimizer"]
    assert len(problems) == 7 and "no kernel image" in problems[0]


def test_json_is_strict_even_with_a_non_finite_figure(tmp_path):
    out = tmp_path / "r.json"
    report = selftest.Report({"build_info": {}}, str(out), out=io.StringIO())
    report.add(dict(name="speed x", family="f", kind="speed", passed=False, error="non-finite output",
                    figures={"gbps": float("inf"), "ms": 0.5}, seconds=0.1))
    report.write_json(complete=True)
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["checks"][0]["figures"] == {"gbps": None, "ms": 0.5} and doc["passed"] is False
