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
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._checks import check_tensor
from ._checks import is_int as _is_int
from ._composite import _norm as _composite_norm
from .attention import fused_attention
from .rope import RoPE3D, rotate_composite

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
            gathered); a bad keyword value (checked by fused_attention for the full
            sequence) -- all before the q, k, v exchange.
        RuntimeError: torch.distributed is not initialized.
    """
    world, rank, seq_lens = _checked_call("ulysses_attention", q, k, v, group, seq_lens, kwargs)
    if world == 1:
        return fused_attention(q, k, v, **kwargs)
    batch, local_seq, heads, head_dim = q.shape
    _check_heads(heads, world)
    if seq_lens is None:
        seq_lens = _gathered_seq_lens(q, world, group)
    local_heads = heads // world
    _check_kwargs(q, sum(seq_lens), local_heads, kwargs)

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


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    seq_lens: Optional[Sequence[int]] = None,
    **kwargs,
):
    """:func:`cogkern.fused_attention` over a sequence split across the ranks of ``group``, for
    any number of heads (``ulysses_attention`` needs heads divisible by the group size).

    Same arguments, results, gradient convention and errors as :func:`ulysses_attention`
    (except the heads rule), and a RoPE3D must be interleaved (CogVideoX's; a half-split one
    raises ValueError). Each rank normalizes and rotates its own q and k at their global
    positions; then k and v go round the ring (``world - 1`` send/recv steps, each a host-side
    wait: no overlap with the compute), each step attends this rank's queries to one rank's
    keys with ``fused_attention``, and the partial results are merged by their log-sum-exp.
    With ``causal``, the chunks of later ranks are passed on but not attended to. It moves
    ``world - 1`` times this rank's k and v, forward and backward, against Ulysses' two
    all-to-alls; use Ulysses where the heads allow it.
    """
    world, rank, seq_lens = _checked_call("ring_attention", q, k, v, group, seq_lens, kwargs)
    if world == 1:
        return fused_attention(q, k, v, **kwargs)
    if seq_lens is None:
        seq_lens = _gathered_seq_lens(q, world, group)
    _check_kwargs(q, sum(seq_lens), q.shape[2], kwargs)
    args = inspect.signature(fused_attention).bind(q, k, v, **kwargs)
    args.apply_defaults()
    a = args.arguments
    scale = 1.0 / math.sqrt(q.shape[-1]) if a["scale"] is None else float(a["scale"])
    start = sum(seq_lens[:rank])

    # The norms and the rotation here, on this rank's tokens only, so each ring step is plain attention.
    q = _composite_norm(q, a["qk_norm"], a["q_norm_weight"], a["q_norm_bias"], a["norm_eps"])
    k = _composite_norm(k, a["qk_norm"], a["k_norm_weight"], a["k_norm_bias"], a["norm_eps"])
    if a["rope"] is not None:
        q, k = (_rotate_slice(t, a["rope"], a["text_len"], start) for t in (q, k))
    kv = torch.stack((k, v))
    partial = []  # (out, lse) of this rank's queries against one rank's keys
    for step in range(world):
        source = (rank - step) % world  # whose k and v this rank holds now
        if step:
            kv = _RingShift.apply(kv, group, world, seq_lens[source])
        if (a["causal"] and source > rank) or seq_lens[source] == 0 or q.shape[1] == 0:
            continue
        partial.append(_attend(q, kv[0], kv[1], scale, causal=a["causal"] and source == rank))
    out, lse = _merge(partial, q)
    # Every rank runs the whole ring's backward, also where a causal mask or an empty slice left the
    # last chunks unused: a rank that skipped its part would leave its neighbours waiting.
    out, lse = _DependOn.apply(kv, out, lse)
    return (out, lse) if a["return_lse"] else out


def _check_kwargs(q: torch.Tensor, total_seq: int, heads: int, kwargs: dict) -> None:
    """Every keyword value, checked by fused_attention itself (the C++ op's checks) on an empty batch
    of the full sequence's shape: no compute, and no communication spent before a bad argument."""
    empty = q.new_empty((0, total_seq, heads, q.shape[-1]))
    with torch.no_grad():
        fused_attention(empty, empty, empty, **kwargs)


def _rotate_slice(x: torch.Tensor, rope, text_len: int, start: int) -> torch.Tensor:
    """x holds the tokens [start, start + local_seq) of the full sequence: rotated at their global
    positions by rope, which covers the full sequence's video tokens."""
    local_text = min(max(text_len - start, 0), x.shape[1])
    first_video = max(start - text_len, 0)  # this slice's first video token, counted among all video tokens
    rows = slice(first_video, first_video + x.shape[1] - local_text)
    if isinstance(rope, RoPE3D):
        if not rope.interleaved:
            raise ValueError("ring_attention takes an interleaved RoPE3D (CogVideoX's) or a (cos, sin) table; "
                             "ulysses_attention takes a half-split one too")
        rope = rope.cos_sin(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    cos, sin = rope
    return rotate_composite(x, (cos[rows], sin[rows]), local_text)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """(out, lse) of q's rows against k and v, which may be of another length: fused_attention takes
    one length for all three, so q goes in pieces of k's length, the last one zero-padded (query
    rows do not interact, and the padding rows are dropped)."""
    keys = k.shape[1]
    outs, lses = [], []
    for lo in range(0, q.shape[1], keys):
        piece = q[:, lo : lo + keys]
        rows = piece.shape[1]
        piece = torch.nn.functional.pad(piece, (0, 0, 0, 0, 0, keys - rows))
        out, lse = fused_attention(piece, k, v, scale=scale, causal=causal, return_lse=True)
        outs.append(out[:, :rows])
        lses.append(lse[..., :rows])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _merge(partial: list, q: torch.Tensor):
    """The attention over all keys from its parts over key chunks: weights exp(lse_part - lse)."""
    batch, local_seq, heads, head_dim = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if not partial:  # no queries on this rank: empty results, still connected to q (an empty gradient)
        return q.clone(), q.new_zeros((batch, heads, local_seq), dtype=acc)
    lses = torch.stack([lse for _, lse in partial])  # (parts, batch, heads, local_seq)
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse).permute(0, 1, 3, 2)[..., None]  # (parts, batch, local_seq, heads, 1)
    out = sum(part.to(acc) * w for (part, _), w in zip(partial, weights))
    return out.to(q.dtype).contiguous(), lse.contiguous()


class _RingShift(torch.autograd.Function):
    """Sends x to the next rank and receives the previous rank's (``received_len`` tokens along
    dim 2 of the stacked (2, batch, seq, heads, head_dim) k and v); the backward sends the
    gradient the other way round."""

    @staticmethod
    def forward(ctx, x, group, world, received_len):
        ctx.ring = (group, world, x.shape)
        shape = (*x.shape[:2], received_len, *x.shape[3:])
        return _send_recv(x.contiguous(), x.new_empty(shape), group, world, forward=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        group, world, shape = ctx.ring
        return _send_recv(grad.contiguous(), grad.new_empty(shape), group, world, forward=False), None, None, None


def _send_recv(send: torch.Tensor, receive: torch.Tensor, group, world: int, forward: bool) -> torch.Tensor:
    rank = dist.get_rank(group)
    to, source = ((rank + 1) % world, (rank - 1) % world) if forward else ((rank - 1) % world, (rank + 1) % world)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=to),
           dist.P2POp(dist.irecv, receive, group=group, group_peer=source)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return receive


class _DependOn(torch.autograd.Function):
    """Returns outputs unchanged, with ``anchor`` among their inputs (zero gradient): the
    backward then reaches every node that made anchor."""

    @staticmethod
    def forward(ctx, anchor, *outputs):
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        shape, dtype, device = ctx.anchor
        return (torch.zeros(shape, dtype=dtype, device=device), *grads)


def _checked_call(function: str, q, k, v, group, seq_lens, kwargs) -> tuple[int, int, Optional[tuple[int, ...]]]:
    """What needs no communication: (group size, this rank in it, checked seq_lens or None)."""
    unknown = sorted(set(kwargs) - _FUSED_ATTENTION_KWARGS)
    if unknown:
        raise TypeError(f"{function} got keyword(s) fused_attention does not take: {', '.join(unknown)}")
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
        raise RuntimeError(f"{function} needs torch.distributed: call init_process_group first")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if seq_lens is not None:
        seq_lens = _checked_seq_lens(seq_lens, world, rank, q.shape[1])
    return world, rank, seq_lens


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


__all__ = ["ring_attention", "ulysses_attention"]
