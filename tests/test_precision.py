"""The activation watch (cogkern.precision.watch) and the stress config on which fp16 hits its wall."""
import csv
import math

import pytest
import torch
import torch.nn as nn

from cogkern.precision import FP16_MAX, watch
from cogkern.train import train

FAST = ["--device", "cpu", "--quiet", "--no-plot", "--log-every", "5", "--ckpt-every", "1000000"]


def _mlp():
    """Linear (0) -> GELU (1) -> Linear (2) -> LayerNorm (3) -> Linear (4), fresh random weights."""
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 11), nn.LayerNorm(11), nn.Linear(11, 5))


def _reference_outputs(model, x):
    """Every module's output, recomputed in float64."""
    outs, h = {}, x.double()
    with torch.no_grad():
        for name, module in model.double().named_children():
            h = module(h)
            outs[name] = h
    model.float()
    return outs


def _push_to(linear: nn.Linear, x_in: torch.Tensor, target: float) -> None:
    """Scales `linear` so that its largest output on `x_in` is `target` (computed in float64)."""
    with torch.no_grad():
        peak = float(linear.double()(x_in.double()).abs().max())
        linear.float()
        linear.weight.mul_(target / peak)
        linear.bias.mul_(target / peak)


@pytest.mark.parametrize("target,unsafe", [(3.1e5, True), (4.1e4, True), (2.9e4, False)])
def test_watch_names_the_module_pushed_toward_fp16_max(target, unsafe):
    """Past 65504, within 2x of it (4.1e4 > 65504 / 2) and just outside 2x: only the first two are unsafe,
    and the watch names the pushed module, not the downstream ones its large output also reaches."""
    torch.manual_seed(0)
    model = _mlp()
    batches = [torch.randn(6, 7) for _ in range(4)]
    with watch(model) as w:
        for step, x in enumerate(batches):
            if step == 2:  # safe for two steps, then module "2" is pushed (its peak over the remaining batches)
                _push_to(model[2], model[1](model[0](torch.cat(batches[2:]))), target)
            model(x)
            w.step()
    ref = [_reference_outputs(model, x) for x in batches[2:]]
    report = w.report()
    rows = {r.module: r for r in report.rows}
    assert max(float(o["2"].abs().max()) for o in ref) == pytest.approx(target, rel=1e-6)
    assert [r.module for r in report.rows] == ["0", "1", "2", "3", "4"]  # execution order
    assert rows["2"].max_abs == pytest.approx(max(float(o["2"].abs().max()) for o in ref), rel=1e-5)
    assert rows["2"].headroom == pytest.approx(FP16_MAX / rows["2"].max_abs)
    if unsafe:
        assert w.first_unsafe() == "2" and report.first_unsafe == "2"
        assert rows["2"].first_unsafe_step == 2
    else:
        assert w.first_unsafe() is None and rows["2"].first_unsafe_step is None
    assert rows["0"].first_unsafe_step is None and rows["3"].first_unsafe_step is None  # LayerNorm tames it


def test_watch_flags_non_finite_outputs_at_the_step_they_appear():
    """An fp16 model whose second Linear overflows to inf at step 1 (LayerNorm then makes nan)."""
    torch.manual_seed(1)
    model = _mlp().half()
    with watch(model) as w:
        model(torch.randn(3, 7).half())
        w.step()
        with torch.no_grad():
            model[0].weight.fill_(1.0)
            model[0].bias.zero_()
            model[2].weight.fill_(1e3)  # inputs in [1, 2): every output of "2" >= 13 * 7 * 1e3 > 65504
        model((torch.rand(3, 7) + 1).half())
        w.step()
    rows = {r.module: r for r in w.report().rows}
    assert rows["2"].max_abs == math.inf and math.isnan(rows["3"].max_abs)
    assert rows["0"].max_abs < 15 and rows["0"].first_unsafe_step is None
    assert w.first_unsafe() == "2" and rows["2"].first_unsafe_step == 1 and rows["3"].first_unsafe_step == 1


def test_watch_backward_records_the_gradient_into_each_output():
    torch.manual_seed(2)
    model = _mlp()
    x = torch.randn(5, 7)
    with watch(model, backward=True) as w:
        out = model(x)
        (out * 300.0).sum().backward()  # d loss / d out = 300 everywhere
    rows = {r.module: r for r in w.report().rows}
    assert rows["4.grad_output"].max_abs == pytest.approx(300.0)
    # the gradient into Linear 2's output, recomputed in float64
    xd = x.double()
    h2 = model.double()[:3](xd).detach().requires_grad_()
    (model[3:](h2) * 300.0).sum().backward()
    model.float()
    assert rows["2.grad_output"].max_abs == pytest.approx(float(h2.grad.abs().max()), rel=1e-5)
    assert [r.module for r in w.report().rows][:5] == ["0", "1", "2", "3", "4"]  # forward rows run first


def test_watch_never_reads_the_device_while_training(monkeypatch):
    """Structural check: no .item(), bool(), float(), .tolist(), .cpu() of a tensor during forward,
    backward or step() with the watch on."""
    torch.manual_seed(3)
    model = _mlp()
    w = watch(model, backward=True)
    x = torch.randn(4, 7)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync during the watched step")

    with monkeypatch.context() as patched:
        for attr in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
            patched.setattr(torch.Tensor, attr, refuse)
        for _ in range(3):
            model(x).square().sum().backward()
            w.step()
    w.close()
    assert w.steps == 3 and w.first_unsafe() is None


def test_watch_csv_and_plot(tmp_path):
    torch.manual_seed(4)
    model = _mlp()
    xs = [torch.randn(2, 7) for _ in range(5)]
    with watch(model) as w:
        for x in xs:
            model(x)
            w.step()
        model[:2](xs[0])  # an open step in which only modules 0 and 1 ran
    w.to_csv(tmp_path / "watch.csv")
    with open(tmp_path / "watch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "0", "1", "2", "3", "4"]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    for r, x in zip(rows, xs):
        ref = _reference_outputs(model, x)
        for name in ("0", "2", "4"):
            assert float(r[name]) == pytest.approx(float(ref[name].abs().max()), rel=1e-5)
    assert rows[5]["2"] == "" and float(rows[5]["1"]) > 0
    if w.plot(tmp_path / "watch.png"):
        assert (tmp_path / "watch.png").stat().st_size > 1000


@pytest.mark.parametrize("model,kwargs,message", [
    ("not a module", {}, "model must be an nn.Module"),
    (None, dict(headroom=0.5), "headroom must be"),
    (None, dict(limit=math.inf), "limit must be"),
    (None, dict(backward=1), "backward must be a bool"),
    (None, dict(start_step=-1), "start_step must be"),
])
def test_watch_refuses_bad_arguments(model, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        watch(_mlp() if model is None else model, **kwargs)


def test_train_watch_flag_writes_the_csv(tmp_path):
    summary = train(FAST + ["--steps", "3", "--watch", "--out", str(tmp_path)])
    report = summary["watch"]
    assert report.first_unsafe is None and report.steps == 3
    with open(tmp_path / "watch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert {"patch_embed", "blocks.0.attn1", "blocks.1.ff.2", "proj_out"} <= set(rows[0])
    assert all(0 < float(r["proj_out"]) < 100 for r in rows)


@pytest.mark.slow
def test_stress_config_overflows_in_fp16_and_trains_in_bf16(tmp_path):
    """The stress config (massive activations, cogkern.model) with the default seed: fp16's forward
    overflows from step 0 and the dynamic loss scale backs off to its floor (1) by step 17, well inside the
    study's default 200 steps; bf16 holds the same values (beyond 65504) and trains. 20 steps of each."""
    steps = 20
    runs = {p: train(FAST + ["--config", "stress", "--precision", p, "--steps", str(steps), "--watch",
                             "--out", str(tmp_path / p)]) for p in ("fp16", "bf16")}
    fp16, bf16 = runs["fp16"]["rows"], runs["bf16"]["rows"]
    assert all(r["skipped"] for r in fp16)  # every step overflowed
    assert [r["loss_scale"] for r in fp16][-3:] == [1.0, 1.0, 1.0]  # at the floor, and stalled there
    watched16 = {r.module: r for r in runs["fp16"]["watch"].rows}
    assert runs["fp16"]["watch"].first_unsafe == "blocks.0.norm1.norm"
    assert watched16["blocks.0.norm1.norm"].max_abs == math.inf and watched16["blocks.0.norm1.norm"].first_unsafe_step == 0
    # bf16: no overflow, every step applied, the loss falls; the values fp16 could not hold are real ones
    assert not any(r["skipped"] for r in bf16) and all(math.isfinite(r["loss"]) for r in bf16)
    assert sum(r["loss"] for r in bf16[-5:]) < 0.9 * sum(r["loss"] for r in bf16[:5])
    held = {r.module: r.max_abs for r in runs["bf16"]["watch"].rows}
    assert FP16_MAX < held["blocks.0.norm1.norm"] < 1e6 and all(math.isfinite(v) for v in held.values())
