"""FLOP and byte counts the benchmarks and `python -m cogkern.selftest` divide by.
Counted by hand, unit-tested (tests/test_benchmarks.py): a throughput is only as
honest as its counter.
"""
from __future__ import annotations

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def attention_flops(batch: int, seq: int, heads: int, head_dim: int, causal: bool = False, pass_: str = "fwd") -> float:
    """Matmul FLOPs of softmax attention, the convention FlashAttention reports:
    forward 4*B*S^2*H*D (QK^T and PV, 2 FLOPs per multiply-add), halved when
    causal; backward 2.5x the forward (five matmuls against two); "fwd_bwd" both."""
    fwd = 4.0 * batch * seq * seq * heads * head_dim
    if causal:
        fwd /= 2
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if pass_ not in factor:
        raise ValueError(f"pass_ must be one of {sorted(factor)}, got {pass_!r}")
    return fwd * factor[pass_]


def rope_bytes(batch: int, seq: int, heads: int, head_dim: int, dtype: str, text_len: int = 0,
               inplace: bool = False) -> int:
    """Fewest bytes a RoPE pass moves: each element read once and written once —
    all tokens out-of-place (the text prefix is copied), only the video tokens in place."""
    tokens = seq - text_len if inplace else seq
    return 2 * batch * tokens * heads * head_dim * BYTES[dtype]


# Bytes an AdamW step must move per parameter (shared/REFERENCE.md): read
# param (or master), grad, m, v; write param (and master), m, v. Keyed by the
# mode names of cogkern._validate.OPTIMIZER_MODES (the selftest's list), with fp32
# moments; a "-bf16m" / "-int8m" suffix changes the moments' part (MOMENT_BYTES_PER_PARAM).
ADAMW_BYTES_PER_PARAM = {
    "fp32": 4 + 4 + 4 + 4 + 4 + 4 + 4,  # r: p g m v, w: p m v = 28
    "fp16-master": 2 + 4 + 4 + 4 + 4 + 4 + 4 + 2,  # r: g(2) master m v, w: master m v p(2) = 28
    "bf16-master": 2 + 4 + 4 + 4 + 4 + 4 + 4 + 2,  # = 28
    "fp16-plain": 2 + 2 + 4 + 4 + 2 + 4 + 4,  # no masters, round to nearest: r: g p m v, w: p m v = 22
    "bf16-plain": 2 + 2 + 4 + 4 + 2 + 4 + 4,  # = 22
    "bf16-sr": 2 + 2 + 4 + 4 + 2 + 4 + 4,  # as bf16-plain = 22 counted exactly (the sheet rounds to 20)
    "bf16-remainders": 2 + 2 + 2 + 4 + 4 + 2 + 2 + 4 + 4,  # r: g p rem m v, w: p rem m v = 26
}
# m and v together, each read and written: fp32 4+4 each; bf16 2+2; int8 codes 1+1 plus the
# fp32 scale of its 256-value block, read (to dequantize) and written (requantized).
MOMENT_BYTES_PER_PARAM = {"fp32": 16.0, "bf16": 8.0, "int8": 2 * (1 + 1 + (4 + 4) / 256)}


def adamw_bytes_per_param(mode: str) -> float:
    """Bytes one step moves per parameter in `mode` (an OPTIMIZER_MODES name), without the grad check."""
    base, moments = mode, "fp32"
    for m in ("bf16", "int8"):
        if mode.endswith(f"-{m}m"):
            base, moments = mode[: -len(m) - 2], m
    if base not in ADAMW_BYTES_PER_PARAM:
        raise ValueError(f"mode must be one of {sorted(ADAMW_BYTES_PER_PARAM)} (+ -bf16m / -int8m), got {mode!r}")
    return ADAMW_BYTES_PER_PARAM[base] - MOMENT_BYTES_PER_PARAM["fp32"] + MOMENT_BYTES_PER_PARAM[moments]


def grad_check_bytes_per_param(mode: str) -> int:
    """The overflow / norm check reads the grads once more (read only): their dtype's size."""
    return 4 if mode.startswith("fp32") else 2


def adamw_bytes(num_params: int, mode: str, with_overflow_check: bool = False) -> float:
    per = adamw_bytes_per_param(mode) + (grad_check_bytes_per_param(mode) if with_overflow_check else 0)
    return num_params * per
