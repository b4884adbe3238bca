"""Argument checks shared by the public ops: clear ValueErrors naming the
argument, raised in Python before any kernel runs."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_bshd(name: str, t) -> None:
    """t is a (batch, seq, heads, head_dim) float tensor on the CPU or a CUDA
    device, with any strides whose last is 1 (float64 on the CPU only)."""
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {t.device}")
    if t.is_cuda and t.dtype == torch.float64:
        raise ValueError(f"{name} of dtype float64 is supported on the CPU only")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must have stride 1, got strides {t.stride()}")
