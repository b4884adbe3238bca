"""cogkern.parallel.ulysses_attention and FusedAttention(group=...) on two gloo CPU
processes, against fused_attention / FusedAttention on the full sequence (float64).

One spawn runs every distributed check (the ranks save what they computed, or
the error they raised, and how many collectives they called); the tests below
read its results and compare them with the full-sequence run made here."""
from __future__ import annotations

import copy
import datetime
import os
import re
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogkern import FusedAttention, RoPE3D, fused_attention
from cogkern.parallel import ring_attention, ulysses_attention
from test_attention import differentiable_inputs, make_case

WORLD = 2
NORM_PARAMS = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")

FUNCTIONS = {"ulysses": ulysses_attention, "ring": ring_attention}
# name: (function, batch, seq_lens, heads, head_dim, text_len, qk_norm, rope kind, causal, return_lse,
#        pass seq_lens)
CASES = {
    # 24 text tokens: the text spans the rank boundary (rank 1 starts at token 20).
    "ln-text-spans-ranks": ("ulysses", 2, (20, 20), 4, 16, 24, "layer_norm", "angles", False, True, False),
    # 5 text tokens, shorter than rank 0's slice; an uneven split.
    "rms-short-text-uneven": ("ulysses", 1, (23, 18), 2, 16, 5, "rms_norm", "angles", False, True, True),
    "ln-table-causal-uneven": ("ulysses", 1, (9, 16), 4, 8, 3, "layer_norm", "table", True, False, False),
    "rms-halfsplit-empty-rank": ("ulysses", 2, (0, 19), 2, 8, 4, "rms_norm", "halfsplit", False, True, True),
    # Ring attention: fewer heads than ranks, or heads not divisible by them.
    "ring-one-head-uneven": ("ring", 1, (23, 18), 1, 16, 5, "layer_norm", "angles", False, True, True),
    # Rank 0 has fewer tokens than rank 1 (its queries padded) and rank 1 more (in pieces).
    "ring-three-heads-causal-table": ("ring", 2, (9, 16), 3, 8, 3, "rms_norm", "table", True, True, False),
    "ring-text-spans-ranks-causal": ("ring", 1, (20, 20), 1, 16, 24, "layer_norm", "angles", True, True, True),
    "ring-empty-rank": ("ring", 2, (0, 19), 1, 8, 4, "rms_norm", "angles", False, False, True),
}
# FusedAttention: (batch, seq_lens, dim, heads, qk_norm, text_len, grid)
MODULE_CASE = (2, (14, 11), 64, 4, "layer_norm", 7, (2, 3, 3))


def _offsets(seq_lens):
    return [sum(seq_lens[:r]) for r in range(len(seq_lens))]


def _full_case(name):
    """The full-sequence inputs of a case (leaves) and the upstream gradients of out and lse."""
    _, batch, seq_lens, heads, head_dim, text_len, norm, rope_kind, causal, return_lse, _ = CASES[name]
    seq = sum(seq_lens)
    q, k, v, kwargs = make_case(batch, seq, heads, head_dim, text_len, norm, rope_kind, seed=list(CASES).index(name))
    kwargs.update(causal=causal, return_lse=return_lse)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(batch, heads, seq, generator=g, dtype=torch.float64)
    return (q, k, v), kwargs, grad_out, grad_lse


def _loss(result, grad_out, grad_lse):
    if isinstance(result, tuple):
        out, lse = result
        return (out * grad_out).sum() + (lse * grad_lse).sum()
    return (result * grad_out).sum()


def _full_module():
    batch, seq_lens, dim, heads, qk_norm, text_len, grid = MODULE_CASE
    torch.manual_seed(5)
    module = FusedAttention(dim, heads, qk_norm=qk_norm).double()
    with torch.no_grad():  # norm parameters away from 1 and 0
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(batch, sum(seq_lens), dim, dtype=torch.float64)
    grad = torch.randn(batch, sum(seq_lens), dim, dtype=torch.float64)
    return module, x, grad, RoPE3D(grid, dim // heads)


# ----------------------------------------------------------------------------
# What the ranks run
# ----------------------------------------------------------------------------


@contextmanager
def _counting_collectives(counts):
    """Counts the collectives ulysses_attention calls (it calls them as torch.distributed.<name>)."""
    saved = {}
    for name in ("all_gather", "all_to_all_single"):
        saved[name] = original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _raised(fn):
    """(exception type name, message, collectives called) of fn(), which must raise."""
    counts = {}
    with _counting_collectives(counts):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test compares the type
            return type(e).__name__, str(e), counts
    return None, "did not raise", counts


def _run_case(name, rank):
    (q, k, v), kwargs, grad_out, grad_lse = _full_case(name)
    function, seq_lens = FUNCTIONS[CASES[name][0]], CASES[name][2]
    start, n = _offsets(seq_lens)[rank], seq_lens[rank]

    def local(t):
        return t.detach()[:, start : start + n].clone().requires_grad_()

    q, k, v, grad_out = local(q), local(k), local(v), grad_out[:, start : start + n]
    grad_lse = grad_lse[:, :, start : start + n]
    params = {p: kwargs[p].detach().clone().requires_grad_() for p in NORM_PARAMS if kwargs.get(p) is not None}
    kwargs.update(params)
    passed = {"seq_lens": list(seq_lens)} if CASES[name][10] else {}
    counts = {}
    with _counting_collectives(counts):
        result = function(q, k, v, **passed, **kwargs)
        _loss(result, grad_out, grad_lse).backward()
    out, lse = result if isinstance(result, tuple) else (result, None)
    return {
        "out": out.detach(), "lse": None if lse is None else lse.detach(),
        "contiguous": out.is_contiguous() and (lse is None or lse.is_contiguous()),
        "grads": [t.grad for t in (q, k, v)], "norm_grads": {p: t.grad for p, t in params.items()},
        "collectives": counts,
    }  # fmt: skip


def _run_module(rank):
    batch, seq_lens, dim, heads, qk_norm, text_len, grid = MODULE_CASE
    full, x, grad, rope = _full_module()
    module = FusedAttention(dim, heads, qk_norm=qk_norm, group=dist.group.WORLD).double()
    module.load_state_dict(full.state_dict())
    # A model built before its group is known gets it set afterwards.
    late = FusedAttention(dim, heads, qk_norm=qk_norm).double()
    late.load_state_dict(full.state_dict())
    late.group = dist.group.WORLD
    start, n = _offsets(seq_lens)[rank], seq_lens[rank]
    x = x[:, start : start + n].clone().requires_grad_()
    out = module(x, rope=rope, text_len=text_len)
    (out * grad[:, start : start + n]).sum().backward()
    with torch.no_grad():
        again = module(x, rope=rope, text_len=text_len, seq_lens=list(seq_lens))  # no all_gather
        late_out = late(x, rope=rope, text_len=text_len)
    twin = copy.deepcopy(module)  # EMA-style copies share the group
    return {
        "out": out.detach(), "x_grad": x.grad, "again_equal": torch.equal(again, out) and torch.equal(late_out, out),
        "param_grads": {name: p.grad for name, p in module.named_parameters()},
        "deepcopy_shares_group": twin.group is module.group and twin.to_q.weight is not module.to_q.weight,
    }  # fmt: skip


def _run_group_of_one(rank):
    # new_group is collective: every rank makes both one-rank groups.
    own = [dist.new_group([r]) for r in range(WORLD)][rank]
    (q, k, v), kwargs, _, _ = _full_case("ln-text-spans-ranks")
    want = fused_attention(q, k, v, **kwargs)
    counts = {}
    with _counting_collectives(counts):
        got = [function(q, k, v, group=own, **kwargs) for function in FUNCTIONS.values()]
    return all(torch.equal(a, b) for result in got for a, b in zip(result, want)) and not counts


def _run_errors(rank):
    (q, k, v), kwargs, _, _ = _full_case("ln-text-spans-ranks")
    q, k, v = (t.detach()[:, :20] for t in (q, k, v))  # 20 of the 40 tokens on each rank, 4 heads
    three_heads = [t[:, :, :3] for t in (q, k, v)]
    one_head_more = [t[:, :, : 2 + 2 * rank] for t in (q, k, v)]  # 2 heads on rank 0, 4 on rank 1
    wrong_own_len = [20, 20]
    wrong_own_len[rank] = 19
    return {
        "heads-indivisible": _raised(lambda: ulysses_attention(*three_heads, **kwargs)),
        "seq_lens-length": _raised(lambda: ulysses_attention(q, k, v, seq_lens=[20], **kwargs)),
        "seq_lens-local": _raised(lambda: ulysses_attention(q, k, v, seq_lens=wrong_own_len, **kwargs)),
        "seq_lens-type": _raised(lambda: ulysses_attention(q, k, v, seq_lens=20, **kwargs)),
        "heads-differ-across-ranks": _raised(lambda: ulysses_attention(*one_head_more)),
        "k-shape": _raised(lambda: ulysses_attention(q, k[:, :9], v, **kwargs)),
        "unknown-keyword": _raised(lambda: ulysses_attention(q, k, v, text_length=3)),
        # A RoPE that does not fit the full sequence: fused_attention's own check, on both ranks alike.
        "rope-misfit": _raised(lambda: ulysses_attention(q, k, v, **{**kwargs, "rope": RoPE3D((1, 1, 3), 16)})),
        "ring-rope-misfit": _raised(lambda: ring_attention(q, k, v, seq_lens=[20, 20],
                                                           **{**kwargs, "rope": RoPE3D((1, 1, 3), 16)})),
        "ring-halfsplit": _raised(lambda: ring_attention(q, k, v, seq_lens=[20, 20], **{
            **kwargs, "rope": RoPE3D((1, 4, 4), 16, interleaved=False)})),
        "module-heads": _raised(lambda: FusedAttention(24, 3, group=dist.group.WORLD)),
        "module-group-type": _raised(lambda: FusedAttention(32, 4, group="world")),
        "module-heads-set-later": _raised(lambda: setattr(FusedAttention(24, 3), "group", dist.group.WORLD)),
    }


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    # File rendezvous (no port to pick); every collective is bounded by the timeout.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {name: _run_case(name, rank) for name in CASES}
        results["module"] = _run_module(rank)
        results["group-of-one"] = _run_group_of_one(rank)
        results["errors"] = _run_errors(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks are done communicating before either tears the group down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ulysses")
    mp.start_processes(_worker, args=(str(out_dir),), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------


def _assert_close(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_gathered_output_and_gradients_equal_the_full_sequence(ranks, name):
    (q, k, v), kwargs, grad_out, grad_lse = _full_case(name)
    result = fused_attention(q, k, v, **kwargs)
    inputs = differentiable_inputs(q, k, v, kwargs)
    want_grads = torch.autograd.grad(_loss(result, grad_out, grad_lse), inputs)
    want_out, want_lse = result if isinstance(result, tuple) else (result, None)

    local = [r[name] for r in ranks]
    assert all(r["contiguous"] for r in local)
    _assert_close(torch.cat([r["out"] for r in local], dim=1), want_out)
    if want_lse is not None:  # lse comes back as (batch, heads, local_seq)
        _assert_close(torch.cat([r["lse"] for r in local], dim=2), want_lse)
    else:
        assert all(r["lse"] is None for r in local)
    for i in range(3):  # q, k, v: each rank holds its slice of the full gradient
        _assert_close(torch.cat([r["grads"][i] for r in local], dim=1), want_grads[i])
    # The norm parameters: each rank's gradient is its heads' share, and the shares sum to the full one.
    want_norm = dict(zip([p for p in NORM_PARAMS if kwargs.get(p) is not None], want_grads[3:]))
    assert set(local[0]["norm_grads"]) == set(want_norm) and want_norm
    for p, want in want_norm.items():
        _assert_close(sum(r["norm_grads"][p] for r in local), want)
        assert not torch.allclose(local[0]["norm_grads"][p], want)  # a share, not the whole
    # One all_gather of the lengths unless they were passed; Ulysses: the q, k, v exchange and the
    # output (and lse) exchange, forward and backward (the ring's send/recv is not counted).
    gathers = {} if CASES[name][10] else {"all_gather": 1}
    exchanges = 4 + (2 if kwargs["return_lse"] else 0) if CASES[name][0] == "ulysses" else 0
    for r in local:
        assert r["collectives"] == {**gathers, **({"all_to_all_single": exchanges} if exchanges else {})}


@pytest.mark.slow
def test_module_with_a_group_equals_the_module_on_the_full_sequence(ranks):
    full, x, grad, rope = _full_module()
    x.requires_grad_()
    text_len = MODULE_CASE[5]
    out = full(x, rope=rope, text_len=text_len)
    (out * grad).sum().backward()
    local = [r["module"] for r in ranks]
    _assert_close(torch.cat([r["out"] for r in local], dim=1), out.detach())
    _assert_close(torch.cat([r["x_grad"] for r in local], dim=1), x.grad)
    # Every parameter's gradient is the rank's share; summed over the group (what DDP / FSDP over the
    # group does) it is the full-sequence gradient.
    for name, p in full.named_parameters():
        _assert_close(sum(r["param_grads"][name] for r in local), p.grad)
    assert all(r["again_equal"] and r["deepcopy_shares_group"] for r in local)


@pytest.mark.slow
def test_group_of_one_is_plain_fused_attention(ranks):  # for both functions
    assert all(r["group-of-one"] for r in ranks)


ERRORS = {
    # name: (exception, message, collectives called before it was raised)
    "heads-indivisible": ("ValueError", "heads=3 is not divisible by the group size 2", {}),
    "seq_lens-length": ("ValueError", "seq_lens has 1 entries but the group has 2 ranks", {}),
    "seq_lens-local": ("ValueError", r"seq_lens\[{rank}\]=19 does not match this rank's q, which has local_seq=20", {}),
    "seq_lens-type": ("ValueError", "seq_lens must be a sequence of ints", {}),
    "heads-differ-across-ranks": ("ValueError", r"differ across the group \(rank 0: \(2, 20, 2, 16\), rank 1: "
                                  r"\(2, 20, 4, 16\)\)", {"all_gather": 1}),
    "k-shape": ("ValueError", "k must have q's shape", {}),
    "unknown-keyword": ("TypeError", "does not take: text_length", {}),
    "rope-misfit": ("ValueError", r"rope grid \[1, 1, 3\] has 3 video tokens but q has seq - text_len = 40 - 24",
                    {"all_gather": 1}),
    "ring-rope-misfit": ("ValueError", r"rope grid \[1, 1, 3\] has 3 video tokens", {}),
    "ring-halfsplit": ("ValueError", "ring_attention takes an interleaved RoPE3D", {}),
    "module-heads": ("ValueError", "heads=3 is not divisible by the group size 2", {}),
    "module-group-type": ("ValueError", "group must be None or a torch.distributed ProcessGroup", {}),
    "module-heads-set-later": ("ValueError", "heads=3 is not divisible by the group size 2", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_raises_on_every_rank_before_communicating(ranks, name):
    kind, message, collectives = ERRORS[name]
    for rank, r in enumerate(ranks):
        got_kind, got_message, got_collectives = r["errors"][name]
        assert got_kind == kind, got_message
        assert re.search(message.format(rank=rank), got_message), got_message
        assert got_collectives == collectives


def test_needs_an_initialized_process_group():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ulysses_attention(q, q, q)


def test_module_without_a_group_takes_no_seq_lens():
    module = FusedAttention(16, 2).double()
    assert module.group is None
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="seq_lens is for a FusedAttention built with a group"):
        module(x, seq_lens=[5])
