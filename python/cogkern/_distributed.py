"""The torch.distributed helpers the loss scaler and the optimizer share (here so
that neither has to import the other): the overflow-flag reduction, and the
DTensor plumbing (FSDP2's ``fully_shard`` params and grads are DTensors; the ops
take their local shards, and the gradient norm is summed over the shards)."""
from __future__ import annotations

import functools

import torch

from . import _extension  # noqa: F401  (loads the ops)

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch built without distributed
    DTensor = Partial = Replicate = Shard = None

_ops = torch.ops.cogkern


def _dist_world() -> bool:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size() > 1


def reduce_found_inf_(flag: torch.Tensor, process_group=None) -> None:
    """MAX-reduces an overflow flag across ranks in place (no-op outside torch.distributed)."""
    if _dist_world():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=process_group)


# ---------------------------------------------------------------- DTensor plumbing
def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself, not a copy: in-place updates
    reach the DTensor); a plain tensor as it is."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():  # with grad mode on, to_local() would go through autograd
        return t.to_local()


def like_param(p: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """local_tensor as a DTensor laid out as the DTensor param p (p's mesh, placements,
    global shape and stride), so that DCP reshards it elementwise; as it is for a plain p."""
    if not is_dtensor(p):
        return local_tensor
    return DTensor.from_local(local_tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def local_state(p: torch.Tensor, value):
    """A loaded state value for param p, as p's local shard where it is param-shaped: a
    DTensor laid out otherwise is redistributed to p's placements, a full plain tensor of
    p's shape is sliced to p's shard (no communication); other values pass as they are."""
    if not torch.is_tensor(value):
        return value
    if not is_dtensor(p):
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh:
            raise ValueError(f"a loaded optimizer state DTensor is on {value.device_mesh}, its param on "
                             f"{p.device_mesh}; load it into the param's mesh (DCP does)")
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return local(value)
    if value.dim() > 0 and tuple(value.shape) == tuple(p.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return value


def check_dtensor_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    """A DTensor param needs a DTensor grad laid out as the param, with no Partial placement."""
    if not is_dtensor(p) and not is_dtensor(g):
        return
    if not (is_dtensor(p) and is_dtensor(g)):
        raise ValueError(f"{where}: a {'DTensor' if is_dtensor(p) else 'plain'} param has a "
                         f"{'DTensor' if is_dtensor(g) else 'plain'} gradient; they must be the same kind")
    if any(isinstance(pl, Partial) for pl in g.placements):
        raise ValueError(f"{where}: a DTensor gradient has a Partial placement {g.placements}; reduce it first "
                         "(FSDP2 reduce-scatters gradients to Shard placements)")
    if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
        raise ValueError(f"{where}: a DTensor gradient is laid out as {g.placements} on {g.device_mesh} but its "
                         f"param as {p.placements} on {p.device_mesh}; they must match")


def _shard_groups(g: torch.Tensor) -> tuple:
    """The process groups a gradient's squared sum is summed over: one per sharded mesh
    dimension (replicated dimensions and plain tensors are counted once)."""
    if not is_dtensor(g):
        return ()
    groups = []
    for dim, placement in enumerate(g.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"a DTensor gradient has a Partial placement {g.placements}; it cannot be clipped or "
                             "checked before it is reduced")
        if isinstance(placement, Shard):
            groups.append(g.device_mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(f"a DTensor gradient has a placement FusedAdamW does not support: {placement}")
    return tuple(groups)


def _same_ranks(group, process_group) -> bool:
    world = torch.distributed.group.WORLD
    return (torch.distributed.get_process_group_ranks(group)
            == torch.distributed.get_process_group_ranks(process_group if process_group is not None else world))


def grad_check_(grads: list[torch.Tensor], scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                max_norm: float, scan: bool, out: torch.Tensor, process_group=None,
                tensor_flags: torch.Tensor | None = None, flag_indices: list[int] | None = None) -> None:
    """``cogkern.amp_grad_check_`` over plain tensors and DTensors, with the overflow flag
    MAX-reduced over process_group (the world by default); writes out = [found_inf,
    inv_scale, clip_coef, grad_norm], the step scalars the update kernel reads.

    With DTensor gradients the norm is global: the local squared sum of the sharded ones is
    summed over their shard group(s) (one all-reduce of a 2-element device tensor that also
    carries the overflow flag, when the shard group is process_group's ranks), the
    replicated ones (plain tensors, Replicate placements) count once, and the clip
    coefficient follows the kernel's rule (adamw_math.h finalize_grad_check). No host sync.
    tensor_flags / flag_indices: the op's per-grad inf/NaN bits (this rank's shards), as the op.
    """
    if not scan or not any(is_dtensor(g) for g in grads):
        _ops.amp_grad_check_([local(g) for g in grads], scale, found_inf, max_norm, scan and bool(grads), False, out,
                             tensor_flags, flag_indices)
        if scan or found_inf is not None:
            reduce_found_inf_(out[0:1], process_group)
        return
    buckets: dict[tuple, tuple[list, list]] = {}  # shard groups -> local grads, their flag indices; () counts once
    for i, g in enumerate(grads):
        local_grads, indices = buckets.setdefault(_shard_groups(g), ([], []))
        local_grads.append(local(g))
        indices.append(i if flag_indices is None else flag_indices[i])
    partial, bucket_flags = {}, []
    for groups, (local_grads, indices) in buckets.items():
        o = torch.empty(4, dtype=torch.float32, device=out.device)
        flags = None if tensor_flags is None else torch.empty_like(tensor_flags)
        _ops.amp_grad_check_(local_grads, scale, found_inf, 0.0, True, False, o, flags,
                             None if flags is None else indices)
        partial[groups] = o
        bucket_flags.append(flags)
    if tensor_flags is not None:  # each bucket's call wrote every entry: the OR is the whole picture
        tensor_flags.copy_(functools.reduce(torch.bitwise_or, bucket_flags))
    found = torch.stack([o[0] for o in partial.values()]).amax()
    sharded = [(groups, o[3] * o[3]) for groups, o in partial.items() if groups]
    if len(sharded) == 1 and len(sharded[0][0]) == 1 and _same_ranks(sharded[0][0][0], process_group):
        # One all-reduce for both: summed flags are nonzero where any rank overflowed.
        packed = torch.stack([sharded[0][1], found])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM, group=sharded[0][0][0])
        sumsqs = [packed[0]]
        found = (packed[1] > 0).to(torch.float32)
    else:
        sumsqs = []
        for groups, sumsq in sharded:
            sumsq = sumsq.reshape(1)
            for group in groups:
                torch.distributed.all_reduce(sumsq, op=torch.distributed.ReduceOp.SUM, group=group)
            sumsqs.append(sumsq[0])
        found = found.reshape(1)
        reduce_found_inf_(found, process_group)
        found = found[0]
    if () in partial:
        sumsqs.append(partial[()][3] * partial[()][3])
    norm = torch.stack(sumsqs).sum().sqrt()
    clip = torch.ones((), dtype=torch.float32, device=out.device)
    if max_norm > 0:  # fp32, as finalize_grad_check: min(max_norm / (norm + 1e-6f), 1)
        # torch.full, not torch.tensor: no host-to-device copy.
        max_norm_t = torch.full((), max_norm, dtype=torch.float32, device=out.device)
        eps = torch.full((), 1e-6, dtype=torch.float32, device=out.device)
        clip = max_norm_t / (norm + eps)
        clip = torch.where(clip < 1.0, clip, torch.ones_like(clip))
    out.copy_(torch.stack([found, partial[next(iter(partial))][1], clip, norm]))
