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

import csv
import math
import sys
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


def observed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs `audit` and `watch` record: every leaf, plus the fused attention
    (whose internals are one op), in registration order."""
    return [(name, module) for name, module in model.named_modules()
            if name and (not any(True for _ in module.children()) or type(module).__name__ == "FusedAttention")]


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

    for name, module in observed_modules(model):
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


# ----------------------------------------------------------------------------- watch


@dataclass
class WatchRow:
    module: str  # qualified name; "NAME.grad_output" for the gradient flowing into NAME's output
    max_abs: float  # over all steps watched (inf or nan once it went non-finite)
    headroom: float  # limit / max_abs: how many times the largest value fits below fp16's max
    first_unsafe_step: int | None  # first step it went non-finite or within the watch's headroom factor


@dataclass
class WatchReport:
    rows: list[WatchRow]  # in execution order
    first_unsafe: str | None
    steps: int
    headroom: float
    limit: float

    def to_markdown(self, top: int | None = None) -> str:
        """The table; ``top``: only the ``top`` rows of largest max-abs (and the first unsafe one)."""
        rows = self.rows
        if top is not None:
            keep = sorted(rows, key=lambda r: -_sort_key(r.max_abs))[:top]
            rows = [r for r in rows if r in keep or r.module == self.first_unsafe]
        head = (f"first unsafe: `{self.first_unsafe}`" if self.first_unsafe else
                f"every output stayed finite and more than {self.headroom:g}x below {self.limit:g}")
        lines = [f"{head} ({self.steps} step(s) watched)", "",
                 "| module | max abs | headroom (limit / max) | first unsafe step |", "|---|---|---|---|"]
        for r in rows:
            step = "-" if r.first_unsafe_step is None else str(r.first_unsafe_step)
            lines.append(f"| {r.module} | {r.max_abs:.4g} | {r.headroom:.3g}x | {step} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(r.module) for r in self.rows] + [6])
        head = (f"first unsafe module: {self.first_unsafe}" if self.first_unsafe else
                f"all outputs stayed finite and more than {self.headroom:g}x below {self.limit:g}")
        lines = [f"activation watch, {self.steps} step(s): {head}",
                 f"{'module':<{width}}  {'max abs':>10}  {'headroom':>9}  first unsafe step"]
        for r in self.rows:
            step = "-" if r.first_unsafe_step is None else str(r.first_unsafe_step)
            lines.append(f"{r.module:<{width}}  {r.max_abs:>10.4g}  {r.headroom:>8.3g}x  {step}")
        return "\n".join(lines)


def _headroom(limit: float, max_abs: float) -> float:
    if not math.isfinite(max_abs):
        return 0.0  # it already went past: no headroom left
    return limit / max_abs if max_abs else math.inf


def _sort_key(x: float) -> float:
    return math.inf if math.isnan(x) else x


class Watch:
    """Running max-abs of every module's output, kept on the device; see :func:`watch`."""

    def __init__(self, model: nn.Module, *, backward: bool = False, headroom: float = HEADROOM,
                 limit: float = FP16_MAX, start_step: int = 0, history: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for flag, value in (("backward", backward), ("history", history)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        for arg, value, low in (("headroom", headroom, 1.0), ("limit", limit, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or value == 0:
                raise ValueError(f"{arg} must be a finite number {'>= 1' if low else '> 0'}, got {value!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        modules = observed_modules(model)
        self.backward, self.headroom, self.limit = backward, float(headroom), float(limit)
        self.current_step = start_step
        self._keep_history = history
        self._names = [n for n, _ in modules] + ([f"{n}.grad_output" for n, _ in modules] if backward else [])
        self._order: list[int] = []  # rows in the order they first recorded: execution order
        self._fired: set[int] = set()  # rows recorded in the open step (host-side bookkeeping only)
        self._current = self._running = self._first = None  # device tensors, made on the first output's device
        self._history: list[tuple[int, torch.Tensor, frozenset[int]]] = []
        self._closed_steps = 0
        self._hooks = [m.register_forward_hook(self._forward_hook(i, len(modules))) for i, (_, m) in enumerate(modules)]

    # -------------------------------------------------------------- recording (no host sync)
    def _forward_hook(self, row: int, n_modules: int):
        def hook(_module, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for o in outs:
                if torch.is_tensor(o) and o.is_floating_point() and o.numel():
                    self._record(row, o)
                    if self.backward and o.requires_grad:
                        o.register_hook(self._grad_hook(row + n_modules))

        return hook

    def _grad_hook(self, row: int):
        def hook(grad):
            if grad is not None and grad.numel():
                self._record(row, grad)

        return hook

    def _record(self, row: int, t: torch.Tensor) -> None:
        m = t.detach().abs().amax().float()  # nan and inf propagate: a non-finite output stays visible
        if self._current is None:
            n = len(self._names)
            self._current = torch.zeros(n, dtype=torch.float32, device=m.device)
            self._running = torch.zeros_like(self._current)
            self._first = torch.full((n,), -1, dtype=torch.int64, device=m.device)
        self._current[row] = torch.maximum(self._current[row], m.to(self._current.device))
        if row not in self._fired:
            self._fired.add(row)
            if row not in self._order:
                self._order.append(row)

    def _unsafe(self, values: torch.Tensor) -> torch.Tensor:
        return ~(values * self.headroom <= self.limit)  # nan compares False: unsafe

    def step(self) -> None:
        """Ends the current step (call once per training step, after backward); a few device ops, no sync.
        Without calls to step() everything watched counts as step `start_step`."""
        if self._fired:
            self._first.masked_fill_((self._first < 0) & self._unsafe(self._current), self.current_step)
            torch.maximum(self._running, self._current, out=self._running)
            if self._keep_history:
                self._history.append((self.current_step, self._current.clone(), frozenset(self._fired)))
            self._current.zero_()
            self._fired = set()
            self._closed_steps += 1
        self.current_step += 1

    # -------------------------------------------------------------- reading (one sync each)
    def _totals(self) -> tuple[list[float], list[int]]:
        """Running max and first unsafe step per row, the open step included."""
        if self._current is None:
            return [0.0] * len(self._names), [-1] * len(self._names)
        first = self._first
        if self._fired:
            first = first.masked_fill((first < 0) & self._unsafe(self._current), self.current_step)
        both = torch.cat([torch.maximum(self._running, self._current).double(), first.double()]).cpu().tolist()
        n = len(self._names)
        return both[:n], [int(s) for s in both[n:]]

    @property
    def steps(self) -> int:
        """Steps in which something was recorded, the open one included."""
        return self._closed_steps + bool(self._fired)

    def first_unsafe(self) -> str | None:
        """The first module (earliest step, then execution order) whose output went non-finite or within
        `headroom` of `limit`; None when all stayed safe."""
        _, first = self._totals()
        hits = [(first[r], k, r) for k, r in enumerate(self._order) if first[r] >= 0]
        return self._names[min(hits)[2]] if hits else None

    def report(self) -> WatchReport:
        running, first = self._totals()
        rows = [WatchRow(self._names[r], running[r], _headroom(self.limit, running[r]),
                         first[r] if first[r] >= 0 else None) for r in self._order]
        hits = [(first[r], k, r) for k, r in enumerate(self._order) if first[r] >= 0]
        return WatchReport(rows, self._names[min(hits)[2]] if hits else None, self.steps, self.headroom, self.limit)

    def history(self) -> tuple[list[str], list[tuple[int, list[float | None]]]]:
        """(module names in execution order, [(step, per-module max-abs or None where it did not run)])."""
        if not self._keep_history:
            raise RuntimeError("this watch keeps no history (made with history=False)")
        entries = list(self._history)
        if self._fired:
            entries.append((self.current_step, self._current, frozenset(self._fired)))
        values = torch.stack([v for _, v, _ in entries]).cpu().tolist() if entries else []
        steps = [(s, [vals[r] if r in fired else None for r in self._order])
                 for (s, _, fired), vals in zip(entries, values)]
        return [self._names[r] for r in self._order], steps

    def to_csv(self, path: str) -> None:
        """One row per step, one column per module (execution order); empty where a module did not run."""
        names, steps = self.history()
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *names])
            for s, vals in steps:
                w.writerow([s, *("" if v is None else repr(v) for v in vals)])

    def plot(self, path: str, top: int = 8) -> bool:
        """Max-abs per step of the `top` modules that came nearest fp16's limit (matplotlib; False without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: skipping the watch plot", file=sys.stderr)
            return False
        names, steps = self.history()
        report = self.report()
        peak = {r.module: _sort_key(r.max_abs) for r in report.rows}
        shown = sorted(names, key=lambda n: -peak[n])[:top]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in shown:
            k = names.index(name)
            pts = [(s, v[k]) for s, v in steps if v[k] is not None]
            ax.plot([s for s, _ in pts], [v if math.isfinite(v) else math.nan for _, v in pts], lw=1, label=name)
        ax.axhline(self.limit, color="black", lw=0.8, ls="--", label=f"fp16 max {self.limit:g}")
        ax.axhline(self.limit / self.headroom, color="gray", lw=0.8, ls=":", label=f"/{self.headroom:g}")
        if report.first_unsafe is not None:
            step = next(r.first_unsafe_step for r in report.rows if r.module == report.first_unsafe)
            ax.axvline(step, color="red", lw=0.8, label=f"first unsafe: {report.first_unsafe} @ {step}")
        ax.set(xlabel="step", ylabel="max |output|", yscale="log", title="activation watch")
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True

    # -------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Removes the hooks; what was recorded stays readable."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def watch(model: nn.Module, *, backward: bool = False, headroom: float = HEADROOM, limit: float = FP16_MAX,
          start_step: int = 0, history: bool = True) -> Watch:
    """Watch every module's output approach fp16's range while `model` trains.

        with cogkern.precision.watch(model) as w:
            for batch in data:
                loss = ...; loss.backward(); opt.step()
                w.step()                      # marks the step boundary
        print(w.report()); w.first_unsafe(); w.to_csv("watch.csv"); w.plot("watch.png")

    Forward hooks on the modules `audit` records (leaves and fused attention) keep, per module, the
    max-abs of its output in a device tensor (``backward=True``: also of the gradient flowing into that
    output, rows "NAME.grad_output"; under loss scaling that is the scaled gradient, the value fp16 must
    hold). Nothing is read back while training: each recorded output costs an abs, an amax and a
    maximum on the device, each ``step()`` a few ops on one vector; ``report()``, ``first_unsafe()``,
    ``history()`` sync once when called. A module is unsafe at the first step its output is non-finite
    or within `headroom` of `limit` (default: 2x of 65504). Execution order is the order in which
    modules first ran. One device per model.

    Cost, measured with ``python -m benchmarks.bench_watch`` (one training step of the tiny demo, fp32,
    batch 8, on 2 CPU threads shared with other work, fastest of 9 rounds): 174 ms without the watch,
    338 ms with it (+94%), 339 ms with backward hooks too. On the CPU each recorded output costs one more
    read of it (abs, amax) and the tiny model's ops are as cheap as that read, so the watch about doubles
    the step; it is a diagnostic to turn on for a run that overflows, not an always-on monitor. Not yet
    measured on a GPU.
    """
    return Watch(model, backward=backward, headroom=headroom, limit=limit, start_step=start_step, history=history)
