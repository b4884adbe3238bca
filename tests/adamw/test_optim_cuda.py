"""FusedAdamW and DynamicLossScaler on CUDA (skipped without a GPU).

One run should tell everything: parity with the CPU backend (the same functor
bodies, so bit for bit), parity with torch, overflow skipping decided on the
device, no host synchronization (sync debug mode), a CUDA graph capture of a
whole scaler step that replays correctly, checkpoints, torch.amp.GradScaler.
"""
import copy
import math

import pytest
import torch

from cogkern.amp import DynamicLossScaler
from cogkern.optim import FusedAdamW

pytestmark = pytest.mark.cuda

SHAPES = [(3, 5), (7,), (32768,), (32769,), (129, 257), (1,), (2, 3, 4), (65541,), (3072, 48)]
MODES = [
    (torch.float32, {}),
    (torch.float16, {}),
    (torch.bfloat16, {}),
    (torch.float16, {"master_weights": False}),
    (torch.bfloat16, {"master_weights": False}),
    (torch.bfloat16, {"stochastic_rounding": True}),
    (torch.bfloat16, {"param_remainders": True}),
    (torch.float32, {"moments": "int8"}),
    (torch.float16, {"moments": "int8"}),
    (torch.bfloat16, {"moments": "int8", "param_remainders": True}),
    (torch.bfloat16, {"moments": "int8", "stochastic_rounding": True}),
    (torch.float32, {"moments": "bf16"}),
    (torch.bfloat16, {"moments": "bf16", "param_remainders": True}),
]
MODE_IDS = ["fp32", "fp16-master", "bf16-master", "fp16-plain", "bf16-plain", "bf16-sr", "bf16-remainders",
            "fp32-int8", "fp16-master-int8", "bf16-remainders-int8", "bf16-sr-int8", "fp32-bf16m",
            "bf16-remainders-bf16m"]


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]


def grads_for(step, shapes, dtype, device, scale=1.0, bad=None):
    g = torch.Generator().manual_seed(1000 + step)
    out = [(torch.randn(s, generator=g) * 0.1 * scale).to(dtype) for s in shapes]
    if bad is not None:
        out[bad[0]].view(-1)[bad[1]] = bad[2]
    return [t.to(device) for t in out]


def snapshot(opt, params):
    snap = [p.detach().clone().cpu() for p in params]
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            if torch.is_tensor(st[k]):
                snap.append(st[k].detach().clone().cpu())
    return snap


def bits(t):
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same_bits(xs, ys, what=""):
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} #{i}"
        if not torch.equal(bits(x), bits(y)):
            diff = (x.double() - y.double()).abs().max().item()
            raise AssertionError(f"{what} #{i} ({x.dtype} {tuple(x.shape)}) differs, max |diff| {diff}")


def train(device, dtype, kw, steps, scaler_kw=None, bad_steps=None, seed=0, shapes=SHAPES, groups=True):
    """A few scaler-driven steps; returns (params, opt, scaler)."""
    params = make_params(shapes, dtype, device, seed)
    half = len(params) // 2
    spec = [dict(params=params[:half]), dict(params=params[half:], lr=3e-4, weight_decay=0.1)] if groups else params
    opt = FusedAdamW(spec, lr=1e-3, seed=1234, **kw)
    scaler = DynamicLossScaler(**(scaler_kw or dict(init_scale=2.0**10, growth_interval=2, hysteresis=2)))
    for step in range(steps):
        scaler.scale(torch.ones((), device=device))
        bad = (bad_steps or {}).get(step)
        gs = grads_for(step, shapes, dtype, device, scale=scaler.get_scale(), bad=bad)
        for p, g in zip(params, gs):
            p.grad = g
        scaler.step(opt)
        scaler.update()
    return params, opt, scaler


# ----------------------------------------------------------------------------- CPU == CUDA


@pytest.mark.parametrize("dtype,kw", MODES, ids=MODE_IDS)
def test_cuda_matches_cpu_backend_bit_for_bit(dtype, kw):
    bad = {3: (4, 77, math.inf), 4: (2, 5, math.nan)}  # two skipped steps in the run
    cpu = train("cpu", dtype, kw, 7, bad_steps=bad)
    gpu = train("cuda", dtype, kw, 7, bad_steps=bad)
    assert_same_bits(snapshot(gpu[1], gpu[0]), snapshot(cpu[1], cpu[0]), "state")
    assert gpu[2].state_dict() == cpu[2].state_dict()


def test_many_tensors_and_groups_cuda_matches_cpu():
    shapes = [(i % 11 + 1, 33) for i in range(300)]

    def run(device):
        params = make_params(shapes, torch.bfloat16, device)
        opt = FusedAdamW([dict(params=params[i::30], lr=1e-3 * (i + 1)) for i in range(30)])
        for step in range(3):
            for p, g in zip(params, grads_for(step, shapes, torch.bfloat16, device)):
                p.grad = g
            opt.step()
        return snapshot(opt, params)

    assert_same_bits(run("cuda"), run("cpu"), "state")


# ----------------------------------------------------------------------------- torch parity


def test_fp32_matches_torch_adamw_100_steps():
    params = make_params(SHAPES, torch.float32, "cuda")
    ref = [p.clone() for p in params]
    hyper = [dict(lr=3e-3, betas=(0.9, 0.999), weight_decay=1e-2), dict(lr=1e-2, betas=(0.3, 0.95), weight_decay=0.0),
             dict(lr=5e-4, betas=(0.5, 0.9), eps=1e-10, weight_decay=0.1)]
    split = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    opt = FusedAdamW([dict(params=[params[i] for i in s], **h) for s, h in zip(split, hyper)])
    ropt = torch.optim.AdamW([dict(params=[ref[i] for i in s], **h) for s, h in zip(split, hyper)], foreach=True)
    for step in range(100):
        for p, r, g in zip(params, ref, grads_for(step, SHAPES, torch.float32, "cuda", scale=10)):
            p.grad, r.grad = g, g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(params, ref):
        assert (p - r).abs().max().item() <= 1e-6 * r.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_master_matches_fp32_adamw_on_master(dtype):
    params = make_params(SHAPES, dtype, "cuda")
    masters = [p.float() for p in params]
    opt = FusedAdamW(params, lr=1e-3)
    ropt = torch.optim.AdamW(masters, lr=1e-3, foreach=True)
    for step in range(20):
        for p, m, g in zip(params, masters, grads_for(step, SHAPES, dtype, "cuda")):
            p.grad, m.grad = g, g.float()
        opt.step()
        ropt.step()
    for p, m in zip(params, masters):
        master = opt.state[p]["master_param"]
        assert (master - m).abs().max().item() <= 1e-6 * m.abs().max().item()
        assert torch.equal(p, master.to(dtype))


def test_clipping_matches_torch_clip_grad_norm():
    params = make_params(SHAPES, torch.float32, "cuda")
    ref = [p.clone() for p in params]
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=0.3)
    ropt = torch.optim.AdamW(ref, lr=1e-2, foreach=True)
    for step in range(5):
        for p, r, g in zip(params, ref, grads_for(step, SHAPES, torch.float32, "cuda")):
            p.grad, r.grad = g, g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.3)
        opt.step()
        ropt.step()
        torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=0)
    for p, r in zip(params, ref):
        assert (p - r).abs().max().item() <= 2e-6 * r.abs().max().item()


# ----------------------------------------------------------------------------- overflow, no sync


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype,kw", MODES + [(torch.bfloat16, {"max_grad_norm": 1.0})],
                         ids=MODE_IDS + ["bf16-master-clip"])
def test_overflow_leaves_state_bit_identical_on_cuda(bad, dtype, kw):
    params, opt, scaler = train("cuda", dtype, kw, 2)
    before = snapshot(opt, params)
    scale = scaler.get_scale()
    scaler.scale(torch.ones((), device="cuda"))
    gs = grads_for(9, SHAPES, dtype, "cuda", bad=(8, 3072 * 48 - 1, bad))  # last element of the last tensor
    for p, g in zip(params, gs):
        p.grad = g
    scaler.step(opt)
    scaler.update()
    assert_same_bits(snapshot(opt, params), before, "state")
    assert opt.last_step_skipped and scaler.get_scale() == scale  # hysteresis 2 absorbs the first
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, g)  # gradients are never written back


def test_whole_scaler_step_never_synchronizes():
    params, opt, scaler = train("cuda", torch.bfloat16, {"max_grad_norm": 1.0}, 1)
    gs = [grads_for(s, SHAPES, torch.bfloat16, "cuda", scale=2.0**10, bad=(1, 0, math.inf) if s == 1 else None)
          for s in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in gs:
            loss = scaler.scale(torch.ones((), device="cuda"))
            for p, g in zip(params, step_grads):
                p.grad = g
            scaler.step(opt)
            scaler.update()
            _ = opt.skipped_flag, opt.grad_norm, scaler.found_inf, loss
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.state[params[0]]["step"].item() == 3  # 1 + 2 taken, 1 skipped


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("dtype,kw", [(torch.bfloat16, {}), (torch.bfloat16, {"stochastic_rounding": True}),
                                      (torch.float32, {"max_grad_norm": 0.5}),
                                      (torch.bfloat16, {"moments": "int8", "param_remainders": True}),
                                      (torch.float32, {"moments": "bf16", "max_grad_norm": 0.5})],
                         ids=["bf16-master", "bf16-sr", "fp32-clip", "bf16-remainders-int8", "fp32-bf16m-clip"])
def test_cuda_graph_capture_of_a_whole_step_replays_correctly(dtype, kw):
    shapes = SHAPES[:6]
    scaler_kw = dict(init_scale=2.0**8, growth_interval=2, hysteresis=1)
    schedule = [None, None, (2, 1, math.inf), None, None, (0, 3, math.nan), None]

    def setup():
        params = make_params(shapes, dtype, "cuda")
        lr = torch.tensor(1e-3, device="cuda")
        opt = FusedAdamW(params, lr=lr, capturable=True, seed=7, **kw)
        scaler = DynamicLossScaler(**scaler_kw)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, lr, opt, scaler

    def fill(params, step, scale):
        for p, g in zip(params, grads_for(step, shapes, dtype, "cuda", scale=scale, bad=schedule[step - 1])):
            p.grad.copy_(g)

    # Eager reference.
    ref_params, ref_lr, ref_opt, ref_scaler = setup()
    ref_scaler.scale(torch.ones((), device="cuda"))
    fill(ref_params, 0, ref_scaler.get_scale())
    ref_scaler.step(ref_opt)
    ref_scaler.update()
    for step in range(1, len(schedule) + 1):
        if step == 4:
            ref_lr.fill_(5e-4)
        ref_scaler.scale(torch.ones((), device="cuda"))
        fill(ref_params, step, ref_scaler.get_scale())
        ref_scaler.step(ref_opt)
        ref_scaler.update()

    # Captured: one eager warm-up step (creates the state), then capture step+update once.
    params, lr, opt, scaler = setup()
    scaler.scale(torch.ones((), device="cuda"))
    fill(params, 0, scaler.get_scale())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scaler.step(opt)
        scaler.update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaler.step(opt)
        scaler.update()
    for step in range(1, len(schedule) + 1):
        if step == 4:
            lr.fill_(5e-4)  # a tensor lr changes without recapture
        fill(params, step, scaler.get_scale())
        graph.replay()
    torch.cuda.synchronize()
    assert_same_bits(snapshot(opt, params), snapshot(ref_opt, ref_params), "state")
    assert scaler.state_dict() == ref_scaler.state_dict()
    assert opt.state[params[0]]["step"].item() == 1 + len(schedule) - 2


# ----------------------------------------------------------------------------- SR, checkpoints, GradScaler


def test_stochastic_rounding_unbiased_on_cuda():
    n = 1 << 20
    p = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    opt = FusedAdamW([p], lr=3e-3, weight_decay=0.0, stochastic_rounding=True, seed=99)
    p.grad = torch.full((n,), 0.25, dtype=torch.bfloat16, device="cuda")
    opt.step()
    lo, hi, exact = 1.0 - 2**-8, 1.0, 1.0 - 3e-3
    vals = p.float()
    assert set(torch.unique(vals).tolist()) <= {lo, hi}
    expected_hi = (exact - lo) / (hi - lo)
    sigma = math.sqrt(expected_hi * (1 - expected_hi) / n)
    assert abs((vals == hi).double().mean().item() - expected_hi) < 5 * sigma


@pytest.mark.parametrize("dtype,kw", MODES[:3] + MODES[5:], ids=MODE_IDS[:3] + MODE_IDS[5:])
def test_save_load_exact_continuation_cuda(dtype, kw):
    bad = {2: (1, 0, math.inf)}
    p_full, opt_full, sc_full = train("cuda", dtype, kw, 6, bad_steps=bad)
    p_a, opt_a, sc_a = train("cuda", dtype, kw, 3, bad_steps=bad)
    ck = copy.deepcopy({"params": [p.detach() for p in p_a], "opt": opt_a.state_dict(), "scaler": sc_a.state_dict()})
    p_b = [p.clone() for p in ck["params"]]
    half = len(p_b) // 2
    opt_b = FusedAdamW([dict(params=p_b[:half]), dict(params=p_b[half:], lr=3e-4, weight_decay=0.1)],
                       lr=1e-3, seed=1, **kw)
    sc_b = DynamicLossScaler(init_scale=1.0, growth_interval=2, hysteresis=2)
    opt_b.load_state_dict(ck["opt"])
    sc_b.load_state_dict(ck["scaler"])
    for step in range(3, 6):
        sc_b.scale(torch.ones((), device="cuda"))
        for p, g in zip(p_b, grads_for(step, SHAPES, dtype, "cuda", scale=sc_b.get_scale(), bad=bad.get(step))):
            p.grad = g
        sc_b.step(opt_b)
        sc_b.update()
    assert_same_bits(snapshot(opt_b, p_b), snapshot(opt_full, p_full), "state")
    assert sc_b.state_dict() == sc_full.state_dict()


def test_torch_grad_scaler_matches_our_scaler_on_cuda():
    # Both unscale inside the update kernel (fp32 math): bit-identical.
    shapes = SHAPES[:5]
    a = make_params(shapes, torch.float16, "cuda")
    b = [p.clone() for p in a]
    opt_a, opt_b = FusedAdamW(a, lr=1e-3), FusedAdamW(b, lr=1e-3)
    theirs = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    ours = DynamicLossScaler(init_scale=2.0**8)
    for step in range(3):
        theirs.scale(torch.ones((), device="cuda"))
        ours.scale(torch.ones((), device="cuda"))
        gs = grads_for(step, shapes, torch.float16, "cuda", scale=256.0, bad=(1, 2, math.inf) if step == 1 else None)
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g, g.clone()
        theirs.step(opt_a)
        theirs.update()
        ours.step(opt_b)
        ours.update()
    assert_same_bits(snapshot(opt_a, a), snapshot(opt_b, b), "state")
    assert opt_a.state[a[0]]["step"].item() == 2


def test_unscale_fp16_grads_then_clip_on_cuda():
    # torch's GradScaler refuses to unscale float16 gradients; ours unscales them in place.
    shapes = SHAPES[:5]
    params = make_params(shapes, torch.float16, "cuda")
    masters = [p.float() for p in params]
    opt = FusedAdamW(params, lr=1e-3)
    ropt = torch.optim.AdamW(masters, lr=1e-3, foreach=True)
    scaler = DynamicLossScaler(init_scale=2.0**8)
    scaler.scale(torch.ones((), device="cuda"))
    gs = grads_for(0, shapes, torch.float16, "cuda", scale=256.0)
    for p, g in zip(params, gs):
        p.grad = g
    scaler.unscale_(opt)
    for p, g in zip(params, gs):
        assert torch.equal(p.grad, (g.float() / 256).half())
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for p, m in zip(params, masters):
        m.grad = p.grad.float()
    scaler.step(opt)
    scaler.update()
    ropt.step()
    for p, m in zip(params, masters):
        master = opt.state[p]["master_param"]
        assert (master - m).abs().max().item() <= 1e-6 * m.abs().max().item()


def test_cuda_bad_input_is_refused_before_launch():
    p = torch.randn(8, device="cuda")
    opt = FusedAdamW([p])
    p.grad = torch.randn(8, device="cuda").to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="several devices"):
        FusedAdamW([torch.randn(2, device="cuda"), torch.randn(2)])
    m = torch.zeros(8, device="cuda")
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is on cpu"):
        torch.ops.cogkern.fused_adamw_([p], [torch.randn(8, device="cuda")], [torch.zeros(8)], [m], [],
                                       [torch.zeros((), device="cuda")], [0], [0], [1e-3], [None], [0.9], [0.999],
                                       [1e-8], [0.0], None, 0, False, [], [])
