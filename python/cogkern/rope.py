"""3D rotary position embedding for CogVideoX-style video tokens.

``RoPE3D`` describes the rotation (grid, axis split, frequencies, positions);
``apply_rope3d`` applies it with one fused kernel (torch.ops.cogkern.rope3d),
computing angles in-kernel so no cos/sin table is materialized. For drop-in use
with diffusers, ``rope`` may instead be the ``(cos, sin)`` pair that
``get_3d_rotary_pos_embed(..., use_real=True)`` returns.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

from ._checks import check_bool, check_int, check_tensor
from ._checks import is_int as _is_int
from ._extension import op_argument_names, require_cuda_kernels  # (importing it loads the ops)

_ops = torch.ops.cogkern
RopeTable = tuple[torch.Tensor, torch.Tensor]


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """CogVideoX's split of the head dim into (t, h, w): D/4, 3D/8, 3D/8."""
    return (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)


class RoPE3D:
    """A 3D rotary embedding over a ``(T, H, W)`` grid of video tokens.

    Args:
        grid: ``(T, H, W)``, the video token grid (after patching).
        head_dim: the attention head dim D.
        axes_dims: rotary channels of the t, h, w slices, in that order; each
            even, summing to at most D (channels past the sum pass through).
            Default: CogVideoX's ``(D/4, 3D/8, 3D/8)``.
        theta: frequency base; pair j of an axis of dim d turns by
            ``pos * theta ** (-2j/d)``.
        interleaved: rotate pairs ``(2j, 2j+1)`` of each axis slice (CogVideoX);
            False pairs ``j`` with ``j + d/2`` inside each slice (GPT-NeoX style).
        positions: optional ``(pos_t, pos_h, pos_w)``, 1-D with T, H and W
            entries, fractional allowed (diffusers' crop coordinates). Default:
            the integers ``0..n-1``.
    """

    def __init__(
        self,
        grid: Sequence[int],
        head_dim: int,
        axes_dims: Sequence[int] | None = None,
        theta: float = 10000.0,
        interleaved: bool = True,
        positions: Sequence[torch.Tensor | Sequence[float]] | None = None,
    ) -> None:
        if not isinstance(grid, Sequence) or len(grid) != 3 or not all(_is_int(g) and g >= 1 for g in grid):
            raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
        if not _is_int(head_dim) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
        if axes_dims is None:
            axes_dims = default_axes_dims(head_dim)
            if any(d % 2 for d in axes_dims):
                raise ValueError(
                    f"the default axes_dims {axes_dims} for head_dim={head_dim} are not all even; pass axes_dims"
                )
        if (
            not isinstance(axes_dims, Sequence)
            or len(axes_dims) != 3
            or not all(_is_int(d) and d >= 0 and d % 2 == 0 for d in axes_dims)
        ):
            raise ValueError(f"axes_dims must be three even non-negative ints, got {axes_dims!r}")
        if sum(axes_dims) > head_dim:
            raise ValueError(f"axes_dims {tuple(axes_dims)} sum to more than head_dim={head_dim}")
        if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise ValueError(f"theta must be a positive finite number, got {theta!r}")
        self.grid = tuple(int(g) for g in grid)
        self.head_dim = int(head_dim)
        self.axes_dims = tuple(int(d) for d in axes_dims)
        self.theta = float(theta)
        self.interleaved = bool(interleaved)
        self._positions = None if positions is None else _concat_positions(positions, self.grid)
        self._positions_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The (pos_t, pos_h, pos_w) given at construction, as float64, or None."""
        if self._positions is None:
            return None
        t, h, _ = self.grid
        p = self._positions
        return p[:t], p[t : t + h], p[t + h :]

    def positions_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Positions in the kernel's math dtype on x's device (cached: no copy per call)."""
        if self._positions is None:
            return None
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, dtype)
        pos = self._positions_cache.get(key)
        if pos is None:
            pos = self._positions.to(device=x.device, dtype=dtype)
            self._positions_cache[key] = pos
        return pos

    def cos_sin(self, device=None, dtype: torch.dtype = torch.float32) -> RopeTable:
        """The rotation as diffusers' ``(cos, sin)`` tables, each ``(T*H*W, head_dim)``.

        What ``get_3d_rotary_pos_embed(..., use_real=True)`` returns: the angle of
        each interleaved pair repeated for both of its channels (pass-through
        channels get cos 1, sin 0). For eager reference paths and for peers that
        take tables; ``apply_rope3d`` itself never needs them. Interleaved only.
        """
        if not self.interleaved:
            raise ValueError("cos_sin: diffusers' tables describe interleaved pairs; this RoPE3D is half-split")
        pair_angle, first, second = self.pair_angles()
        angle = torch.zeros(self.num_video_tokens, self.head_dim, dtype=torch.float64)  # pass-through: angle 0
        angle[:, first] = pair_angle
        angle[:, second] = pair_angle
        return angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype)

    def pair_angles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(angle, first, second)`` on the CPU: ``angle[n, j]`` (float64, ``(T*H*W, sum(axes_dims)/2)``)
        turns channels ``first[j]`` and ``second[j]`` of video token n (t-major, then h, then w):
        ``(x_first, x_second) -> (x_first cos - x_second sin, x_second cos + x_first sin)``.
        The composite (eager) path rotates by these; the kernels compute the same angles themselves."""
        t, h, w = self.grid
        pos = self._positions if self._positions is not None else torch.cat([torch.arange(n) for n in self.grid])
        pos = pos.to(device="cpu", dtype=torch.float64)
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        idx = (tt.flatten(), t + hh.flatten(), t + h + ww.flatten())
        angles, first, second = [], [], []
        offset = 0
        for axis_pos, d in zip(idx, self.axes_dims):
            j = torch.arange(d // 2)
            angles.append(torch.outer(pos[axis_pos], self.theta ** (-2.0 * j.to(torch.float64) / d)))
            if self.interleaved:
                first.append(offset + 2 * j)
                second.append(offset + 2 * j + 1)
            else:
                first.append(offset + j)
                second.append(offset + j + d // 2)
            offset += d
        return torch.cat(angles, dim=1), torch.cat(first), torch.cat(second)

    def __repr__(self) -> str:
        pos = "integer" if self._positions is None else "given"
        return (
            f"RoPE3D(grid={self.grid}, head_dim={self.head_dim}, axes_dims={self.axes_dims}, "
            f"theta={self.theta}, interleaved={self.interleaved}, positions={pos})"
        )


def _concat_positions(positions, grid) -> torch.Tensor:
    if not isinstance(positions, Sequence) or len(positions) != 3:
        raise ValueError("positions must be a sequence of three 1-D tensors (pos_t, pos_h, pos_w)")
    device = next((p.device for p in positions if torch.is_tensor(p)), torch.device("cpu"))
    parts = []
    for name, p, n in zip(("pos_t", "pos_h", "pos_w"), positions, grid):
        p = torch.as_tensor(p).detach()
        if p.dim() != 1 or p.numel() != n:
            raise ValueError(f"positions: {name} must be 1-D with {n} entries, got shape {tuple(p.shape)}")
        if not (p.is_floating_point() or p.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"positions: {name} must be real numbers, got dtype {p.dtype}")
        parts.append(p.to(dtype=torch.float64, device=device))
    return torch.cat(parts).contiguous()


def check_rope3d_fits(rope: "RoPE3D", x: torch.Tensor, x_name: str) -> None:
    """The one thing about a RoPE3D the op cannot see: the head_dim it was built for
    (the op sees grid, axes_dims, theta and positions, and checks them against x)."""
    if x.dim() > 0 and x.shape[-1] != rope.head_dim:
        raise ValueError(f"{x_name} has head_dim={x.shape[-1]} but rope was built for head_dim={rope.head_dim}")


def rope_table_pair(rope) -> RopeTable:
    """A diffusers ``(cos, sin)`` pair as the ops take it (shapes, dtypes and devices: checked by the op)."""
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2 and all(torch.is_tensor(t) for t in rope)):
        raise ValueError(f"rope must be a RoPE3D or a (cos, sin) pair of tensors, got {type(rope).__name__}")
    cos, sin = rope
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(f"rope {name}", t)
        # Autograd through the tables is a Python-level matter: the op's autograd returns no table grads.
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"rope: gradients with respect to the {name} table are not supported; detach it")
    if cos.dim() == 2 and sin.dim() == 2 and (cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0)):
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def apply_rope3d(
    x: torch.Tensor,
    rope: Union[RoPE3D, RopeTable],
    text_len: int = 0,
    inplace: bool = False,
) -> torch.Tensor:
    """Rotates the video tokens of ``x`` by a 3D rotary embedding.

    Args:
        x: ``(batch, seq, heads, head_dim)``, any strides with the last one 1
            (a ``(B, H, S, D)`` tensor's ``.transpose(1, 2)`` view works without
            a copy). ``seq == text_len + T*H*W``.
        rope: a :class:`RoPE3D`, or a diffusers ``(cos, sin)`` pair of shape
            ``(T*H*W, head_dim)`` (interleaved pairs), float32 or x's dtype.
        text_len: the first ``text_len`` tokens (the text prefix) are untouched.
        inplace: rotate ``x`` in place and return it.

    Returns:
        The rotated tensor (``x`` itself when ``inplace``), differentiable with
        respect to ``x``; the backward is the inverse rotation.
    """
    # Python types and devices only: every value is checked by the op (rope3d_op.h).
    check_tensor("x", x)
    require_cuda_kernels("cogkern.apply_rope3d", x)
    check_int("text_len", text_len)
    check_bool("inplace", inplace)
    if isinstance(rope, RoPE3D):
        check_rope3d_fits(rope, x, "x")
        args = (rope.positions_for(x), list(rope.grid), list(rope.axes_dims), rope.theta, rope.interleaved, text_len)
        if not inplace:
            return _ops.rope3d(x, *args, False)
        if torch.is_grad_enabled() and x.requires_grad:
            return _Rope3DInplace.apply(x, *args)
        _ops.rope3d_(x, *args, False)
        return x

    cos, sin = rope_table_pair(rope)
    for t in (cos, sin):
        require_cuda_kernels("cogkern.apply_rope3d", t)
    if not inplace:
        return _ops.rope_table(x, cos, sin, text_len, False)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeTableInplace.apply(x, cos, sin, text_len)
    _ops.rope_table_(x, cos, sin, text_len, False)
    return x


def _rotate_half_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x_{2j}, x_{2j+1}) -> (-x_{2j+1}, x_{2j}): what diffusers' interleaved tables multiply by sin."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def rotate_composite(x: torch.Tensor, rope, text_len: int, inverse: bool = False) -> torch.Tensor:
    """apply_rope3d as plain PyTorch ops, differentiable by autograd: the path the first-use guard
    (_guard.py) takes when the RoPE kernel failed its check. Rotates the video tokens of x
    ``(batch, seq, heads, head_dim)`` (those after text_len) by a RoPE3D or a diffusers ``(cos, sin)``
    table; math in fp32 (float64 for float64 x), cast back."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    video = x[:, text_len:].to(acc)
    sign = -1.0 if inverse else 1.0
    if isinstance(rope, RoPE3D):
        angle, first, second = rope.pair_angles()
        first, second = first.to(x.device), second.to(x.device)
        angle = angle.to(device=x.device)[None, :, None, :]
        cos, sin = angle.cos().to(acc), (sign * angle.sin()).to(acc)
        x0, x1 = video[..., first], video[..., second]
        rotated = video.clone()
        rotated[..., first] = x0 * cos - x1 * sin
        rotated[..., second] = x1 * cos + x0 * sin
    else:
        cos, sin = (t.to(device=x.device, dtype=acc)[None, :, None, :] for t in rope)
        rotated = video * cos + _rotate_half_pairs(video) * (sign * sin)
    return torch.cat((x[:, :text_len], rotated.to(x.dtype)), dim=1)


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------
# Autograd and fake (meta) kernels for the functional ops. The backward of a
# rotation is its inverse; of a table mix, its transpose.
# ----------------------------------------------------------------------------


# Arguments by the schemas' own names (rope3d_op.cpp), as the attention glue does,
# so a moved or added argument cannot shift the others. The tensors that are not
# x are saved for the backward; the rest is kept on ctx.
_ROPE3D_ARGS = op_argument_names(_ops.rope3d)
_ROPE_TABLE_ARGS = op_argument_names(_ops.rope_table)
_ROPE3D_TENSORS = ("positions",)
_ROPE_TABLE_TENSORS = ("cos", "sin")


def _setup_by_name(ctx, names, tensors, inputs):
    args = dict(zip(names, inputs))
    ctx.save_for_backward(*(args[n] for n in tensors))
    ctx.others = {n: v for n, v in args.items() if n != "x" and n not in tensors}


def _backward_by_name(ctx, op, names, tensors, grad, flip):
    """op on grad with the forward's arguments, `flip` (inverse / transpose) negated: dL/dx alone."""
    args = dict(ctx.others, **dict(zip(tensors, ctx.saved_tensors)))
    args[flip] = not args[flip]
    args["x"] = _contiguous_last(grad)
    gx = op(*(args[n] for n in names))
    return tuple(gx if n == "x" else None for n in names)


def _rope3d_setup(ctx, inputs, output):
    _setup_by_name(ctx, _ROPE3D_ARGS, _ROPE3D_TENSORS, inputs)


def _rope3d_backward(ctx, grad):
    return _backward_by_name(ctx, _ops.rope3d, _ROPE3D_ARGS, _ROPE3D_TENSORS, grad, "inverse")


def _rope_table_setup(ctx, inputs, output):
    _setup_by_name(ctx, _ROPE_TABLE_ARGS, _ROPE_TABLE_TENSORS, inputs)


def _rope_table_backward(ctx, grad):
    return _backward_by_name(ctx, _ops.rope_table, _ROPE_TABLE_ARGS, _ROPE_TABLE_TENSORS, grad, "transpose")


torch.library.register_autograd("cogkern::rope3d", _rope3d_backward, setup_context=_rope3d_setup)
torch.library.register_autograd("cogkern::rope_table", _rope_table_backward, setup_context=_rope_table_setup)


@torch.library.register_fake("cogkern::rope3d")
def _rope3d_fake(x, positions, grid, axes, theta, interleaved, text_len, inverse):
    return torch.empty_like(x)


@torch.library.register_fake("cogkern::rope3d_")
def _rope3d_inplace_fake(x, positions, grid, axes, theta, interleaved, text_len, inverse):
    return None


@torch.library.register_fake("cogkern::rope_table")
def _rope_table_fake(x, cos, sin, text_len, transpose):
    return torch.empty_like(x)


@torch.library.register_fake("cogkern::rope_table_")
def _rope_table_inplace_fake(x, cos, sin, text_len, transpose):
    return None


class _Rope3DInplace(torch.autograd.Function):
    """In-place rotation of a tensor that requires grad (mutating ops cannot use register_autograd)."""

    @staticmethod
    def forward(ctx, x, positions, grid, axes, theta, interleaved, text_len):
        _ops.rope3d_(x, positions, grid, axes, theta, interleaved, text_len, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions)
        ctx.args = (grid, axes, theta, interleaved, text_len)
        return x

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        gx = _ops.rope3d(_contiguous_last(grad), positions, *ctx.args, True)
        return gx, None, None, None, None, None, None


class _RopeTableInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, text_len):
        _ops.rope_table_(x, cos, sin, text_len, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.text_len = text_len
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _ops.rope_table(_contiguous_last(grad), cos, sin, ctx.text_len, True), None, None, None
