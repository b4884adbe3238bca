"""Independent pure-PyTorch references for 3D RoPE, written from the formula
(shared/REFERENCE.md) and from diffusers' table construction. They share no
code with cogkern."""
from __future__ import annotations

import torch


def video_positions(grid, positions=None, dtype=torch.float64):
    """Per video token (t-major, then h, then w) position along each axis: 3 tensors of T*H*W."""
    T, H, W = grid
    if positions is None:
        positions = [torch.arange(n, dtype=dtype) for n in grid]
    pt, ph, pw = (torch.as_tensor(p, dtype=dtype) for p in positions)
    tt, hh, ww = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return pt[tt.flatten()], ph[hh.flatten()], pw[ww.flatten()]


def rope3d_reference(x, grid, axes_dims, theta=10000.0, interleaved=True, text_len=0, positions=None, inverse=False):
    """Rotates the video tokens of x (B, S, H, D) in float64; returns float64 (differentiable)."""
    x = x.to(torch.float64)
    out = x.clone()
    offset = 0
    for pos, d in zip(video_positions(grid, positions), axes_dims):
        if d == 0:
            continue
        j = torch.arange(d // 2, dtype=torch.float64)
        angle = pos[:, None] * theta ** (-2.0 * j / d)  # (n_video, d/2)
        if inverse:
            angle = -angle
        cos = angle.cos()[None, :, None, :]
        sin = angle.sin()[None, :, None, :]
        xs = x[:, text_len:, :, offset : offset + d]
        if interleaved:
            x0, x1 = xs[..., 0::2], xs[..., 1::2]
        else:
            x0, x1 = xs[..., : d // 2], xs[..., d // 2 :]
        y0 = x0 * cos - x1 * sin
        y1 = x1 * cos + x0 * sin
        ys = out[:, text_len:, :, offset : offset + d]
        if interleaved:
            ys[..., 0::2], ys[..., 1::2] = y0, y1
        else:
            ys[..., : d // 2], ys[..., d // 2 :] = y0, y1
        offset += d
    return out


def diffusers_style_table(grid, head_dim, theta=10000.0, positions=None, dtype=torch.float32):
    """(cos, sin) of shape (T*H*W, head_dim) built the way diffusers'
    get_3d_rotary_pos_embed(use_real=True) builds them: per-axis frequencies,
    each value repeated for its interleaved pair, axes concatenated t, h, w."""
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    coss, sins = [], []
    for pos, d in zip(video_positions(grid, positions), dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
        ang = torch.outer(pos, freqs)
        coss.append(ang.cos().repeat_interleave(2, dim=1))
        sins.append(ang.sin().repeat_interleave(2, dim=1))
    return torch.cat(coss, dim=1).to(dtype), torch.cat(sins, dim=1).to(dtype)


def diffusers_apply_rotary_emb(x_bhsd, cos, sin):
    """diffusers' apply_rotary_emb(use_real_unbind_dim=-1) on (B, H, S, D): math in fp32
    (float64 for float64 input), cast back."""
    acc = torch.float64 if x_bhsd.dtype == torch.float64 else torch.float32
    x_real, x_imag = x_bhsd.reshape(*x_bhsd.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    out = x_bhsd.to(acc) * cos.to(acc) + x_rotated.to(acc) * sin.to(acc)
    return out.to(x_bhsd.dtype)


def apply_table_reference(x, cos, sin, text_len=0):
    """The table mix on (B, S, H, D) in float64, text prefix untouched (differentiable)."""
    x = x.to(torch.float64)
    out = x.clone()
    video = x[:, text_len:].transpose(1, 2)  # (B, H, n, D)
    out[:, text_len:] = diffusers_apply_rotary_emb(video, cos.double(), sin.double()).transpose(1, 2)
    return out
