"""What scripts/device_check.sh decides from its earlier steps' results.

    python scripts/device_check_select.py ws-hung --json selftest.json [--probe-log wgmma_probe.log]
        exit 0 and one line of why, if a warp-specialized kernel hung; exit 1 if none did
    python scripts/device_check_select.py fastest --json selftest.json --direction forward|backward [--skip-ws]
        'KERNEL MODE TFLOPS' of the fastest Hopper kernel whose every check passed; exit 1 if none
    python scripts/device_check_select.py summary --json selftest.json
        one line: how many checks passed and failed, and the first failures' names
    python scripts/device_check_select.py failed-groups [--json selftest.json] [--junit a.xml ...] [--probe-log LOG]
                                                         [--test-log pytest.log ...]
        the scripts/sanitize_cases.py groups (rope, optimizer, attention, wgmma) of every kernel
        that failed, comma-separated on the first line, then one line per failure; empty if none
        (--test-log: the 'TIMEOUT: nodeid' line of a test that hung, whose process wrote no JUnit XML)

selftest.json is what `python -m cogkern.selftest --json` writes: {"checks": [{"name",
"family", "kernel", "direction", "dtype", "head_dim", "passed", "error", "figures": {"tflops",
...}}]}; a family that ran past its timeout gives a record with passed false and an error
starting "timeout". A missing or unreadable file counts as no results.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET

# The opt-in Hopper kernels and the environment value that selects each (python/cogkern/attention.py).
SM90_FORWARD_MODES = {"wgmma": "1", "wgmma-pipelined": "2", "wgmma-ws": "3", "wgmma-ws-pingpong": "4"}
SM90_BACKWARD_MODES = {"wgmma-2wg": "1", "wgmma-1wg": "2", "wgmma-ws": "3"}
SANITIZE_GROUPS = ("rope", "optimizer", "attention", "wgmma")
# What profiling/profile_step.py --what attention runs, so ncu sees the configuration ranked here.
PROFILED_DTYPES = ("bf16", "bfloat16", "torch.bfloat16")
PROFILED_HEAD_DIM = 64


def load_checks(path: str | None) -> list[dict]:
    if not path:
        return []
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    checks = data.get("checks", []) if isinstance(data, dict) else []
    return [c for c in checks if isinstance(c, dict)]


def _words(*texts) -> set[str]:
    return {w for t in texts if t for w in re.split(r"[^a-z0-9]+", str(t).lower()) if w}


def is_warp_specialized(check: dict) -> bool:
    return "ws" in _words(check.get("kernel"), check.get("family"), check.get("name"))


def timed_out(check: dict) -> bool:
    return not check.get("passed") and str(check.get("error") or "").lower().startswith("timeout")


def ws_hang_reason(checks: list[dict], probe_log: str | None = None) -> str | None:
    for c in checks:
        if timed_out(c) and is_warp_specialized(c):
            return f"selftest: {c.get('name') or c.get('family')}: {c.get('error')}"
    if probe_log:
        # The probe prints '.... NAME' before each check and 'ok'/'FAIL NAME' after it: a last
        # '....' line with no verdict after it is the check it was in when it was stopped.
        try:
            with open(probe_log, errors="replace") as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        except OSError:
            lines = []
        if lines and lines[-1].startswith(".... ") and "ws" in _words(lines[-1][5:]):
            return f"wgmma_probe stopped inside: {lines[-1][5:]}"
    return None


def fastest(checks: list[dict], direction: str, skip_ws: bool = False) -> tuple[str, str, float] | None:
    modes = SM90_FORWARD_MODES if direction == "forward" else SM90_BACKWARD_MODES
    by_kernel: dict[str, list[dict]] = {}
    for c in checks:
        if c.get("kernel") in modes and str(c.get("direction", "")).startswith(direction):
            by_kernel.setdefault(c["kernel"], []).append(c)
    # A family with any failed row (its subprocess timed out or crashed, say) rules out its kernel.
    failed_families = {c.get("family") for c in checks if not c.get("passed")}
    best = None
    for kernel, recs in by_kernel.items():
        if (skip_ws and kernel.startswith("wgmma-ws")) or not all(r.get("passed") for r in recs):
            continue
        if any(r.get("family") in failed_families for r in recs):
            continue
        rated = [r for r in recs if isinstance((r.get("figures") or {}).get("tflops"), (int, float))]
        profiled = [r for r in rated if str(r.get("dtype")) in PROFILED_DTYPES and r.get("head_dim") == PROFILED_HEAD_DIM]
        rated = profiled or rated
        if not rated:
            continue
        tflops = max(float(r["figures"]["tflops"]) for r in rated)
        if best is None or tflops > best[2]:
            best = (kernel, modes[kernel], tflops)
    return best


def group_of(*texts) -> str | None:
    """The sanitize_cases.py group of a kernel, test or check, from the words naming it."""
    words = _words(*texts)
    joined = " ".join(str(t).lower() for t in texts if t)
    if "wgmma" in joined or "sm90" in words:
        return "wgmma"
    # Attention before RoPE: the fused attention applies the RoPE, and its tests say so in their names.
    if words & {"attention", "flash", "mma"} or "attention" in joined:
        return "attention"
    if "rope" in joined:
        return "rope"
    if words & {"adamw", "optim", "optimizer", "scaler"} or "adamw" in joined:
        return "optimizer"
    return None


def failures(checks: list[dict], junit_paths: list[str], probe_log: str | None,
             test_logs: list[str] = ()) -> list[tuple[str | None, str]]:
    found = []
    for c in checks:
        if c.get("passed") is False:
            found.append((group_of(c.get("kernel"), c.get("family"), c.get("name")),
                          f"selftest {c.get('name') or c.get('family')}: {str(c.get('error') or '')[:120]}"))
    for path in junit_paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                found.append((group_of(case.get("classname"), case.get("name")),
                              f"test {case.get('classname')}::{case.get('name')}"))
    if probe_log:
        try:
            with open(probe_log, errors="replace") as f:
                for line in f:
                    if line.startswith("FAIL "):
                        found.append(("wgmma", f"wgmma_probe {line[5:].strip()}"))
        except OSError:
            pass
    for path in test_logs:
        # tests/conftest.py's watchdog: 'TIMEOUT: tests/x.py::test_y[id] ran past ...'.
        try:
            with open(path, errors="replace") as f:
                hung = [line.split()[1] for line in f if line.startswith("TIMEOUT: ") and len(line.split()) > 1]
        except OSError:
            continue
        found += [(group_of(*nodeid.replace("/", " ").split("::")), f"test {nodeid} hung") for nodeid in hung]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ws-hung")
    p.add_argument("--json")
    p.add_argument("--probe-log")
    p = sub.add_parser("fastest")
    p.add_argument("--json")
    p.add_argument("--direction", choices=("forward", "backward"), required=True)
    p.add_argument("--skip-ws", action="store_true")
    p = sub.add_parser("summary")
    p.add_argument("--json")
    p = sub.add_parser("failed-groups")
    p.add_argument("--json")
    p.add_argument("--junit", nargs="*", default=[])
    p.add_argument("--probe-log")
    p.add_argument("--test-log", nargs="*", default=[])
    args = ap.parse_args(argv)
    checks = load_checks(args.json)
    if args.what == "ws-hung":
        reason = ws_hang_reason(checks, args.probe_log)
        if reason:
            print(reason)
        return 0 if reason else 1
    if args.what == "fastest":
        best = fastest(checks, args.direction, args.skip_ws)
        if best is None:
            return 1
        print(f"{best[0]} {best[1]} {best[2]:.1f}")
        return 0
    if args.what == "summary":
        failed = [str(c.get("name") or c.get("family")) for c in checks if not c.get("passed")]
        print(f"{len(checks)} checks, {len(checks) - len(failed)} passed, {len(failed)} failed"
              + (f": {'; '.join(failed[:3])}" + (" ..." if len(failed) > 3 else "") if failed else ""))
        return 0 if checks and not failed else 1
    found = failures(checks, args.junit, args.probe_log, args.test_log)
    groups = [g for g in SANITIZE_GROUPS if any(fg == g for fg, _ in found)]
    print(",".join(groups))
    for group, what in found:
        print(f"{group or '(no sanitize group)'}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
