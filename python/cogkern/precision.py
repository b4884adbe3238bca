"""FP16 or BF16? Measure it on your model: `audit(model, batch)`.

One forward/backward in the model's current precision (fp32 recommended) that
records, for every module output (activation), parameter and gradient:
- the largest magnitude, against fp16's largest finite value (65504);
- for gradients, the fraction of non-zero values that fp16 would flush to zero
  (below 2^-24) or store with reduced precision (below 2^-14) at the given loss
  scale;
- bf16's mean relative rounding error of the values (bf16 keeps fp32's range
  but only 8 bits of mantissa; fp16 keeps 11).
It then recommends fp16 (with dynamic loss scaling: more mantissa, the faster
choice on GPUs whose fp16 and bf16 rates match) when nothing comes near fp16's
range limit, and bf16 otherwise, saying why — the choice CogVideoX's authors
made by hand (FP16 for the 2B model, BF16 for 5B, where FP16 overflowed).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MIN_NORMAL = 2.0**-14
HEADROOM = 2.0  # a value within 2x of fp16's max is one outlier away from overflow


@dataclass
class TensorStat:
    name: str
    kind: str  # "activation", "param" or "grad"
    max_abs: float
    bf16_rel_err: float
    underflow_frac: float = 0.0  # grads: non-zero values flushed to zero in fp16 at the loss scale
    subnormal_frac: float = 0.0  # grads: non-zero values stored as fp16 subnormals (lost precision)

    @property
    def fp16_safe(self) -> bool:
        return self.max_abs * HEADROOM <= FP16_MAX


@dataclass
class AuditReport:
    stats: list[TensorStat]
    loss_scale: float
    recommendation: str  # "fp16" or "bf16"
    reasons: list[str] = field(default_factory=list)

    def unsafe_in_fp16(self) -> list[TensorStat]:
        return [s for s in self.stats if s.kind != "grad" and not s.fp16_safe]

    def worst(self, kind: str, n: int = 5) -> list[TensorStat]:
        return sorted((s for s in self.stats if s.kind == kind), key=lambda s: -s.max_abs)[:n]

    def to_markdown(self) -> str:
        lines = [f"**Recommendation: {self.recommendation}.**", ""]
        lines += [f"- {r}" for r in self.reasons]
        lines += ["", "| tensor | kind | max abs | fp16 safe | bf16 rel. error | fp16 underflow @ scale |",
                  "|---|---|---|---|---|---|"]
        for kind in ("activation", "param", "grad"):
            for s in self.worst(kind):
                under = f"{s.underflow_frac:.2%}" if s.kind == "grad" else "-"
                lines.append(f"| {s.name} | {s.kind} | {s.max_abs:.4g} | {'yes' if s.fp16_safe else 'NO'} | "
                             f"{s.bf16_rel_err:.2e} | {under} |")
        return "\n".join(lines)


def _bf16_rel_err(t: torch.Tensor) -> float:
    x = t.detach().float().flatten()
    x = x[x != 0]
    if x.numel() == 0:
        return 0.0
    return float(((x.bfloat16().float() - x).abs() / x.abs()).mean())


def _stat(name: str, kind: str, t: torch.Tensor, loss_scale: float = 1.0) -> TensorStat:
    x = t.detach().float()
    finite = x[torch.isfinite(x)]
    max_abs = float(finite.abs().max()) if finite.numel() else 0.0
    if finite.numel() != x.numel():
        max_abs = float("inf")
    stat = TensorStat(name, kind, max_abs, _bf16_rel_err(finite))
    if kind == "grad":
        scaled = (finite * loss_scale).abs()
        nonzero = scaled[scaled != 0]
        if nonzero.numel():
            stat.underflow_frac = float((nonzero < FP16_MIN_SUBNORMAL).float().mean())
            stat.subnormal_frac = float((nonzero < FP16_MIN_NORMAL).float().mean())
    return stat


def audit(
    model: nn.Module,
    batch: Sequence | torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_scale: float = 2.0**16,
) -> AuditReport:
    """One forward/backward of ``model(*batch)``; the loss is ``loss_fn(output)``
    (default: the mean square of the output). Gradients are cleared afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(loss_scale, (int, float)) and loss_scale > 0):
        raise ValueError(f"loss_scale must be a positive number, got {loss_scale!r}")
    args = (batch,) if torch.is_tensor(batch) else tuple(batch)
    stats: list[TensorStat] = []
    hooks = []

    def record(name):
        def hook(_module, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for i, o in enumerate(outs):
                if torch.is_tensor(o) and o.is_floating_point():
                    stats.append(_stat(name if len(outs) == 1 else f"{name}[{i}]", "activation", o))

        return hook

    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):  # leaves, plus fused modules below
            hooks.append(module.register_forward_hook(record(name)))
        elif name and type(module).__name__ == "FusedAttention":
            hooks.append(module.register_forward_hook(record(name)))
    try:
        model.zero_grad(set_to_none=True)
        out = model(*args)
        loss = loss_fn(out) if loss_fn is not None else out.float().square().mean()
        stats.append(_stat("loss", "activation", loss))
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    for name, p in model.named_parameters():
        stats.append(_stat(name, "param", p))
        if p.grad is not None:
            stats.append(_stat(name, "grad", p.grad, loss_scale))
    model.zero_grad(set_to_none=True)
    return _recommend(stats, loss_scale)


def _recommend(stats: list[TensorStat], loss_scale: float) -> AuditReport:
    reasons = []
    unsafe = [s for s in stats if s.kind != "grad" and not s.fp16_safe]
    grads = [s for s in stats if s.kind == "grad"]
    worst_act = max((s for s in stats if s.kind == "activation"), key=lambda s: s.max_abs, default=None)
    if unsafe:
        top = max(unsafe, key=lambda s: s.max_abs)
        reasons.append(
            f"{len(unsafe)} tensor(s) come within {HEADROOM:g}x of fp16's largest value {FP16_MAX:g} or beyond; "
            f"the largest is {top.kind} `{top.name}` at {top.max_abs:.4g}: fp16 would overflow to inf")
        reasons.append("bf16 has fp32's range, so it cannot overflow here; keep fp32 master weights "
                       "(or stochastic rounding) to protect small updates")
        rec = "bf16"
    else:
        rec = "fp16"
        if worst_act is not None:
            reasons.append(f"the largest activation (`{worst_act.name}`, {worst_act.max_abs:.4g}) is "
                           f"{FP16_MAX / max(worst_act.max_abs, 1e-30):.0f}x below fp16's limit {FP16_MAX:g}")
        reasons.append("fp16 keeps 3 more mantissa bits than bf16 (relative rounding error ~8x smaller); "
                       "it needs dynamic loss scaling for the gradients")
    if grads:
        under = max(grads, key=lambda s: s.underflow_frac)
        reasons.append(f"at loss scale {loss_scale:g}, up to {under.underflow_frac:.2%} of a gradient's non-zero "
                       f"values (`{under.name}`) would underflow to zero in fp16"
                       + ("; a dynamic loss scaler raises the scale until this is small"
                          if under.underflow_frac > 0.01 else ""))
    mean_bf16 = sum(s.bf16_rel_err for s in stats) / max(len(stats), 1)
    reasons.append(f"bf16's mean relative rounding error over all tensors: {mean_bf16:.2e} (fp16: ~8x smaller)")
    return AuditReport(stats=stats, loss_scale=loss_scale, recommendation=rec, reasons=reasons)
