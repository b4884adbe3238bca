"""The one torch.distributed helper the loss scaler and the optimizer share
(here so that neither has to import the other)."""
from __future__ import annotations

import torch


def _dist_world() -> bool:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size() > 1


def reduce_found_inf_(flag: torch.Tensor, process_group=None) -> None:
    """MAX-reduces an overflow flag across ranks in place (no-op outside torch.distributed)."""
    if _dist_world():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=process_group)
