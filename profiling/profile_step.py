"""Run one op or one training step under a profiler, with NVTX ranges around each cogkern op.

    python profiling/profile_step.py --what train_step [--device cuda] [--trace trace.json]
    python profiling/profile_step.py --what rope|attention|optimizer ...

On CUDA: the profiled iteration runs inside cudaProfilerStart/Stop (nsys's
capture range) and an NVTX range "cogkern_step"; each cogkern op inside it gets
its own NVTX range "cogkern::<op>" (ncu.sh filters on those). Anywhere:
--trace writes a torch.profiler Chrome trace (open in chrome://tracing or Perfetto).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # for `benchmarks`


class NvtxCogkernOps(TorchDispatchMode):
    """Wraps every torch.ops.cogkern.* call in an NVTX range named after the op."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "cogkern":
            return func(*args, **(kwargs or {}))
        torch.cuda.nvtx.range_push(f"cogkern::{func._opname}")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            torch.cuda.nvtx.range_pop()


def workload(what: str, device: torch.device, small: bool):
    import cogkern

    if what == "train_step":
        from benchmarks.bench_train_step import make_step
        from cogkern.model import CONFIGS

        config = "tiny" if small or device.type == "cpu" else "cogvideox-5b-4blocks"
        precision = "bf16" if device.type == "cuda" else "fp32"
        return make_step(CONFIGS[config], "cogkern", "cogkern", precision, 1, device)
    if what == "rope":
        grid, text = ((2, 4, 4), 8) if small else ((13, 30, 45), 226)
        rope = cogkern.RoPE3D(grid, 64)
        x = torch.randn(1, text + rope.num_video_tokens, 48, 64, device=device, dtype=torch.bfloat16)
        return lambda: cogkern.apply_rope3d(x, rope, text_len=text, inplace=True)
    if what == "attention":
        s, text, grid = (40, 8, (2, 4, 4)) if small else (17776, 226, (13, 30, 45))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        q, k, v = (torch.randn(1, s, 48 if not small else 2, 64, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        w = torch.ones(64, device=device)
        rope = cogkern.RoPE3D(grid, 64)

        def step():
            out = cogkern.fused_attention(q, k, v, rope=rope, text_len=text, qk_norm="layer_norm",
                                          q_norm_weight=w, q_norm_bias=torch.zeros_like(w),
                                          k_norm_weight=w, k_norm_bias=torch.zeros_like(w))
            out.sum().backward()

        return step
    if what == "optimizer":
        n = 1 << 16 if small else 1 << 27
        params = [torch.nn.Parameter(torch.randn(n, device=device, dtype=torch.bfloat16)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = cogkern.optim.FusedAdamW(params, lr=1e-4)
        return opt.step
    raise ValueError(what)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["train_step", "rope", "attention", "optimizer"], default="train_step")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (for a quick check)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trace", default=None, help="write a torch.profiler Chrome trace here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    device = torch.device(args.device)
    fn = workload(args.what, device, args.small)
    for _ in range(args.warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        torch.cuda.nvtx.range_push("cogkern_step")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities) if args.trace else contextlib.nullcontext()
    with prof, (NvtxCogkernOps() if cuda else contextlib.nullcontext()):
        fn()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.nvtx.range_pop()
        torch.cuda.cudart().cudaProfilerStop()
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=15))
        print(f"wrote {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
