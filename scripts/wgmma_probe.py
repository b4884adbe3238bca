"""Where the Hopper kernels go wrong, if they do: one GPU run that localizes faults.

    PYTHONPATH=python python scripts/wgmma_probe.py [--no-attention]

The tests say pass or fail; this says where. Two parts, each line 'ok' or 'FAIL':

  * the wgmma / TMA selftest tile (torch.ops.cogkern._sm90_wgmma_selftest) fed
    with identities and integer address codes (cogkern/reference/wgmma_layout.py): for each
    operand read of S = Q K^T, O = 16bit(S) V, U = V[:, :64]^T V, with ordinary
    stores and with TMA, fp16 and bf16, D 64 and 128, the map of which operand
    element each output element came from, and which read is to blame;
  * the default (mma.sync) attention kernels against the float32 reference,
    and every opt-in Hopper attention kernel (COGKERN_ATTENTION_SM90=1..4,
    COGKERN_ATTENTION_SM90_BWD=1..3, atomic and deterministic dq) against the
    mma.sync kernels on the same inputs: where the outputs, lse and gradients
    differ (by batch, head, 64-row group, 16-row warp slice, 8-column chunk).

Each check prints its name before it runs, so a hang names its kernel. Needs a
compute capability 9.0 GPU and a build with 9.0a; scripts/device_check.sh runs it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import cogkern  # noqa: E402
from cogkern.attention import CUDA_DTYPES, CUDA_HEAD_DIMS
from cogkern.reference.attention_math import reference_attention  # noqa: E402
from cogkern.reference.wgmma_layout import error_profile, explain, probes, random_check, read_model, run_probe  # noqa: E402

FAILS: list[str] = []
CHECKS = 0
DEVICE = "cuda"  # --cpu-dry-run: "cpu", to check this script's own plumbing without a GPU


def report(name: str, ok: bool, lines: list[str] = ()) -> None:
    global CHECKS
    CHECKS += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    for line in lines:
        print(line, flush=True)
    if not ok:
        FAILS.append(name)


def selftest_on_gpu(tma: bool):
    if DEVICE == "cpu":
        return read_model({})  # a right kernel, in float64

    def run(q, k, v):
        out = torch.ops.cogkern._sm90_wgmma_selftest(q.cuda(), k.cuda(), v.cuda(), tma)
        torch.cuda.synchronize()
        return tuple(t.cpu() for t in out)

    return run


def probe_selftest() -> None:
    for tma in (False, True):
        for dtype in (torch.bfloat16, torch.float16):
            for d in CUDA_HEAD_DIMS:
                name = f"selftest {'tma' if tma else 'stores'} {str(dtype)[6:]} D={d}"
                print(f".... {name}", flush=True)
                kernel = selftest_on_gpu(tma)
                plist = probes(d)
                results = [run_probe(kernel, p, d, dtype) for p in plist]
                rand = random_check(kernel, d, dtype, DEVICE)
                lines = []
                verdicts = explain(results, plist, d, dtype)
                for r in results:
                    if r.wrong:
                        lines.append(f"  probe {r.name}: {r.wrong} of {r.total} wrong; {verdicts[r.name]}")
                        lines += r.lines
                for prod, wrong, grid in rand:
                    if wrong:
                        lines.append(f"  random {prod}: {wrong} elements wrong; 8x8 blocks (X wrong):")
                        lines += grid
                ok = not lines
                report(f"{name}: {len(results)} layout probes and random S, O, U", ok, lines)


def attention_case(d: int, dtype: torch.dtype, causal: bool):
    torch.manual_seed(d + causal)
    b, s, h, text = 2, 1000, 3, 226
    rope = cogkern.RoPE3D((2, 9, 43), d)  # the 774 video tokens after the text
    shape = (b, s, h, d)
    q, k, v, dout = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(4))
    w = [1 + 0.1 * torch.randn(d, device=DEVICE) for _ in range(2)]
    bias = [0.1 * torch.randn(d, device=DEVICE) for _ in range(2)]
    return dict(q=q, k=k, v=v, dout=dout, rope=rope, text=text, w=w, bias=bias, causal=causal)


def reference_run(c):
    """The float32 reference (cogkern.reference.attention_math) on the same (rounded) inputs."""
    q, k, v = (c[n].float().requires_grad_() for n in "qkv")
    params = [t.clone().requires_grad_() for t in (c["w"][0], c["bias"][0], c["w"][1], c["bias"][1])]
    out, lse = reference_attention(q, k, v, rope=c["rope"], text_len=c["text"], qk_norm="layer_norm",
                                   q_norm_weight=params[0], q_norm_bias=params[1], k_norm_weight=params[2],
                                   k_norm_bias=params[3], causal=c["causal"])
    out.backward(c["dout"].float())
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dqw": params[0].grad, "dkw": params[2].grad}


def attention_run(c, backward: bool):
    q, k, v = (c[n].clone().requires_grad_(backward) for n in "qkv")
    params = [t.clone().requires_grad_(backward) for t in (c["w"][0], c["bias"][0], c["w"][1], c["bias"][1])]
    out, lse = cogkern.fused_attention(q, k, v, rope=c["rope"], text_len=c["text"], qk_norm="layer_norm",
                                       q_norm_weight=params[0], q_norm_bias=params[1], k_norm_weight=params[2],
                                       k_norm_bias=params[3], causal=c["causal"], return_lse=True)
    res = {"out": out.detach(), "lse": lse.detach()}
    if backward:
        out.backward(c["dout"])
        res.update(dq=q.grad, dk=k.grad, dv=v.grad, dqw=params[0].grad, dkw=params[2].grad)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return res


def set_modes(fwd: int, bwd: int) -> None:
    for var, mode in (("COGKERN_ATTENTION_SM90", fwd), ("COGKERN_ATTENTION_SM90_BWD", bwd)):
        if mode:
            os.environ[var] = str(mode)
        else:
            os.environ.pop(var, None)


def compare(name: str, got: dict, ref: dict, lse_tol: float = 2e-3) -> None:
    lines = []
    for key, r in ref.items():
        g = got[key]
        scale = r.abs().max().item()
        # Two right kernels differ by 16-bit rounding (and, for lse, fp32 sums) only.
        tol = lse_tol if key == "lse" else 0.03 * scale + 1e-6
        if g.dim() == 1:  # norm weight grads: no layout to profile
            err = (g - r).abs().max().item()
            if not err <= tol:
                lines.append(f"  {key}: max diff {err:.3g} (tol {tol:.3g})")
            continue
        n, where = error_profile(g, r, tol)
        if n:
            err = (g.double() - r.double()).abs().max().item()
            lines.append(f"  {key}: {n} of {r.numel()} elements off by more than {tol:.3g} (max diff {err:.3g}):")
            lines += where
    report(name, not lines, lines)


def probe_attention(skip_ws: bool) -> None:
    fwd_names = {1: "wgmma", 2: "wgmma-pipelined", 3: "wgmma-ws", 4: "wgmma-ws-pingpong"}
    bwd_names = {1: "wgmma-2wg", 2: "wgmma-1wg", 3: "wgmma-ws"}
    if skip_ws:  # the warp-specialized ones hung in the tests: probe the others
        fwd_names = {m: n for m, n in fwd_names.items() if "ws" not in n}
        bwd_names = {m: n for m, n in bwd_names.items() if "ws" not in n}
    for d in CUDA_HEAD_DIMS:
        for causal in (False, True):
            c = attention_case(d, torch.bfloat16, causal)
            tag = f"bf16 D={d} B=2 S=1000 H=3 text 226{' causal' if causal else ''}"
            set_modes(0, 0)
            torch.use_deterministic_algorithms(False)
            ref = attention_run(c, backward=True)
            # The default (mma.sync) kernels themselves, against float32: where they go wrong, if they do.
            # Their q^, k^ are 16-bit, so lse may differ by ~|score| * 2**-8.
            compare(f"default mma.sync kernels vs float32 reference, {tag}", ref, reference_run(c), lse_tol=0.05)
            for mode, kname in fwd_names.items():
                name = f"forward {kname} vs mma.sync, {tag}"
                print(f".... {name}", flush=True)
                set_modes(mode, 0)
                try:
                    if DEVICE == "cuda" and cogkern.attention_kernels(c["q"])["forward"] != kname:
                        report(name, False, [f"  not selected: {cogkern.attention_kernels(c['q'])}"])
                        continue
                    got = attention_run(c, backward=False)
                    compare(name, got, {k: ref[k] for k in ("out", "lse")})
                except RuntimeError as e:
                    report(name, False, [f"  {type(e).__name__}: {str(e).splitlines()[0]}"])
            for mode, kname in bwd_names.items():
                for det in (False, True):
                    name = f"backward {kname}{' deterministic' if det else ''} vs mma.sync, {tag}"
                    print(f".... {name}", flush=True)
                    set_modes(0, mode)
                    torch.use_deterministic_algorithms(det)
                    try:
                        got = attention_run(c, backward=True)
                        compare(name, got, {k: v for k, v in ref.items() if k not in ("out", "lse")})
                    except RuntimeError as e:
                        report(name, False, [f"  {type(e).__name__}: {str(e).splitlines()[0]}"])
                    finally:
                        torch.use_deterministic_algorithms(False)
    set_modes(0, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-attention", action="store_true", help="only the selftest tile's layout probes")
    ap.add_argument("--skip-ws", action="store_true", help="leave out the warp-specialized kernels (they hung)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run everything on the CPU (a right model tile, the CPU attention): checks this script only")
    args = ap.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("wgmma_probe: needs a compute capability 9.0 GPU")
        return 2
    elif not any(a.startswith("90a") for a in cogkern.build_info()["cuda_archs"]):
        print("wgmma_probe: this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)")
        return 2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    probe_selftest()
    if not args.no_attention:
        probe_attention(args.skip_ws)
    print(f"wgmma_probe: {CHECKS} checks, {len(FAILS)} failed" + (f": {'; '.join(FAILS[:4])}" if FAILS else ""))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
