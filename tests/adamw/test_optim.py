"""cogkern.optim.FusedAdamW on the CPU: parity with torch.optim.AdamW, precision
modes, loss scaling and overflow skipping, clipping, stochastic rounding,
checkpoint continuation, torch.amp.GradScaler compatibility, bad input."""
import copy
import math

import pytest
import torch

import cogkern
from cogkern.amp import DynamicLossScaler
from cogkern.optim import FusedAdamW

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/adamw/conftest.py


# Shapes around the chunk size (32768) and the vector width (4): tails, several chunks, scalars.
SHAPES = [(3, 5), (7,), (32768,), (32769,), (129, 257), (1,), (2, 3, 4), (65541,)]


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def rel_close(a, b, rtol):
    """max |a - b| <= rtol * max |b| (relative to the tensor's scale)."""
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= rtol * scale


def state_snapshot(opt, params):
    snap = [p.detach().clone() for p in params]
    for p in params:
        st = opt.state.get(p, {})
        for k in sorted(st):
            if torch.is_tensor(st[k]):
                snap.append(st[k].clone())
    return snap


def assert_bitwise_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8) if x.dtype != torch.bool else x,
                           y.view(-1).view(torch.uint8) if y.dtype != torch.bool else y)


# ----------------------------------------------------------------------------- fp32 parity


def test_fp32_matches_torch_adamw_100_steps_param_groups():
    params = make_params(SHAPES)
    ref = [p.clone() for p in params]
    hyper = [
        dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
        dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0),
        dict(lr=5e-4, betas=(0.5, 0.9), eps=1e-10, weight_decay=0.1),
        dict(lr=2e-3, betas=(0.3, 0.99), eps=1e-8, weight_decay=0.05),  # beta1 < 0.5: lerp's other form
    ]
    split = [[0, 1], [2, 3], [4, 5], [6, 7]]
    opt = FusedAdamW([dict(params=[params[i] for i in s], **h) for s, h in zip(split, hyper)])
    ropt = torch.optim.AdamW([dict(params=[ref[i] for i in s], **h) for s, h in zip(split, hyper)], foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(100):
        for i, (p, r) in enumerate(zip(params, ref)):
            if i == 1 and step % 3 == 0:  # grad=None: skipped by both, its step count lags
                p.grad = r.grad = None
                continue
            g = torch.randn(p.shape, generator=gen)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(params, ref):
        assert rel_close(p, r, 1e-6), (p - r).abs().max()
        assert rel_close(opt.state[p]["exp_avg"], ropt.state[r]["exp_avg"], 1e-6)
        assert rel_close(opt.state[p]["exp_avg_sq"], ropt.state[r]["exp_avg_sq"], 1e-6)
        assert opt.state[p]["step"].item() == ropt.state[r]["step"].item()
    assert opt.state[params[1]]["step"].item() == 100 - 34


def test_many_tensors_and_groups_span_several_launches():
    # More tensors (224) and groups (24) than one launch holds.
    shapes = [(i % 7 + 1, 3) for i in range(260)]
    params = make_params(shapes)
    ref = [p.clone() for p in params]
    groups = [dict(params=params[i::30], lr=1e-3 * (1 + i), weight_decay=0.01 * (i % 3)) for i in range(30)]
    rgroups = [dict(params=ref[i::30], lr=1e-3 * (1 + i), weight_decay=0.01 * (i % 3)) for i in range(30)]
    opt, ropt = FusedAdamW(groups), torch.optim.AdamW(rgroups, foreach=False)
    for _ in range(3):
        for p, r in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(params, ref):
        assert rel_close(p, r, 1e-6)


def test_unaligned_views_and_non_contiguous_dense_params():
    base = torch.randn(40003)
    edges = base[[0, -1]].clone()
    p_view = base[1:40002]  # offset 1: no vector loads, scalar path
    p_t = torch.randn(64, 48).t()  # dense, transposed strides; state keeps them
    params = [p_view, p_t]
    ref = [p.clone() for p in params]
    opt, ropt = FusedAdamW(params, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for _ in range(5):
        for p, r in zip(params, ref):
            g = torch.randn(p.shape) if p.dim() == 1 else torch.randn(64, 48).t()
            p.grad, r.grad = g, g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(params, ref):
        assert rel_close(p, r, 1e-6)
    assert opt.state[p_t]["exp_avg"].stride() == p_t.stride()
    assert torch.equal(base[[0, -1]], edges)  # the view's neighbours are untouched


def test_tensor_lr_is_read_every_step():
    params = make_params([(100,), (33, 3)])
    ref = [p.clone() for p in params]
    lr = torch.tensor(1e-2)
    opt, ropt = FusedAdamW(params, lr=lr), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(6):
        if step == 3:
            lr.fill_(3e-3)  # in place: no new optimizer, no recapture
            ropt.param_groups[0]["lr"] = 3e-3
        for p, r in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.clone()
        opt.step()
        ropt.step()
    for p, r in zip(params, ref):
        # float32 lr vs Python float lr: the step size differs in its last bits.
        assert rel_close(p, r, 1e-6)


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_master_weights_match_fp32_adamw_on_master(dtype):
    params = make_params(SHAPES, dtype)
    masters = [p.float() for p in params]
    opt = FusedAdamW(params, lr=1e-3, weight_decay=0.01)
    ropt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(20):
        for p, m in zip(params, masters):
            g = torch.randn(p.shape).to(dtype)
            p.grad, m.grad = g, g.float()
        opt.step()
        ropt.step()
    for p, m in zip(params, masters):
        master = opt.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert rel_close(master, m, 1e-6)
        assert torch.equal(p, master.to(dtype))  # params are the rounded master, bit for bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_master_rounds_an_fp32_update_to_nearest(dtype):
    p = make_params([(5000,)], dtype)[0]
    opt = FusedAdamW([p], lr=1e-2, master_weights=False)
    assert "master_param" not in opt.state[p]
    for _ in range(3):
        before = p.float()
        st = {k: v.clone() for k, v in opt.state[p].items()} if opt.state[p] else None
        g = torch.randn(p.shape).to(dtype)
        p.grad = g
        opt.step()
        ref = before.clone()
        r = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
        if st is not None:
            r.state[ref] = {"step": st["step"].clone(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        ref.grad = g.float()
        r.step()
        # one rounding of an fp32 result; allow one ulp where the fp32 values straddle a tie
        ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((p.float() - ref).abs() <= ulp).all()
    assert "master_param" not in opt.state[p]


def test_fp32_params_never_get_master_weights():
    p32, p16 = torch.randn(10), torch.randn(10).half()
    opt = FusedAdamW([p32, p16])
    p32.grad, p16.grad = torch.randn(10), torch.randn(10).half()
    opt.step()
    assert "master_param" not in opt.state[p32] and "master_param" in opt.state[p16]


# ----------------------------------------------------------------------------- loss scaling


def _copies(dtype, **kw):
    a = make_params(SHAPES[:5], dtype, seed=3)
    b = [p.clone() for p in a]
    return a, FusedAdamW(a, lr=1e-3, **kw), b, FusedAdamW(b, lr=1e-3, **kw)


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.float16, {}), (torch.bfloat16, {}),
                                      (torch.bfloat16, {"stochastic_rounding": True, "seed": 5}),
                                      (torch.bfloat16, {"param_remainders": True}),
                                      (torch.float32, {"moments": "int8"}),
                                      (torch.bfloat16, {"moments": "bf16", "stochastic_rounding": True})])
def test_scaled_step_equals_unscaled_step_and_grads_untouched(dtype, kw):
    a, opt_a, b, opt_b = _copies(dtype, **kw)
    scaler = DynamicLossScaler(init_scale=1024.0)
    for _ in range(4):
        grads = [torch.randn(p.shape).to(dtype) * 0.1 for p in a]
        for p, q, g in zip(a, b, grads):
            scaler.scale(torch.ones(()))  # initializes the scale on the CPU
            p.grad = (g.float() * 1024).to(dtype)
            q.grad = g.clone()
        scaled = [p.grad.clone() for p in a]
        scaler.step(opt_a)
        scaler.update()
        opt_b.step()
        for p, s in zip(a, scaled):
            assert torch.equal(p.grad, s)  # unscaled inside the kernel, never written back
    assert_bitwise_equal(state_snapshot(opt_a, a), state_snapshot(opt_b, b))


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {"max_grad_norm": 0.5}), (torch.float16, {"max_grad_norm": 0.5}),
                                      (torch.bfloat16, {"stochastic_rounding": True, "seed": 5}),
                                      (torch.bfloat16, {"param_remainders": True, "max_grad_norm": 0.5}),
                                      (torch.float32, {"moments": "int8", "max_grad_norm": 0.5}),
                                      (torch.float16, {"moments": "bf16"})])
def test_steps_do_not_depend_on_thread_count(dtype, kw):
    """Chunks run in parallel; the grad norm is summed per chunk, then in chunk order."""
    shapes = [(70000,), (33, 1000), (5,)]  # several chunks, so several threads get work
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        params = make_params(shapes, dtype, seed=7)
        opt = FusedAdamW(params, lr=1e-3, **kw)
        scaler = DynamicLossScaler(init_scale=64.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            scaler.scale(torch.ones(()))
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * 64).to(dtype)
            scaler.step(opt)
            scaler.update()
        results.append(state_snapshot(opt, params) + [opt.grad_norm.clone()])
    assert_bitwise_equal(results[0], results[1])


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.float16, {}), (torch.bfloat16, {}),
                                      (torch.bfloat16, {"stochastic_rounding": True}),
                                      (torch.float32, {"max_grad_norm": 1.0}),
                                      (torch.bfloat16, {"param_remainders": True}),
                                      (torch.float32, {"moments": "int8"}), (torch.float16, {"moments": "int8"}),
                                      (torch.bfloat16, {"moments": "int8", "param_remainders": True}),
                                      (torch.bfloat16, {"moments": "int8", "stochastic_rounding": True}),
                                      (torch.float32, {"moments": "bf16"}),
                                      (torch.bfloat16, {"moments": "bf16", "param_remainders": True})])
def test_overflow_leaves_state_bit_identical(bad, dtype, kw):
    params = make_params(SHAPES[:6], dtype, seed=4)
    opt = FusedAdamW(params, lr=1e-2, **kw)
    scaler = DynamicLossScaler(init_scale=256.0, hysteresis=2)
    scaler.scale(torch.ones(()))
    for p in params:  # one clean step so that every piece of state exists and is non-trivial
        p.grad = torch.randn(p.shape).to(dtype)
    scaler.step(opt)
    scaler.update()
    before = state_snapshot(opt, params)
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    params[3].grad.view(-1)[12345 % params[3].numel()] = bad  # one element of one tensor
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(state_snapshot(opt, params), before)
    assert opt.skipped_flag.item() == 1.0 and opt.last_step_skipped
    assert scaler.found_inf.item() == 1.0 and scaler.last_step_skipped
    assert scaler.get_scale() == 256.0  # hysteresis 2: the first overflow does not back off
    scaler.scale(torch.ones(()))
    scaler.step(opt)  # same bad grads
    scaler.update()
    assert_bitwise_equal(state_snapshot(opt, params), before)
    assert scaler.get_scale() == 128.0
    params[3].grad = torch.randn(params[3].shape).to(dtype)
    scaler.step(opt)
    scaler.update()
    assert not opt.last_step_skipped and not scaler.last_step_skipped
    assert all(opt.state[p]["step"].item() == 2 for p in params)


def test_skip_decision_needs_no_host_sync_attributes():
    p = torch.randn(8)
    opt = FusedAdamW([p])
    p.grad = torch.randn(8)
    opt.step()
    assert opt.skipped_flag.dim() == 0 and opt.skipped_flag.device == p.device
    assert opt.skipped_flag.item() == 0.0 and not opt.last_step_skipped


def test_step_without_grads_clears_the_skipped_flag():
    p = torch.randn(8)
    opt = FusedAdamW([p])
    scaler = DynamicLossScaler(init_scale=4.0, hysteresis=1)
    scaler.scale(torch.ones(()))
    p.grad = torch.full((8,), math.inf)
    scaler.step(opt)
    scaler.update()
    assert opt.last_step_skipped and scaler.get_scale() == 2.0
    p.grad = None
    scaler.step(opt)  # nothing to update, nothing overflowed
    scaler.update()
    assert not opt.last_step_skipped and not scaler.last_step_skipped and scaler.get_scale() == 2.0


def test_default_seed_does_not_consume_the_global_generator():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    opt = FusedAdamW([torch.zeros(2).bfloat16()], stochastic_rounding=True)
    assert torch.equal(torch.rand(3), expected)
    assert opt.seed == 3


def test_unscale_then_step_with_fp16_grads_and_external_clipping():
    # torch's GradScaler refuses to unscale float16 gradients; ours does not.
    params = make_params([(300,), (17, 5)], torch.float16)
    ref = [p.float() for p in params]
    opt = FusedAdamW(params, lr=1e-3)
    ropt = torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    scaler = DynamicLossScaler(init_scale=512.0)
    scaler.scale(torch.ones(()))
    grads = [torch.randn(p.shape).half() for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad = (g.float() * 512).half()
        r.grad = g.float()
    scaler.unscale_(opt)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)  # power-of-two scale: exact
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for p, r in zip(params, ref):
        r.grad = p.grad.float()  # compare the update itself
    scaler.step(opt)
    scaler.update()
    ropt.step()
    for p, r in zip(params, ref):
        assert rel_close(opt.state[p]["master_param"], r, 1e-6)


def test_scaler_with_a_plain_torch_optimizer():
    p = torch.randn(50, dtype=torch.float16)
    q = p.float().clone()
    sgd, rsgd = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([q], lr=0.1)
    scaler = DynamicLossScaler(init_scale=64.0, hysteresis=1)
    scaler.scale(torch.ones(()))
    g = torch.randn(50).half()
    p.grad = (g.float() * 64).half()
    q.grad = g.float()
    scaler.step(sgd)
    scaler.update()
    rsgd.step()
    torch.testing.assert_close(p.float(), q, rtol=1e-3, atol=1e-3)
    before = p.clone()
    p.grad = torch.full((50,), math.inf).half()
    scaler.step(sgd)
    scaler.update()
    assert torch.equal(p, before) and scaler.get_scale() == 32.0


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_max_grad_norm_matches_clip_grad_norm(max_norm):
    params = make_params(SHAPES[:5])
    ref = [p.clone() for p in params]
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=max_norm)
    ropt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for _ in range(5):
        for p, r in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g, g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False)
        opt.step()
        ropt.step()
        torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=0)
    for p, r in zip(params, ref):
        assert rel_close(p, r, 2e-6)


def test_clipping_with_loss_scale_uses_unscaled_norm():
    params = make_params([(1000,), (20, 20)], torch.bfloat16)
    masters = [p.float() for p in params]
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=0.1)
    ropt = torch.optim.AdamW(masters, lr=1e-3, foreach=False)
    scaler = DynamicLossScaler(init_scale=2.0**10)
    scaler.scale(torch.ones(()))
    grads = [torch.randn(p.shape).bfloat16() for p in params]
    for p, m, g in zip(params, masters, grads):
        p.grad = (g.float() * 2**10).bfloat16()
        m.grad = g.float()
    norm = torch.nn.utils.clip_grad_norm_(masters, 0.1, foreach=False)
    scaler.step(opt)
    scaler.update()
    ropt.step()
    torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=0)
    for p, m in zip(params, masters):
        assert rel_close(opt.state[p]["master_param"], m, 1e-6)


def test_nonfinite_grads_with_clipping_skip_the_step_without_a_scaler():
    p = torch.randn(100)
    opt = FusedAdamW([p], max_grad_norm=1.0)
    p.grad = torch.randn(100)
    opt.step()
    before = state_snapshot(opt, [p])
    p.grad[7] = math.nan
    opt.step()
    assert_bitwise_equal(state_snapshot(opt, [p]), before)
    assert opt.last_step_skipped


# ----------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased():
    # Every element starts at 1.0 with the same grad; the exact fp32 update is a
    # fraction of a bf16 ulp (2^-7 at 1.0). The mean of the rounded results must
    # be the fp32 result, and the rounding must be to the two neighbours only.
    n = 1 << 18
    p = torch.ones(n, dtype=torch.bfloat16)
    opt = FusedAdamW([p], lr=3e-3, weight_decay=0.0, stochastic_rounding=True, seed=1234)
    p.grad = torch.full((n,), 0.5, dtype=torch.bfloat16)
    opt.step()
    exact = 1.0 - 3e-3  # first Adam step moves by lr * sign(g)
    lo, hi = 1.0 - 2**-8, 1.0  # the bf16 neighbours of 0.997 (ulp 2^-8 below 1)
    vals = p.float()
    assert set(torch.unique(vals).tolist()) <= {lo, hi}
    frac_hi = (vals == hi).double().mean().item()
    expected_hi = (exact - lo) / (hi - lo)
    sigma = math.sqrt(expected_hi * (1 - expected_hi) / n)
    assert abs(frac_hi - expected_hi) < 5 * sigma
    assert abs(vals.double().mean().item() - exact) < 5 * sigma * (hi - lo)


def test_round_to_nearest_stalls_where_stochastic_rounding_keeps_improving():
    # Minimize 0.5 * |w - target|^2 in bf16 with a learning rate far below
    # bf16's resolution at |w| ~ 1: nearest rounding loses every update.
    torch.manual_seed(0)
    target = torch.full((4096,), 0.9)
    w0 = torch.ones(4096, dtype=torch.bfloat16)

    def run(**kw):
        w = w0.clone()
        opt = FusedAdamW([w], lr=1e-3, weight_decay=0.0, **kw)
        for _ in range(60):
            w.grad = (w.float() - target).bfloat16()
            opt.step()
        return (w.float() - target).pow(2).mean().item()

    start = (w0.float() - target).pow(2).mean().item()
    rn = run(master_weights=False)
    sr = run(stochastic_rounding=True, seed=7)
    assert rn == pytest.approx(start)  # stalled: 1 - 1e-3 rounds back to 1.0
    assert sr < 0.5 * start  # ~60 * 1e-3 of progress out of 0.1


def test_stochastic_rounding_is_reproducible_and_seeded():
    def run(seed):
        p = make_params([(5000,), (77,)], torch.bfloat16, seed=9)
        opt = FusedAdamW(p, lr=1e-3, stochastic_rounding=True, seed=seed)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for q in p:
                q.grad = torch.randn(q.shape, generator=gen).bfloat16()
            opt.step()
        return p

    a, b, c = run(11), run(11), run(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {"max_grad_norm": 1.0}), (torch.float16, {}),
                                      (torch.bfloat16, {}), (torch.bfloat16, {"stochastic_rounding": True}),
                                      (torch.bfloat16, {"param_remainders": True}),
                                      (torch.float32, {"moments": "int8"}), (torch.bfloat16, {"moments": "int8"}),
                                      (torch.bfloat16, {"moments": "bf16", "stochastic_rounding": True}),
                                      (torch.float16, {"moments": "bf16"})])
def test_save_load_continues_bit_for_bit(dtype, kw, tmp_path):
    def grads(step, params):
        gen = torch.Generator().manual_seed(100 + step)
        out = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        if step == 2:
            out[1].view(-1)[0] = math.inf  # a skipped step inside the run
        return out

    def train(params, opt, scaler, steps):
        for s in steps:
            scaler.scale(torch.ones(()))
            for p, g in zip(params, grads(s, params)):
                p.grad = (g.float() * scaler.get_scale()).to(dtype)
            scaler.step(opt)
            scaler.update()

    make = lambda: make_params(SHAPES[:4], dtype, seed=21)  # noqa: E731
    scaler_kw = dict(init_scale=2.0**8, growth_interval=2, hysteresis=1)
    p_full = make()
    kw = {**kw, "seed": 77}  # the resumed optimizer is built with another seed: the checkpoint restores it
    opt_full = FusedAdamW([dict(params=p_full[:2]), dict(params=p_full[2:], lr=3e-4)], **kw)
    sc_full = DynamicLossScaler(**scaler_kw)
    train(p_full, opt_full, sc_full, range(8))

    p_a = make()
    opt_a = FusedAdamW([dict(params=p_a[:2]), dict(params=p_a[2:], lr=3e-4)], **kw)
    sc_a = DynamicLossScaler(**scaler_kw)
    train(p_a, opt_a, sc_a, range(4))
    path = tmp_path / "ckpt.pt"
    torch.save({"params": p_a, "opt": opt_a.state_dict(), "scaler": sc_a.state_dict()}, path)

    ck = torch.load(path, weights_only=False)
    p_b = [p.clone() for p in ck["params"]]
    opt_b = FusedAdamW([dict(params=p_b[:2]), dict(params=p_b[2:], lr=3e-4)], **{**kw, "seed": 999})
    sc_b = DynamicLossScaler(**scaler_kw)
    opt_b.load_state_dict(ck["opt"])
    sc_b.load_state_dict(ck["scaler"])
    train(p_b, opt_b, sc_b, range(4, 8))

    assert_bitwise_equal(state_snapshot(opt_b, p_b), state_snapshot(opt_full, p_full))
    assert sc_b.state_dict() == sc_full.state_dict()


def test_load_state_dict_copies_into_existing_state_and_keeps_fp32():
    p = torch.randn(64).bfloat16()
    opt = FusedAdamW([p])
    p.grad = torch.randn(64).bfloat16()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    ptrs = {k: v.data_ptr() for k, v in opt.state[p].items()}
    opt.step()
    opt.load_state_dict(sd)
    for k, v in opt.state[p].items():
        assert v.data_ptr() == ptrs[k] and v.dtype == torch.float32  # in place: captured graphs stay valid
        assert torch.equal(v, sd["state"][0][k])


def test_loads_a_torch_adamw_state_dict():
    params = make_params([(50,), (4, 4)])
    ref = [p.clone() for p in params]
    ropt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for _ in range(3):
        for r in ref:
            r.grad = torch.randn_like(r)
        ropt.step()
    for p, r in zip(params, ref):
        p.copy_(r)
    opt = FusedAdamW(params, lr=1e-2)
    opt.load_state_dict(ropt.state_dict())
    for p, r in zip(params, ref):
        g = torch.randn_like(p)
        p.grad, r.grad = g, g.clone()
    opt.step()
    ropt.step()
    for p, r in zip(params, ref):
        assert rel_close(p, r, 1e-6)
        assert opt.state[p]["step"].item() == 4


# ----------------------------------------------------------------------------- torch.amp.GradScaler


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_grad_scaler_drives_fused_adamw(dtype):
    a = make_params(SHAPES[:4], dtype)
    b = [p.clone() for p in a]
    opt_a, opt_b = FusedAdamW(a, lr=1e-3), FusedAdamW(b, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    for step in range(3):
        grads = [torch.randn(p.shape).to(dtype) for p in a]
        loss = scaler.scale(torch.ones(()))
        assert loss.item() == 256.0
        for p, q, g in zip(a, b, grads):
            p.grad = (g.float() * 256).to(dtype)
            q.grad = g.clone()
        scaler.step(opt_a)
        scaler.update()
        opt_b.step()
    assert_bitwise_equal(state_snapshot(opt_a, a), state_snapshot(opt_b, b))
    before = state_snapshot(opt_a, a)
    for p in a:
        p.grad = torch.randn(p.shape).to(dtype)
    a[2].grad.view(-1)[5] = math.nan
    scaler.step(opt_a)
    scaler.update()
    assert_bitwise_equal(state_snapshot(opt_a, a), before)
    assert scaler.get_scale() == 128.0


def test_grad_scale_and_found_inf_kwargs():
    p = torch.randn(40)
    q = p.clone()
    opt_p, opt_q = FusedAdamW([p]), FusedAdamW([q])
    g = torch.randn(40)
    p.grad, q.grad = g * 8, g.clone()
    opt_p.step(grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([0.0]))
    opt_q.step()
    assert torch.equal(p, q)
    before = p.clone()
    opt_p.step(grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    assert torch.equal(p, before) and opt_p.state[p]["step"].item() == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,exc,match", [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "lr"),
    (dict(betas=(1.0, 0.999)), ValueError, "beta"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta"),
    (dict(betas=(0.9,)), ValueError, "betas"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(master_weights="yes"), TypeError, "master_weights"),
    (dict(stochastic_rounding=True, master_weights=True), ValueError, "stochastic_rounding"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_invalid_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        FusedAdamW([torch.randn(3).bfloat16()], **kw)


def test_invalid_group_hyperparameters_name_the_group():
    with pytest.raises(ValueError, match=r"param_groups\[1\].*beta"):
        FusedAdamW([dict(params=[torch.randn(2)]), dict(params=[torch.randn(2)], betas=(0.9, 1.5))])


def test_stochastic_rounding_on_non_bf16_params():
    with pytest.raises(ValueError, match="stochastic_rounding needs bfloat16"):
        FusedAdamW([torch.randn(3)], stochastic_rounding=True)


def test_params_on_several_devices_in_one_group():
    with pytest.raises(ValueError, match="several devices"):
        FusedAdamW([torch.randn(3), torch.randn(3, device="meta")])


def test_unsupported_param_dtype():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        FusedAdamW([torch.randn(3).double()])


def test_sparse_gradient():
    p = torch.randn(4, 3)
    opt = FusedAdamW([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_param_dtype_changed_after_construction():
    p = torch.randn(5)
    opt = FusedAdamW([p])
    p.data = p.data.half()
    p.grad = torch.randn(5).half()
    with pytest.raises(ValueError, match="dtype changed"):
        opt.step()


def test_grad_dtype_must_match_param():
    p = torch.randn(5).bfloat16()
    opt = FusedAdamW([p])
    p.grad_dtype = None  # let autograd's own check through; the optimizer must still refuse
    p.grad = torch.randn(5)
    with pytest.raises(ValueError, match="gradient"):
        opt.step()


def test_grad_none_params_are_skipped():
    a, b = torch.randn(5), torch.randn(6)
    b0 = b.clone()
    opt = FusedAdamW([a, b])
    a.grad = torch.randn(5)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state
    assert opt.state[a]["step"].item() == 1
    opt.zero_grad()
    assert opt.step() is None  # nothing to do


def test_op_checks_name_the_argument_before_any_kernel_runs():
    p, g = torch.randn(8), torch.randn(8)
    m, v, s = torch.zeros(8), torch.zeros(8), torch.zeros(())
    op = torch.ops.cogkern.fused_adamw_
    args = ([p], [g], [m], [v], [], [s], [0], [0], [1e-3], [None], [0.9], [0.999], [1e-8], [0.0], None, 0, False, [], [])
    with pytest.raises(ValueError, match="exp_avgs must have one entry per param"):
        op(args[0], args[1], [], *args[3:])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        op([p], [torch.randn(9)], *args[2:])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] must be Float"):
        op([p], [g], [m], [v.double()], *args[4:])
    with pytest.raises(ValueError, match=r"beta2s\[0\]"):
        op(*args[:11], [1.0], *args[12:])
    with pytest.raises(ValueError, match=r"tensor_groups\[0\]"):
        op(*args[:6], [3], *args[7:])
    with pytest.raises(ValueError, match="stochastic_rounding needs bfloat16"):
        op(*args[:16], True, [], [])
    assert torch.equal(m, torch.zeros(8)) and s.item() == 0  # nothing ran
    with pytest.raises(ValueError, match="out must have 4"):
        torch.ops.cogkern.amp_grad_check_([g], None, None, 0.0, True, False, torch.zeros(3))


def test_public_api_exports():
    assert cogkern.optim.FusedAdamW is FusedAdamW
    assert cogkern.amp.DynamicLossScaler is DynamicLossScaler
    assert "optim" in cogkern.__all__ and "amp" in cogkern.__all__
