"""Memory-lean optimizer state in FusedAdamW (CPU): param remainders, bf16 and
int8 moments, state_bytes / state_bytes_per_param, their checkpoints and the
argument checks. The promises every mode shares (overflow bit-identity, thread
independence, exact resume, scaled == unscaled) are parametrized over these
modes in test_optim.py."""
import math

import pytest
import torch

from cogkern.amp import DynamicLossScaler
from cogkern.optim import (MOMENT_BLOCK, FusedAdamW, _join_master, _split_master, state_bytes_per_param)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Odd sizes: smaller than one int8 block, a block and a bit, a chunk and a bit, 2-D with a ragged tail.
SHAPES = [(3, 5), (257,), (32769,), (129, 257), (1,), (7,)]


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def round_ties_away(master):
    """fp32 -> bf16, to nearest with ties away from zero, from the two bf16 neighbours (float64 distances)."""
    b = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lo = ((b >> 16) << 16)
    hi = lo + (1 << 16)
    as_f = lambda x: (x - (x >= 2**31).to(torch.int64) * 2**32).to(torch.int32).view(torch.float32)  # noqa: E731
    lo_f, hi_f = as_f(lo).double(), as_f(hi).double()
    x = master.double()
    pick_hi = (x - lo_f).abs() >= (hi_f - x).abs()  # a tie goes to the larger magnitude
    return torch.where(pick_hi, as_f(hi), as_f(lo)).to(torch.bfloat16)


# ----------------------------------------------------------------------------- param remainders


def test_remainders_equal_the_fp32_master_mode_bit_for_bit_over_100_steps():
    a = make_params(SHAPES, torch.bfloat16, seed=1)
    b = [p.clone() for p in a]
    groups = lambda ps: [dict(params=ps[:3]), dict(params=ps[3:], lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)]  # noqa: E731
    opt_a = FusedAdamW(groups(a), lr=1e-2, max_grad_norm=2.0)
    opt_b = FusedAdamW(groups(b), lr=1e-2, max_grad_norm=2.0, param_remainders=True)
    sc_a, sc_b = DynamicLossScaler(init_scale=512.0), DynamicLossScaler(init_scale=512.0)
    gen = torch.Generator().manual_seed(2)
    ties = 0
    for step in range(100):
        sc_a.scale(torch.ones(()))
        sc_b.scale(torch.ones(()))
        for p, q in zip(a, b):
            g = (torch.randn(p.shape, generator=gen) * 512).bfloat16()
            if step == 40:
                g.view(-1)[0] = math.inf  # one skipped step on the way
            p.grad, q.grad = g.clone(), g.clone()
        sc_a.step(opt_a)
        sc_b.step(opt_b)
        sc_a.update()
        sc_b.update()
        for p, q in zip(a, b):
            master = opt_a.state[p]["master_param"]
            assert torch.equal(bits(_join_master(q, opt_b.state[q]["master_remainder"])), bits(master))
            assert torch.equal(bits(opt_b.state[q]["exp_avg"]), bits(opt_a.state[p]["exp_avg"]))
            assert torch.equal(bits(opt_b.state[q]["exp_avg_sq"]), bits(opt_a.state[p]["exp_avg_sq"]))
            assert torch.equal(bits(q), bits(round_ties_away(master)))
            assert torch.equal(bits(p), bits(master.to(torch.bfloat16)))  # the fp32-master mode: ties to even
            ties += int((bits(p) != bits(q)).sum())
    assert opt_a.state[a[0]]["step"].item() == opt_b.state[b[0]]["step"].item() == 99
    # Params differ only where a master lies exactly halfway between two bf16 values (checked above).
    assert ties < 0.001 * 100 * sum(p.numel() for p in a)


def test_remainder_split_of_the_kernel_matches_the_python_helpers_on_any_bits():
    """A step with lr 0 and zero grads leaves the master as it is: the kernel joins and splits
    again. Random bit patterns (every finite fp32 master), plus inf and the largest finite."""
    gen = torch.Generator().manual_seed(3)
    n = 20000
    master_bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int64)
    master = master_bits.to(torch.int32).view(torch.float32).clone()
    master[~torch.isfinite(master)] = 1.5
    master[:4] = torch.tensor([math.inf, -math.inf, 3.4028234663852886e38, -3.4028234663852886e38])
    param, rem = _split_master(master)
    assert torch.equal(bits(_join_master(param, rem)), bits(master))
    assert torch.equal(bits(param[4:]), bits(round_ties_away(master[4:])))
    p = param.clone()
    opt = FusedAdamW([p], lr=0.0, weight_decay=0.0, param_remainders=True)
    p.grad = torch.zeros_like(p)
    opt.step()  # creates a zero remainder: the master is the param
    opt.state[p]["master_remainder"].copy_(rem)
    p.copy_(param)
    opt.step()
    assert torch.equal(bits(p), bits(param)) and torch.equal(opt.state[p]["master_remainder"], rem)


@pytest.mark.parametrize("direction", ["master_to_remainder", "remainder_to_master"])
def test_state_dict_converts_between_masters_and_remainders(direction):
    a = make_params(SHAPES[:4], torch.bfloat16, seed=5)
    src_kw, dst_kw = ({}, {"param_remainders": True}) if direction == "master_to_remainder" else \
        ({"param_remainders": True}, {})
    opt_a = FusedAdamW(a, lr=1e-2, **src_kw)
    gen = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=gen).bfloat16() for p in a] for _ in range(10)]

    def train(params, opt, steps):
        for s in steps:
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()

    train(a, opt_a, range(5))
    b = [p.clone() for p in a]
    opt_b = FusedAdamW(b, lr=1e-2, **dst_kw)
    opt_b.load_state_dict(opt_a.state_dict())
    ref = [p.clone() for p in a]
    opt_ref = FusedAdamW(ref, lr=1e-2)  # the fp32-master mode throughout, from the same masters
    sd = opt_a.state_dict()
    if direction == "remainder_to_master":
        for i, p in enumerate(a):
            st = sd["state"][i]
            sd["state"][i] = {**{k: v for k, v in st.items() if k != "master_remainder"},
                              "master_param": _join_master(p, st["master_remainder"])}
    opt_ref.load_state_dict(sd)
    train(b, opt_b, range(5, 10))
    train(ref, opt_ref, range(5, 10))
    for p, r in zip(b, ref):
        master = opt_b.state[p].get("master_param")
        if master is None:
            master = _join_master(p, opt_b.state[p]["master_remainder"])
        assert torch.equal(bits(master), bits(opt_ref.state[r]["master_param"]))


# ----------------------------------------------------------------------------- state bytes

MODES = [
    (torch.float32, {}), (torch.float16, {}), (torch.bfloat16, {}), (torch.bfloat16, {"master_weights": False}),
    (torch.bfloat16, {"stochastic_rounding": True}), (torch.bfloat16, {"param_remainders": True}),
]


@pytest.mark.parametrize("dtype,kw", MODES)
def test_state_bytes_counts_what_is_allocated_and_matches_the_per_param_formula(dtype, kw):
    shapes = [(1000, 1024), (300,), (5,)]
    params = make_params(shapes, dtype)
    opt = FusedAdamW(params, **kw)
    assert opt.state_bytes()["total"] == 0  # nothing allocated before the first step
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    opt.step()
    sb = opt.state_bytes()
    assert set(sb) == {"masters", "remainders", "exp_avg", "exp_avg_sq", "scales", "total"}
    assert sb["total"] == sum(v for k, v in sb.items() if k != "total")
    expect = 0
    for st in opt.state.values():
        expect += sum(t.numel() * t.element_size() for k, t in st.items() if torch.is_tensor(t) and k != "step")
    assert sb["total"] == expect
    per_param = state_bytes_per_param(dtype, **kw)
    n = sum(p.numel() for p in params)
    # Exact for whole int8 blocks; the two small tensors add at most one partial block each.
    assert abs(sb["total"] - per_param * n) <= 2 * 2 * 4
    big = opt.state[params[0]]
    assert sum(t.numel() * t.element_size() for k, t in big.items() if k != "step") == per_param * params[0].numel()


def test_state_bytes_per_param_table():
    assert state_bytes_per_param(torch.float32) == 8
    assert state_bytes_per_param(torch.bfloat16) == 12
    assert state_bytes_per_param(torch.float16, master_weights=False) == 8
    assert state_bytes_per_param(torch.bfloat16, stochastic_rounding=True) == 8
    assert state_bytes_per_param(torch.bfloat16, param_remainders=True) == 10


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize("dtype,kw,match", [
    (torch.float32, dict(moments="fp8"), "moments"),
    (torch.float32, dict(moments=None), "moments"),
    (torch.float16, dict(param_remainders=True), "param_remainders"),
    (torch.float32, dict(param_remainders=True), "param_remainders"),
    (torch.bfloat16, dict(param_remainders=True, master_weights=False), "param_remainders"),
    (torch.bfloat16, dict(param_remainders=True, stochastic_rounding=True), "param_remainders"),
])
def test_bad_combinations_raise_value_error_naming_the_argument(dtype, kw, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW(make_params([(4,)], dtype), **kw)
    with pytest.raises(ValueError, match=match):
        state_bytes_per_param(dtype, **kw)


def test_param_remainders_must_be_a_bool():
    with pytest.raises(TypeError, match="param_remainders"):
        FusedAdamW(make_params([(4,)], torch.bfloat16), param_remainders=1)


def test_op_refuses_int16_masters_for_fp16_params():
    p, g = torch.randn(8).half(), torch.randn(8).half()
    m, v, s = torch.zeros(8), torch.zeros(8), torch.zeros(())
    with pytest.raises(ValueError, match="remainders, for bfloat16 params only"):
        torch.ops.cogkern.fused_adamw_([p], [g], [m], [v], [torch.zeros(8, dtype=torch.int16)], [s], [0], [0],
                                       [1e-3], [None], [0.9], [0.999], [1e-8], [0.0], None, 0, False, [], [])
    assert s.item() == 0


def test_moment_block_is_the_kernels():
    assert MOMENT_BLOCK == 256
