"""Context parallelism for the fused attention: Ulysses (DeepSpeed-Ulysses) sequence parallelism.

Each rank of a process group holds a contiguous slice of the joint [text; video]
sequence, in rank order. ``ulysses_attention`` exchanges q, k and v with one
all-to-all so that each rank holds the whole sequence for ``heads / world`` of the
heads, runs :func:`cogkern.fused_attention` there (QK-norm, 3D RoPE at the global
positions, attention), and exchanges the output back to sequence slices with a
second all-to-all. Works with any torch.distributed backend that has
``all_to_all_single`` with split sizes (gloo on the CPU, nccl on CUDA).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._checks import check_tensor
from ._checks import is_int as _is_int
from .attention import fused_attention

# The keywords ulysses_attention passes through: exactly fused_attention's (one source of truth).
_FUSED_ATTENTION_KWARGS = frozenset(
    name for name, p in inspect.signature(fused_attention).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    seq_lens: Optional[Sequence[int]] = None,
    **kwargs,
):
    """:func:`cogkern.fused_attention` over a sequence split across the ranks of ``group``.

    Args:
        q, k, v: this rank's slice of the joint sequence, ``(batch, local_seq,
            heads, head_dim)``, any strides with the last one 1. The slices of
            ranks 0, 1, ... concatenated are the full sequence [text; video]; they
            may differ in length (``local_seq`` may be 0). batch, heads and
            head_dim are the same on every rank, and heads is divisible by the
            group size.
        group: the process group; None: the default (world) group. A group of
            size 1 runs plain ``fused_attention``.
        seq_lens: the ``local_seq`` of every rank, in rank order. None: gathered
            with one small all_gather, which is a host sync (the lengths are
            needed on the host for the split sizes); pass them to avoid it, e.g.
            when they are fixed for a run. Nothing is cached between calls.
        **kwargs: exactly :func:`cogkern.fused_attention`'s (rope, text_len,
            qk_norm, the norm parameters, norm_eps, scale, causal, return_lse),
            meant for the FULL sequence: ``text_len`` is the global text length
            and ``rope`` covers the ``sum(seq_lens) - text_len`` video tokens.

    Returns:
        ``out``, this rank's slice of the attention output, ``(batch, local_seq,
        heads, head_dim)``, contiguous; with ``return_lse``, ``(out, lse)`` where
        ``lse`` is ``(batch, heads, local_seq)``: fused_attention's layout, so
        the ranks' lse concatenated along the last dim is the full sequence's.

    Gradients flow to q, k, v (this rank's slice of the full gradient) and to the
    norm parameters. The norm parameters are replicated on every rank and each
    rank's gradient of them is its share (from its heads, over the whole
    sequence): summed over the group it is the full-sequence gradient. That is
    the convention of every other replicated parameter under context parallelism
    (the q/k/v/out projections see only the rank's tokens), so a gradient
    all-reduce over the group (DDP, FSDP over a mesh that includes the group, or
    one ``all_reduce``) makes them all right at once; nothing is summed here, which
    would count the norm parameters twice there.

    Every rank of the group must call it with the same keyword arguments, and run
    the backward, as for any collective.

    Raises:
        TypeError: a keyword fused_attention does not take.
        ValueError: q, k, v not alike; heads not divisible by the group size; bad
            ``seq_lens``; q shapes that differ across ranks (seen when seq_lens is
            gathered) -- all before the q, k, v exchange. The values of kwargs are
            checked by fused_attention on the gathered sequence, on every rank alike.
        RuntimeError: torch.distributed is not initialized.
    """
    unknown = sorted(set(kwargs) - _FUSED_ATTENTION_KWARGS)
    if unknown:
        raise TypeError(f"ulysses_attention got keyword(s) fused_attention does not take: {', '.join(unknown)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, local_seq, heads, head_dim), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} must have q's shape, dtype and device: q is {tuple(q.shape)} {q.dtype} on {q.device}, "
                f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed: call init_process_group first")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if seq_lens is not None:
        seq_lens = _checked_seq_lens(seq_lens, world, rank, q.shape[1])
    if world == 1:
        return fused_attention(q, k, v, **kwargs)
    batch, local_seq, heads, head_dim = q.shape
    _check_heads(heads, world)
    if seq_lens is None:
        seq_lens = _gathered_seq_lens(q, world, group)

    local_heads = heads // world
    # Sequence slices -> head slices. The send buffer is (world, local_seq, 3, batch, local_heads, head_dim):
    # block j (head group j) goes to rank j, and what arrives is concatenated by source rank along dim 0,
    # which is the full sequence in order. One collective for q, k and v together.
    send = torch.stack(
        [t.view(batch, local_seq, world, local_heads, head_dim).permute(2, 1, 0, 3, 4) for t in (q, k, v)], dim=2
    ).flatten(0, 1)
    (received,) = _AllToAll.apply(list(seq_lens), [local_seq] * world, group, send)
    # (seq, 3, batch, local_heads, head_dim) -> (batch, seq, local_heads, head_dim) views: fused_attention
    # takes any strides with the last one 1, so no copy.
    q_heads, k_heads, v_heads = (received[:, i].transpose(0, 1) for i in range(3))
    result = fused_attention(q_heads, k_heads, v_heads, **kwargs)
    out, lse = result if kwargs.get("return_lse", False) else (result, None)

    # Head slices -> sequence slices: each rank sends seq_lens[j] tokens of its heads to rank j, and
    # receives (world, local_seq, ...) blocks, block i holding head group i.
    to_send = [out.transpose(0, 1)]  # (seq, batch, local_heads, head_dim)
    if lse is not None:
        to_send.append(lse.permute(2, 0, 1))  # (seq, batch, local_heads)
    back = _AllToAll.apply([local_seq] * world, list(seq_lens), group, *to_send)
    # (A reshape can return a non-contiguous view here, e.g. for batch 1 and one local head.)
    out = back[0].view(world, local_seq, batch, local_heads, head_dim).permute(2, 1, 0, 3, 4).contiguous()
    out = out.view(batch, local_seq, heads, head_dim)
    if lse is None:
        return out
    lse = back[1].view(world, local_seq, batch, local_heads).permute(2, 0, 3, 1).contiguous()
    return out, lse.view(batch, heads, local_seq)


def _checked_seq_lens(seq_lens, world: int, rank: int, local_seq: int) -> tuple[int, ...]:
    if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Sequence):
        raise ValueError(f"seq_lens must be a sequence of ints, one per rank, got {type(seq_lens).__name__}")
    if len(seq_lens) != world:
        raise ValueError(f"seq_lens has {len(seq_lens)} entries but the group has {world} ranks: one per rank")
    if not all(_is_int(n) and n >= 0 for n in seq_lens):
        raise ValueError(f"seq_lens must be non-negative ints, got {list(seq_lens)}")
    if seq_lens[rank] != local_seq:
        raise ValueError(
            f"seq_lens[{rank}]={seq_lens[rank]} does not match this rank's q, which has local_seq={local_seq} "
            f"(seq_lens={list(seq_lens)})"
        )
    return tuple(int(n) for n in seq_lens)


def _gathered_seq_lens(q: torch.Tensor, world: int, group) -> tuple[int, ...]:
    """Every rank's local_seq, from one all_gather of the q shapes (a host sync). The other sizes come
    along so that a mismatch raises the same ValueError on every rank instead of a hang or garbage."""
    shape = torch.tensor(q.shape, dtype=torch.int64, device=q.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len({(b, h, d) for b, _, h, d in shapes}) > 1:
        listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
        raise ValueError(f"q's batch, heads and head_dim differ across the group ({listed})")
    return tuple(s[1] for s in shapes)


def _exchange(x: torch.Tensor, output_splits: list, input_splits: list, group) -> torch.Tensor:
    """all_to_all_single along dim 0: input_splits[j] rows go to rank j, output_splits[i] rows come from rank i."""
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """_exchange of each tensor; the backward is the reverse exchange. One node for all the tensors, so
    that its backward's collectives run on every rank once any of the outputs gets a gradient (an unused
    output gets zeros), not on some ranks only."""

    @staticmethod
    def forward(ctx, output_splits, input_splits, group, *tensors):
        ctx.exchange = (output_splits, input_splits, group)
        return tuple(_exchange(t, output_splits, input_splits, group) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        output_splits, input_splits, group = ctx.exchange
        return (None, None, None, *(_exchange(g, input_splits, output_splits, group) for g in grads))


class SharedGroup:
    """A ProcessGroup held by a module. A process group cannot be copied or pickled, and copies of
    the module (copy.deepcopy, as EMA and torch.optim.swa_utils.AveragedModel make them) run in the
    same processes, so they share it."""

    __slots__ = ("group",)

    def __init__(self, group: "dist.ProcessGroup") -> None:
        self.group = group

    def __deepcopy__(self, memo):
        return self


def check_group(group, heads: int) -> None:
    """For a module built with ``group``: a ProcessGroup whose size divides heads."""
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")
    _check_heads(heads, dist.get_world_size(group))


def _check_heads(heads: int, world: int) -> None:
    if heads % world:
        raise ValueError(f"heads={heads} is not divisible by the group size {world}: Ulysses splits the heads")


__all__ = ["ulysses_attention"]
