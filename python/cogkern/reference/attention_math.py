"""An eager reference of CogVideoX's attention, written from the formulas and
sharing no code with the kernels: per-head norm over head_dim, 3D rotation of
the video tokens, softmax(q k^T * scale) v. It computes in its inputs' dtype
(float64 for the exactness tests, float32 for the CUDA error rule) and is
differentiable by autograd.
"""
from __future__ import annotations

import math

import torch

from .rope_math import apply_table_reference


def norm_rows(x, kind, weight, bias, eps):
    """LayerNorm or RMSNorm over the last dim; weight/bias None mean 1/0."""
    if kind is None:
        return x
    if kind == "layer_norm":
        centered = x - x.mean(dim=-1, keepdim=True)
    elif kind == "rms_norm":
        centered = x
    else:
        raise ValueError(kind)
    y = centered / torch.sqrt((centered * centered).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def rope_angle_table(grid, head_dim, axes_dims, theta, interleaved, positions, dtype):
    """(angles [n_video, n_pairs], first channels [n_pairs], second channels [n_pairs]) of a 3D RoPE.

    Video token n sits at (n // (H*W), (n // W) % H, n % W); pair j of an axis
    slice of dim d turns by pos * theta^(-2j/d); channels past sum(axes_dims)
    are not rotated.
    """
    t_n, h_n, w_n = grid
    n = torch.arange(t_n * h_n * w_n)
    index = (n // (h_n * w_n), (n // w_n) % h_n, n % w_n)
    if positions is None:
        positions = [torch.arange(g, dtype=torch.float64) for g in grid]
    angles, first, second = [], [], []
    offset = 0
    for axis, d in enumerate(axes_dims):
        pos = positions[axis].to(torch.float64)[index[axis]]
        for j in range(d // 2):
            angles.append(pos * theta ** (-2.0 * j / d))
            if interleaved:
                first.append(offset + 2 * j)
                second.append(offset + 2 * j + 1)
            else:
                first.append(offset + j)
                second.append(offset + j + d // 2)
        offset += d
    return torch.stack(angles, dim=1).to(dtype), torch.tensor(first), torch.tensor(second)


def rotate_video_tokens(x, rope, text_len):
    """x: (batch, seq, heads, head_dim); rotates tokens [text_len, seq)."""
    if rope is None:
        return x
    if isinstance(rope, (tuple, list)):
        # A (cos, sin) table: x * cos + rotate_half(x) * sin, in x's dtype.
        return apply_table_reference(x, *rope, text_len=text_len, dtype=x.dtype)
    text, video = x[:, :text_len], x[:, text_len:]
    positions = rope.positions
    angles, first, second = rope_angle_table(
        rope.grid, rope.head_dim, rope.axes_dims, rope.theta, rope.interleaved, positions, x.dtype
    )
    cos, sin = torch.cos(angles)[None, :, None, :], torch.sin(angles)[None, :, None, :]
    x0, x1 = video[..., first], video[..., second]
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    out = video.clone()
    out[..., first] = y0
    out[..., second] = y1
    video = out
    return torch.cat((text, video), dim=1)


def reference_attention(
    q,
    k,
    v,
    *,
    rope=None,
    text_len=0,
    qk_norm=None,
    q_norm_weight=None,
    q_norm_bias=None,
    k_norm_weight=None,
    k_norm_bias=None,
    norm_eps=1e-6,
    scale=None,
    causal=False,
):
    """Returns (out (batch, seq, heads, head_dim), lse (batch, heads, seq))."""
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    q = rotate_video_tokens(norm_rows(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps), rope, text_len)
    k = rotate_video_tokens(norm_rows(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps), rope, text_len)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        seq = q.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse
