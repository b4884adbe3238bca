"""Fused multi-tensor AdamW with mixed precision and on-device loss scaling.

``FusedAdamW`` computes exactly what ``torch.optim.AdamW`` computes (decoupled
weight decay, bias correction, fp32 math) with one kernel launch per dtype
group over all tensors. The precision follows each param's dtype:

=================  ===========================================  ==============
params             kept per param                               bytes / param
=================  ===========================================  ==============
float32            fp32 param, grad, exp_avg, exp_avg_sq        16
float16/bfloat16   16-bit param, grad + fp32 master, m, v       16
bfloat16 + SR      bf16 param, grad + fp32 m, v; stochastic      12
                   rounding of the update (no master)
=================  ===========================================  ==============

With a loss scaler (``scaler.step(opt)``: :class:`cogkern.amp.DynamicLossScaler`,
or ``torch.amp.GradScaler``, which passes ``grad_scale``/``found_inf`` as to
torch's fused optimizers), one read-only pass over the gradients finds inf/NaN
and, when ``max_grad_norm`` is set, the global gradient norm; the update kernel
then unscales and clips inside (gradients are never written back) and, on
overflow, leaves params, master weights, moments and step counts bit-for-bit
unchanged. The decision is made on the device: a step never synchronizes with
the host, so it can be captured into a CUDA graph (``capturable=True``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch

from . import _extension, _guard  # noqa: F401  (_extension loads the ops)
from ._distributed import reduce_found_inf_

_ops = torch.ops.cogkern
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN, _MASTER, _SR = "plain", "master", "stochastic_rounding"


def _check_lr(lr: Any, where: str) -> None:
    if torch.is_tensor(lr):
        if lr.numel() != 1 or lr.dtype != torch.float32:
            raise ValueError(f"{where}: a tensor lr must be a 1-element float32 tensor, got {lr.dtype} {tuple(lr.shape)}")
        if lr.device.type == "cpu" and lr.item() < 0:
            raise ValueError(f"{where}: invalid learning rate {lr.item()}")
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{where}: lr must be a float or a tensor, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"{where}: invalid learning rate {lr}")


def _check_hyper(group: dict, where: str) -> None:
    _check_lr(group["lr"], where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"{where}: betas[{i}] must be a float, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}: invalid beta parameter at index {i}: {b} (must be in [0, 1))")
    for name in ("eps", "weight_decay"):
        v = group[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where}: {name} must be a float, got {type(v).__name__}")
        if not math.isfinite(v) or v < 0.0:
            raise ValueError(f"{where}: invalid {name} value {v} (must be >= 0)")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (as ``torch.optim.AdamW``) fused over all tensors, with mixed precision.

    Args:
        params: params or param groups (dicts with per-group ``lr``, ``betas``,
            ``eps``, ``weight_decay``). All params must be on one device.
        lr: float, or a 1-element float32 tensor on the params' device (read by
            the kernel at every step: changing it needs no recapture).
        betas, eps, weight_decay: as ``torch.optim.AdamW``.
        master_weights: keep fp32 master weights for float16/bfloat16 params
            (default True for them; ignored for float32 params). False updates
            16-bit params directly (round to nearest).
        stochastic_rounding: bfloat16 params without master weights, updated in
            fp32 and stochastically rounded back (unbiased; seeded by ``seed``).
        max_grad_norm: clip the global norm of the (unscaled) gradients to this,
            like ``torch.nn.utils.clip_grad_norm_``, inside the update. A step
            whose gradients contain inf/NaN is then skipped. The norm is over
            this process's gradients (identical on every rank under DDP;
            sharded gradients would need a sum across ranks, not done here).
        capturable: allow the step inside CUDA graph capture. (Steps never
            synchronize; this only enables the capture-time checks.)
        seed: stochastic-rounding seed (default: ``torch.initial_seed()``).
        process_group: overflow flags are MAX-reduced over it under
            torch.distributed (default: the world).

    After a step, ``skipped_flag`` (device tensor, 1.0 if the step was skipped)
    and ``grad_norm`` (device tensor) are available without synchronizing;
    ``last_step_skipped`` reads the flag on the host. Per-param step counts
    (``state[p]['step']``) only advance on steps that were taken.
    """

    # The loss-scaler protocol (this module knows no scaler; see cogkern.amp):
    # torch.amp.GradScaler and DynamicLossScaler hand step() grad_scale / found_inf ...
    _step_supports_amp_scaling = True
    # ... and, since step(grad_scale=s) without found_inf finds inf/NaN itself (in the pass it
    # makes anyway) and leaves the verdict in skipped_flag, a scaler need not scan first.
    step_checks_overflow = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_weights: bool | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
        capturable: bool = False,
        seed: int | None = None,
        process_group=None,
    ) -> None:
        if master_weights is not None and not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be None or a bool, got {type(master_weights).__name__}")
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}")
        if stochastic_rounding and master_weights:
            raise ValueError("stochastic_rounding replaces master weights; do not combine it with master_weights=True")
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
                raise TypeError(f"max_grad_norm must be None or a float, got {type(max_grad_norm).__name__}")
            if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")
        if seed is None:
            # Reproducible under torch.manual_seed without consuming the global generator.
            seed = torch.initial_seed() % 2**63
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.capturable = capturable
        self.seed = seed
        self.process_group = process_group
        self._device: torch.device | None = None
        self._param_dtypes: dict[int, torch.dtype] = {}
        self._scalars: torch.Tensor | None = None
        self._checked_dtypes: set[torch.dtype] = set()  # precision modes past their first-use check
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_hyper(defaults, "FusedAdamW")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        where = f"param_groups[{len(self.param_groups)}]"
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyper(group, where)
            devices = {p.device for p in group["params"]}
            if len(devices) > 1:
                raise ValueError(f"{where}: params are on several devices {sorted(map(str, devices))}; "
                                 "a param group must be on one device")
            for p in group["params"]:
                if p.dtype not in _DTYPES:
                    raise ValueError(f"{where}: params must be float32, float16 or bfloat16, got {p.dtype}")
                if self.stochastic_rounding and p.dtype != torch.bfloat16:
                    raise ValueError(f"{where}: stochastic_rounding needs bfloat16 params, got a {p.dtype} param")
                if p.device.type not in ("cpu", "cuda"):
                    raise ValueError(f"{where}: params must be on the CPU or a CUDA device, got {p.device}")
            if devices:
                (device,) = devices
                if self._device is None:
                    self._device = device
                elif device != self._device:
                    raise ValueError(f"{where}: params are on {device} but earlier groups are on {self._device}; "
                                     "all params of a FusedAdamW must be on one device")
            lr = group["lr"]
            if torch.is_tensor(lr) and devices and lr.device != self._device:
                raise ValueError(f"{where}: the lr tensor is on {lr.device} but the params are on {self._device}")
        except Exception:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            self._param_dtypes[id(p)] = p.dtype

    def _check_kwargs(self, dtype: torch.dtype) -> dict:
        """The FusedAdamW arguments of dtype's precision mode, for its first-use check."""
        mode = self._mode(dtype)
        if mode == _SR:
            return {"stochastic_rounding": True}
        return {} if dtype == torch.float32 else {"master_weights": mode == _MASTER}

    def _mode(self, dtype: torch.dtype) -> str:
        if dtype == torch.float32:
            return _PLAIN
        if self.stochastic_rounding:
            return _SR
        return _PLAIN if self.master_weights is False else _MASTER

    # ------------------------------------------------------------------ flags
    @property
    def skipped_flag(self) -> torch.Tensor:
        """0-dim float32 device tensor: 1.0 if the last step was skipped (inf/NaN gradients). No sync."""
        return self._step_scalars()[0]

    @property
    def grad_norm(self) -> torch.Tensor:
        """0-dim float32 device tensor: the global norm of the last step's unscaled gradients
        (computed when ``max_grad_norm`` is set or a loss scaler checked the gradients)."""
        return self._step_scalars()[3]

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped. Reads the device flag: synchronizes."""
        return self._scalars is not None and bool(self._scalars[0].item() != 0.0)

    def _step_scalars(self) -> torch.Tensor:
        if self._scalars is None:
            device = self._device if self._device is not None else torch.device("cpu")
            self._scalars = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float32, device=device)
        return self._scalars

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, mode: str) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        if mode == _MASTER and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        return state

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ):
        """One AdamW step over every param with a gradient.

        Args:
            closure: re-evaluates the model and returns the loss.
            grad_scale: the loss scale the gradients carry (they are divided by it
                inside the update); torch.amp.GradScaler also sets it as an attribute.
            found_inf: a 1-element flag; nonzero skips the step on the device. With
                ``grad_scale`` but no ``found_inf``, the step finds inf/NaN in the
                gradients itself (and ``skipped_flag`` tells the verdict).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        entries = []  # (flat index, group index, param, grad)
        flat = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                index, flat = flat, flat + 1
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise ValueError(f"param_groups[{gi}]: FusedAdamW does not support sparse gradients")
                expected = self._param_dtypes.get(id(p))
                if p.dtype != expected:
                    raise ValueError(f"param_groups[{gi}]: a param's dtype changed from {expected} to {p.dtype} "
                                     "after the optimizer was built; build a new optimizer")
                if g.dtype != p.dtype:
                    raise ValueError(f"param_groups[{gi}]: a {p.dtype} param has a {g.dtype} gradient; "
                                     "they must match")
                entries.append((index, gi, p, g))
        device = self._device
        if device is None:  # no params at all
            return loss
        scalars = self._step_scalars()
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            if not self.capturable:
                raise RuntimeError("FusedAdamW.step() is being captured into a CUDA graph; build it with capturable=True")
            if any("step" not in self.state[p] for _, _, p, _ in entries):
                raise RuntimeError("FusedAdamW: run one step before capturing it, so the optimizer state exists")

        # First use of each precision mode's kernels in the process: checked (cogkern._guard),
        # before anything is launched; a failed check raises here.
        for dtype in {p.dtype for _, _, p, _ in entries} - self._checked_dtypes:
            _guard.route("optimizer", (dtype, tuple(sorted(self._check_kwargs(dtype).items()))), device)
            self._checked_dtypes.add(dtype)

        # Where the scale and the overflow flag come from.
        scale = None
        found_in = None
        scale, found_in = grad_scale, found_inf
        # Scaled gradients with no verdict on them: find inf/NaN here (step_checks_overflow).
        scan = self.max_grad_norm is not None or (scale is not None and found_in is None)
        scale = self._as_device_scalar(scale, "grad_scale")
        found_in = self._as_device_scalar(found_in, "found_inf")

        grads = [g for _, _, _, g in entries]
        # Always rewrites the step scalars, so skipped_flag describes this step
        # even when there is nothing to update.
        _ops.amp_grad_check_(grads, scale, found_in, self.max_grad_norm or 0.0, scan and bool(entries), False, scalars)
        if scan or found_in is not None:
            reduce_found_inf_(scalars[0:1], self.process_group)
        if entries:
            self._apply(entries, scalars)
        return loss

    def _as_device_scalar(self, t: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if t is None:
            return None
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.numel() != 1:
            raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
        if t.dtype != torch.float32 or t.device != self._device:
            t = t.to(device=self._device, dtype=torch.float32, non_blocking=True)
        return t.reshape(1) if t.is_contiguous() else t.contiguous().reshape(1)

    def _apply(self, entries, scalars: torch.Tensor) -> None:
        groups = self.param_groups
        lrs, lr_tensors = [], []
        for group in groups:
            lr = group["lr"]
            if torch.is_tensor(lr):  # dtype, size, device (and a CPU value < 0): checked by the op
                lrs.append(0.0)
                lr_tensors.append(lr.reshape(()) if lr.dim() and lr.numel() == 1 else lr)
            else:
                lrs.append(float(lr))
                lr_tensors.append(None)
        beta1s = [float(g["betas"][0]) for g in groups]
        beta2s = [float(g["betas"][1]) for g in groups]
        epss = [float(g["eps"]) for g in groups]
        wds = [float(g["weight_decay"]) for g in groups]

        # One op call (one launch series) per (dtype, precision mode).
        buckets: dict[tuple[torch.dtype, str], list] = defaultdict(list)
        for e in entries:
            buckets[(e[2].dtype, self._mode(e[2].dtype))].append(e)
        for (dtype, mode), items in buckets.items():
            params, grads, ms, vs, masters, steps, gids, ids = [], [], [], [], [], [], [], []
            for index, gi, p, g in items:
                state = self._init_state(p, mode)
                params.append(p)
                grads.append(g)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                if mode == _MASTER:
                    masters.append(state["master_param"])
                gids.append(gi)
                ids.append(index)
            _ops.fused_adamw_(
                params, grads, ms, vs, masters, steps, gids, ids, lrs, lr_tensors,
                beta1s, beta2s, epss, wds, scalars, self.seed, mode == _SR,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict (state holds step, exp_avg, exp_avg_sq and, with
        master weights, master_param) plus this optimizer's settings under 'cogkern'."""
        sd = super().state_dict()
        sd["cogkern"] = {
            "seed": self.seed,
            "master_weights": self.master_weights,
            "stochastic_rounding": self.stochastic_rounding,
            "max_grad_norm": self.max_grad_norm,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class (or of torch.optim.AdamW: moments and steps).

        State tensors are copied into existing ones where they exist (so a
        captured CUDA graph stays valid), keeping fp32 for moments and masters.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be an optimizer state_dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} param groups, the optimizer has "
                             f"{len(self.param_groups)}")
        id_map = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"param_groups[{gi}] has {len(group['params'])} params but the loaded group "
                                 f"has {len(saved['params'])}")
            id_map.update(zip(saved["params"], group["params"]))
        extra = state_dict.get("cogkern")
        if extra is not None:
            self.seed = int(extra.get("seed", self.seed))

        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key, value in saved.items():
                if key == "params":
                    continue
                if key == "lr" and torch.is_tensor(group["lr"]):
                    group["lr"].copy_(value if torch.is_tensor(value) else torch.tensor(value))
                elif key == "lr" and torch.is_tensor(value):
                    group["lr"] = value.detach().to(device=self._device, dtype=torch.float32).clone()
                else:
                    group[key] = value
            _check_hyper(group, f"param_groups[{gi}]")

        for key, saved_state in state_dict["state"].items():
            p = id_map.get(key)
            if p is None:
                continue
            state = self.state[p]
            for name, value in saved_state.items():
                if not torch.is_tensor(value):
                    state[name] = value
                    continue
                if name == "step":
                    value = value.detach().reshape(())
                elif name in ("exp_avg", "exp_avg_sq", "master_param"):
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"state '{name}' has shape {tuple(value.shape)} but its param has "
                                         f"shape {tuple(p.shape)}")
                current = state.get(name)
                if (current is not None and torch.is_tensor(current) and current.shape == value.shape
                        and current.dtype == torch.float32):
                    current.copy_(value)
                elif name in ("step", "exp_avg", "exp_avg_sq", "master_param"):
                    like = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format) \
                        if name != "step" else torch.empty((), dtype=torch.float32, device=p.device)
                    like.copy_(value)
                    state[name] = like
                else:
                    state[name] = value.detach().to(p.device).clone()


# Fake (meta) kernels, so torch.compile can trace code that calls the ops.
@torch.library.register_fake("cogkern::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, masters, steps, tensor_groups, tensor_ids, lrs,
                      lr_tensors, beta1s, beta2s, epss, weight_decays, step_scalars, seed, stochastic_rounding):
    return None


@torch.library.register_fake("cogkern::amp_grad_check_")
def _amp_grad_check_fake(grads, scale, found_inf, max_norm, scan, unscale_inplace, out):
    return None


@torch.library.register_fake("cogkern::loss_scale_update_")
def _loss_scale_update_fake(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor,
                            growth_interval, hysteresis, min_scale, max_scale):
    return None


__all__ = ["FusedAdamW"]
