"""Correctness checks of cogkern's kernels on small inputs, against a more precise reference.

One set of checks serves two callers: the first-use guard (:mod:`cogkern._guard`, which decides
from them whether a kernel may run in this process) and ``python -m cogkern.selftest`` (which
prints them). Each returns :class:`Check` records.

- attention (:func:`check_attention`): FlashAttention's rule, the kernel's error against a float32
  reference at most 2x the error of eager PyTorch (diffusers' path) in the same dtype, for the
  output (forward) and every gradient (backward); on the CPU in float32/float64 against float64.
- RoPE (:func:`check_rope`): the fused kernel (angles computed inside, and the table mode) forward
  and backward within one rounding of a float64 reference, and within 2x of diffusers' formula.
- the optimizer (:func:`check_optimizer`): a few steps on odd sizes, with a loss scale and an
  overflowing step; on a GPU every state tensor bit-equal to the CPU backend's (they share the
  functor), on the CPU within a stated tolerance of float64 ``torch.optim.AdamW``; the overflow
  step leaves everything bit-identical; the gradient norm within 1e-5 of float64.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator

import torch

from . import _guard
from .attention import _BACKWARD_KERNELS, _FORWARD_KERNELS, attention_kernels, fused_attention
from .optim import FusedAdamW, _join_master
from .reference.flash_rule import RULE_NAMES, rule_errors
from .reference.rope_math import apply_table_reference, rope3d_reference
from .reference.diffusers_attention import apply_rotary_emb
from .rope import RoPE3D, apply_rope3d

_ops = torch.ops.cogkern


@dataclasses.dataclass
class Check:
    name: str  # what was checked, e.g. "attention.backward[mma.sync] bfloat16 D=128"
    passed: bool
    error: str | None  # why it failed; None when it passed
    figures: dict[str, float]  # the measured errors (and their bounds)
    seconds: float  # wall time of the check
    family: str = ""  # "attention", "rope", "optimizer"
    kernel: str = ""  # the kernel checked, as attention_kernels() names it ("cpu" on the CPU)
    direction: str = ""  # "forward", "backward" or "step"
    dtype: str = ""
    head_dim: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _corrupt(t: torch.Tensor) -> torch.Tensor:
    """What a wrong kernel does: one element off by far more than any rounding."""
    t = t.detach().contiguous().clone()
    flat = t.view(-1)
    flat[flat.numel() // 2] += 0.5 + flat.abs().max()
    return t


@contextlib.contextmanager
def _check_settings(device: torch.device) -> Iterator[None]:
    """The checks run the same whatever the caller's global settings: the guard bypassed (the
    kernels run directly), gradients on, no autocast, full-precision fp32 matmuls (a TF32
    reference would be no reference), deterministic algorithms and the sync debug mode off
    (the eager peer's backward may be nondeterministic; a check syncs once, by design)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        torch.use_deterministic_algorithms(False)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        with _guard.bypass(), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            yield
        _sync(device)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(sync_mode)


# ---------------------------------------------------------------------------- attention

# The case: odd sizes around the tiles (13 text + 195 video = 208 tokens: 3 tiles of 64, the last
# partial), 2 heads, a 3-D grid, LayerNorm with affine parameters, the RoPE computed in the kernel.
ATTENTION_CASE = dict(batch=1, heads=2, text_len=13, grid=(3, 5, 13))
# Absolute slack on top of 2x eager, for errors at the reference's own rounding level.
_ATTENTION_SLACK = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-6, torch.float64: 1e-12}


def check_attention(dtype: torch.dtype, head_dim: int, device, *, seq: int | None = None, seed: int = 0) -> list[Check]:
    """[forward, backward] of the attention kernels that fused_attention selects now for this
    dtype, head dim and device (the COGKERN_ATTENTION_SM90* switches, minus retired kernels)."""
    device = torch.device(device)
    case = dict(ATTENTION_CASE)
    grid = case.pop("grid")
    text_len = case["text_len"]
    if seq is not None and seq != text_len + math.prod(grid):
        grid = None  # rule_case factors seq - text_len itself
    else:
        seq = text_len + math.prod(grid)
    probe = torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device)
    kernels = attention_kernels(probe)
    forward, backward = kernels["forward"], kernels["backward"]
    hurt_forward = _guard.injected("attention.forward", forward)
    hurt_backward = _guard.injected("attention.backward", backward)

    def perturb(out, grads):
        if hurt_forward:
            out = _corrupt(out)
        if hurt_backward:
            grads = (_corrupt(grads[0]), *grads[1:])
        return out, grads

    start = time.perf_counter()
    with _check_settings(device):
        err_kernel, err_eager, finite = rule_errors(
            fused_attention, case["batch"], seq, case["heads"], head_dim, text_len, dtype, device,
            seed=seed, grid=grid, perturb=perturb if (hurt_forward or hurt_backward) else None,
        )  # fmt: skip
    _sync(device)
    seconds = time.perf_counter() - start
    slack = _ATTENTION_SLACK[dtype]
    checks = []
    for direction, kernel, names in (("forward", forward, RULE_NAMES[:1]), ("backward", backward, RULE_NAMES[1:])):
        figures, bad = {}, []
        for name in names:
            i = RULE_NAMES.index(name)
            ek, ee = err_kernel[i], err_eager[i]
            figures[f"{name}_err"], figures[f"{name}_eager_err"] = ek, ee
            if not ek <= 2 * ee + slack:  # (NaN fails)
                bad.append(f"{name} error {ek:.3g} > 2 x eager {ee:.3g}")
        if not finite:
            bad.append("non-finite output or gradients")
        checks.append(Check(
            name=f"attention.{direction}[{kernel}] {_dtype_name(dtype)} D={head_dim}",
            passed=not bad, error="; ".join(bad) or None, figures=figures, seconds=seconds,
            family="attention", kernel=kernel, direction=direction, dtype=_dtype_name(dtype), head_dim=head_dim,
        ))  # fmt: skip
    return checks


def _retire_attention(probe: torch.Tensor, check: Check) -> None:
    names = _BACKWARD_KERNELS if check.direction == "backward" else _FORWARD_KERNELS
    mode = next(m for m, n in names.items() if n == check.kernel)
    _ops._attention_cuda_retire_kernel(probe, check.direction == "backward", mode)


def _decide_attention(key: tuple, device: torch.device) -> _guard.Decision:
    """Check the selected kernels; a failing Hopper mode is retired and its successor checked, until
    the kernels pass or mma.sync (or the CPU backend) fails, which sends the config to the composite path.
    A wrong forward spoils the backward's check too (it reads out and lse), so it is judged first."""
    dtype, head_dim = key[0], key[1]
    probe = torch.empty((1, 1, 1, head_dim), dtype=dtype, device=device)
    failures = []
    while True:
        fwd, bwd = check_attention(dtype, head_dim, device)
        bad = fwd if not fwd.passed else (bwd if not bwd.passed else None)
        if bad is None:
            kernels = attention_kernels(probe)
            return _guard.Decision(_guard.KERNEL, failures,
                                   fallback=f"attention kernels {kernels['forward']} / {kernels['backward']} "
                                            "(forward / backward), which passed")  # fmt: skip
        failures.append(bad)
        if bad.kernel in ("mma.sync", "cpu"):
            return _guard.Decision(_guard.COMPOSITE, failures,
                                   fallback="the composite attention (eager norm + RoPE + torch SDPA)")
        _retire_attention(probe, bad)


# ---------------------------------------------------------------------------- RoPE

ROPE_CASE = dict(batch=2, heads=3, head_dim=64, text_len=13, grid=(3, 5, 7))


def check_rope(dtype: torch.dtype, device, *, seed: int = 0) -> Check:
    """apply_rope3d, forward and backward, in both modes (angles in the kernel; a diffusers table),
    on a (B, H, S, D)-transposed view, against float64."""
    device = torch.device(device)
    c = ROPE_CASE
    seq = c["text_len"] + math.prod(c["grid"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["batch"], c["heads"], seq, c["head_dim"], generator=g).to(device=device, dtype=dtype)
    x = x.transpose(1, 2)  # diffusers' layout, viewed as (B, S, H, D)
    grad = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
    rope = RoPE3D(c["grid"], c["head_dim"])
    cos, sin = rope.cos_sin(device=device)
    hurt = _guard.injected("rope", "cpu" if device.type == "cpu" else "cuda")
    math_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    angle_max = max(c["grid"])
    # fp32 math and one rounding inside the kernel: one ulp of the output plus the angle's own error.
    bound = torch.finfo(dtype).eps + 4 * angle_max * math_eps

    start = time.perf_counter()
    figures, bad = {}, []
    with _check_settings(device):
        for mode, table in (("rope3d", rope), ("table", (cos, sin))):
            xi = x.detach().requires_grad_()
            out = apply_rope3d(xi, table, text_len=c["text_len"])
            (gx,) = torch.autograd.grad(out, xi, grad)
            if hurt:
                out = _corrupt(out)
            if mode == "rope3d":
                ref = rope3d_reference(x.cpu(), c["grid"], rope.axes_dims, text_len=c["text_len"])
                ref_gx = rope3d_reference(grad.cpu(), c["grid"], rope.axes_dims, text_len=c["text_len"], inverse=True)
                for name, got, want in (("out", out, ref), ("grad", gx, ref_gx)):
                    err = ((got.cpu().double() - want).abs() / want.abs().clamp_min(1.0)).max().item()
                    figures[f"{mode}_{name}_rel_err"] = err
                    if not err <= bound:
                        bad.append(f"{mode} {name}: relative error {err:.3g} > {bound:.3g}")
            else:
                ref = apply_table_reference(x.cpu(), cos.cpu(), sin.cpu(), c["text_len"])
                video = x[:, c["text_len"]:].transpose(1, 2)
                eager = apply_rotary_emb(video, (cos, sin)).transpose(1, 2)  # diffusers' formula, same table
                err = (out[:, c["text_len"]:].cpu().double() - ref[:, c["text_len"]:]).abs().max().item()
                err_eager = (eager.cpu().double() - ref[:, c["text_len"]:]).abs().max().item()
                figures["table_out_err"], figures["table_out_eager_err"] = err, err_eager
                if not err <= max(2 * err_eager, 2 * math_eps):
                    bad.append(f"table out: error {err:.3g} > 2 x eager {err_eager:.3g}")
                # The backward is the transposed table mix: the rotation by -angle.
                ref_gx = apply_table_reference(grad.cpu(), cos.cpu(), -sin.cpu(), c["text_len"])
                err = ((gx.cpu().double() - ref_gx).abs() / ref_gx.abs().clamp_min(1.0)).max().item()
                figures["table_grad_rel_err"] = err
                if not err <= bound:
                    bad.append(f"table grad: relative error {err:.3g} > {bound:.3g}")
            if not torch.equal(out[:, : c["text_len"]], x[:, : c["text_len"]]):
                bad.append(f"{mode}: the text tokens changed")
    _sync(device)
    kernel = "cpu" if device.type == "cpu" else "cuda"
    return Check(
        name=f"rope[{kernel}] {_dtype_name(dtype)} D={c['head_dim']}", passed=not bad, error="; ".join(bad) or None,
        figures=figures, seconds=time.perf_counter() - start, family="rope", kernel=kernel,
        direction="forward+backward", dtype=_dtype_name(dtype), head_dim=c["head_dim"],
    )  # fmt: skip


def _decide_rope(key: tuple, device: torch.device) -> _guard.Decision:
    check = check_rope(key[0], device)
    if check.passed:
        return _guard.Decision(_guard.KERNEL, [])
    return _guard.Decision(_guard.COMPOSITE, [check], fallback="the composite RoPE (eager PyTorch, fp32 math)")


# ---------------------------------------------------------------------------- optimizer

# Every optimizer precision mode: (name, param dtype, FusedAdamW keyword arguments): each param
# precision with fp32, bf16 and int8 moments ("-bf16m", "-int8m"), but 16-bit params without
# masters, which keep fp32 moments. The selftest and bench_optimizer enumerate these.
_PARAM_MODES: list[tuple[str, torch.dtype, dict]] = [
    ("fp32", torch.float32, {}),
    ("fp16-master", torch.float16, {"master_weights": True}),
    ("bf16-master", torch.bfloat16, {"master_weights": True}),
    ("fp16-plain", torch.float16, {"master_weights": False}),
    ("bf16-plain", torch.bfloat16, {"master_weights": False}),
    ("bf16-sr", torch.bfloat16, {"stochastic_rounding": True}),
    ("bf16-remainders", torch.bfloat16, {"param_remainders": True}),
]
OPTIMIZER_MODES: list[tuple[str, torch.dtype, dict]] = [
    (name if moments == "fp32" else f"{name}-{moments}m", dtype, kw if moments == "fp32" else {**kw, "moments": moments})
    for moments in ("fp32", "bf16", "int8")
    for name, dtype, kw in _PARAM_MODES
    if moments == "fp32" or kw.get("master_weights") is not False
]
# Odd sizes: vector tails, one past a chunk (32768), a 2-D one.
OPTIMIZER_SHAPES = [(3, 5), (257,), (1031,), (4, 300), (32771,)]
# The steps: plain, loss-scaled, loss-scaled and overflowing (skipped), plain.
_OPT_SCALES = (None, 1024.0, 1024.0, None)
_OPT_OVERFLOW_STEP = 2


def _optimizer_run(device: torch.device, dtype: torch.dtype, kwargs: dict, seed: int):
    """The steps on `device`; returns (params, opt, grads per step (CPU), norms per step, skip intact)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype).to(device) for s in OPTIMIZER_SHAPES]
    # Clipping on with a bound no norm reaches: the norm pass runs and the update stays unclipped.
    opt = FusedAdamW(params, lr=1e-3, weight_decay=0.05, seed=1234, max_grad_norm=1e30, **kwargs)
    grads_cpu, norms, skip_intact = [], [], True
    for step, scale in enumerate(_OPT_SCALES):
        gs = [(torch.randn(s, generator=g) * 0.1 * (scale or 1.0)).to(dtype) for s in OPTIMIZER_SHAPES]
        if step == _OPT_OVERFLOW_STEP:
            gs[1].view(-1)[100] = float("inf")
        grads_cpu.append(gs)
        for p, gr in zip(params, gs):
            p.grad = gr.to(device)
        before = _state_bits(opt, params) if step == _OPT_OVERFLOW_STEP else None
        grad_scale = None if scale is None else torch.tensor(scale, device=device)
        opt.step(grad_scale=grad_scale)
        norms.append(opt.grad_norm.item())
        if before is not None:
            skip_intact = opt.skipped_flag.item() == 1.0 and all(
                torch.equal(a, b) for a, b in zip(before, _state_bits(opt, params)))
    return params, opt, grads_cpu, norms, skip_intact


def _state_bits(opt: FusedAdamW, params) -> list[torch.Tensor]:
    """Params and every state tensor, as raw bytes on the CPU (bit-exact comparisons)."""
    out = [p.detach().cpu().contiguous().view(-1).view(torch.uint8) for p in params]
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            if torch.is_tensor(st[k]):
                out.append(st[k].detach().cpu().contiguous().view(-1).view(torch.uint8))
    return out


def _reference_adamw(params0, grads_cpu, norms_skip_step) -> list[torch.Tensor]:
    """float64 torch.optim.AdamW over the same unscaled gradients, the skipped step skipped."""
    ref = [p.detach().cpu().double().clone().requires_grad_() for p in params0]
    opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.05, foreach=False)
    for step, (scale, gs) in enumerate(zip(_OPT_SCALES, grads_cpu)):
        if step == norms_skip_step:
            continue
        for p, gr in zip(ref, gs):
            p.grad = gr.double() / (scale or 1.0)
        opt.step()
    return [p.detach() for p in ref]


def _exact_param(opt: FusedAdamW, p: torch.Tensor) -> torch.Tensor:
    """The value the optimizer keeps for p: its fp32 master (or param + remainder), else p."""
    state = opt.state[p]
    if "master_param" in state:
        return state["master_param"]
    if "master_remainder" in state:
        return _join_master(p.detach(), state["master_remainder"])
    return p.detach()


def check_optimizer(device, param_dtype: torch.dtype, *, seed: int = 0, **fused_adamw_kwargs) -> Check:
    """FusedAdamW (one precision mode) over OPTIMIZER_SHAPES and the steps above."""
    device = torch.device(device)
    mode = next((n for n, d, kw in OPTIMIZER_MODES if d == param_dtype and kw == fused_adamw_kwargs), None)
    mode = mode or f"{_dtype_name(param_dtype)} {fused_adamw_kwargs}"
    hurt = _guard.injected("optimizer", mode)
    start = time.perf_counter()
    figures, bad = {}, []
    with _check_settings(device):
        g = torch.Generator().manual_seed(seed)
        params0 = [torch.randn(s, generator=g).to(param_dtype) for s in OPTIMIZER_SHAPES]
        params, opt, grads_cpu, norms, skip_intact = _optimizer_run(device, param_dtype, fused_adamw_kwargs, seed)
        if hurt:
            with torch.no_grad():
                params[0].copy_(_corrupt(params[0]))
        if not skip_intact:
            bad.append("the overflowing step changed the state (or was not flagged as skipped)")
        for step, (scale, gs) in enumerate(zip(_OPT_SCALES, grads_cpu)):
            if step == _OPT_OVERFLOW_STEP:
                continue
            want = math.sqrt(sum((gr.double() / (scale or 1.0)).square().sum().item() for gr in gs))
            err = abs(norms[step] - want) / want
            figures[f"grad_norm_rel_err_step{step}"] = err
            if not err <= 1e-5:
                bad.append(f"grad_norm at step {step}: relative error {err:.3g} > 1e-5")
        if device.type == "cuda":
            # The CPU backend runs the same functor bodies: every state bit must agree.
            cpu_params, cpu_opt, _, _, _ = _optimizer_run(torch.device("cpu"), param_dtype, fused_adamw_kwargs, seed)
            got, want = _state_bits(opt, params), _state_bits(cpu_opt, cpu_params)
            differing = sum(not torch.equal(a, b) for a, b in zip(got, want))
            figures["state_tensors"], figures["state_tensors_differing"] = len(got), differing
            if differing or len(got) != len(want):
                bad.append(f"{differing} of {len(got)} params/state tensors differ from the CPU backend's bits")
        else:
            ref = _reference_adamw(params0, grads_cpu, _OPT_OVERFLOW_STEP)
            exact = [_exact_param(opt, p) for p in params]
            steps = len(_OPT_SCALES) - 1
            moments = fused_adamw_kwargs.get("moments", "fp32")
            if exact[0].dtype != torch.float32:
                # 16-bit params without masters: each step may round the param by half an ulp of its
                # dtype (stochastically with SR), whatever the moments.
                rtol = steps * torch.finfo(param_dtype).eps
                worst = max(((e.double() - r).abs().max() / r.abs().max()).item() for e, r in zip(exact, ref))
                figures["rel_err_vs_float64"], figures["rel_tol"] = worst, rtol
                what = "relative error vs float64 AdamW"
            elif moments == "fp32":
                # fp32 masters (or params) and moments: fp32 rounding over a few steps.
                rtol = 1e-6 * steps
                worst = max(((e.double() - r).abs().max() / r.abs().max()).item() for e, r in zip(exact, ref))
                figures["rel_err_vs_float64"], figures["rel_tol"] = worst, rtol
                what = "relative error vs float64 AdamW"
            else:
                # Lean moments: one value's update may be far off (an int8 code of m that flushed to 0
                # changes that element's step by a whole lr), so the update as a whole is compared:
                # its L2 distance from float64 AdamW's, relative; bf16 codes keep 8 bits (~0.4 %),
                # int8 3 (~6 % per value, unbiased); measured 0.11 % and 1.8 %: 1 % and 8 % bounds.
                rtol = {"bf16": 0.01, "int8": 0.08}[moments]
                num = sum(float((e.double() - r).square().sum()) for e, r in zip(exact, ref))
                den = sum(float((r - p0.double()).square().sum()) for r, p0 in zip(ref, params0))
                worst = math.sqrt(num / den)
                figures["update_rel_l2_err_vs_float64"], figures["rel_tol"] = worst, rtol
                what = "the update's relative L2 error vs float64 AdamW"
            if not worst <= rtol:
                bad.append(f"{what} {worst:.3g} > {rtol:.3g}")
            if "master_param" in opt.state[params[0]]:
                if not all(torch.equal(p, opt.state[p]["master_param"].to(param_dtype)) for p in params):
                    bad.append("a param is not its master rounded to nearest")
    _sync(device)
    kernel = "cpu" if device.type == "cpu" else "cuda"
    return Check(
        name=f"optimizer[{mode}] on {kernel}", passed=not bad, error="; ".join(bad) or None, figures=figures,
        seconds=time.perf_counter() - start, family="optimizer", kernel=kernel, direction="step",
        dtype=_dtype_name(param_dtype),
    )  # fmt: skip


def _decide_optimizer(key: tuple, device: torch.device) -> _guard.Decision:
    dtype, kwargs = key[0], dict(key[1])
    check = check_optimizer(device, dtype, **kwargs)
    return _guard.Decision(_guard.KERNEL, [] if check.passed else [check], fatal=True)


def _forget_retired_attention() -> None:
    if torch.cuda.is_available() and hasattr(_ops, "_attention_cuda_forget_retired"):
        _ops._attention_cuda_forget_retired()


_guard.register_checker("attention", _decide_attention, ("COGKERN_ATTENTION_SM90", "COGKERN_ATTENTION_SM90_BWD"),
                        forget=_forget_retired_attention,
                        describe=lambda key: f"attention ({_dtype_name(key[0])}, head_dim {key[1]})")
_guard.register_checker("rope", _decide_rope, describe=lambda key: f"RoPE ({_dtype_name(key[0])})")
_guard.register_checker("optimizer", _decide_optimizer, describe=lambda key: (
    f"FusedAdamW ({_dtype_name(key[0])} params{''.join(f', {k}={v}' for k, v in key[1])})"))
