"""Two ranks (gloo, CPU): an overflow on one rank skips the step on both, and
the loss scale stays identical across ranks."""
import math
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, out_dir: str):
    torch.set_num_threads(1)
    # Rendezvous through a file: no port to pick (a free port found beforehand can be taken
    # by the time the ranks bind it, which made this test fail now and then).
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        from cogkern.amp import DynamicLossScaler
        from cogkern.optim import FusedAdamW

        torch.manual_seed(0)  # same params on both ranks
        params = [torch.randn(100, dtype=torch.bfloat16), torch.randn(7, 3, dtype=torch.bfloat16)]
        opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0)
        scaler = DynamicLossScaler(init_scale=2.0**8, hysteresis=1)
        out = []
        for step in range(3):
            scaler.scale(torch.ones(()))
            torch.manual_seed(100 + step)
            for p in params:
                p.grad = torch.randn(p.shape).bfloat16()
            if step == 1 and rank == 1:  # only rank 1 overflows
                params[1].grad[2, 1] = math.inf
            before = [p.clone() for p in params]
            scaler.step(opt)
            scaler.update()
            changed = any(not torch.equal(a, b) for a, b in zip(params, before))
            out.append((changed, opt.last_step_skipped, scaler.get_scale(), opt.state[params[0]]["step"].item()))
        unscale_flags = []
        # unscale_ on a plain optimizer reduces the flag too.
        q = torch.zeros(4)
        sgd = torch.optim.SGD([q], lr=1.0)
        scaler.scale(torch.ones(()))
        q.grad = torch.tensor([1.0, 1.0, math.nan if rank == 0 else 1.0, 1.0])
        scaler.step(sgd)
        scaler.update()
        unscale_flags.append((torch.equal(q, torch.zeros(4)), scaler.get_scale()))
        torch.save((out, unscale_flags), os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks are done communicating before either tears the group down: a rank
        # that destroyed its gloo group while the other still used the connection has
        # aborted ("terminate called without an active exception") now and then.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_overflow_on_one_rank_skips_the_step_on_both(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0 == r1  # identical decisions, scales and step counts on both ranks
    steps, unscale = r0
    assert [s[0] for s in steps] == [True, False, True]  # params changed / unchanged
    assert [s[1] for s in steps] == [False, True, False]  # skipped flag
    assert [s[2] for s in steps] == [256.0, 128.0, 128.0]  # hysteresis 1: back off at once
    assert [s[3] for s in steps] == [1.0, 1.0, 2.0]  # the skipped step does not count
    assert unscale == [(True, 64.0)]  # rank 0's NaN stopped rank 1's SGD step too
