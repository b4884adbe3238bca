"""Planted faults the emulator must catch. Each mutation edits one kernel source
in a copy of csrc/, runs the emulator section that covers that code, and
expects the run to fail with the message that names the fault. A check of the
emulator that stops catching its fault (or a mutation whose source line has
changed) fails this suite, so the emulator's strictness is tested, not assumed.

    PYTHONPATH=python python scripts/cuda_emu/mutations.py [--list] [--only NAME,NAME]

Each run reuses one work tree (and ccache, when installed), so only the
emulator units that include the mutated file are recompiled. Baseline: the
unmutated sources must pass every distinct emulator command the mutations use,
so a "caught" fault is not a failure that was there before.
"""
from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under csrc/
    old: str  # must occur exactly once in the file
    new: str
    args: tuple[str, ...]  # run_emu.py's arguments
    expect: str  # a regular expression the run's output must match
    drop: tuple[str, str] | None = None  # a second (old, new) edit in the same file: moves are two edits


M = Mutation
MUTATIONS = [
    # The mma.sync kernels (sm_80+): the pipeline's waits and barriers.
    M("mma.sync forward waits for one cp.async group too few", "attention/flash/flash_fwd_kernel.cuh",
      "cp_async_wait<1>();  // everything but", "cp_async_wait<2>();  // everything but",
      ("--only", "mma", "--cases", "5"), FAILED_CHECK),
    M("mma.sync forward refills a stage other warps still read", "attention/flash/flash_fwd_kernel.cuh",
      "    __syncthreads();  // all warps are done with this stage before it is refilled\n", "",
      ("--only", "mma", "--cases", "5", "--laggard"), FAILED_CHECK),  # S = 200: 4 key tiles, 2 stages
    M("mma.sync backward reuses a q^/dO stage other warps still read", "attention/flash/flash_bwd_kernel.cuh",
      "    __syncthreads();  // this stage's q^ / dO and sdS are free again\n", "",
      ("--only", "mma", "--cases", "3", "--laggard"), FAILED_CHECK),  # only the deterministic dq^ path shows it
    # The Hopper kernels: proxy fences, wgmma fences and register hand-offs.
    M("sm90 forward: no proxy fence between cp.async and wgmma", "attention/flash/sm90/flash_fwd_sm90_kernel.cuh",
      "    sm90::fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads through the "
      "async one\n", "",
      ("--only", "sm90", "--max-cases", "1"), r"wgmma reads shared address \d+, which thread \d+ wrote"),
    M("sm90 backward: dS^T panel not fenced for the async proxy", "attention/flash/sm90/flash_bwd_sm90_kernel.cuh",
      "                                  dsa[kk][r]);\n  }\n  sm90::fence_proxy_async_shared();\n}",
      "                                  dsa[kk][r]);\n  }\n}",
      ("--only", "sm90", "--max-cases", "1"), r"wgmma reads shared address \d+, which thread \d+ wrote"),
    M("warp-specialized backward: dq^ staging rows not fenced before the bulk reduction",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh",
      "    sm90::fence_proxy_async_shared();\n    sm90::named_barrier_sync(stage_barrier",
      "    sm90::named_barrier_sync(stage_barrier",
      ("--only", "sm90", "--max-cases", "1"), r"bulk reduction reads shared address \d+, which thread \d+ wrote"),
    M("sm90 backward, two warpgroups: dq^ wgmma reads the dS^T panel before the other warpgroup wrote its half",
      "attention/flash/sm90/flash_bwd_sm90_kernel.cuh", "      __syncthreads();  // every warpgroup's dS^T is in the panel\n", "",
      ("--only", "sm90", "--max-cases", "1", "--laggard"), FAILED_CHECK),
    M("warp-specialized backward: dq^ wgmma reads the dS^T panel before the other consumer wrote its half",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh", "      sm90::named_barrier_sync(kDsBarrier, kConsumerThreads);\n", "",
      ("--only", "sm90", "--case", WS_CASE, "--laggard"), FAILED_CHECK),
    M("warp-specialized forward: wgmma issued without wgmma.fence", "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh",
      "    sm90::wgmma_fence_after(sm.acc_o, pa);  // pa and the rescaled acc_o, before both batches\n", "",
      ("--only", "ws", "--case", WS_CASE), "wgmma issued without a wgmma.fence"),
    M("warp-specialized forward: P packed into the A registers before the wait that retires them",
      "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh",
      "    sm.step(s, j * kBN, seq, a.causal, c);\n    sm90::wgmma_wait<0>();",
      "    sm.step(s, j * kBN, seq, a.causal, c);\n    pack_a_slices<T>(s, pa);\n    sm90::wgmma_wait<0>();",
      ("--only", "ws", "--case", WS_CASE), "A registers of a wgmma written before the wait_group"),
    M("warp-specialized forward: V stage released before the wgmma that reads it retires",
      "attention/flash/sm90/flash_fwd_sm90_ws_kernel.cuh",
      "    sm90::wgmma_wait<0>();  // now acc_o and pa are ours again\n"
      "    sm90::fence_operands(sm.acc_o);\n    sm90::fence_operands(pa);\n    release(v_empty(prev));\n",
      "    release(v_empty(prev));\n"
      "    sm90::wgmma_wait<0>();  // now acc_o and pa are ours again\n"
      "    sm90::fence_operands(sm.acc_o);\n    sm90::fence_operands(pa);\n",
      ("--only", "ws", "--case", WS_CASE, "--laggard"), FAILED_CHECK),
    M("warp-specialized backward: q^/dO stage freed before the dv, dk^ wgmmas that read it retire",
      "attention/flash/sm90/flash_bwd_sm90_ws_kernel.cuh",
      "    sm90::wgmma_wait<0>();  // dv, dk^ of this tile: pa, dsa and the stage are free\n",
      "    __syncwarp();\n    if (lane == 0) sm90::mbar_arrive(q_empty(st));\n"
      "    sm90::wgmma_wait<0>();  // dv, dk^ of this tile: pa, dsa and the stage are free\n",
      ("--only", "sm90", "--case", WS_CASE, "--laggard"), FAILED_CHECK, drop=(
          "    __syncwarp();\n    if (lane == 0) sm90::mbar_arrive(q_empty(st));\n  }\n",
          "  }\n")),
    # The wgmma conformance tile and the layout probes (scripts/wgmma_probe.py) on it.
    M("wgmma tile: one warp's descriptor differs", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      "desc_k_major(smem_addr(ks + panel * kPanelBytes), slice)",
      "desc_k_major(smem_addr(ks + panel * kPanelBytes + (tid >= 32 ? 1024 : 0)), slice)",
      ("--only", "tile"), "the threads of a warpgroup issued different wgmmas"),
    M("wgmma tile: shared memory not aligned to a 1024-byte swizzle group", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      "unsigned char* smem = align_to_panel_group(smem_raw);", "unsigned char* smem = smem_raw;",
      ("--only", "tile"), "1024-byte"),
    M("probe: k stored with the swizzle's row term off by one", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      "    load_panels<D>(ks, k, tid);\n",
      "    for (int i = tid; i < kSelftestRows * (D / 8); i += kWarpgroupThreads) {\n"
      "      const int row = i / (D / 8), col = (i % (D / 8)) * 8;\n"
      "      store_for_async_proxy(ks + (col / kPanelCols) * (kSelftestRows * 128) + row * 128 +\n"
      "                                ((((col % kPanelCols) / 8) ^ ((row + 1) % 8)) * 16),\n"
      "                            *reinterpret_cast<const uint4*>(k + row * D + col));\n"
      "    }\n",
      ("--only", "probe"), r"FAIL layout probes \w+ D=64: wrong: [^\n]*S <- k \(B, K-major\)"),
    M("probe: the S accumulators' row halves swapped in the A registers", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      "    a[j][1] = flash::ElemTraits<T>::pack(s[8 * j + 2], s[8 * j + 3]);\n"
      "    a[j][2] = flash::ElemTraits<T>::pack(s[8 * j + 4], s[8 * j + 5]);\n",
      "    a[j][2] = flash::ElemTraits<T>::pack(s[8 * j + 2], s[8 * j + 3]);\n"
      "    a[j][1] = flash::ElemTraits<T>::pack(s[8 * j + 4], s[8 * j + 5]);\n",
      ("--only", "probe"), r"wrong: [^\n]*O <- S accumulators as A registers"),
    M("probe: q's TMA panels swapped", "attention/flash/sm90/wgmma_selftest_kernel.cuh",
      "tma_load_2d(smem_addr(qs) + panel, &maps.q, bar, p * kPanelCols, 0);",
      "tma_load_2d(smem_addr(qs) + panel, &maps.q, bar, (D / kPanelCols - 1 - p) * kPanelCols, 0);",
      ("--only", "probe"), r"FAIL layout probes \w+ D=128 \(TMA loads\)"),
    # The host launch path (attention_launch.cu and the launchers), which the emulator runs as it is.
    M("launcher: the mma.sync forward's grid leaves out the heads", "attention/flash/flash_fwd_launch.cu",
      "a.batch * a.heads * ceil_div(a.seq, C::kBM), C::kWarps * kWarpSize, fwd_smem_bytes<T, D>()",
      "a.batch * ceil_div(a.seq, C::kBM), C::kWarps * kWarpSize, fwd_smem_bytes<T, D>()",
      ("--only", "mma", "--cases", "0"), FAILED_CHECK),
    M("launcher: no cudaFuncSetAttribute before a launch with more than 48 KB of shared memory",
      "attention/flash/flash_launch_kernel.cuh",
      "  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));\n"
      "  if (err != cudaSuccess) return err;\n", "",
      ("--only", "mma", "--cases", "1"), r"launch refused \(cudaErrorInvalidValue\).*81920 bytes"),
    M("launcher: the atomic-dq backward on a GPU whose shared memory it does not fit", "attention/attention_launch.cu",
      "  if (!deterministic && !flash::atomic_dq_fits<T, D>()) deterministic = true;", "",
      ("--only", "device"), r"cudaFuncSetAttribute refused \(cudaErrorInvalidValue\): 107008 bytes"),
    # The optimizer's and the RoPE op's kernels.
    M("optimizer: block reduction reads the other warps' partials before they are written",
      "adamw/adamw_kernels.cuh",
      "    warp_f[warp] = f;\n  }\n  __syncthreads();\n", "    warp_f[warp] = f;\n  }\n",
      ("--only", "optim", "--laggard"), FAILED_CHECK),
    M("rope: rows rotated before the block's coefficients are all computed", "rope3d/rope3d_kernel.cuh",
      "    coeffs[i] = rope_coeffs<A, table_t>(P, tok0 + i / half_d, i % half_d);\n  }\n  __syncthreads();\n",
      "    coeffs[i] = rope_coeffs<A, table_t>(P, tok0 + i / half_d, i % half_d);\n  }\n",
      ("--only", "rope", "--laggard"), FAILED_CHECK),
]


def emulator(csrc: str, build_dir: str, args, timeout: float) -> tuple[int, str]:
    env = dict(os.environ)
    cmd = [sys.executable, os.path.join(HERE, "run_emu.py"), "--csrc", csrc, "--build-dir", build_dir, *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, text + "\n(timed out)"
    return out.returncode, out.stdout + out.stderr


def apply(mutation: Mutation, csrc: str) -> None:
    path = os.path.join(csrc, mutation.file)
    with open(path) as f:
        text = f.read()
    if text.count(mutation.old) != 1:
        raise ValueError(f"mutation {mutation.name!r}: its source text occurs {text.count(mutation.old)} times in "
                         f"csrc/{mutation.file}, expected once; update the mutation to the new source")
    text = text.replace(mutation.old, mutation.new)
    if mutation.drop:
        old, new = mutation.drop
        if text.count(old) != 1:
            raise ValueError(f"mutation {mutation.name!r}: its second source text occurs {text.count(old)} times")
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", default=None, help="comma-separated substrings of mutation names")
    ap.add_argument("--work", default="/tmp/cogkern_emu_mutations", help="work tree (the sources are copied there)")
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
