"""Optimizer-step benchmark: cogkern.optim.FusedAdamW (+ DynamicLossScaler) against torch.

For each precision mode (param precision x moment storage) it reports, all measured in this run:
  * ms per step: ours without a scaler, ours with scaler.step + update, ours
    replaying a CUDA graph of that step (GPU), torch's equivalent step, apex if importable;
  * bytes moved per parameter by our step, as counted from what the kernels read
    and write, the bandwidth that implies, and its share of the copy bandwidth
    measured in the same run;
  * host synchronizations per step (GPU: counted with torch's sync debug mode);
  * optimizer-state bytes per param as allocated (opt.state_bytes());
  * peers, where importable, in the same process: bitsandbytes AdamW8bit, torchao
    AdamW8bit and _AdamW(bf16_stochastic_round=True), torch-optimi AdamW(kahan_sum=True),
    with their state bytes per param and their time as a ratio of ours.

torch's step: GradScaler + AdamW (fused=True on the GPU, foreach=True on the
CPU) on fp32 params; for 16-bit modes the AMP-style fp32 master copy (grads
copied to fp32 master grads, step, params copied back). The tensor list
follows CogVideoX-5B transformer blocks (hidden 3072) until the target count.

    python benchmarks/bench_optimizer.py                # 1 B params on the GPU, 16 M on the CPU
    python benchmarks/bench_optimizer.py --quick        # small and fast
    python benchmarks/bench_optimizer.py --device cpu --params 4e6 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings

import torch

from benchmarks.common import copy_bandwidth, print_table, time_fn
from cogkern.amp import DynamicLossScaler
from cogkern._counters import adamw_bytes_per_param, grad_check_bytes_per_param
from cogkern._validate import OPTIMIZER_MODES
from cogkern.optim import FusedAdamW


def time_ms(fn, device, warmup, iters) -> float:
    return 1e3 * time_fn(fn, device, warmup=warmup, repeats=iters)

# The modes benchmarked: a subset of cogkern._validate.OPTIMIZER_MODES (the one list of modes),
# with the bytes each step moves per parameter from cogkern._counters (counted per kernel there:
# the update, plus the grad check that a scaler or clipping adds, reading the grads once more).
_BENCHED = ("fp32", "fp16-master", "bf16-master", "bf16-sr", "bf16-remainders", "fp32-bf16m", "bf16-sr-bf16m",
            "fp32-int8m", "bf16-master-int8m", "bf16-remainders-int8m", "bf16-sr-int8m")
MODES = {
    name: dict(dtype=dtype, kw=kw, update_bytes=adamw_bytes_per_param(name), check_bytes=grad_check_bytes_per_param(name))
    for name, dtype, kw in OPTIMIZER_MODES if name in _BENCHED
}


def _state_bytes_of(opt, n: int) -> float:
    """Optimizer-state bytes per param of any torch optimizer (its state tensors but step counters)."""
    total = 0
    for st in opt.state.values():
        for k, t in st.items():
            if not torch.is_tensor(t) or k == "step" or t.numel() <= 1:
                continue
            if hasattr(t, "__tensor_flatten__"):  # torchao's quantized state: count its inner tensors
                names, _ = t.__tensor_flatten__()
                total += sum(getattr(t, a).numel() * getattr(t, a).element_size() for a in names)
            else:
                total += t.numel() * t.element_size()
    return total / n


# Peers (run in this process where importable): the bytes-per-param class each is compared in.
def _peer_factories():
    out = {}
    try:
        import bitsandbytes as bnb  # type: ignore
        out["bitsandbytes AdamW8bit"] = ("int8", torch.float32, lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4))
    except Exception as exc:
        out["bitsandbytes AdamW8bit"] = ("int8", None, f"not importable ({type(exc).__name__})")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit  # type: ignore
        from torchao.optim import _AdamW as AoAdamW  # type: ignore
        out["torchao AdamW8bit"] = ("int8", torch.float32, lambda ps: AoAdamW8bit(ps, lr=1e-4))
        out["torchao _AdamW(bf16_stochastic_round)"] = (
            "bf16-sr", torch.bfloat16, lambda ps: AoAdamW(ps, lr=1e-4, bf16_stochastic_round=True))
    except Exception as exc:
        out["torchao AdamW8bit"] = ("int8", None, f"not importable ({type(exc).__name__})")
        out["torchao _AdamW(bf16_stochastic_round)"] = ("bf16-sr", None, f"not importable ({type(exc).__name__})")
    try:
        import optimi  # type: ignore
        out["torch-optimi AdamW(kahan_sum)"] = (
            "bf16-sr", torch.bfloat16, lambda ps: optimi.AdamW(ps, lr=1e-4, kahan_sum=True))
    except Exception as exc:
        out["torch-optimi AdamW(kahan_sum)"] = ("bf16-sr", None, f"not importable ({type(exc).__name__})")
    return out


def bench_peers(shapes, device, warmup, iters):
    n = sum(_numel(s) for s in shapes)
    out = {}
    for name, (klass, dtype, make) in _peer_factories().items():
        if dtype is None:
            out[name] = {"class": klass, "skipped": make}
            continue
        try:
            params = make_tensors(shapes, dtype, device)
            for p in params:
                p.grad = (torch.randn(p.shape, device=device) * 1e-3).to(dtype)
            opt = make(params)
            opt.step()  # creates the state
            out[name] = {"class": klass, "ms": time_ms(opt.step, device, warmup, iters),
                         "state_bytes_per_param": _state_bytes_of(opt, n), "param_dtype": str(dtype)}
            del params, opt
        except Exception as exc:  # report, do not hide
            out[name] = {"class": klass, "skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
        gc.collect()
    return out


def cogvideox_shapes(target: int, hidden: int = 3072, ff_mult: int = 4, time_dim: int = 512, head_dim: int = 64):
    """Param shapes of CogVideoX-style transformer blocks, repeated until `target` params."""
    ff = hidden * ff_mult
    block = []
    for _ in range(4):  # to_q, to_k, to_v, to_out
        block += [(hidden, hidden), (hidden,)]
    block += [(head_dim,), (head_dim,), (head_dim,), (head_dim,)]  # q/k LayerNorm weight, bias
    for _ in range(2):  # norm1 / norm2: adaLN modulation (time embedding -> 6 * hidden) and LayerNorm
        block += [(6 * hidden, time_dim), (6 * hidden,), (hidden,), (hidden,)]
    block += [(ff, hidden), (ff,), (hidden, ff), (hidden,)]  # feed-forward
    per_block = sum(_numel(s) for s in block)
    shapes = []
    while sum(_numel(s) for s in shapes) + per_block <= max(target, per_block):
        shapes += block
    return shapes


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def make_tensors(shapes, dtype, device, scale=1.0):
    return [(torch.randn(s, device=device) * scale).to(dtype) for s in shapes]


def count_syncs(fn, device, n=3):
    """Host synchronizations in n calls of fn, as torch's CUDA sync debug mode reports them."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs / n


def bench_ours(mode, shapes, device, warmup, iters):
    spec = MODES[mode]
    params = make_tensors(shapes, spec["dtype"], device)
    for p in params:
        p.grad = (torch.randn(p.shape, device=device) * 1e-3).to(spec["dtype"])
    opt = FusedAdamW(params, lr=1e-4, capturable=device.type == "cuda", **spec["kw"])
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=10**6)
    scaler.scale(torch.ones((), device=device))

    def scaled_step():
        scaler.step(opt)
        scaler.update()

    out = {
        "ms_plain": time_ms(opt.step, device, warmup, iters),
        "ms_scaled": time_ms(scaled_step, device, warmup, iters),
        "syncs_per_step": count_syncs(scaled_step, device),
        "state_bytes_per_param": opt.state_bytes()["total"] / sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                scaled_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                scaled_step()
            out["ms_graph"] = time_ms(graph.replay, device, warmup, iters)
            out["graph_capture"] = "ok"
            del graph
        except Exception as exc:  # report, do not hide
            out["graph_capture"] = f"failed: {type(exc).__name__}: {exc}"
    del params, opt, scaler
    return out


def bench_torch(mode, shapes, device, warmup, iters):
    """torch's closest step: GradScaler + AdamW(fused on GPU / foreach on CPU), AMP master copy for 16-bit."""
    spec = MODES[mode]
    impl = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, growth_interval=10**6)
    scaler.scale(torch.ones((), device=device))
    if spec["dtype"] == torch.float32:
        params = make_tensors(shapes, torch.float32, device)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-4, **impl)

        def step():
            scaler.step(opt)
            scaler.update()
    else:
        model = make_tensors(shapes, spec["dtype"], device)
        model_grads = [(torch.randn(p.shape, device=device) * 1e-3).to(spec["dtype"]) for p in model]
        masters = [p.float() for p in model]
        for m in masters:
            m.grad = torch.empty_like(m)
        master_grads = [m.grad for m in masters]
        opt = torch.optim.AdamW(masters, lr=1e-4, **impl)

        def step():
            torch._foreach_copy_(master_grads, model_grads)
            scaler.step(opt)
            scaler.update()
            torch._foreach_copy_(model, masters)

    out = {"ms": time_ms(step, device, warmup, iters), "syncs_per_step": count_syncs(step, device),
           "impl": "fused" if device.type == "cuda" else "foreach"}
    return out


def bench_apex(mode, shapes, device, warmup, iters):
    try:
        from apex.optimizers import FusedAdam  # type: ignore
    except Exception as exc:
        return {"skipped": f"apex not importable ({type(exc).__name__})"}
    if device.type != "cuda":
        return {"skipped": "apex needs CUDA"}
    spec = MODES[mode]
    params = make_tensors(shapes, torch.float32, device)  # fp32 (masters for 16-bit modes)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = FusedAdam(params, lr=1e-4, adam_w_mode=True)
    out = {"ms": time_ms(opt.step, device, warmup, iters), "note": "FusedAdam on fp32 params, no loss scaling"}
    if spec["dtype"] != torch.float32:
        out["note"] += " (master copy only: no 16-bit model copy)"
    return out


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU available")
    target = int(float(args.params)) if args.params else None
    if target is None:
        # 1 B parameters on a GPU even with --quick: the size; a step there takes milliseconds.
        target = {("cuda", False): 10**9, ("cuda", True): 10**9,
                  ("cpu", False): 16 * 10**6, ("cpu", True): 2 * 10**6}[(device.type, args.quick)]
    hidden = 3072 if device.type == "cuda" or target >= 10**8 else 512
    shapes = cogvideox_shapes(target, hidden=hidden, time_dim=512 if hidden == 3072 else 128)
    n = sum(_numel(s) for s in shapes)
    warmup, iters = (2, 5) if args.quick else (3, 20)
    if device.type == "cpu":
        warmup, iters = (1, 3) if args.quick else (2, 5)

    copy_bytes = min(4 * n, 8 * 2**30) if device.type == "cuda" else min(4 * n, 256 * 2**20)
    copy_gbps = copy_bandwidth(device, copy_bytes) / 1e9
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "params": n,
        "tensors": len(shapes),
        "hidden": hidden,
        "copy_gbps": copy_gbps,
        "modes": {},
    }
    print(f"# {info['device']}, torch {torch.__version__}: {n / 1e6:.1f} M params in {len(shapes)} tensors "
          f"(CogVideoX blocks, hidden {hidden}); copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    torch_results = {}
    for mode in args.modes:
        spec = MODES[mode]
        ours = bench_ours(mode, shapes, device, warmup, iters)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch_mode = {torch.float32: "fp32", torch.float16: "fp16-master"}.get(spec["dtype"], "bf16-master")
        theirs = torch_results.get(torch_mode)
        if theirs is None:  # torch's step depends on the param dtype only: once per dtype
            theirs = torch_results[torch_mode] = bench_torch(torch_mode, shapes, device, warmup, iters)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        apex = bench_apex(mode, shapes, device, warmup, iters) if device.type == "cuda" else {"skipped": "CPU run"}
        bytes_plain = spec["update_bytes"]
        bytes_scaled = spec["update_bytes"] + spec["check_bytes"]
        best_scaled_ms = min(ours["ms_scaled"], ours.get("ms_graph", float("inf")))
        res = {
            **ours,
            "bytes_per_param_plain": bytes_plain,
            "bytes_per_param_scaled": bytes_scaled,
            "gbps_plain": bytes_plain * n / (ours["ms_plain"] * 1e-3) / 1e9,
            "gbps_scaled": bytes_scaled * n / (best_scaled_ms * 1e-3) / 1e9,
            "torch": theirs,
            "apex": apex,
            "speedup_vs_torch": theirs["ms"] / best_scaled_ms,
        }
        res["pct_copy_plain"] = 100 * res["gbps_plain"] / copy_gbps
        res["pct_copy_scaled"] = 100 * res["gbps_scaled"] / copy_gbps
        info["modes"][mode] = res
        graph = f", graph {ours['ms_graph']:.2f} ms" if "ms_graph" in ours else ""
        syncs = "" if ours["syncs_per_step"] is None else \
            f"; host syncs/step: ours {ours['syncs_per_step']:g}, torch {theirs['syncs_per_step']:g}"
        print(f"{mode:12s} ours: {ours['ms_plain']:.2f} ms plain ({bytes_plain:.2f} B/param moved, "
              f"{ours['state_bytes_per_param']:.2f} B/param of state, {res['gbps_plain']:.0f} GB/s, "
              f"{res['pct_copy_plain']:.0f}% of copy) | with scaler {ours['ms_scaled']:.2f} ms{graph} "
              f"({bytes_scaled:.2f} B/param, {res['gbps_scaled']:.0f} GB/s, {res['pct_copy_scaled']:.0f}% of copy) | "
              f"torch {theirs['impl']} + GradScaler {theirs['ms']:.2f} ms -> {res['speedup_vs_torch']:.2f}x{syncs}")
        if "ms" in apex:
            print(f"{'':12s} apex FusedAdam: {apex['ms']:.2f} ms ({apex['note']})")
        elif device.type == "cuda":
            print(f"{'':12s} apex: {apex['skipped']}")
        if "graph_capture" in ours and ours["graph_capture"] != "ok":
            print(f"{'':12s} CUDA graph capture {ours['graph_capture']}")
    if not args.no_peers:
        info["peers"] = bench_peers(shapes, device, warmup, iters)
        base = info["modes"].get("fp32", {}).get("ms_plain")
        for name, r in info["peers"].items():
            if "ms" not in r:
                print(f"peer {name}: {r['skipped']}")
                continue
            ours_mode = {"int8": "fp32-int8m", "bf16-sr": "bf16-sr-int8m"}[r["class"]]
            ours_ms = info["modes"].get(ours_mode, {}).get("ms_plain")
            ratio = f", {r['ms'] / ours_ms:.1f}x our {ours_mode}" if ours_ms else ""
            vs_fp32 = f", {r['ms'] / base:.1f}x our fp32 step" if base else ""
            print(f"peer {name} ({r['param_dtype']} params): {r['ms']:.2f} ms, "
                  f"{r['state_bytes_per_param']:.2f} B/param of state{ratio}{vs_fp32}")
    info["rows"] = rows_of(info)
    print_table(f"Optimizer step on {info['device']}: {n / 1e6:.1f} M params, torch {torch.__version__}",
                info["rows"], ["mode", "impl", "ms", "bytes_per_param", "state_bytes_per_param", "GBps", "pct_copy", "speedup_vs_torch",
                               "syncs_per_step", "status"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return info


def rows_of(info: dict) -> list[dict]:
    """One row per (mode, implementation), for the suite's tables and CSV."""
    rows = []
    for mode, r in info["modes"].items():
        torch_ms = r["torch"]["ms"]
        rows.append(dict(mode=mode, impl="cogkern FusedAdamW", ms=r["ms_plain"], bytes_per_param=r["bytes_per_param_plain"],
                         state_bytes_per_param=r["state_bytes_per_param"],
                         GBps=r["gbps_plain"], pct_copy=r["pct_copy_plain"], speedup_vs_torch=torch_ms / r["ms_plain"],
                         syncs_per_step=r.get("syncs_per_step"), status="ok"))
        rows.append(dict(mode=mode, impl="cogkern FusedAdamW + DynamicLossScaler", ms=r["ms_scaled"],
                         bytes_per_param=r["bytes_per_param_scaled"],
                         GBps=r["bytes_per_param_scaled"] * info["params"] / (r["ms_scaled"] * 1e-3) / 1e9,
                         speedup_vs_torch=torch_ms / r["ms_scaled"], status="ok"))
        if "ms_graph" in r:
            rows.append(dict(mode=mode, impl="cogkern, CUDA graph of scaler step", ms=r["ms_graph"],
                             speedup_vs_torch=torch_ms / r["ms_graph"], status="ok"))
        rows.append(dict(mode=mode, impl=f"torch {r['torch']['impl']} + GradScaler", ms=torch_ms, speedup_vs_torch=1.0,
                         syncs_per_step=r["torch"].get("syncs_per_step"), status="ok"))
        apex = r["apex"]
        rows.append(dict(mode=mode, impl="apex FusedAdam", ms=apex.get("ms"),
                         status="ok" if "ms" in apex else f"absent: {apex.get('skipped', '')}"))
    for name, r in info.get("peers", {}).items():
        rows.append(dict(mode=r["class"], impl=name, ms=r.get("ms"), state_bytes_per_param=r.get("state_bytes_per_param"),
                         status="ok" if "ms" in r else f"absent: {r['skipped']}"))
    for row in rows:
        row["pct_copy"] = row.get("pct_copy") if row.get("GBps") is None else 100 * row["GBps"] / info["copy_gbps"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--params", default=None, help="target parameter count (default: 1e9 GPU, 16e6 CPU)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--quick", action="store_true", help="small sizes, few iterations")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-peers", action="store_true", help="skip bitsandbytes / torchao / torch-optimi")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared, oversubscribed box 1 gives steadier numbers)")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
