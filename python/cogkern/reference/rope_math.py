"""Independent pure-PyTorch references for 3D RoPE, written from the formula
(shared/REFERENCE.md), in float64 by default. diffusers' table construction and
rotation are in :mod:`.diffusers_attention`. They share no code with cogkern."""
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


def rotate_half_pairs(x):
    """rotate_half of interleaved pairs: out[2j] = -x[2j+1], out[2j+1] = x[2j]."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_table_reference(x, cos, sin, text_len=0, dtype=torch.float64):
    """The table mix x * cos + rotate_half(x) * sin on the video tokens of x (B, S, H, D), computed
    and returned in `dtype` (default float64), text prefix untouched (differentiable)."""
    x = x.to(dtype)
    cos, sin = (t.to(device=x.device, dtype=dtype)[None, :, None, :] for t in (cos, sin))
    text, video = x[:, :text_len], x[:, text_len:]
    return torch.cat((text, video * cos + rotate_half_pairs(video) * sin), dim=1)
