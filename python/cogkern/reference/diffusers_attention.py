"""The attention of a CogVideoX block computed the way diffusers writes it.

For A/B runs and benchmarks against cogkern's fused path: the same parameters
(a :class:`cogkern.FusedAttention`'s ``to_q``/``to_k``/``to_v``/``norm_q``/
``norm_k``/``to_out``), the same math, done step by step in plain PyTorch as
diffusers' ``CogVideoXAttnProcessor2_0`` does: ``(B, H, S, D)`` layout, QK-norm
modules, ``apply_rotary_emb`` on the video tokens (fp32 math, cast back), then
``F.scaled_dot_product_attention`` (``impl="sdpa"``) or an explicit softmax
(``impl="eager"``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..rope import RopeTable


def apply_rotary_emb(x: torch.Tensor, freqs_cis: RopeTable) -> torch.Tensor:
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on (B, H, S, D)."""
    cos, sin = freqs_cis
    cos, sin = cos[None, None].to(x.device), sin[None, None].to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on (B, H, S, D), the S x S matrix in memory; softmax in fp32."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def cogvideox_attention(
    attn, hidden_states: torch.Tensor, rope_table: RopeTable | None, text_len: int, impl: str = "sdpa"
) -> torch.Tensor:
    """One CogVideoX attention over the joint [text; video] sequence (batch, seq, dim)."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"impl must be 'sdpa' or 'eager', got {impl!r}")
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if rope_table is not None:
        query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rope_table)
        key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rope_table)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    else:
        out = softmax_attention(query, key, value)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))
