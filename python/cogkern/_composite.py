"""The composite path: QK-norm, 3D RoPE and attention as plain PyTorch ops
(``F.layer_norm`` / ``F.rms_norm``, ``rope.rotate_composite``, ``F.scaled_dot_product_attention``),
differentiable by autograd.

This is where :func:`cogkern.fused_attention` goes when the first-use guard
(``_guard.py``) found none of its kernels correct on a device: slower, but right.
It takes the arguments the fused op takes, already checked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .rope import rotate_composite


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm(x: torch.Tensor, kind: Optional[str], weight, bias, eps: float) -> torch.Tensor:
    if kind is None:
        return x
    shape = (x.shape[-1],)
    weight = None if weight is None else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if kind == "layer_norm":
        return F.layer_norm(x, shape, weight, bias, eps)
    y = F.rms_norm(x, shape, weight, eps)
    return y if bias is None else y + bias


def attention(
    q, k, v, *, rope, text_len, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
    norm_eps, scale, causal, return_lse,
):  # fmt: skip
    """What fused_attention computes (same arguments, same layouts and dtypes of the results)."""
    q = _norm(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps)
    k = _norm(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps)
    if rope is not None:
        q, k = rotate_composite(q, rope, text_len), rotate_composite(k, rope, text_len)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (batch, heads, seq, head_dim)
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    out = out.transpose(1, 2).contiguous()
    if not return_lse:
        return out
    acc = _math_dtype(q)
    scores = (qh.to(acc) @ kh.to(acc).transpose(-2, -1)) * scale
    if causal:
        seq = q.shape[1]
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    return out, torch.logsumexp(scores, dim=-1)
