"""Planted faults the emulator must catch. Each mutation edits one kernel source
in a copy of csrc/, runs the emulator section that covers that code, and
expects the run to fail with the message that names the fault. A check of the
emulator that stops catching its fault fails this suite, so the emulator's
strictness is tested, not assumed.

A mutation finds its place by a marker comment in the kernel source, `[mut:NAME]`
at the end of the line it edits (or alone on the line before it), not by
matching the source text around it, so code and comments nearby may change
freely; a marker that is missing or appears twice fails loudly, and so does a
marker no mutation uses (tests/test_cuda_emulator.py).

    PYTHONPATH=python python scripts/cuda_emu/mutations.py [--list] [--only NAME,NAME]

Each run reuses one work tree (and ccache, when installed), so only the
emulator units that include the mutated file are recompiled. Baseline: the
unmutated sources must pass every distinct emulator command the mutations use,
so a "caught" fault is not a failure that was there before.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FAILED_CHECK = r"(?m)^FAIL "  # a check of run_emu.py printed its verdict as failed
# Three key tiles through the two-stage rings of the warp-specialized kernels, so each stage is reused.
WS_CASE = "bfloat16,64,300,5,1,1,0,layer_norm,angles,0"


MARKER = re.compile(r"\[mut:([a-z0-9-]+)\]")


@dataclasses.dataclass(frozen=True)
class Edit:
    """One edit at a marked site: a comment `[mut:NAME]` in the kernel source, at the end of the
    site's (first) line or alone on the line before it. `lines`: the site is that many lines."""
    marker: str
    op: str  # "delete" the site, "replace" `old` (once in the site) by `new`, "insert" `new` before the site
    old: str = ""
    new: str = ""
    lines: int = 1


def delete(marker: str, lines: int = 1) -> Edit:
    return Edit(marker, "delete", lines=lines)


def replace(marker: str, old: str, new: str, lines: int = 1) -> Edit:
    return Edit(marker, "replace", old, new, lines)


def insert(marker: str, new: str) -> Edit:
    """`new` (lines, indented like the site) before the site."""
    return Edit(marker, "insert", new=new)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under csrc/
    edits: tuple[Edit, ...]  # applied in order
    args: tuple[str, ...]  # run_emu.py's arguments
    expect: str  # a regular expression the run's output must match


M = Mutation
MUTATIONS = [
    # The mma.sync kernels (sm_80+): the pipeline's waits and barriers.
    M("mma.sync forward waits for one cp.async group too few", "attention/flash/flash_fwd_kernel.cuh",
      (replace("fwd-wait-tile", "cp_async_wait<1>();", "cp_async_wait<2>();"),),
      ("--only", "mma", "--cases", "5"), FAILED_CHECK),
    M("mma.sync forward refills a stage other warps still read", "attention/flash/flash_fwd_kernel.cuh",
      (delete("fwd-refill-barrier"),),
      ("--only", "mma", "--cases", "5", "--laggard"), FAILED_CHECK),  # S = 200: 4 key tiles, 2 stages
    M("mma.sync backward reuses a q^/dO stage other warps still read", "attention/flash/flash_bwd_kernel.cuh",
      (delete("bwd-stage-barrier"),),
      ("--only", "mma", "--cases", "3", "--laggard"), FAILED_CHECK),  # only the deterministic dq^ path shows it
    # The Hopper kernels: proxy fences, wgmma fences and register hand-offs.
    M("sm90 forward: no proxy fence between cp.async and wgmma", "attention/flash/sm90/flash_fwd_sm90_kernel.cuh",
      (delete("sm90-fwd-proxy-fence"),),
      ("--only", "sm90", "--max-cases", "1"), r"wgmma reads shared address \d+, which thread \d+ wrote"),
    M("sm90 backward: dS^T panel not fenced for the async proxy", "attention/flash/sm90/flash_bwd_sm90_kernel.cuh",
      (delete("sm90-bwd-ds-fence"),),
      ("--only", "sm90", "--max-cases", "1"), r"wgmma reads shared address \d+, which thread \d+ wrote"),
    M("warp-specialized backward: dq^ staging rows not fenced before the bulk reduction",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh", (delete("ws-bwd-dq-fence"),),
      ("--only", "sm90", "--max-cases", "1"), r"bulk reduction reads shared address \d+, which thread \d+ wrote"),
    M("sm90 backward, two warpgroups: dq^ wgmma reads the dS^T panel before the other warpgroup wrote its half",
      "attention/flash/sm90/flash_bwd_sm90_kernel.cuh", (delete("sm90-bwd-ds-barrier"),),
      ("--only", "sm90", "--max-cases", "1", "--laggard"), FAILED_CHECK),
    M("warp-specialized backward: dq^ wgmma reads the dS^T panel before the other consumer wrote its half",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh", (delete("ws-bwd-ds-barrier"),),
      ("--only", "sm90", "--case", WS_CASE, "--laggard"), FAILED_CHECK),
    M("warp-specialized forward: wgmma issued without wgmma.fence", "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh",
      (delete("ws-fwd-wgmma-fence"),),
      ("--only", "ws", "--case", WS_CASE), "wgmma issued without a wgmma.fence"),
    M("warp-specialized forward: P packed into the A registers before the wait that retires them",
      "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh", (insert("ws-fwd-wait-pv", "pack_a_slices<T>(s, pa);"),),
      ("--only", "ws", "--case", WS_CASE), "A registers of a wgmma written before the wait_group"),
    M("warp-specialized forward: V stage released before the wgmma that reads it retires",
      "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh",
      (delete("ws-fwd-v-release"), insert("ws-fwd-wait-pv", "release(v_empty(prev));")),
      ("--only", "ws", "--case", WS_CASE, "--laggard"), FAILED_CHECK),
    M("warp-specialized backward: q^/dO stage freed before the dv, dk^ wgmmas that read it retire",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh",
      (delete("ws-bwd-q-release", lines=2),
       insert("ws-bwd-wait-dv", "__syncwarp();\nif (lane == 0) sm90::mbar_arrive(q_empty(st));")),
      ("--only", "sm90", "--case", WS_CASE, "--laggard"), FAILED_CHECK),
    # The wgmma conformance tile and the layout probes (scripts/wgmma_probe.py) on it.
    M("wgmma tile: one warp's descriptor differs", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      (replace("tile-desc-k", "smem_addr(ks + panel * kPanelBytes)",
               "smem_addr(ks + panel * kPanelBytes + (tid >= 32 ? 1024 : 0))"),),
      ("--only", "tile"), "the threads of a warpgroup issued different wgmmas"),
    M("wgmma tile: shared memory not aligned to a 1024-byte swizzle group", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      (replace("tile-align", "align_to_panel_group(smem_raw)", "smem_raw"),),
      ("--only", "tile"), "1024-byte"),
    M("probe: k stored with the swizzle's row term off by one", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      (replace("probe-load-k", "load_panels<D>(ks, k, tid);",
               "for (int i = tid; i < kSelftestRows * (D / 8); i += kWarpgroupThreads) {\n"
               "      const int row = i / (D / 8), col = (i % (D / 8)) * 8;\n"
               "      store_for_async_proxy(ks + (col / kPanelCols) * (kSelftestRows * 128) + row * 128 +\n"
               "                                ((((col % kPanelCols) / 8) ^ ((row + 1) % 8)) * 16),\n"
               "                            *reinterpret_cast<const uint4*>(k + row * D + col));\n"
               "    }"),),
      ("--only", "probe"), r"FAIL layout probes \w+ D=64: wrong: [^\n]*S <- k \(B, K-major\)"),
    M("probe: the S accumulators' row halves swapped in the A registers", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      (replace("probe-pack-a1", "a[j][1] =", "a[j][2] ="), replace("probe-pack-a2", "a[j][2] =", "a[j][1] =")),
      ("--only", "probe"), r"wrong: [^\n]*O <- S accumulators as A registers"),
    M("probe: q's TMA panels swapped", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      (replace("probe-tma-q", "p * kPanelCols, 0);", "(D / kPanelCols - 1 - p) * kPanelCols, 0);"),),
      ("--only", "probe"), r"FAIL layout probes \w+ D=128 \(TMA loads\)"),
    # The host launch path (attention_launch.cu and the launchers), which the emulator runs as it is.
    M("launcher: the mma.sync forward's grid leaves out the heads", "attention/flash/flash_fwd_launch.cu",
      (replace("fwd-grid", "a.batch * a.heads * ceil_div(a.seq, C::kBM)", "a.batch * ceil_div(a.seq, C::kBM)",
               lines=2),),
      ("--only", "mma", "--cases", "0"), FAILED_CHECK),
    M("launcher: no cudaFuncSetAttribute before a launch with more than 48 KB of shared memory",
      "attention/flash/flash_launch_kernel.cuh", (delete("smem-opt-in", lines=2),),
      ("--only", "mma", "--cases", "1"), r"launch refused \(cudaErrorInvalidValue\).*81920 bytes"),
    M("launcher: the atomic-dq backward on a GPU whose shared memory it does not fit", "attention/attention_launch.cu",
      (delete("atomic-dq-fits"),),
      ("--only", "device"), r"cudaFuncSetAttribute refused \(cudaErrorInvalidValue\): 107008 bytes"),
    # The online softmax's NaN path: its max (fmaxf) drops a NaN score, so the score's own
    # exponential must carry it; the NaN-in-one-k-row check catches P = 0 for a NaN score.
    M("online softmax: a NaN score's exponential dropped (P = 0)", "attention/flash/flash_common.cuh",
      (replace("softmax-nan-exp", "return fast_exp2(fmaf(s, c, -shift));",
               "return s == s ? fast_exp2(fmaf(s, c, -shift)) : 0.f;"),),
      ("--only", "nan"), r"(?m)^FAIL .*NaN in one k row"),
    # The optimizer's and the RoPE op's kernels.
    M("optimizer: block reduction reads the other warps' partials before they are written",
      "adamw/adamw_kernels.cuh", (delete("optim-reduce-barrier"),),
      ("--only", "optim", "--laggard"), FAILED_CHECK),
    M("rope: rows rotated before the block's coefficients are all computed", "rope3d/rope3d_kernel.cuh",
      (delete("rope-coeff-barrier"),),
      ("--only", "rope", "--laggard"), FAILED_CHECK),
]


def default_work_dir() -> str:
    """A fixed work tree per checkout, so that runs from different checkouts do not share one (and
    ccache, when installed, serves the units a mutation leaves alone)."""
    return f"/tmp/cogkern_emu_mutations-{hashlib.sha1(ROOT.encode()).hexdigest()[:8]}"


def emulator(csrc: str, build_dir: str, args, timeout: float) -> tuple[int, str]:
    env = dict(os.environ)
    cmd = [sys.executable, os.path.join(HERE, "run_emu.py"), "--csrc", csrc, "--build-dir", build_dir, *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, text + "\n(timed out)"
    return out.returncode, out.stdout + out.stderr


def find_site(lines: list[str], marker: str, where: str) -> int:
    """The index of the line the marker `[mut:NAME]` marks: its own line, or the next one when the marker
    stands alone on its line. Fails unless the marker occurs exactly once."""
    tag = f"[mut:{marker}]"
    hits = [i for i, line in enumerate(lines) for _ in range(line.count(tag))]
    if len(hits) != 1:
        raise ValueError(f"marker {tag} occurs {len(hits)} times in {where}, expected once: put it back at the "
                         "mutation's site (or update the mutation)")
    i = hits[0]
    return i + 1 if lines[i].strip() == f"// {tag}" else i


def apply_edit(edit: Edit, lines: list[str], where: str) -> list[str]:
    i = find_site(lines, edit.marker, where)
    site = lines[i:i + edit.lines]
    if len(site) != edit.lines:
        raise ValueError(f"marker [mut:{edit.marker}] in {where}: the site runs past the end of the file")
    indent = site[0][:len(site[0]) - len(site[0].lstrip())]
    if edit.op == "delete":
        new = []
    elif edit.op == "insert":
        new = [indent + line for line in edit.new.split("\n")] + site
    elif edit.op == "replace":
        text = "\n".join(site)
        if text.count(edit.old) != 1:
            raise ValueError(f"marker [mut:{edit.marker}] in {where}: {edit.old!r} occurs {text.count(edit.old)} "
                             "times at the marked site, expected once; update the mutation to the new source")
        new = text.replace(edit.old, edit.new).split("\n")
    else:
        raise ValueError(f"unknown edit {edit.op!r}")
    return lines[:i] + new + lines[i + edit.lines:]


def apply(mutation: Mutation, csrc: str) -> None:
    path = os.path.join(csrc, mutation.file)
    with open(path) as f:
        lines = f.read().split("\n")
    for edit in mutation.edits:
        lines = apply_edit(edit, lines, f"csrc/{mutation.file} (mutation {mutation.name!r})")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def markers_in(csrc: str) -> dict[str, list[str]]:
    """Every `[mut:NAME]` marker in the sources: name -> the files it occurs in (once per occurrence)."""
    found: dict[str, list[str]] = {}
    for d, _, files in os.walk(csrc):
        for name in files:
            path = os.path.join(d, name)
            with open(path, errors="replace") as f:
                for m in MARKER.finditer(f.read()):
                    found.setdefault(m.group(1), []).append(os.path.relpath(path, csrc))
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", default=None, help="comma-separated substrings of mutation names")
    ap.add_argument("--work", default=default_work_dir(),
                    help="work tree (the sources are copied there; default: one per checkout)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per emulator run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        keys = args.only.split(",")
        chosen = [m for m in MUTATIONS if any(k in m.name for k in keys)]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name}  [csrc/{m.file}; run_emu.py {' '.join(m.args)}]")
        return 0 if chosen else 2
    csrc, build_dir = os.path.join(args.work, "csrc"), os.path.join(args.work, "build")
    fails = 0

    def fresh_tree():
        shutil.rmtree(csrc, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)

    if not args.no_baseline:
        fresh_tree()
        for run_args in dict.fromkeys(m.args for m in chosen):
            t0 = time.time()
            rc, out = emulator(csrc, build_dir, run_args, args.timeout)
            ok = rc == 0 and "\n0 failed" in out
            print(f"{'ok  ' if ok else 'FAIL'} baseline, unmutated: run_emu.py {' '.join(run_args)} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
            if not ok:
                print(f"     exit {rc}, output ends:\n{out[-3000:]}")
            fails += not ok
    for m in chosen:
        fresh_tree()
        t0 = time.time()
        try:
            apply(m, csrc)
        except ValueError as e:
            print(f"FAIL {e}", flush=True)
            fails += 1
            continue
        rc, out = emulator(csrc, build_dir, m.args, args.timeout)
        if "error:" in out and "CalledProcessError" in out:
            print(f"FAIL mutation {m.name!r} does not compile: fix its replacement text\n{out[-2000:]}", flush=True)
            fails += 1
            continue
        caught = rc != 0 and re.search(m.expect, out) is not None
        print(f"{'ok  ' if caught else 'FAIL'} {'caught' if caught else 'NOT caught'}: {m.name} "
              f"[{time.time() - t0:.0f}s]", flush=True)
        if not caught:
            print(f"     expected exit != 0 and /{m.expect}/; got exit {rc}, output ends:\n{out[-3000:]}")
        fails += not caught
    shutil.rmtree(csrc, ignore_errors=True)
    print(f"{fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
