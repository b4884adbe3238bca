"""Fused CogVideoX attention: per-head QK-norm, 3D RoPE on the video tokens and
softmax attention in one op (torch.ops.cogkern.fused_attention_fwd / _bwd).

``fused_attention`` is the functional form; ``FusedAttention`` the module, with
the parameter names of diffusers' ``Attention`` as CogVideoX builds it, so a
CogVideoX attention state dict loads one to one.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from . import _composite, _guard
from ._extension import _C, op_argument_names, require_cuda_kernels  # (importing it loads the ops)
from ._checks import check_bool, check_int, check_number, check_optional_tensor, check_tensor
from ._checks import is_int as _is_int
from .rope import RoPE3D, RopeTable, check_rope3d_fits, rope_table_pair

_ops = torch.ops.cogkern

_NORMS = (None, "layer_norm", "rms_norm")

# What the CUDA kernels are built for, from the one list in csrc/common/dispatch.h
# (tests and benchmarks parametrize over these; other dtypes and head dims run on the CPU).
CUDA_HEAD_DIMS: tuple[int, ...] = tuple(_C.cuda_attention_head_dims())
CUDA_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in _C.cuda_dtypes())


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: Union[RoPE3D, RopeTable, None] = None,
    text_len: int = 0,
    qk_norm: Optional[str] = None,
    q_norm_weight: Optional[torch.Tensor] = None,
    q_norm_bias: Optional[torch.Tensor] = None,
    k_norm_weight: Optional[torch.Tensor] = None,
    k_norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
    scale: Optional[float] = None,
    causal: bool = False,
    return_lse: bool = False,
):
    """Attention with CogVideoX's QK-norm and 3D RoPE fused in.

    Per head, ``q`` and ``k`` of every token are normalized over head_dim
    (``qk_norm``), the video tokens after ``text_len`` are rotated by ``rope``,
    and then ``softmax(q k^T * scale) v`` is taken (non-causal unless ``causal``).

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``, same shape, dtype and device;
            any strides with the last one 1 (the ``.transpose(1, 2)`` view of a
            diffusers-style ``(batch, heads, seq, head_dim)`` tensor works
            without a copy).
        rope: a :class:`RoPE3D` over the ``seq - text_len`` video tokens, or a
            diffusers ``(cos, sin)`` pair of shape ``(seq - text_len, head_dim)``;
            None: no rotation.
        text_len: the first ``text_len`` tokens (the text prefix) are not rotated.
        qk_norm: None, ``"layer_norm"`` or ``"rms_norm"``.
        q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias: optional
            ``(head_dim,)`` affine parameters of the norms (absent: 1 and 0).
        norm_eps: the norms' epsilon.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.
        causal: mask key j > query i.
        return_lse: also return the log-sum-exp of each row's scaled scores,
            ``(batch, heads, seq)``, float32 (float64 for float64 inputs).

    Returns:
        ``out`` of shape ``(batch, seq, heads, head_dim)`` in q's dtype
        (contiguous), or ``(out, lse)``. Differentiable (once) with respect to
        q, k, v and the norm parameters, also through lse; not with respect to
        the RoPE tables or positions.

    Raises:
        ValueError: a bad argument (shape, dtype, device, strides, norm
            parameters, a RoPE that does not fit ``seq - text_len``), before
            any kernel runs.
        NotImplementedError: CUDA tensors in a build without CUDA kernels.
    """
    # Python types and devices only: every value is checked by the op (attention_op.h).
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_int("text_len", text_len)
    if qk_norm is not None and not isinstance(qk_norm, str):
        raise ValueError(f"qk_norm must be None, 'layer_norm' or 'rms_norm', got {qk_norm!r}")
    norm_params = (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    for name, t in zip(("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"), norm_params):
        check_optional_tensor(name, t)
    check_number("norm_eps", norm_eps)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    else:
        check_number("scale", scale)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    rope_args = _rope_args(rope, q)
    for t in (q, k, v, *norm_params, *rope_args):
        if torch.is_tensor(t):
            require_cuda_kernels("cogkern.fused_attention", t)

    # First use of this configuration in the process: checked (cogkern._guard); a config whose
    # kernels all failed goes to the composite path.
    if _guard.route("attention", (q.dtype, q.shape[-1]), q.device) == _guard.COMPOSITE:
        return _composite.attention(
            q, k, v, rope=rope, text_len=text_len, qk_norm=qk_norm, q_norm_weight=q_norm_weight,
            q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight, k_norm_bias=k_norm_bias,
            norm_eps=float(norm_eps), scale=float(scale), causal=causal, return_lse=return_lse,
        )  # fmt: skip
    out, lse = _ops.fused_attention_fwd(
        q,
        k,
        v,
        qk_norm or "none",
        *norm_params,
        float(norm_eps),
        *rope_args,
        text_len,
        float(scale),
        causal,
    )
    return (out, lse) if return_lse else out


_FORWARD_KERNELS = {0: "mma.sync", 1: "wgmma", 2: "wgmma-pipelined", 3: "wgmma-ws", 4: "wgmma-ws-pingpong"}
_BACKWARD_KERNELS = {0: "mma.sync", 1: "wgmma-2wg", 2: "wgmma-1wg", 3: "wgmma-ws"}


def attention_kernels(q: torch.Tensor) -> dict[str, str]:
    """Which kernels :func:`fused_attention` runs for ``q``'s device, dtype and head dim:
    ``{"forward": ..., "backward": ...}``.

    On the CPU both are ``"cpu"``. On a GPU: ``"mma.sync"`` (the default), or, where
    ``COGKERN_ATTENTION_SM90`` / ``COGKERN_ATTENTION_SM90_BWD`` opt in and the GPU (compute
    capability 9.0) and the build (``9.0a`` in ``TORCH_CUDA_ARCH_LIST``) allow it, a Hopper
    ``wgmma`` kernel: ``"wgmma"`` / ``"wgmma-pipelined"`` / ``"wgmma-ws"`` /
    ``"wgmma-ws-pingpong"`` forward (``COGKERN_ATTENTION_SM90=1|2|3|4``; ``ws``: warp-specialized,
    TMA loads; ``pingpong``: its two math warpgroups take turns on the tensor cores), ``"wgmma-2wg"`` /
    ``"wgmma-1wg"`` / ``"wgmma-ws"`` backward (``COGKERN_ATTENTION_SM90_BWD=1|2|3``: two or one
    warpgroups per block, or warp-specialized with TMA loads). Use it to confirm that an
    opt-in took effect: elsewhere the switches are ignored without a word. ``"composite"``: the
    first-use check (cogkern._guard) failed every kernel of this configuration, and eager PyTorch
    (norm, RoPE, SDPA) runs it instead.
    """
    if not torch.is_tensor(q) or q.dim() != 4:
        raise ValueError("q must be a (batch, seq, heads, head_dim) tensor")
    if _guard.verdict("attention", (q.dtype, q.shape[-1]), q.device) == _guard.COMPOSITE:
        return {"forward": "composite", "backward": "composite"}
    if q.device.type == "cpu":
        return {"forward": "cpu", "backward": "cpu"}
    require_cuda_kernels("cogkern.attention_kernels", q)  # dtype and head_dim: checked by the op
    forward, backward = _ops._attention_cuda_kernels(q)
    return {"forward": _FORWARD_KERNELS[forward], "backward": _BACKWARD_KERNELS[backward]}


def _rope_args(rope, q: torch.Tensor) -> tuple:
    """(rope_positions, rope_grid, rope_axes_dims, rope_theta, rope_interleaved, rope_cos, rope_sin) for the op."""
    if rope is None:
        return None, [], [], 10000.0, True, None, None
    if isinstance(rope, RoPE3D):
        check_rope3d_fits(rope, q, "q")
        return rope.positions_for(q), list(rope.grid), list(rope.axes_dims), rope.theta, rope.interleaved, None, None
    cos, sin = rope_table_pair(rope)
    return None, [], [], 10000.0, True, cos, sin


# ----------------------------------------------------------------------------
# Autograd and fake (meta) kernels.
# ----------------------------------------------------------------------------

# The glue names every argument by the schema's own argument names, so adding
# or moving an argument in attention_op.cpp cannot silently shift the others.
_FWD_SCHEMA = _ops.fused_attention_fwd.default._schema
_BWD_SCHEMA = _ops.fused_attention_bwd.default._schema
_FWD_ARGS = op_argument_names(_ops.fused_attention_fwd)
_BWD_ARGS = op_argument_names(_ops.fused_attention_bwd)
# The forward's tensor arguments (saved for the backward) and the rest (kept on ctx).
_FWD_TENSORS = tuple(
    a.name for a in _FWD_SCHEMA.arguments if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())
)
_FWD_OTHERS = tuple(n for n in _FWD_ARGS if n not in _FWD_TENSORS)
# What the backward takes that is not a forward argument: grad_out, grad_lse and the forward's outputs.
_FWD_OUTPUTS = tuple(r.name for r in _FWD_SCHEMA.returns)  # ("out", "lse")
if set(_BWD_ARGS) != set(_FWD_ARGS) | set(_FWD_OUTPUTS) | {"grad_out", "grad_lse"}:
    raise ImportError(f"cogkern: fused_attention_bwd's arguments {_BWD_ARGS} do not match the forward's")
# fused_attention_bwd returns grad_<name> for the forward inputs that carry gradients.
_BWD_RETURNS = tuple(r.name for r in _BWD_SCHEMA.returns)
if not all(r.startswith("grad_") and r[len("grad_"):] in _FWD_TENSORS for r in _BWD_RETURNS):
    raise ImportError(f"cogkern: fused_attention_bwd's returns {_BWD_RETURNS} are not grad_<forward tensor>")


def _bind(names: tuple, args: tuple, kwargs: dict) -> dict:
    """The arguments of one op call by name."""
    if len(args) > len(names):
        raise TypeError(f"expected at most {len(names)} arguments, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _setup_context(ctx, inputs, output):
    args = _bind(_FWD_ARGS, inputs, {})
    out, lse = output
    ctx.save_for_backward(out, lse, *(args[n] for n in _FWD_TENSORS))
    ctx.others = {n: args[n] for n in _FWD_OTHERS}


def _backward(ctx, grad_out, grad_lse):
    out, lse, *tensors = ctx.saved_tensors
    args = dict(zip(_FWD_TENSORS, tensors), **ctx.others)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    args.update(grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)
    grads = dict(zip(_BWD_RETURNS, _ops.fused_attention_bwd(*(args[n] for n in _BWD_ARGS))))
    # An absent norm parameter (None) gets no gradient (the op returns an empty tensor for it).
    return tuple(
        grads.get("grad_" + n) if args.get(n) is not None else None for n in _FWD_ARGS
    )


torch.library.register_autograd("cogkern::fused_attention_fwd", _backward, setup_context=_setup_context)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("cogkern::fused_attention_fwd")
def _fwd_fake(*args, **kwargs):
    q = _bind(_FWD_ARGS, args, kwargs)["q"]
    batch, seq, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seq), dtype=_math_dtype(q.dtype))


@torch.library.register_fake("cogkern::fused_attention_bwd")
def _bwd_fake(*args, **kwargs):
    a = _bind(_BWD_ARGS, args, kwargs)
    q = a["q"]

    def grad_of(name):
        p = a[name]
        return q.new_empty((0,)) if p is None else p.new_empty(p.shape)

    return tuple(grad_of(r[len("grad_"):]) for r in _BWD_RETURNS)


# ----------------------------------------------------------------------------
# The module.
# ----------------------------------------------------------------------------


class FusedAttention(nn.Module):
    """CogVideoX's self-attention over the joint [text; video] sequence, fused.

    Parameters are named as in diffusers' ``Attention`` built the CogVideoX way
    (``to_q``, ``to_k``, ``to_v``, ``norm_q``, ``norm_k``, ``to_out.0``), so
    ``load_state_dict`` takes a CogVideoX block's ``attn1`` weights unchanged.

    Args:
        dim: model width (input and output features).
        heads: number of heads.
        head_dim: per-head width; default ``dim // heads``.
        qk_norm: ``"layer_norm"`` (CogVideoX), ``"rms_norm"`` or None.
        bias: bias in to_q, to_k, to_v.
        out_bias: bias in the output projection.
        eps: the QK-norm epsilon.
        group: None (one process, the whole sequence), or a torch.distributed
            ProcessGroup (e.g. ``torch.distributed.group.WORLD``) over which the
            sequence is split: ``forward`` then runs
            :func:`cogkern.parallel.ulysses_attention`, ``hidden_states`` is this
            rank's contiguous slice of [text; video] (ranks in order) and
            ``text_len`` and ``rope`` are the full sequence's. ``heads`` must be
            divisible by the group size. The parameters' gradients are then this
            rank's share: all-reduce them over the group (as DDP or FSDP over the
            group does) for the full-sequence gradient. Copies of the module
            (``copy.deepcopy``) share the group; ``module.group = ...`` sets it
            later.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: Optional[int] = None,
        qk_norm: Optional[str] = "layer_norm",
        bias: bool = True,
        out_bias: bool = True,
        eps: float = 1e-6,
        group=None,
    ) -> None:
        super().__init__()
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not _is_int(heads) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim={dim} is not divisible by heads={heads}; pass head_dim")
            head_dim = dim // heads
        if not _is_int(head_dim) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if qk_norm not in _NORMS:
            raise ValueError(f"qk_norm must be None, 'layer_norm' or 'rms_norm', got {qk_norm!r}")
        self.heads = heads
        self.head_dim = head_dim
        self.qk_norm = qk_norm
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        if qk_norm == "layer_norm":
            self.norm_q = nn.LayerNorm(head_dim, eps=eps)
            self.norm_k = nn.LayerNorm(head_dim, eps=eps)
        elif qk_norm == "rms_norm":
            self.norm_q = nn.RMSNorm(head_dim, eps=eps)
            self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        else:
            self.norm_q = None
            self.norm_k = None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(0.0)])
        self.group = group

    @property
    def group(self):
        """The process group the sequence is split over, or None. Settable, e.g. on a model built
        before ``init_process_group``; heads must be divisible by its size."""
        return None if self._group is None else self._group.group

    @group.setter
    def group(self, group) -> None:
        self._group = None
        if group is not None:
            from .parallel import SharedGroup, check_group  # (parallel imports this module)

            check_group(group, self.heads)
            self._group = SharedGroup(group)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: Union[RoPE3D, RopeTable, None] = None,
        text_len: int = 0,
        seq_lens=None,
    ) -> torch.Tensor:
        """``hidden_states``: ``(batch, seq, dim)`` = [text; video] tokens (with a group: this rank's
        slice of them); returns the same shape. ``seq_lens`` (with a group only): every rank's
        slice length, to skip ulysses_attention's all_gather of them (a host sync per call)."""
        if not torch.is_tensor(hidden_states) or hidden_states.dim() != 3:
            shape = tuple(hidden_states.shape) if torch.is_tensor(hidden_states) else type(hidden_states).__name__
            raise ValueError(f"hidden_states must be (batch, seq, dim), got {shape}")
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, self.heads, self.head_dim)
        q = self.to_q(hidden_states).view(shape)
        k = self.to_k(hidden_states).view(shape)
        v = self.to_v(hidden_states).view(shape)
        norm_kwargs = {}
        if self.qk_norm is not None:
            norm_kwargs = dict(
                qk_norm=self.qk_norm,
                q_norm_weight=self.norm_q.weight,
                q_norm_bias=getattr(self.norm_q, "bias", None),
                k_norm_weight=self.norm_k.weight,
                k_norm_bias=getattr(self.norm_k, "bias", None),
                norm_eps=_norm_eps(self.norm_q, hidden_states.dtype),
            )
        if self._group is None:
            if seq_lens is not None:
                raise ValueError("seq_lens is for a FusedAttention built with a group; this one has none")
            out = fused_attention(q, k, v, rope=rope, text_len=text_len, **norm_kwargs)
        else:
            from .parallel import ulysses_attention  # (parallel imports this module)

            out = ulysses_attention(
                q, k, v, group=self.group, seq_lens=seq_lens, rope=rope, text_len=text_len, **norm_kwargs
            )
        out = self.to_out[0](out.flatten(2))
        return self.to_out[1](out)


def _norm_eps(norm: nn.Module, dtype: torch.dtype) -> float:
    # nn.RMSNorm's eps=None means the dtype's machine epsilon.
    eps = norm.eps
    return torch.finfo(dtype).eps if eps is None else float(eps)
