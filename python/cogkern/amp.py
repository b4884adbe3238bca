"""Dynamic loss scaling whose state lives on the device.

``DynamicLossScaler`` has torch.amp.GradScaler's public methods (``scale``,
``unscale_``, ``step``, ``update``, ``get_scale``, ``state_dict``,
``load_state_dict``, ``is_enabled``) with Megatron-LM's hysteresis semantics:

* overflow: the growth tracker resets and the hysteresis tracker drops by one;
  whenever it is <= 0 the scale backs off (never below ``min_scale``), so after
  the first backoff every further overflow backs off until a growth resets it;
* ``growth_interval`` clean steps in a row: the scale grows (never above
  ``max_scale``) and the hysteresis tracker is reset.

``scale``, ``step`` and ``update`` never synchronize with the host when the
optimizer is a :class:`cogkern.optim.FusedAdamW` (or a torch optimizer that
takes ``grad_scale``/``found_inf``, such as ``AdamW(fused=True)``): the
overflow check, the skip and the scale update all happen on the device. Other
optimizers need one host read per step to decide whether to step, as with
torch's GradScaler. ``unscale_`` also works on float16 gradients.

``overflow_report()`` says which params' gradients held inf / NaN in the last
skipped iteration (the check's per-param flags are kept on the device; the
report reads them with one sync).
"""
from __future__ import annotations

import enum
import functools
import math
import weakref
from typing import Any

import torch

from . import _extension  # noqa: F401  (loads the ops)
from ._distributed import reduce_found_inf_
from ._overflow import OverflowReport, SkipMemory, build_report, flags_buffer, param_labels

_ops = torch.ops.cogkern


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value < 2**31:
        raise ValueError(f"{name} must be a positive int32, got {value}")
    return value


class DynamicLossScaler:
    """Loss scaler with device-resident state and hysteresis.

    Args:
        init_scale: the first scale.
        growth_factor: scale multiplier after ``growth_interval`` clean steps (>= 1).
        backoff_factor: scale multiplier on a backoff, in (0, 1].
        growth_interval: clean steps in a row before growing.
        hysteresis: overflows tolerated before the first backoff (1 = torch's GradScaler).
        min_scale, max_scale: bounds of the scale.
        enabled: False makes every method a pass-through, like GradScaler(enabled=False).
        process_group: overflow flags found by ``unscale_`` are MAX-reduced over it
            under torch.distributed (default: the world).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        enabled: bool = True,
        process_group=None,
    ) -> None:
        init_scale = _number("init_scale", init_scale)
        growth_factor = _number("growth_factor", growth_factor)
        backoff_factor = _number("backoff_factor", backoff_factor)
        min_scale = _number("min_scale", min_scale)
        max_scale = _number("max_scale", max_scale)
        if growth_factor < 1.0:
            raise ValueError(f"growth_factor must be >= 1, got {growth_factor}")
        if not 0.0 < backoff_factor <= 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1], got {backoff_factor}")
        if min_scale <= 0.0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if max_scale < min_scale or max_scale > torch.finfo(torch.float32).max:
            raise ValueError(f"max_scale must be in [min_scale={min_scale}, float32 max], got {max_scale}")
        if not min_scale <= init_scale <= max_scale:
            raise ValueError(f"init_scale must be in [min_scale, max_scale] = [{min_scale}, {max_scale}], got {init_scale}")
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self._init_scale = init_scale
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = _positive_int("growth_interval", growth_interval)
        self._hysteresis = _positive_int("hysteresis", hysteresis)
        self._min_scale = min_scale
        self._max_scale = max_scale
        self._enabled = enabled
        self.process_group = process_group
        # Device state, created on the first scale() (or load_state_dict) on the outputs' device.
        self._scale: torch.Tensor | None = None
        self._growth_tracker: torch.Tensor | None = None
        self._hysteresis_tracker: torch.Tensor | None = None
        self._found_inf: torch.Tensor | None = None
        self._pending: dict[str, Any] | None = None  # a loaded state waiting for a device
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        # The last skipped iteration (counted in update() calls), and per optimizer the
        # per-param inf/NaN flags it had then: on the device, read by overflow_report().
        self._iterations = SkipMemory()
        self._optimizer_skips: dict[int, tuple[weakref.ref, SkipMemory]] = {}

    # ------------------------------------------------------------------ state
    def _lazy_init(self, device: torch.device) -> None:
        pending = self._pending or {}
        self._scale = torch.full((), pending.get("scale", self._init_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.full(
            (), pending.get("_growth_tracker", 0), dtype=torch.int32, device=device
        )
        self._hysteresis_tracker = torch.full(
            (), pending.get("_hysteresis_tracker", self._hysteresis), dtype=torch.int32, device=device
        )
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._pending = None

    def _opt_state(self, optimizer) -> dict[str, Any]:
        st = self._per_optimizer.get(id(optimizer))
        if st is None:
            st = {"stage": _Stage.READY, "found_inf": None, "flags": None, "optimizer": weakref.ref(optimizer)}
            self._per_optimizer[id(optimizer)] = st
        return st

    def _require_scale(self, what: str) -> torch.Tensor:
        if self._scale is None:
            raise RuntimeError(
                f"{what}: the scale is not initialized; call scaler.scale(loss) earlier in the iteration"
            )
        return self._scale

    @property
    def device(self) -> torch.device | None:
        return None if self._scale is None else self._scale.device

    @property
    def scale_tensor(self) -> torch.Tensor | None:
        """The current scale as a 0-dim float32 device tensor (no sync)."""
        return self._scale

    @property
    def found_inf(self) -> torch.Tensor | None:
        """1.0 on the device when the last update() saw an overflow (the step was skipped); no sync."""
        return self._found_inf

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last update()'s iteration was skipped. Reads the device flag: synchronizes."""
        return bool(self._found_inf is not None and self._found_inf.item() != 0.0)

    # ---------------------------------------------------------------- GradScaler API
    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale as a Python float (reads the device: synchronizes)."""
        if not self._enabled:
            return 1.0
        if self._scale is None:
            return float((self._pending or {}).get("scale", self._init_scale))
        return float(self._scale.item())

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def get_hysteresis(self) -> int:
        return self._hysteresis

    def scale(self, outputs):
        """Multiplies a tensor (or a nest of lists/tuples/dicts of tensors) by the scale, on the device."""
        if not self._enabled:
            return outputs
        if torch.is_tensor(outputs):
            if self._scale is None:
                self._lazy_init(outputs.device)
            scale = self._scale
            if scale.device != outputs.device:
                scale = scale.to(outputs.device, non_blocking=True)
            return outputs * scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if isinstance(outputs, dict):
            return {k: self.scale(v) for k, v in outputs.items()}
        raise TypeError(f"outputs must be a tensor or a list/tuple/dict of tensors, got {type(outputs).__name__}")

    def unscale_(self, optimizer) -> None:
        """Divides the optimizer's gradients by the scale in place and records inf/NaN (float16 grads work)."""
        if not self._enabled:
            return
        st = self._opt_state(optimizer)
        if st["stage"] is _Stage.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if st["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        st["found_inf"], st["flags"] = self._check(optimizer, unscale=True)
        st["stage"] = _Stage.UNSCALED

    def _grads_by_device(self, optimizer) -> tuple[dict[torch.device, tuple[list, list]], int]:
        """Per device (grads, their flat param indices), and the number of params."""
        by_device: dict[torch.device, tuple[list, list]] = {}
        flat = 0
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                index, flat = flat, flat + 1
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise ValueError(f"param_groups[{gi}] has a param with a sparse gradient; not supported")
                grads, indices = by_device.setdefault(g.device, ([], []))
                grads.append(g)
                indices.append(index)
        return by_device, flat

    def _check(self, optimizer, unscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Scans the optimizer's grads (optionally unscaling them); returns a (1,) float32 found_inf
        flag and the per-param inf/NaN flags (cogkern._overflow), on the scale's device."""
        scale = self._require_scale("unscale_" if unscale else "step")
        found_flags, param_flags = [], []
        by_device, num_params = self._grads_by_device(optimizer)
        for device, (grads, indices) in by_device.items():
            out = torch.empty(4, dtype=torch.float32, device=device)
            flags = flags_buffer(num_params, device)
            s = scale if scale.device == device else scale.to(device, non_blocking=True)
            _ops.amp_grad_check_(grads, s, None, 0.0, True, unscale, out, flags, indices)
            found_flags.append(out[0:1].to(scale.device, non_blocking=True))
            param_flags.append(flags.to(scale.device, non_blocking=True))
        if not found_flags:
            found = torch.zeros(1, dtype=torch.float32, device=scale.device)
            param_flags = [flags_buffer(num_params, scale.device)]
        elif len(found_flags) == 1:
            found = found_flags[0]
        else:
            found = torch.stack(found_flags).amax(0)
        reduce_found_inf_(found, self.process_group)
        return found, functools.reduce(torch.bitwise_or, param_flags)

    def step(self, optimizer, *args, **kwargs):
        """Steps the optimizer unless its gradients overflowed.

        The scaler knows no optimizer class, only this protocol:

        * ``_step_supports_amp_scaling`` (torch's, e.g. fused AdamW/Adam/SGD): the
          optimizer gets ``grad_scale``/``found_inf`` as attributes, as torch's
          GradScaler gives them, and skips on the device when found_inf is set.
        * ``step_checks_overflow`` as well (:class:`cogkern.optim.FusedAdamW`): before
          any ``unscale_``, it gets only ``step(grad_scale=...)``, finds inf/NaN in its
          own pass over the gradients, and its public ``skipped_flag`` (a device
          tensor, nonzero when the step was skipped) is the overflow flag.

        Any other optimizer is unscaled in place and stepped only if no overflow
        was found, which reads the flag on the host (one synchronization, as
        torch's GradScaler does).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not supported when the loss scaler is enabled.")
        st = self._opt_state(optimizer)
        if st["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        amp_aware = getattr(optimizer, "_step_supports_amp_scaling", False)
        if amp_aware and getattr(optimizer, "step_checks_overflow", False) and st["stage"] is _Stage.READY:
            scale = self._require_scale("step")
            retval = optimizer.step(*args, grad_scale=scale, **kwargs)
            st["found_inf"] = optimizer.skipped_flag.reshape(1)
            st["flags"] = getattr(optimizer, "grad_flags", None)  # its own check's per-param flags
        elif amp_aware:
            scale = self._require_scale("step")
            if st["stage"] is _Stage.READY:
                st["found_inf"], st["flags"] = self._check(optimizer, unscale=False)
                optimizer.grad_scale = scale.reshape(1)
            else:
                optimizer.grad_scale = None
            optimizer.found_inf = st["found_inf"]
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
        else:
            if st["stage"] is _Stage.READY:
                self.unscale_(optimizer)
            retval = None
            if st["found_inf"].item() == 0.0:  # the one host read this path needs
                retval = optimizer.step(*args, **kwargs)
        st["stage"] = _Stage.STEPPED
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Updates the scale on the device from this iteration's overflow flags (or sets ``new_scale``)."""
        if not self._enabled:
            return
        scale = self._require_scale("update")
        if new_scale is not None:
            if torch.is_tensor(new_scale):
                if new_scale.numel() != 1 or not new_scale.is_floating_point():
                    raise ValueError("new_scale must be a float or a 1-element floating-point tensor")
                scale.copy_(new_scale.reshape(()))
            else:
                scale.fill_(_number("new_scale", new_scale))
        else:
            flags = [st["found_inf"] for st in self._per_optimizer.values() if st["found_inf"] is not None]
            if not flags:
                raise RuntimeError("No inf checks were recorded prior to update(); call scaler.step(optimizer) first.")
            found = flags[0] if len(flags) == 1 else torch.stack([f.reshape(1) for f in flags]).amax(0)
            self._found_inf.copy_(found.reshape(()))
            self._remember_skip()
            _ops.loss_scale_update_(
                scale,
                self._growth_tracker,
                self._hysteresis_tracker,
                self._found_inf,
                self._growth_factor,
                self._backoff_factor,
                self._growth_interval,
                self._hysteresis,
                self._min_scale,
                self._max_scale,
            )
        self._per_optimizer.clear()

    def _remember_skip(self) -> None:
        """Keeps this iteration's per-param flags on the device if it was skipped (no sync)."""
        count = self._iterations.tick(self._found_inf.device)
        self._iterations.record(self._found_inf, flags_buffer(0, self._found_inf.device))
        for key, st in self._per_optimizer.items():
            if st["flags"] is None:
                continue
            ref, memory = self._optimizer_skips.get(key, (None, None))
            if ref is None or ref() is not st["optimizer"]():  # new, or an id reused by another optimizer
                memory = SkipMemory()
                self._optimizer_skips[key] = (st["optimizer"], memory)
            memory.record(self._found_inf, st["flags"], count)

    def overflow_report(self) -> OverflowReport:
        """The last skipped iteration (counted in update() calls, from 1) and the params whose
        gradients held inf / NaN in it, by name when the optimizer was built from
        named_parameters(), else by group and index; or why none is named (another rank
        overflowed, the flag came from elsewhere). One sync, however many optimizers."""
        if self._iterations.count is None:
            return OverflowReport(None, "none", counted_as="iteration")
        device = self._iterations.count.device
        live = [(ref(), memory) for ref, memory in self._optimizer_skips.values() if ref() is not None]
        packed = [self._iterations.packed(device)] + [memory.packed(device) for _, memory in live]
        values = torch.cat(packed).tolist()  # the one host read
        step, offset, parts = values[0], len(packed[0]), []
        for (optimizer, _), chunk in zip(live, packed[1:]):
            record = values[offset: offset + len(chunk)]
            offset += len(chunk)
            if step and record[0] == step:  # this optimizer took part in that iteration
                parts.append((record[1:], param_labels(optimizer.param_groups)))
        return build_report(step, parts, "iteration")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.amp.GradScaler's keys plus the hysteresis state and bounds (reads the device)."""
        if not self._enabled:
            return {}
        if self._scale is None:
            pending = self._pending or {}
            scale = float(pending.get("scale", self._init_scale))
            growth = int(pending.get("_growth_tracker", 0))
            hyst = int(pending.get("_hysteresis_tracker", self._hysteresis))
        else:
            scale = float(self._scale.item())
            growth = int(self._growth_tracker.item())
            hyst = int(self._hysteresis_tracker.item())
        return {
            "scale": scale,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": growth,
            "hysteresis": self._hysteresis,
            "_hysteresis_tracker": hyst,
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads our state_dict or a torch.amp.GradScaler one (which has no hysteresis: it is reset)."""
        if not self._enabled:
            return
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved from a disabled scaler.")
        if "scale" not in state_dict:
            raise ValueError("state_dict has no 'scale'")
        self._growth_factor = _number("growth_factor", state_dict.get("growth_factor", self._growth_factor))
        self._backoff_factor = _number("backoff_factor", state_dict.get("backoff_factor", self._backoff_factor))
        self._growth_interval = _positive_int("growth_interval", state_dict.get("growth_interval", self._growth_interval))
        self._hysteresis = _positive_int("hysteresis", state_dict.get("hysteresis", self._hysteresis))
        self._min_scale = _number("min_scale", state_dict.get("min_scale", self._min_scale))
        self._max_scale = _number("max_scale", state_dict.get("max_scale", self._max_scale))
        values = {
            "scale": _number("scale", state_dict["scale"]),
            "_growth_tracker": int(state_dict.get("_growth_tracker", 0)),
            "_hysteresis_tracker": int(state_dict.get("_hysteresis_tracker", self._hysteresis)),
        }
        if self._scale is None:
            self._pending = values
            return
        # In place, so CUDA graphs that captured these tensors keep working.
        self._scale.fill_(values["scale"])
        self._growth_tracker.fill_(values["_growth_tracker"])
        self._hysteresis_tracker.fill_(values["_hysteresis_tracker"])
        self._per_optimizer.clear()

    def __repr__(self) -> str:
        return (
            f"DynamicLossScaler(init_scale={self._init_scale}, growth_factor={self._growth_factor}, "
            f"backoff_factor={self._backoff_factor}, growth_interval={self._growth_interval}, "
            f"hysteresis={self._hysteresis}, min_scale={self._min_scale}, max_scale={self._max_scale}, "
            f"enabled={self._enabled})"
        )


__all__ = ["DynamicLossScaler", "reduce_found_inf_"]
