"""CogVideoX's attention computed the way diffusers writes it: the one eager
diffusers-style reference (the tests, benchmarks, scripts and the training
demo's ``--attention eager`` all use it).

Step by step in plain PyTorch as diffusers' ``CogVideoXAttnProcessor2_0``
does: ``(B, H, S, D)`` layout, QK-norm, ``apply_rotary_emb`` on the video
tokens with the ``(cos, sin)`` table of ``get_3d_rotary_pos_embed(use_real=True)``
(fp32 math, cast back), then ``F.scaled_dot_product_attention``
(``impl="sdpa"``) or an explicit softmax (``impl="eager"``).

- :func:`rotary_table`: diffusers' ``(cos, sin)`` table.
- :func:`apply_rotary_emb`: diffusers' rotation by that table.
- :func:`processor_attention`: the processor after the projections, on ``(B, H, S, D)``.
- :func:`cogvideox_attention`: from the projections of an attention module
  (``to_q``/``to_k``/``to_v``/``norm_q``/``norm_k``/``to_out``, e.g. a
  :class:`cogkern.FusedAttention`'s) to its output.
- :func:`eager_attention`: ``(B, S, H, D)`` q, k, v with LayerNorm parameters,
  the form the kernels are measured against (FlashAttention's rule, benchmarks).

It shares no code with cogkern's kernels.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

RopeTable = tuple[torch.Tensor, torch.Tensor]


def rotary_table(grid, head_dim: int, theta: float = 10000.0, positions=None, dtype=torch.float32) -> RopeTable:
    """(cos, sin), each (T*H*W, head_dim), built the way diffusers' get_3d_rotary_pos_embed(use_real=True)
    builds them: CogVideoX's axis split (D/4, 3D/8, 3D/8), per-axis frequencies in float64, each value
    repeated for its interleaved pair, axes concatenated t, h, w (token order t-major, then h, then w).
    positions: optional (pos_t, pos_h, pos_w) (default: the integers 0..n-1)."""
    t_n, h_n, w_n = grid
    if positions is None:
        positions = [torch.arange(n, dtype=torch.float64) for n in grid]
    pt, ph, pw = (torch.as_tensor(p).to(torch.float64) for p in positions)
    tt, hh, ww = torch.meshgrid(torch.arange(t_n), torch.arange(h_n), torch.arange(w_n), indexing="ij")
    token_pos = (pt[tt.flatten()], ph[hh.flatten()], pw[ww.flatten()])
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    coss, sins = [], []
    for pos, d in zip(token_pos, dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
        angle = torch.outer(pos, freqs)
        coss.append(angle.cos().repeat_interleave(2, dim=1))
        sins.append(angle.sin().repeat_interleave(2, dim=1))
    return torch.cat(coss, dim=1).to(dtype), torch.cat(sins, dim=1).to(dtype)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: RopeTable) -> torch.Tensor:
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on x (B, H, S, D) with
    (cos, sin) of shape (S, D): math in fp32 (float64 for float64 x, so exact tests can use it), cast back."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = (t.to(device=x.device, dtype=acc) for t in freqs_cis)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.to(acc) * cos + x_rotated.to(acc) * sin).to(x.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v on (B, H, S, D), the S x S matrix in memory; softmax in fp32."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


Norm = Optional[Callable[[torch.Tensor], torch.Tensor]]


def processor_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    norm_q: Norm,
    norm_k: Norm,
    rope_table: RopeTable | None,
    text_len: int,
    impl: str = "sdpa",
) -> torch.Tensor:
    """The processor after the projections: query, key, value (B, H, S, D) -> (B, H, S, D).
    norm_q, norm_k: the QK-norms over head_dim (None: none); rope_table rotates tokens [text_len, S)."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"impl must be 'sdpa' or 'eager', got {impl!r}")
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    if rope_table is not None:
        # diffusers assigns in place; a concatenation computes the same values and also
        # works on views of leaves.
        query = torch.cat((query[:, :, :text_len], apply_rotary_emb(query[:, :, text_len:], rope_table)), dim=2)
        key = torch.cat((key[:, :, :text_len], apply_rotary_emb(key[:, :, text_len:], rope_table)), dim=2)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return softmax_attention(query, key, value)


def cogvideox_attention(
    attn, hidden_states: torch.Tensor, rope_table: RopeTable | None, text_len: int, impl: str = "sdpa"
) -> torch.Tensor:
    """One CogVideoX attention over the joint [text; video] sequence (batch, seq, dim), with attn's
    to_q, to_k, to_v, norm_q, norm_k (None: no QK-norm), to_out and heads."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = processor_attention(query, key, value, attn.norm_q, attn.norm_k, rope_table, text_len, impl)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
    return attn.to_out[1](attn.to_out[0](out))


def eager_attention(q, k, v, norms, table: RopeTable | None, text_len: int, eps: float = 1e-6, impl: str = "sdpa"):
    """q, k, v (B, S, H, D) -> (B, S, H, D): LayerNorm QK-norm with norms = ((q_weight, q_bias),
    (k_weight, k_bias)), diffusers' rotation by table, SDPA, all in the inputs' dtype."""
    (qw, qb), (kw, kb) = norms

    def norm_q(x):
        return F.layer_norm(x, (x.shape[-1],), qw, qb, eps)

    def norm_k(x):
        return F.layer_norm(x, (x.shape[-1],), kw, kb, eps)

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # diffusers' (B, H, S, D) views
    return processor_attention(q, k, v, norm_q, norm_k, table, text_len, impl).transpose(1, 2)
