"""FusedAdamW and DynamicLossScaler under FSDP2 (``fully_shard``), and their DCP
checkpoints: two gloo ranks on the CPU (one spawn shares every sharded check), one
process for the load at world size 1, and the single-process references here.

Odd sizes: Linear(37, 19), Linear(19, 3) and Linear(3, 1) shard 10 + 9, 2 + 1 and 1 + 0
rows (rank 1 holds empty shards of the last layer); the 3 x 19 weight is smaller than an
int8 block, the 19 x 37 one is 2 blocks on rank 0 and 2 on rank 1, 3 on one rank (its
blocks do not line up with those of the whole param)."""
import contextlib
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from cogkern.amp import DynamicLossScaler
from cogkern.optim import FusedAdamW, _dequantize_moment

pytestmark = pytest.mark.slow

BATCH = 6
LR = 1e-2
MAX_NORM = 0.05  # below every step's gradient norm here: clipping clips (checked)
STEPS = 4
RESUME_AT = 2
# bf16 params with masters: the masters are an fp32 Adam on bf16 gradients, and those
# differ (by bf16 roundings: FSDP2 reduce-scatters per-rank bf16 gradients, the reference
# has one full-batch bf16 backward). Adam's normalized step turns a tiny gradient's sign
# flip into an update difference of up to 2 lr, so: every element within 2 lr per step,
# and 99 % of them within lr / 10 (measured: 4e-4), bf16 params 1 ulp (2^-8 relative) more.
BF16_MAX_ATOL = 2 * LR * STEPS
BF16_Q99_ATOL = 1e-3
PRECISION = {"fp32": dict(dtype=torch.float32, opt={}),
             "bf16_master": dict(dtype=torch.bfloat16, opt={})}
# Checkpointed configurations: every state storage that DCP must carry.
RESUMED = {"bf16_master_int8": dict(dtype=torch.bfloat16, opt=dict(moments="int8")),
           "bf16_remainder_bf16m": dict(dtype=torch.bfloat16, opt=dict(param_remainders=True, moments="bf16")),
           "fp32_int8": dict(dtype=torch.float32, opt=dict(moments="int8"))}


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 19), torch.nn.Tanh(), torch.nn.Linear(19, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1)).to(dtype)


def _shard(model, mesh, only=None):
    from torch.distributed.fsdp import fully_shard

    for i in (only if only is not None else (0, 2, 4)):
        fully_shard(model[i], mesh=mesh)
    if only is None:
        fully_shard(model, mesh=mesh)
    return model


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 37, generator=g), torch.randn(BATCH, 1, generator=g)


def _train(model, opt, steps, rank=0, world=1, scaler=None, plain_params=(), overflow=None):
    """steps = range of global step numbers; each rank takes its rows of the global batch
    (FSDP2 averages the gradients over ranks, plain_params are averaged here as DDP would).
    overflow = (step, rank): that rank's gradient gets an inf at that step. Returns the norms."""
    dtype = next(model.parameters()).dtype
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    norms = []
    for step in steps:
        x, t = _batch(step)
        loss = (model(x[rows].to(dtype)).float() - t[rows]).pow(2).mean()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for p in plain_params:
            dist.all_reduce(p.grad)
            p.grad /= world
        if overflow is not None and overflow == (step, rank):
            _local(model[0].weight.grad)[0, 1] = math.inf
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        norms.append(opt.grad_norm.item())
    return norms


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t):
    if not hasattr(t, "full_tensor"):
        return t
    if not t.is_floating_point():  # gloo gathers no 8/16-bit integers: through fp32, exact
        return t.to(torch.float32).full_tensor().to(t.dtype)
    return t.full_tensor()


def _snapshot(model, opt):
    """Full (gathered) params and optimizer state, for bit comparisons across runs."""
    params = [_full(p.detach()).clone() for p in model.parameters()]
    state = []
    for p in model.parameters():
        st = opt.state[p]
        state.append({k: (_full(v).clone() if v.dim() and "scale" not in k else _local(v).clone())
                      for k, v in st.items()})
    return params, state


@contextlib.contextmanager
def _no_host_sync():
    """Every way Python code reads a tensor on the host raises (the CPU stand-in for
    torch.cuda.set_sync_debug_mode('error'))."""
    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a device tensor during a sharded step")

    for n in names:
        setattr(torch.Tensor, n, refuse)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def _dcp_state(model, opt, scaler):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
            "scaler": scaler.state_dict()}


def _dcp_set(model, opt, scaler, state):
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    scaler.load_state_dict(state["scaler"])


def _sharded(cfg, mesh, **opt_kwargs):
    model = _shard(_model(cfg["dtype"]), mesh)
    return model, FusedAdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM, seed=7, **cfg["opt"], **opt_kwargs)


def _resumed(cfg, mesh, path):
    """A fresh model, optimizer and scaler loaded from the DCP checkpoint at path, and the
    loaded snapshot."""
    model, opt = _sharded(cfg, mesh)
    torch.manual_seed(123)  # the resumed run must not depend on the fresh params
    for p in model.parameters():
        _local(p).detach().normal_()
    scaler = DynamicLossScaler(init_scale=2.0**3)
    state = _dcp_state(model, opt, scaler)
    dcp.load(state, checkpoint_id=path)
    _dcp_set(model, opt, scaler, state)
    return model, opt, scaler, _snapshot(model, opt)


def _init(rank, world, out_dir, name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, name)}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _sharded_worker(rank, world, out_dir):
    mesh = _init(rank, world, out_dir, "rendezvous2")
    try:
        out = {}
        # 1. fp32 and bf16 with masters, clipping: against one process (compared in the test).
        for name, cfg in PRECISION.items():
            model, opt = _sharded(cfg, mesh)
            norms = _train(model, opt, range(STEPS), rank, world)
            out[name] = dict(norms=norms, snapshot=_snapshot(model, opt),
                             state_is_dtensor=all(type(opt.state[p]["exp_avg"]).__name__ == "DTensor"
                                                  for p in model.parameters()))
        # 2. Mixed: layers 0 and 4 sharded, layer 2 plain (replicated by hand).
        model = _shard(_model(torch.float32), mesh, only=(0, 4))
        opt = FusedAdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM, seed=7)
        out["mixed"] = dict(norms=_train(model, opt, range(STEPS), rank, world,
                                         plain_params=list(model[2].parameters())),
                            snapshot=_snapshot(model, opt))
        # HSDP on a (2 replicas, 1 shard) mesh: (Replicate, Shard(0)) grads, a shard group of one
        # rank (the squared sums and the flag are reduced apart; the replicas count once).
        from torch.distributed.device_mesh import init_device_mesh

        hsdp_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
        model = _shard(_model(torch.float32), hsdp_mesh)
        opt = FusedAdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM, seed=7)
        out["hsdp"] = dict(norms=_train(model, opt, range(STEPS), rank, world), snapshot=_snapshot(model, opt))
        # Partial gradients are refused before anything runs.
        from torch.distributed.tensor import DTensor, Partial, Shard

        p = torch.nn.Parameter(DTensor.from_local(torch.randn(3, 5), mesh, [Shard(0)]))
        p.grad = DTensor.from_local(torch.randn(6, 5), mesh, [Partial()])  # global shape 6 x 5, as p
        try:
            FusedAdamW([p], max_grad_norm=1.0).step()
        except ValueError as e:
            out["partial_error"] = str(e)
        try:
            scaler = DynamicLossScaler()
            scaler.scale(torch.ones(()))
            scaler.unscale_(torch.optim.SGD([p], lr=1.0))
        except ValueError as e:
            out["partial_error_scaler"] = str(e)
        # 3. Overflow on rank 1 only, at step 1: DynamicLossScaler, torch.amp.GradScaler, and a
        # non-cogkern optimizer (DynamicLossScaler unscales DTensor grads in place).
        for name in ("dynamic", "gradscaler", "sgd"):
            model = _shard(_model(torch.float32), mesh)
            if name == "sgd":
                opt = torch.optim.SGD(model.parameters(), lr=LR)
                opt.grad_norm = torch.zeros(())  # _train records it
            else:
                opt = FusedAdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM, seed=7)
            scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10) if name == "gradscaler"
                      else DynamicLossScaler(init_scale=2.0**10, hysteresis=1))
            records = []
            for step in range(3):
                before = _snapshot(model, opt)
                _train(model, opt, range(step, step + 1), rank, world, scaler=scaler, overflow=(1, 1))
                records.append((before, _snapshot(model, opt), scaler.get_scale()))
            out["overflow_" + name] = records
            report = (opt if name == "gradscaler" else scaler).overflow_report()  # this rank's shards' flags
            out["report_" + name] = (str(report), report.cause, report.step)
        # 4. bf16 and int8 moments track fp32 moments.
        for moments in ("fp32", "bf16", "int8"):
            model, opt = _sharded(PRECISION["fp32"], mesh, moments=moments)
            _train(model, opt, range(STEPS), rank, world)
            out["moments_" + moments] = _snapshot(model, opt)
            out["moments_" + moments + "_bytes"] = opt.state_bytes()
        # 5. No host sync in a sharded step with clipping and a loss scaler.
        model, opt = _sharded(PRECISION["bf16_master"], mesh)
        scaler = DynamicLossScaler(init_scale=2.0**10)
        _train(model, opt, range(1), rank, world, scaler=scaler)  # first use: the kernels' checks
        x, t = _batch(1)
        scaler.scale((model(x[:3].bfloat16()).float() - t[:3]).pow(2).mean()).backward()
        with _no_host_sync():
            scaler.step(opt)
            scaler.update()
        out["no_host_sync"] = True
        # 6. DCP: save at RESUME_AT and go on; resume from the checkpoint; both must agree bit for bit.
        for name, cfg in RESUMED.items():
            path = os.path.join(out_dir, "ckpt_" + name)
            model, opt = _sharded(cfg, mesh)
            scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=1)
            _train(model, opt, range(RESUME_AT), rank, world, scaler=scaler)
            dcp.save(_dcp_state(model, opt, scaler), checkpoint_id=path)
            saved = _snapshot(model, opt)
            _train(model, opt, range(RESUME_AT, STEPS), rank, world, scaler=scaler)
            straight = (_snapshot(model, opt), scaler.state_dict())

            model, opt, scaler, loaded = _resumed(cfg, mesh, path)
            _train(model, opt, range(RESUME_AT, STEPS), rank, world, scaler=scaler)
            out["resume_" + name] = dict(straight=straight, resumed=(_snapshot(model, opt), scaler.state_dict()),
                                         saved=saved, loaded=loaded)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done communicating before either tears the group down
    finally:
        dist.destroy_process_group()


def _one_rank_worker(rank, world, out_dir):
    """Loads the two-rank checkpoints into one rank (a 1-process FSDP2 mesh)."""
    mesh = _init(rank, world, out_dir, "rendezvous1")
    try:
        out = {}
        for name, cfg in RESUMED.items():
            model, opt, scaler, loaded = _resumed(cfg, mesh, os.path.join(out_dir, "ckpt_" + name))
            _train(model, opt, range(RESUME_AT, STEPS), scaler=scaler)
            out[name] = dict(loaded=loaded, after=_snapshot(model, opt), scale=scaler.get_scale())
        torch.save(out, os.path.join(out_dir, "world1.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    mp.start_processes(_sharded_worker, args=(2, out_dir), nprocs=2, join=True, start_method="spawn")
    mp.start_processes(_one_rank_worker, args=(1, out_dir), nprocs=1, join=True, start_method="spawn")
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    return ranks, torch.load(os.path.join(out_dir, "world1.pt"), weights_only=False)


def _reference(dtype, opt_kwargs, steps=range(STEPS)):
    model = _model(dtype)
    opt = FusedAdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM, seed=7, **opt_kwargs)
    norms = _train(model, opt, steps)
    return norms, _snapshot(model, opt)


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                     b.view(-1).view(torch.uint8))


def _assert_snapshots_bitwise(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert _bits_equal(x, y)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert _bits_equal(x[k].contiguous(), y[k].contiguous()), k


@pytest.mark.parametrize("name", list(PRECISION))
def test_fsdp_matches_one_process_with_clipping(runs, name):
    (r0, r1), _ = runs
    norms, (ref_params, ref_state) = _reference(PRECISION[name]["dtype"], PRECISION[name]["opt"])
    got = r0[name]
    assert got["state_is_dtensor"]
    # The global norm, the same on both ranks (one all-reduce), and it clips.
    assert got["norms"] == r1[name]["norms"]
    assert min(norms) > MAX_NORM
    # fp32: the norm's and the gradients' summation orders differ (shards, then ranks).
    # bf16: the gradients themselves differ by bf16 roundings (see BF16_MAX_ATOL).
    norm_rtol = 1e-5 if name == "fp32" else 2e-2
    assert got["norms"] == pytest.approx(norms, rel=norm_rtol)
    params, state = got["snapshot"]
    for p, q, st, rst in zip(params, ref_params, state, ref_state):
        if name == "fp32":
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-4, atol=1e-7)
        else:
            for a, b in ((st["master_param"], rst["master_param"]), (p.float(), q.float())):
                diff = (a - b).abs() - (0 if a is st["master_param"] else 2.0**-8 * b.abs())
                assert diff.max() <= BF16_MAX_ATOL
                assert diff.flatten().quantile(0.99) <= BF16_Q99_ATOL
        assert torch.equal(st["step"], rst["step"])


def test_mixed_plain_and_dtensor_params(runs):
    (r0, r1), _ = runs
    norms, (ref_params, _) = _reference(torch.float32, {})
    assert r0["mixed"]["norms"] == r1["mixed"]["norms"]
    assert r0["mixed"]["norms"] == pytest.approx(norms, rel=1e-5)  # plain layer counted once
    for p, q in zip(r0["mixed"]["snapshot"][0], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_hsdp_replicas_count_once(runs):
    (r0, r1), _ = runs
    norms, (ref_params, _) = _reference(torch.float32, {})
    assert r0["hsdp"]["norms"] == r1["hsdp"]["norms"]
    assert r0["hsdp"]["norms"] == pytest.approx(norms, rel=1e-5)
    for p, q in zip(r0["hsdp"]["snapshot"][0], ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_partial_gradients_are_refused(runs):
    (r0, _), _ = runs
    assert "Partial placement" in r0["partial_error"] and "param_groups[0]" in r0["partial_error"]
    assert "Partial placement" in r0["partial_error_scaler"]


@pytest.mark.parametrize("scaler", ["dynamic", "gradscaler", "sgd"])
def test_overflow_on_one_rank_skips_the_step_on_both(runs, scaler):
    (r0, r1), _ = runs
    for records in (r0["overflow_" + scaler], r1["overflow_" + scaler]):
        (before1, after1, scale1), (_, after2, scale2) = records[1], records[2]
        _assert_snapshots_bitwise(before1, after1)  # step 1 skipped: params, state, step counts
        assert not _bits_equal(after1[0][0], after2[0][0])  # step 2 taken
        if scaler != "gradscaler":  # torch's GradScaler keeps its scale per rank (ShardedGradScaler reduces)
            assert scale1 == 2.0**9 and scale2 == 2.0**9  # backed off once, on both ranks
        assert not _bits_equal(records[0][0][0][0], records[0][1][0][0])  # step 0 taken
    for a, b in zip(r0["overflow_" + scaler], r1["overflow_" + scaler]):
        for x, y in zip(a[1][0], b[1][0]):
            assert _bits_equal(x, y)  # gathered params agree on both ranks
    # Rank 1 names its culprit (the second step() / update() call); rank 0 says where its skip came from.
    counted = "step" if scaler == "gradscaler" else "iteration"
    assert r1["report_" + scaler] == (f"{counted} 2 skipped: inf in param_groups[0]['params'][0].grad", "overflow", 2)
    # torch's GradScaler hands rank 0 a found_inf that is already set (its check of the DTensor grads).
    assert r0["report_" + scaler][1:] == ("found_inf_in" if scaler == "gradscaler" else "other_rank", 2)


def test_lean_moments_track_fp32_moments(runs):
    (r0, r1), _ = runs
    p0 = [p.detach() for p in _model(torch.float32).parameters()]
    fp32_params, fp32_state = r0["moments_fp32"]
    for moments, rtol in (("bf16", 0.02), ("int8", 0.1)):
        params, state = r0["moments_" + moments]
        for start, ref, got in zip(p0, fp32_params, params):
            # Within a few % (bf16) / 10 % (int8: 1/16 relative per code) of how far the params moved.
            moved = (ref - start).norm()
            assert (got - ref).norm() <= rtol * moved
        for rst, st in zip(fp32_state, state):
            if moments == "bf16":  # the moments too, as a whole (small ones drift with the params)
                for key in ("exp_avg", "exp_avg_sq"):
                    assert (st[key].float() - rst[key]).norm() <= 0.05 * rst[key].norm()
    # int8 state is sized from the local shards: 2 bytes per element + 2 fp32 scales per block.
    int8_bytes = r0["moments_int8_bytes"]
    assert int8_bytes["exp_avg"] == 10 * 37 + 10 + 2 * 19 + 2 + 1 * 3 + 1
    assert int8_bytes["scales"] == 2 * 4 * (2 + 1 + 1 + 1 + 1 + 1)  # 370 elements: 2 blocks
    assert r1["moments_int8_bytes"]["scales"] == 2 * 4 * (2 + 1 + 1 + 1)  # 333 elements: 2; empty shards: 0


def test_no_host_sync_in_a_sharded_step(runs):
    (r0, r1), _ = runs
    assert r0["no_host_sync"] and r1["no_host_sync"]


@pytest.mark.parametrize("name", list(RESUMED))
def test_dcp_resume_is_bit_exact(runs, name):
    (r0, r1), _ = runs
    for r in (r0, r1):
        run = r["resume_" + name]
        _assert_snapshots_bitwise(run["saved"], run["loaded"])
        _assert_snapshots_bitwise(run["straight"][0], run["resumed"][0])
        assert run["straight"][1] == run["resumed"][1]  # the scaler


@pytest.mark.parametrize("name", list(RESUMED))
def test_dcp_loads_at_another_world_size(runs, name):
    (r0, _), world1 = runs
    saved_params, saved_state = r0["resume_" + name]["saved"]
    params, state = world1[name]["loaded"]
    for p, q in zip(params, saved_params):
        assert _bits_equal(p, q)
    for st, sst in zip(state, saved_state):
        for key in ("step", "master_param", "master_remainder"):
            if key in sst:
                assert _bits_equal(st[key], sst[key])
        if "exp_avg_scale" not in sst:  # fp32 / bf16 moments reshard elementwise: exact
            assert _bits_equal(st["exp_avg"], sst["exp_avg"]) and _bits_equal(st["exp_avg_sq"], sst["exp_avg_sq"])
    # The scaler's state is global.
    assert world1[name]["scale"] == r0["resume_" + name]["straight"][1]["scale"]
    # One process goes on where the two left off: it follows their run (the gradients differ
    # by summation order; int8 moments were requantized on the new blocks).
    for p, q in zip(world1[name]["after"][0], r0["resume_" + name]["straight"][0][0]):
        diff = (p.float() - q.float()).abs()
        assert diff.max() <= BF16_MAX_ATOL and diff.flatten().quantile(0.99) <= BF16_Q99_ATOL


def test_int8_moments_reblock_at_another_world_size(runs):
    """Rank 1's blocks of the 19 x 37 weight start at element 370, not a multiple of 256: the
    loader dequantizes them with their per-element scales and requantizes on its own blocks
    (round to nearest: 1/16 relative at most; 1/8 allowed for the blocks' new absmax, and an
    absolute floor for the codes below the smallest binade)."""
    (r0, r1), world1 = runs
    for name in ("bf16_master_int8", "fp32_int8"):
        _, st1 = world1[name]["loaded"]
        for i, st in enumerate(st1):
            local = [r["resume_" + name]["saved"][1][i] for r in (r0, r1)]
            for codes, scale in (("exp_avg", "exp_avg_scale"), ("exp_avg_sq", "exp_avg_sq_scale")):
                # The two ranks' saved values, each decoded with its own blocks, side by side.
                saved = torch.cat([_dequantize_moment(_shard_rows(s[codes], r), s[scale])
                                   for r, s in enumerate(local)])
                loaded = _dequantize_moment(st[codes], st[scale])
                absmax = loaded.abs().max()
                assert absmax > 0
                torch.testing.assert_close(loaded, saved, rtol=1 / 8, atol=absmax.item() * 2.0**-14)


def _shard_rows(full, rank):
    chunks = torch.chunk(full, 2, dim=0)  # FSDP2's dim-0 shards; fewer rows than ranks: empty ones
    return chunks[rank] if rank < len(chunks) else full[:0]
