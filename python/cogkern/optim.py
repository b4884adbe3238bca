"""Fused multi-tensor AdamW with mixed precision and on-device loss scaling.

``FusedAdamW`` computes exactly what ``torch.optim.AdamW`` computes (decoupled
weight decay, bias correction, fp32 math) with one kernel launch per dtype
group over all tensors. The precision follows each param's dtype:

==================  ===========================================  ==============
params              kept per param                               bytes / param
==================  ===========================================  ==============
float32             fp32 param, grad, exp_avg, exp_avg_sq        16
float16/bfloat16    16-bit param, grad + fp32 master, m, v       16
bfloat16 + SR       bf16 param, grad + fp32 m, v; stochastic      12
                    rounding of the update (no master)
bfloat16 +          bf16 param, grad + int16 remainder (param +   14
param_remainders    remainder == the fp32 master, bit for bit),
                    fp32 m, v
==================  ===========================================  ==============

``moments="bf16"`` keeps m and v in bf16 (stochastically rounded: counter-based
random bits seeded by ``seed``, a stream of their own, so CPU and CUDA agree bit
for bit): 4 bytes less per param than each row above (12, 12, 8, 10).
``moments="int8"`` keeps them as 8-bit codes, 256 per block with one fp32 scale
(the block's absmax) per block and moment, coded as small floats relative to it
and rounded stochastically in the update kernel: 1 + 1 + 8/256 bytes instead of
8, so 10.03, 10.03, 6.03 and 8.03. :func:`state_bytes_per_param` gives the optimizer-state part of
these numbers (params and grads excluded); ``opt.state_bytes()`` counts the
state actually allocated.

State keys (``opt.state[p]``, stored as they are by ``state_dict``): ``step``
(fp32 scalar); ``exp_avg`` / ``exp_avg_sq`` (fp32, bf16, or int8 / uint8 codes);
with int8 moments ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32, one per block
of 256 elements in memory order; blocks never straddle tensors); with master
weights ``master_param`` (fp32), or with param remainders ``master_remainder``
(int16, the param's shape: the fp32 master's low 16 bits). ``load_state_dict``
converts between storages (fp32 <-> bf16 <-> int8 moments, master <-> remainder;
see ``FusedAdamW._loaded_state``); the same storage loads exactly.

With a loss scaler (``scaler.step(opt)``: :class:`cogkern.amp.DynamicLossScaler`,
or ``torch.amp.GradScaler``, which passes ``grad_scale``/``found_inf`` as to
torch's fused optimizers), one read-only pass over the gradients finds inf/NaN
and, when ``max_grad_norm`` is set, the global gradient norm; the update kernel
then unscales and clips inside (gradients are never written back) and, on
overflow, leaves params, master weights, moments and step counts bit-for-bit
unchanged. The decision is made on the device: a step never synchronizes with
the host, so it can be captured into a CUDA graph (``capturable=True``).

Under FSDP2 (DTensor params) the update runs on the local shards, ``max_grad_norm``
clips by the norm over all shards and ranks, and the state checkpoints with
torch.distributed.checkpoint, also to another world size (see ``FusedAdamW``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch

from . import _extension, _guard  # noqa: F401  (_extension loads the ops)
from ._distributed import check_dtensor_grad, grad_check_, is_dtensor, like_param, local, local_state
from ._overflow import OverflowReport, SkipMemory, build_report, param_labels, step_record

_ops = torch.ops.cogkern
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN, _MASTER, _SR, _REMAINDER = "plain", "master", "stochastic_rounding", "remainder"
_MOMENTS = ("fp32", "bf16", "int8")
MOMENT_BLOCK = 256  # elements per int8 moment block (csrc/adamw/adamw_math.h: kMomentBlock)
# Storage of (exp_avg, exp_avg_sq) per moments mode.
_MOMENT_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
                  "int8": (torch.int8, torch.uint8)}
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "master_param", "master_remainder")
_STATE_BYTES_KEYS = ("masters", "remainders", "exp_avg", "exp_avg_sq", "scales", "total")


def _check_precision_args(moments: Any, master_weights: Any, stochastic_rounding: Any, param_remainders: Any) -> None:
    """The checks shared by FusedAdamW and state_bytes_per_param (on the arguments alone, no params)."""
    if master_weights is not None and not isinstance(master_weights, bool):
        raise TypeError(f"master_weights must be None or a bool, got {type(master_weights).__name__}")
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}")
    if not isinstance(param_remainders, bool):
        raise TypeError(f"param_remainders must be a bool, got {type(param_remainders).__name__}")
    if moments not in _MOMENTS:
        raise ValueError(f"moments must be one of {', '.join(map(repr, _MOMENTS))}, got {moments!r}")
    if stochastic_rounding and master_weights:
        raise ValueError("stochastic_rounding replaces master weights; do not combine it with master_weights=True")
    if param_remainders and master_weights is False:
        raise ValueError("param_remainders stand in for fp32 master weights; they need master weights, "
                         "not master_weights=False")
    if param_remainders and stochastic_rounding:
        raise ValueError("param_remainders keep an exact master; do not combine them with stochastic_rounding")


def _check_param_dtype(dtype: torch.dtype, moments: str, master_weights: bool | None, stochastic_rounding: bool,
                       param_remainders: bool, where: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"{where}: params must be float32, float16 or bfloat16, got {dtype}")
    if stochastic_rounding and dtype != torch.bfloat16:
        raise ValueError(f"{where}: stochastic_rounding needs bfloat16 params, got a {dtype} param")
    if param_remainders and dtype != torch.bfloat16:
        raise ValueError(f"{where}: param_remainders complete bfloat16 params to their fp32 master; "
                         f"got a {dtype} param")
    if moments != "fp32" and dtype != torch.float32 and master_weights is False and not stochastic_rounding:
        raise ValueError(f"{where}: moments={moments!r} needs float32 params, master weights, param_remainders or "
                         f"stochastic_rounding; got {dtype} params with master_weights=False")


# ---- int8 moment codes (csrc/adamw/adamw_math.h: encode_moment / decode_moment). Per block of
# MOMENT_BLOCK elements (in memory order) the scale is the block's absmax A; |x| / A is coded as a
# small float: code 0 is 0, code q >= 1 is 2^-R * (1 + (q - 1) / 8) across R binades (3 mantissa
# bits: at most 1/16 relative error when rounded to nearest), below 2^-R linear (0 or 2^-R).
# exp_avg: int8, sign and magnitude, R = 15; exp_avg_sq: uint8, R = 31 (v is >= 0 and spans twice
# the decades of m; a v > 0 never codes to 0, which would leave m / eps as the update).
_CODE_RANGE = {True: 15, False: 31}


def _memory_flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _dequantize_moment(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 moments of int8 (exp_avg) or uint8 (exp_avg_sq) codes, as the kernel decodes them."""
    signed = codes.dtype == torch.int8
    R = _CODE_RANGE[signed]
    flat = _memory_flat(codes).to(torch.int32)
    q = flat.abs()
    rel = (((127 - R) << 23) + ((q - 1).clamp(min=0) << 20)).view(torch.float32)
    rel = torch.where(q == 0, torch.zeros_like(rel), rel)
    value = rel * scales.repeat_interleave(MOMENT_BLOCK)[: flat.numel()]
    if signed:
        value = torch.where(flat < 0, -value, value)
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    _memory_flat(out).copy_(value)
    return out


def _element_scales(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each code's block scale, as a fp32 tensor of the codes' shape and layout."""
    out = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    _memory_flat(out).copy_(scales.repeat_interleave(MOMENT_BLOCK)[: codes.numel()])
    return out


def _from_element_scales(codes: torch.Tensor, element_scales: torch.Tensor):
    """(codes, block scales) when the per-element scales are constant over each of this
    layout's blocks (the blocks they were saved from: exact); else (fp32 moments, None)."""
    scales = torch.empty_like(codes, dtype=torch.float32, memory_format=torch.preserve_format)
    scales.copy_(element_scales)  # into the codes' memory order
    flat = _memory_flat(scales)
    firsts = flat[::MOMENT_BLOCK].clone(memory_format=torch.contiguous_format)  # dense (stride 1) even for one block
    if torch.equal(firsts.repeat_interleave(MOMENT_BLOCK)[: flat.numel()], flat):
        return codes, firsts
    ones = torch.ones(-(-codes.numel() // MOMENT_BLOCK), dtype=torch.float32, device=codes.device)
    return _dequantize_moment(codes, ones) * scales, None  # code value * 1, then * its scale: exact


def _quantize_moment(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of fp32 moments in a dense layout (the codes get it), rounded to nearest
    (for loading a state_dict; the kernel's own coding rounds stochastically)."""
    R = _CODE_RANGE[signed]
    flat = _memory_flat(x).float()
    n = flat.numel()
    blocks = -(-n // MOMENT_BLOCK)
    padded = torch.zeros(blocks * MOMENT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:n] = flat.abs()
    scales = padded.view(blocks, MOMENT_BLOCK).amax(dim=1)
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    rel = (padded.view(blocks, MOMENT_BLOCK) * inv[:, None]).reshape(-1)[:n]
    bits = rel.view(torch.int32).to(torch.int64)
    base = (127 - R) << 23
    normal = (((bits - base + (1 << 19)) >> 20) + 1).clamp(max=R * 8 + 1)
    tiny = (rel * 2.0**R >= 0.5).to(torch.int64)
    q = torch.where(bits >= base, normal, tiny)
    if not signed:
        q = torch.where(flat > 0, q.clamp(min=1), q)
    else:
        q = torch.where(flat < 0, -q, q)
    codes = torch.empty_like(x, dtype=torch.int8 if signed else torch.uint8, memory_format=torch.preserve_format)
    _memory_flat(codes).copy_(q.to(codes.dtype))
    return codes, scales


def state_bytes_per_param(param_dtype: torch.dtype, *, moments: str = "fp32", master_weights: bool | None = None,
                          stochastic_rounding: bool = False, param_remainders: bool = False) -> float:
    """Optimizer-state bytes per parameter of a large tensor (params, grads and the
    step counter excluded), for FusedAdamW built with these arguments: master or
    remainder, m, v, and with int8 moments their per-block scales (2 * 4 / 256)."""
    _check_precision_args(moments, master_weights, stochastic_rounding, param_remainders)
    _check_param_dtype(param_dtype, moments, master_weights, stochastic_rounding, param_remainders, "param_dtype")
    m_dtype, v_dtype = _MOMENT_DTYPES[moments]
    total = float(m_dtype.itemsize + v_dtype.itemsize)
    if moments == "int8":
        total += 2 * 4 / MOMENT_BLOCK
    if param_dtype != torch.float32 and not stochastic_rounding and master_weights is not False:
        total += 2 if param_remainders else 4
    return total


# ---- fp32 master <-> (bf16 param, int16 remainder), as the kernel splits them (adamw_math.h: split_master).
def _join_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The exact fp32 master of a bf16 param and its int16 remainder."""
    top = param.view(torch.int16).to(torch.int64) & 0xFFFF
    top = top - (remainder < 0).to(torch.int64)
    bits = (top << 16) | (remainder.to(torch.int64) & 0xFFFF)
    bits = bits - (bits >= 2**31).to(torch.int64) * 2**32
    return bits.to(torch.int32).view(torch.float32)


def _split_master(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 param, int16 remainder) of a fp32 master: the param rounded to nearest, ties away from zero."""
    bits = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF
    nan = torch.isnan(master.contiguous())
    top = torch.where(nan, (bits >> 16) | 0x40, (bits >> 16) + (low >> 15)) & 0xFFFF
    rem = torch.where(nan, low & 0x7FFF, low)

    def as_int16(x: torch.Tensor) -> torch.Tensor:
        return (x - (x >= 2**15).to(torch.int64) * 2**16).to(torch.int16)

    return as_int16(top).view(torch.bfloat16), as_int16(rem)


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
        params: params, ``model.named_parameters()`` (the names then appear in
            ``overflow_report()`` and in ``param_groups[i]['param_names']``, as
            with torch's optimizers) or param groups (dicts with per-group ``lr``,
            ``betas``, ``eps``, ``weight_decay``). All params must be on one device.
        lr: float, or a 1-element float32 tensor on the params' device (read by
            the kernel at every step: changing it needs no recapture).
        betas, eps, weight_decay: as ``torch.optim.AdamW``.
        master_weights: keep fp32 master weights for float16/bfloat16 params
            (default True for them; ignored for float32 params). False updates
            16-bit params directly (round to nearest).
        stochastic_rounding: bfloat16 params without master weights, updated in
            fp32 and stochastically rounded back (unbiased; seeded by ``seed``).
        moments: storage of exp_avg / exp_avg_sq: ``"fp32"`` (default),
            ``"bf16"`` (stochastically rounded, seeded by ``seed``), or ``"int8"``
            (8-bit codes in blocks of 256 with one fp32 scale each; dequantized,
            updated in fp32 and requantized inside the update kernel). With every
            param precision but 16-bit params with ``master_weights=False``.
        param_remainders: bfloat16 params with master weights: instead of a fp32
            master keep its low 16 bits (int16 ``master_remainder``) beside the
            param; param + remainder is the fp32 master bit for bit, so masters
            and moments equal the fp32-master mode's exactly, at 2 bytes/param
            less. The param is the master rounded to nearest with ties away from
            zero (the fp32-master mode rounds ties to even: params can differ by
            one bf16 ulp where the master lies exactly halfway).
        max_grad_norm: clip the global norm of the (unscaled) gradients to this,
            like ``torch.nn.utils.clip_grad_norm_``, inside the update. A step
            whose gradients contain inf/NaN is then skipped. The norm is global
            over ranks: DTensor (FSDP2/HSDP) gradients' local squared sums are
            summed over their shard groups (one all-reduce of a 2-element device
            tensor, which carries the overflow flag too when the shard group is
            ``process_group``'s ranks), replicated gradients (plain tensors, as
            under DDP, and Replicate placements) count once; the clip coefficient
            is min(max_norm / (norm + 1e-6), 1) in fp32, as the kernel's. No sync.
        capturable: allow the step inside CUDA graph capture. (Steps never
            synchronize; this only enables the capture-time checks.)
        seed: stochastic-rounding seed (default: ``torch.initial_seed()``).
            ``get_optimizer_state_dict`` does not carry it: for a bit-exact
            resume of bf16 / int8 moments or stochastic rounding under DCP, build
            the optimizer with the same seed.
        process_group: overflow flags are MAX-reduced over it under
            torch.distributed (default: the world).

    DTensor params (``torch.distributed.fsdp.fully_shard``) are updated on their
    local shards, in every precision and ``moments`` mode; plain and DTensor
    params mix in one optimizer. Their state is sized from the local shard and
    is a DTensor laid out as the param (``step`` is a plain scalar, as in torch's
    AdamW), except the int8 block scales: plain tensors, one per 256 elements of
    the local shard in memory order (blocks never straddle shards). DTensor
    gradients with a Partial placement are refused (ValueError).

    Checkpoints under torch.distributed.checkpoint: ``get_optimizer_state_dict`` /
    ``set_optimizer_state_dict`` and ``dcp.save`` / ``dcp.load`` work; the same
    world size resumes bit for bit. Another world size (or sharding) reshards
    every param-shaped state elementwise (moments, masters, remainders: exact).
    int8 moments reshard too: ``state_dict`` gives a sharded param's block scales
    per element (``exp_avg_scale`` / ``exp_avg_sq_scale`` as fp32 DTensors of
    the param's shape, 8 checkpoint bytes per element beside the 2 of the codes),
    so that each code travels with its scale. On load, where an element's scales
    are constant over each of the new local blocks (the same sharding), codes and
    scales are taken as they are (exact); otherwise the moments are decoded
    exactly and requantized on the new blocks, rounded to nearest (at most 1/16
    relative, plus the tiny-code floor). A plain-tensor (unsharded) optimizer does
    not load a sharded int8 checkpoint through DCP (its template's block scales
    have another shape, which DCP refuses); load it into a 1-rank FSDP2 model.

    After a step, ``skipped_flag`` (device tensor, 1.0 if the step was skipped)
    and ``grad_norm`` (device tensor) are available without synchronizing;
    ``last_step_skipped`` reads the flag on the host. Per-param step counts
    (``state[p]['step']``) only advance on steps that were taken.
    ``overflow_report()`` names the params whose gradients held inf or NaN in the
    last skipped step (kept on the device, read with one sync when asked).
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
        moments: str = "fp32",
        param_remainders: bool = False,
        max_grad_norm: float | None = None,
        capturable: bool = False,
        seed: int | None = None,
        process_group=None,
    ) -> None:
        _check_precision_args(moments, master_weights, stochastic_rounding, param_remainders)
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
        self.moments = moments
        self.param_remainders = param_remainders
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.capturable = capturable
        self.seed = seed
        self.process_group = process_group
        self._device: torch.device | None = None
        self._param_dtypes: dict[int, torch.dtype] = {}
        self._scalars: torch.Tensor | None = None
        self._step_record: torch.Tensor | None = None  # [step() calls, per-param inf/NaN bits, summary]
        self._skips = SkipMemory()
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
                _check_param_dtype(p.dtype, self.moments, self.master_weights, self.stochastic_rounding,
                                   self.param_remainders, where)
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
        kwargs = {} if self.moments == "fp32" else {"moments": self.moments}
        if mode == _SR:
            kwargs["stochastic_rounding"] = True
        elif mode == _REMAINDER:
            kwargs["param_remainders"] = True
        elif dtype != torch.float32:
            kwargs["master_weights"] = mode == _MASTER
        return kwargs

    def _mode(self, dtype: torch.dtype) -> str:
        if dtype == torch.float32:
            return _PLAIN
        if self.stochastic_rounding:
            return _SR
        if self.master_weights is False:
            return _PLAIN
        return _REMAINDER if self.param_remainders else _MASTER

    # ------------------------------------------------------------------ flags
    @property
    def skipped_flag(self) -> torch.Tensor:
        """0-dim float32 device tensor: 1.0 if the last step was skipped (inf/NaN gradients). No sync."""
        return self._step_scalars()[0]

    @property
    def grad_norm(self) -> torch.Tensor:
        """0-dim float32 device tensor: the global norm of the last step's unscaled gradients
        (computed when ``max_grad_norm`` is set or a loss scaler checked the gradients), over
        all shards and ranks for DTensor gradients."""
        return self._step_scalars()[3]

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped. Reads the device flag: synchronizes."""
        return self._scalars is not None and bool(self._scalars[0].item() != 0.0)

    @property
    def grad_flags(self) -> torch.Tensor | None:
        """int32 device tensor of the last step: per param (flat over param_groups) its
        gradient's inf (1) / NaN (2) bits, then a summary entry (cogkern._overflow). No sync."""
        return None if self._step_record is None else self._step_record[1:]

    def overflow_report(self) -> OverflowReport:
        """The last skipped step (counted in step() calls) and the params whose gradients
        held inf / NaN then, by name when built from named_parameters(). One sync."""
        step, flags = self._skips.read()
        return build_report(step, [(flags, param_labels(self.param_groups))], "step")

    def _step_scalars(self) -> torch.Tensor:
        if self._scalars is None:
            device = self._device if self._device is not None else torch.device("cpu")
            self._scalars = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float32, device=device)
        return self._scalars

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, mode: str) -> dict:
        state = self.state[p]
        # A DTensor param's state is sized from its local shard and is a DTensor laid out as
        # the param (as torch's AdamW state under FSDP2); int8 blocks (plain tensors) are
        # per local shard. ``step`` is a plain scalar, the same on every rank.
        owner, p = p, local(p)
        if "step" not in state:
            m_dtype, v_dtype = _MOMENT_DTYPES[self.moments]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            # Zero codes with zero scales are zero moments.
            state["exp_avg"] = like_param(owner, torch.zeros_like(p, dtype=m_dtype,
                                                                  memory_format=torch.preserve_format))
            state["exp_avg_sq"] = like_param(owner, torch.zeros_like(p, dtype=v_dtype,
                                                                     memory_format=torch.preserve_format))
            if self.moments == "int8":
                blocks = -(-p.numel() // MOMENT_BLOCK)
                state["exp_avg_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_scale"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        if mode == _MASTER and "master_param" not in state:
            state["master_param"] = like_param(owner, p.detach().to(torch.float32, memory_format=torch.preserve_format,
                                                                    copy=True))
        if mode == _REMAINDER and "master_remainder" not in state:
            # The master starts as the param itself: a zero remainder.
            state["master_remainder"] = like_param(owner, torch.zeros_like(p, dtype=torch.int16,
                                                                           memory_format=torch.preserve_format))
        return state

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the optimizer state tensors allocated so far (state exists after a
        param's first step or a load), by kind: ``masters`` (fp32 master_param),
        ``remainders`` (int16 master_remainder), ``exp_avg``, ``exp_avg_sq``,
        ``scales`` (int8 moments' block scales, both moments) and their ``total``.
        The 4-byte step counters are not counted."""
        kinds = {"master_param": "masters", "master_remainder": "remainders", "exp_avg": "exp_avg",
                 "exp_avg_sq": "exp_avg_sq", "exp_avg_scale": "scales", "exp_avg_sq_scale": "scales"}
        out = dict.fromkeys(_STATE_BYTES_KEYS, 0)
        for state in self.state.values():
            for name, kind in kinds.items():
                t = state.get(name)
                if torch.is_tensor(t):
                    t = local(t)  # this process's bytes
                    out[kind] += t.numel() * t.element_size()
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return out

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
                check_dtensor_grad(p, g, f"param_groups[{gi}]")
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
        record = self._step_record
        if record is None or record.numel() != flat + 2:
            record = self._step_record = step_record(flat, device, record)
        record[:1] += 1  # step() calls, counted on the device
        # Always rewrites the step scalars and flags, so skipped_flag and grad_flags describe
        # this step even when there is nothing to update. DTensor grads: the global norm (cogkern._distributed).
        grad_check_(grads, scale, found_in, self.max_grad_norm or 0.0, scan, scalars, self.process_group,
                    record[1:], [index for index, _, _, _ in entries])
        self._skips.record(scalars[0] != 0, record)
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
            m_scales, v_scales = [], []
            for index, gi, p, g in items:
                state = self._init_state(p, mode)
                # DTensors (FSDP2): the ops update the local shards in place.
                params.append(local(p))
                grads.append(local(g))
                ms.append(local(state["exp_avg"]))
                vs.append(local(state["exp_avg_sq"]))
                steps.append(state["step"])
                if mode == _MASTER:
                    masters.append(local(state["master_param"]))
                elif mode == _REMAINDER:
                    masters.append(local(state["master_remainder"]))  # int16 masters: remainders, to the op
                if self.moments == "int8":
                    m_scales.append(state["exp_avg_scale"])
                    v_scales.append(state["exp_avg_sq_scale"])
                gids.append(gi)
                ids.append(index)
            _ops.fused_adamw_(
                params, grads, ms, vs, masters, steps, gids, ids, lrs, lr_tensors,
                beta1s, beta2s, epss, wds, scalars, self.seed, mode == _SR, m_scales, v_scales,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state_dict (state holds step, exp_avg, exp_avg_sq and, with
        master weights, master_param) plus this optimizer's settings under 'cogkern'.
        A DTensor param's int8 block scales go out per element (see the class docstring)."""
        sd = super().state_dict()
        if self.moments == "int8":
            # A sharded param's int8 block scales belong to blocks of its local shard (in memory
            # order), which another sharding cuts elsewhere: they go out per element, as DTensors
            # laid out as the param, so that DCP reshards them with the codes.
            params = [p for group in self.param_groups for p in group["params"]]
            for index, st in sd["state"].items():
                p = params[index]
                if is_dtensor(p) and "exp_avg_scale" in st:
                    st = sd["state"][index] = dict(st)  # a copy: self.state keeps the block scales
                    for name, codes in (("exp_avg_scale", "exp_avg"), ("exp_avg_sq_scale", "exp_avg_sq")):
                        st[name] = like_param(p, _element_scales(local(st[codes]), st[name]))
        sd["cogkern"] = {
            "seed": self.seed,
            "master_weights": self.master_weights,
            "stochastic_rounding": self.stochastic_rounding,
            "moments": self.moments,
            "param_remainders": self.param_remainders,
            "max_grad_norm": self.max_grad_norm,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this class (or of torch.optim.AdamW: moments and steps).

        State tensors are copied into existing ones where they exist (so a
        captured CUDA graph stays valid), in this optimizer's storage (see
        ``_loaded_state`` for the conversions between moment and master storages).
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
                if key == "params" or (key == "param_names" and "param_names" in group):
                    continue  # as torch: this optimizer's own names win
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
            # A DTensor param's state loads as local shards (cogkern._distributed.local_state).
            owner, p = p, local(p)
            saved_state = {name: local_state(owner, value) for name, value in saved_state.items()}
            for name, value in self._loaded_state(p, saved_state).items():
                if not torch.is_tensor(value):
                    state[name] = value
                    continue
                current = local(state.get(name))
                if (current is not None and torch.is_tensor(current) and current.shape == value.shape
                        and current.dtype == value.dtype):
                    current.copy_(value)  # in place: a captured graph keeps its pointers
                elif name in _PARAM_SHAPED:
                    like = torch.empty_like(p, dtype=value.dtype, memory_format=torch.preserve_format)
                    like.copy_(value)
                    state[name] = like_param(owner, like)
                else:
                    state[name] = value.detach().to(p.device).clone()

    def _loaded_state(self, p: torch.Tensor, saved: dict) -> dict:
        """A saved per-param state in this optimizer's storage. The same storage loads
        as it is (exact). Otherwise: fp32 <-> bf16 moments convert (bf16 rounds to
        nearest), int8 codes dequantize and fp32 / bf16 moments quantize (round to
        nearest; the kernel's own requantization rounds stochastically), a fp32
        master becomes a remainder and the param is set from it, and a remainder with
        the current param (load the model first) becomes a fp32 master."""
        out = {}
        for name, value in saved.items():
            if not torch.is_tensor(value):
                out[name] = value
            elif name == "step":
                out[name] = value.detach().reshape(()).to(device=p.device, dtype=torch.float32)
            elif name in _PARAM_SHAPED:
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"state '{name}' has shape {tuple(value.shape)} but its param has "
                                     f"shape {tuple(p.shape)}")
                out[name] = value.detach().to(p.device)
            elif name not in ("exp_avg_scale", "exp_avg_sq_scale"):
                out[name] = value.detach().to(p.device)
        # Moments.
        if "exp_avg" in out and "exp_avg_sq" in out:
            m, v = out["exp_avg"], out["exp_avg_sq"]
            saved_int8 = m.dtype == torch.int8
            if saved_int8:
                if "exp_avg_scale" not in saved or "exp_avg_sq_scale" not in saved:
                    raise ValueError("state_dict has int8 moments without exp_avg_scale / exp_avg_sq_scale")
                blocks = -(-p.numel() // MOMENT_BLOCK)
                m_scale = saved["exp_avg_scale"].detach().to(device=p.device, dtype=torch.float32)
                v_scale = saved["exp_avg_sq_scale"].detach().to(device=p.device, dtype=torch.float32)
                if tuple(m_scale.shape) == tuple(p.shape) and v.dtype == torch.uint8:
                    # Per-element scales (a sharded param's checkpoint, see state_dict).
                    m, m_scale = _from_element_scales(m, m_scale)
                    v, v_scale = _from_element_scales(v, v_scale)
                    if m_scale is None or v_scale is None:  # blocks moved (another sharding): fp32 values
                        m = m if m_scale is None else _dequantize_moment(m, m_scale)
                        v = v if v_scale is None else _dequantize_moment(v, v_scale)
                        saved_int8 = False
            if saved_int8:
                if m_scale.numel() != blocks or v_scale.numel() != blocks or v.dtype != torch.uint8:
                    raise ValueError(f"state_dict's int8 moments need uint8 exp_avg_sq and {blocks} scales per "
                                     f"moment for a param of {p.numel()} elements")
            same_layout = p.numel() <= 1 or (m.stride() == p.stride() and v.stride() == p.stride())
            if self.moments == "int8" and saved_int8 and same_layout:
                out["exp_avg_scale"], out["exp_avg_sq_scale"] = m_scale, v_scale  # as saved: exact
            elif self.moments == "int8":
                if saved_int8:  # blocks follow memory order: re-block in this param's layout
                    m, v = _dequantize_moment(m, m_scale), _dequantize_moment(v, v_scale)
                m = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(m)
                v = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(v)
                out["exp_avg"], out["exp_avg_scale"] = _quantize_moment(m, signed=True)
                out["exp_avg_sq"], out["exp_avg_sq_scale"] = _quantize_moment(v, signed=False)
            else:
                if saved_int8:
                    m, v = _dequantize_moment(m, m_scale), _dequantize_moment(v, v_scale)
                dtype = _MOMENT_DTYPES[self.moments][0]
                out["exp_avg"], out["exp_avg_sq"] = m.to(dtype), v.to(dtype)
        # Masters.
        mode = self._mode(p.dtype)
        if mode == _REMAINDER and "master_param" in out:
            param, out["master_remainder"] = _split_master(out.pop("master_param").float())
            p.detach().copy_(param)
        elif mode == _MASTER and "master_remainder" in out:
            if p.dtype != torch.bfloat16 or out["master_remainder"].dtype != torch.int16:
                raise ValueError("state 'master_remainder' must be int16, for a bfloat16 param")
            out["master_param"] = _join_master(p.detach(), out.pop("master_remainder"))
        elif mode == _MASTER and "master_param" in out:
            out["master_param"] = out["master_param"].float()
        elif mode == _REMAINDER and "master_remainder" in out and out["master_remainder"].dtype != torch.int16:
            raise ValueError(f"state 'master_remainder' must be int16, got {out['master_remainder'].dtype}")
        return out


# Fake (meta) kernels, so torch.compile can trace code that calls the ops.
@torch.library.register_fake("cogkern::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, masters, steps, tensor_groups, tensor_ids, lrs,
                      lr_tensors, beta1s, beta2s, epss, weight_decays, step_scalars, seed, stochastic_rounding,
                      exp_avg_scales, exp_avg_sq_scales):
    return None


@torch.library.register_fake("cogkern::amp_grad_check_")
def _amp_grad_check_fake(grads, scale, found_inf, max_norm, scan, unscale_inplace, out, tensor_flags=None,
                         flag_indices=None):
    return None


@torch.library.register_fake("cogkern::loss_scale_update_")
def _loss_scale_update_fake(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor,
                            growth_interval, hysteresis, min_scale, max_scale):
    return None


__all__ = ["FusedAdamW", "state_bytes_per_param"]
