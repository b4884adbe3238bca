"""The few argument checks the public functions make in Python.

Every check of an argument's value (shape, dtype, strides, ranges, how
arguments fit together) is made once, by the op itself in C++
(csrc/*/*_op.h), which raises a ValueError naming the argument before any
kernel runs: that also covers direct torch.ops.cogkern.* calls and
torch.compile. What is left here is what C++ cannot see: Python types (the
schema parser would reject a wrong type with a RuntimeError, or coerce a bool
to an int) and devices the ops are not registered for (the meta device runs
the fake kernels, which check nothing).
"""
from __future__ import annotations

import torch


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_tensor(name: str, t) -> None:
    """t is a tensor on the CPU or a CUDA device. (With any tensor argument on the meta device,
    the dispatcher would run the op's fake kernel, which checks nothing and returns empty tensors.)"""
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {t.device}")


def check_optional_tensor(name: str, t) -> None:
    if t is not None:
        check_tensor(name, t)


def check_int(name: str, v) -> None:
    if not is_int(v):
        raise ValueError(f"{name} must be an int, got {v!r}")


def check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")


def check_number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
