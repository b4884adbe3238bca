"""cogkern.amp.DynamicLossScaler on the CPU: the hysteresis sequence, bounds,
GradScaler's public API and its errors, checkpoints."""
import math
import random

import pytest
import torch

from cogkern.amp import DynamicLossScaler
from cogkern.optim import FusedAdamW


class Rig:
    """A one-param FusedAdamW whose gradient overflows on demand."""

    def __init__(self, scaler):
        self.p = torch.zeros(4)
        self.opt = FusedAdamW([self.p], lr=1e-3)
        self.scaler = scaler

    def iteration(self, overflow: bool):
        self.scaler.scale(torch.ones(()))
        self.p.grad = torch.full((4,), math.inf if overflow else 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        sd = self.scaler.state_dict()
        return sd["scale"], sd["_growth_tracker"], sd["_hysteresis_tracker"]


# (event, scale, growth tracker, hysteresis tracker) after each update, for
# init 1024, x2 / x0.5, growth_interval 3, hysteresis 2, min 256, max 4096.
SEQUENCE = [
    ("O", 1024, 0, 1),  # first overflow: hysteresis absorbs it
    ("O", 512, 0, 0),  # second: back off
    ("O", 256, 0, -1),  # every further overflow backs off until a growth
    ("O", 256, 0, -2),  # ... but never below min_scale
    ("C", 256, 1, -2),
    ("C", 256, 2, -2),
    ("C", 512, 0, 2),  # growth_interval clean steps: grow, hysteresis restored
    ("O", 512, 0, 1),
    ("C", 512, 1, 1),  # a clean step does not restore hysteresis
    ("O", 256, 0, 0),
    ("C", 256, 1, 0),
    ("C", 256, 2, 0),
    ("C", 512, 0, 2),
    *[("C", 512, 1, 2), ("C", 512, 2, 2), ("C", 1024, 0, 2)],
    *[("C", 1024, 1, 2), ("C", 1024, 2, 2), ("C", 2048, 0, 2)],
    *[("C", 2048, 1, 2), ("C", 2048, 2, 2), ("C", 4096, 0, 2)],
    *[("C", 4096, 1, 2), ("C", 4096, 2, 2), ("C", 4096, 0, 2)],  # never above max_scale
]


def test_scaler_sequence_table():
    rig = Rig(DynamicLossScaler(init_scale=1024.0, growth_interval=3, hysteresis=2, min_scale=256.0, max_scale=4096.0))
    for i, (event, scale, growth, hyst) in enumerate(SEQUENCE):
        got = rig.iteration(event == "O")
        assert got == (scale, growth, hyst), f"after event {i} ({event}): {got} != {(scale, growth, hyst)}"
        assert rig.scaler.last_step_skipped == (event == "O")
        assert rig.opt.last_step_skipped == (event == "O")
    clean = sum(e == "C" for e, *_ in SEQUENCE)
    assert rig.opt.state[rig.p]["step"].item() == clean  # only taken steps count


def test_hysteresis_one_matches_torch_grad_scaler():
    ours = Rig(DynamicLossScaler(init_scale=2.0**16, growth_interval=4, hysteresis=1, min_scale=1e-30, max_scale=1e30))
    p = torch.zeros(4)
    opt = torch.optim.SGD([p], lr=0.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=4)
    rng = random.Random(0)
    for _ in range(60):
        overflow = rng.random() < 0.3
        scale, growth, _ = ours.iteration(overflow)
        theirs.scale(torch.ones(()))
        p.grad = torch.full((4,), math.inf if overflow else 1.0)
        theirs.step(opt)
        theirs.update()
        assert scale == theirs.get_scale() and growth == theirs.state_dict()["_growth_tracker"]


def test_state_is_on_the_device_and_scale_multiplies_nests():
    scaler = DynamicLossScaler(init_scale=8.0)
    x = torch.ones(3)
    out = scaler.scale({"a": x, "b": [x, (x * 2,)]})
    assert torch.equal(out["a"], x * 8) and torch.equal(out["b"][1][0], x * 16)
    assert isinstance(out["b"][1], tuple)
    assert scaler.scale_tensor.dim() == 0 and scaler.scale_tensor.dtype == torch.float32
    assert scaler.get_scale() == 8.0 and scaler.is_enabled()
    with pytest.raises(TypeError, match="outputs"):
        scaler.scale("loss")


def test_disabled_scaler_is_a_pass_through():
    scaler = DynamicLossScaler(enabled=False)
    p = torch.zeros(2)
    opt = FusedAdamW([p], lr=0.1, weight_decay=0.0)
    loss = torch.ones(())
    assert scaler.scale(loss) is loss
    p.grad = torch.ones(2)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert (p < 0).all() and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert not scaler.is_enabled()


def test_update_with_new_scale():
    rig = Rig(DynamicLossScaler(init_scale=64.0))
    rig.iteration(False)
    rig.scaler.update(new_scale=2.0)
    assert rig.scaler.get_scale() == 2.0
    rig.scaler.update(new_scale=torch.tensor(4.0))
    assert rig.scaler.get_scale() == 4.0
    with pytest.raises(TypeError, match="new_scale"):
        rig.scaler.update(new_scale="8")


def test_call_order_errors():
    scaler = DynamicLossScaler()
    p = torch.zeros(2)
    opt = FusedAdamW([p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="scale"):
        scaler.step(opt)  # scale() never called
    scaler.scale(torch.ones(()))
    with pytest.raises(RuntimeError, match="No inf checks"):
        scaler.update()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: None)
    scaler.update()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(init_scale=0.5), ValueError, "init_scale"),
    (dict(init_scale="big"), TypeError, "init_scale"),
    (dict(growth_factor=0.5), ValueError, "growth_factor"),
    (dict(backoff_factor=0.0), ValueError, "backoff_factor"),
    (dict(backoff_factor=1.5), ValueError, "backoff_factor"),
    (dict(growth_interval=0), ValueError, "growth_interval"),
    (dict(growth_interval=2.5), TypeError, "growth_interval"),
    (dict(hysteresis=0), ValueError, "hysteresis"),
    (dict(min_scale=-1.0), ValueError, "min_scale"),
    (dict(max_scale=0.5), ValueError, "max_scale"),
    (dict(init_scale=float("inf")), ValueError, "init_scale"),
    (dict(enabled=1), TypeError, "enabled"),
])
def test_invalid_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        DynamicLossScaler(**kw)


def test_op_validates_arguments():
    s, g, h, f = torch.ones(()), torch.zeros((), dtype=torch.int32), torch.ones((), dtype=torch.int32), torch.zeros(())
    op = torch.ops.cogkern.loss_scale_update_
    with pytest.raises(ValueError, match="growth_tracker must be Int"):
        op(s, g.float(), h, f, 2.0, 0.5, 10, 2, 1.0, 100.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        op(s, g, h, f, 2.0, 0.0, 10, 2, 1.0, 100.0)
    with pytest.raises(ValueError, match="max_scale"):
        op(s, g, h, f, 2.0, 0.5, 10, 2, 1.0, 0.5)
    assert s.item() == 1.0


def test_state_dict_round_trip_in_place_and_before_init():
    a = Rig(DynamicLossScaler(init_scale=2.0**10, growth_interval=2, hysteresis=3))
    for ev in (True, False, True, True, False):
        a.iteration(ev)
    sd = a.scaler.state_dict()
    assert sd["hysteresis"] == 3 and sd["_hysteresis_tracker"] == a.scaler._hysteresis_tracker.item()

    fresh = DynamicLossScaler(init_scale=1.0, hysteresis=3)
    fresh.load_state_dict(sd)  # before any scale(): kept until the device is known
    assert fresh.get_scale() == sd["scale"] and fresh.state_dict() == sd
    b = Rig(fresh)
    for ev in (False, True, False, False):
        assert a.iteration(ev) == b.iteration(ev)

    scale_tensor = b.scaler.scale_tensor
    b.scaler.load_state_dict(sd)
    assert b.scaler.scale_tensor is scale_tensor  # loaded in place (CUDA graphs keep their pointers)
    assert b.scaler.state_dict() == sd


def test_loads_a_torch_grad_scaler_state_dict():
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_factor=4.0, growth_interval=7)
    ours = DynamicLossScaler(hysteresis=2)
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_scale() == 2.0**12 and ours.get_growth_factor() == 4.0 and ours.get_growth_interval() == 7
    assert ours.state_dict()["_hysteresis_tracker"] == 2
    with pytest.raises(RuntimeError, match="empty"):
        ours.load_state_dict({})


def test_several_optimizers_share_one_update():
    scaler = DynamicLossScaler(init_scale=64.0, hysteresis=1)
    p, q = torch.zeros(3), torch.zeros(3)
    o1, o2 = FusedAdamW([p]), torch.optim.SGD([q], lr=0.1)
    scaler.scale(torch.ones(()))
    p.grad = torch.ones(3)
    q.grad = torch.tensor([1.0, math.nan, 1.0])
    scaler.step(o1)
    scaler.step(o2)
    scaler.update()
    assert scaler.get_scale() == 32.0 and scaler.last_step_skipped
    assert not o1.last_step_skipped and torch.equal(q, torch.zeros(3))


# ---------------------------------------------------------------------------- the scaler/optimizer protocol


class _Recorder(torch.optim.SGD):
    """An SGD that records what the scaler hands its step()."""

    _step_supports_amp_scaling = True

    def __init__(self, params, checks_overflow):
        super().__init__(params, lr=0.1)
        self.step_checks_overflow = checks_overflow
        self.skipped_flag = torch.zeros(())
        self.calls = []

    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        self.calls.append(dict(grad_scale=grad_scale, found_inf=found_inf,
                               attr_scale=getattr(self, "grad_scale", None), attr_found=getattr(self, "found_inf", None)))
        self.skipped_flag = torch.ones(())  # "found an overflow" (read only by scalers when step_checks_overflow)
        return "stepped"


@pytest.mark.parametrize("checks_overflow", [True, False])
def test_scaler_drives_optimizers_by_their_public_protocol(checks_overflow):
    p = torch.zeros(3)
    opt = _Recorder([p], checks_overflow)
    scaler = DynamicLossScaler(init_scale=8.0)
    scaler.scale(torch.ones(()))
    p.grad = torch.full((3,), 8.0)
    assert scaler.step(opt) == "stepped"
    (call,) = opt.calls
    if checks_overflow:  # only the scale, as a kwarg; the optimizer's skipped_flag is the verdict
        assert call["grad_scale"].item() == 8.0 and call["found_inf"] is None and call["attr_scale"] is None
    else:  # torch.amp.GradScaler's way: scale and overflow flag as attributes, removed afterwards
        assert call["grad_scale"] is None and call["attr_scale"].item() == 8.0 and call["attr_found"].item() == 0.0
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    scaler.update()
    hysteresis = scaler.state_dict()["_hysteresis_tracker"]
    # The recorded overflow: the optimizer's own verdict, or the scaler's scan of the (finite) gradients.
    assert hysteresis == (1 if checks_overflow else 2)


def test_fused_adamw_finds_overflow_itself_given_only_grad_scale():
    p = torch.ones(4)
    opt = FusedAdamW([p], lr=1e-3)
    p.grad = torch.tensor([1.0, math.inf, 1.0, 1.0])
    opt.step(grad_scale=torch.tensor(4.0))
    assert opt.last_step_skipped and torch.equal(p, torch.ones(4)) and opt.state[p]["step"].item() == 0
    p.grad = torch.full((4,), 4.0)
    opt.step(grad_scale=torch.tensor(4.0))
    assert not opt.last_step_skipped and opt.state[p]["step"].item() == 1


def test_amp_and_optim_do_not_import_each_other():
    import ast

    import cogkern.amp
    import cogkern.optim

    for module, other in ((cogkern.amp, "optim"), (cogkern.optim, "amp")):
        tree = ast.parse(open(module.__file__).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == other or n.endswith("." + other) for n in names), (module.__name__, names)
            if isinstance(node, ast.Import):
                assert not any(a.name.endswith("." + other) for a in node.names), module.__name__
