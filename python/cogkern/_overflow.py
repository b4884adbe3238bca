"""Which gradients overflowed: the shared part of ``FusedAdamW.overflow_report()`` and
``DynamicLossScaler.overflow_report()`` (here so that optim and amp need not import each other).

The grad check (``cogkern::amp_grad_check_``) writes, in its one pass, an int32 per
param into a flags buffer (``GRAD_INF`` / ``GRAD_NAN`` bits) and a summary entry last
(their OR, ``GRAD_SCANNED``, ``GRAD_FOUND_INF_IN``). :class:`SkipMemory` keeps, on the
device and without a sync, the flags of the last skipped step and which step it was;
:meth:`SkipMemory.read` is the one host read, made when a report is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._distributed import _dist_world

# csrc/adamw/adamw_math.h: GradFlag.
GRAD_INF, GRAD_NAN, GRAD_SCANNED, GRAD_FOUND_INF_IN = 1, 2, 4, 8
_KINDS = {GRAD_INF: "inf", GRAD_NAN: "NaN", GRAD_INF | GRAD_NAN: "inf and NaN"}


@dataclass(frozen=True)
class OverflowEntry:
    """One param whose gradient held inf and/or NaN."""

    name: str | None  # from named_parameters(), else None
    group: int  # param group
    index: int  # position in its group's params
    kind: str  # "inf", "NaN" or "inf and NaN"
    optimizer: int | None = None  # which optimizer (in the order stepped), when one scaler stepped several

    @property
    def label(self) -> str:
        where = self.name if self.name is not None else f"param_groups[{self.group}]['params'][{self.index}]"
        return f"{where}.grad" if self.optimizer is None else f"optimizer {self.optimizer}: {where}.grad"


@dataclass(frozen=True)
class OverflowReport:
    """The last skipped step and why. ``step`` is None when no step was skipped.

    ``cause``: ``"none"`` (nothing skipped), ``"overflow"`` (``entries`` name this
    process's culprits), ``"found_inf_in"`` (the flag came from the caller, e.g.
    torch.amp.GradScaler's own check), ``"other_rank"`` (this rank's gradients were
    finite: another rank overflowed and the flag was MAX-reduced), ``"elsewhere"``
    (this process's gradients were finite and the flag came from another source, e.g.
    another optimizer of the same scaler), ``"not_checked"`` (skipped, and this process
    did not scan the gradients).
    """

    step: int | None
    cause: str
    entries: tuple[OverflowEntry, ...] = ()
    counted_as: str = "step"  # what `step` counts: the scaler's update() calls or the optimizer's step() calls

    def __bool__(self) -> bool:
        return self.step is not None

    @property
    def summary(self) -> str:
        """What was found, without the step: e.g. "inf in blocks.3.ff.net.2.weight.grad (+2 more)"."""
        if self.cause == "none":
            return "no step was skipped: no gradient overflowed"
        if self.cause == "overflow":
            first = self.entries[0]
            more = f" (+{len(self.entries) - 1} more)" if len(self.entries) > 1 else ""
            return f"{first.kind} in {first.label}{more}"
        if self.cause == "found_inf_in":
            return ("the found_inf flag passed in (e.g. by torch.amp.GradScaler) was set; "
                    "this process's own check found no inf/NaN")
        if self.cause == "other_rank":
            return "because another rank overflowed (this rank's gradients were all finite)"
        if self.cause == "elsewhere":
            return "the overflow flag came from elsewhere; this process's gradients were all finite"
        return "the gradients were not checked here (the skip flag came from the caller)"

    def format(self, step_label: str | None = None) -> str:
        """One line, the skipped step named by `step_label` (e.g. the training loop's own
        "step 812"; default: this report's count): "step 812 skipped: inf in ..."."""
        if self.step is None:
            return self.summary
        label = step_label if step_label is not None else f"{self.counted_as} {self.step}"
        return f"{label} skipped{' ' if self.cause == 'other_rank' else ': '}{self.summary}"

    def __str__(self) -> str:
        return self.format()

    def details(self) -> str:
        """Every culprit, one line each."""
        return "\n".join([str(self)] + [f"  {e.kind:<11} {e.label}" for e in self.entries])


def param_labels(param_groups) -> list[tuple[str | None, int, int]]:
    """(name or None, group, index) of every param, in the flat order of the flags."""
    out = []
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        for i in range(len(group["params"])):
            out.append((names[i] if names is not None and i < len(names) else None, gi, i))
    return out


def flags_buffer(num_params: int, device: torch.device) -> torch.Tensor:
    """A flags buffer for the grad check: one int32 per param, then the summary."""
    return torch.zeros(num_params + 1, dtype=torch.int32, device=device)


class SkipMemory:
    """The flags of the last skipped step, kept on the device (updated without a sync),
    and the count (1-based) of that step."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # int64, this memory's steps so far
        self.last_step: torch.Tensor | None = None  # int64, count at the last skip (0: none)
        self.flags: torch.Tensor | None = None  # int32, the flags of that step

    def _fit(self, flags: torch.Tensor) -> None:
        if self.count is None or self.count.device != flags.device:
            self.count = torch.zeros((), dtype=torch.int64, device=flags.device)
            self.last_step = torch.zeros((), dtype=torch.int64, device=flags.device)
            self.flags = torch.zeros_like(flags)
        elif self.flags.numel() != flags.numel():  # params were added: the old flat indices stay valid
            resized = torch.zeros_like(flags)
            keep = min(resized.numel(), self.flags.numel()) - 1
            resized[:keep].copy_(self.flags[:keep])
            resized[-1:].copy_(self.flags[-1:])
            self.flags = resized

    def tick(self, device: torch.device) -> torch.Tensor:
        """Counts a step (no sync); returns the count."""
        if self.count is None or self.count.device != device:
            self._fit(flags_buffer(0, device))
        self.count += 1
        return self.count

    def record(self, skipped: torch.Tensor, flags: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """After tick(): keeps `flags` (this step's) and `count` (default: this memory's own)
        when `skipped` (a device flag, nonzero: skipped)."""
        self._fit(flags)
        hit = skipped.reshape(()) != 0
        torch.where(hit, flags, self.flags, out=self.flags)
        torch.where(hit, self.count if count is None else count, self.last_step, out=self.last_step)

    def packed(self, device: torch.device) -> torch.Tensor:
        """[last skipped step (0: none), flags...] as int64 on `device`, to read with others at once."""
        if self.count is None:
            return torch.zeros(1, dtype=torch.int64, device=device)
        return torch.cat([self.last_step.reshape(1), self.flags.to(torch.int64)]).to(device, non_blocking=True)

    def read(self) -> tuple[int, list[int]]:
        """(last skipped step or 0, its flags): the one host read."""
        values = self.packed(self.count.device if self.count is not None else torch.device("cpu")).tolist()
        return values[0], values[1:]


def build_report(step: int, parts: list[tuple[list[int], list[tuple[str | None, int, int]]]],
                 counted_as: str) -> OverflowReport:
    """The report of a skipped `step` (0: none) from the flags (per param, then the
    summary) and labels of each optimizer that took part in it."""
    if step == 0:
        return OverflowReport(None, "none", counted_as=counted_as)
    summary = 0
    entries = []
    for k, (flags, labels) in enumerate(parts):
        summary |= flags[-1] if flags else 0
        entries += [OverflowEntry(name, gi, i, _KINDS[bits & (GRAD_INF | GRAD_NAN)], k if len(parts) > 1 else None)
                    for (name, gi, i), bits in zip(labels, flags[:-1]) if bits & (GRAD_INF | GRAD_NAN)]
    entries = tuple(entries)
    if entries:
        cause = "overflow"
    elif summary & GRAD_FOUND_INF_IN:
        cause = "found_inf_in"
    elif summary & GRAD_SCANNED:
        cause = "other_rank" if _dist_world() else "elsewhere"
    else:
        cause = "not_checked"
    return OverflowReport(step, cause, entries, counted_as)


__all__ = ["OverflowEntry", "OverflowReport"]
