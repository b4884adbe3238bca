"""The training demo on the CPU: learning, every precision, resume, DDP, the audit, bad input."""
import csv
import os
import socket

import pytest
import torch
import torch.nn as nn

from cogkern import train as train_mod
from cogkern.precision import FP16_MAX, audit
from cogkern.precision_study import main as study_main
from cogkern.precision_study import moments_available
from cogkern.train import TrainingError, main, train

FAST = ["--device", "cpu", "--quiet", "--no-plot", "--log-every", "5", "--sample-steps", "2"]  # samples: cheap


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_default_run_learns_and_writes_files(tmp_path):
    out = tmp_path / "run"
    summary = train(["--device", "cpu", "--quiet", "--steps", "120", "--out", str(out)])
    losses = [r["loss"] for r in summary["rows"]]
    assert len(losses) == 120
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == list(train_mod.METRIC_FIELDS) and len(rows) == 120
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").exists()
    assert not [p for p in os.listdir(out) if ".tmp" in p]  # atomic writes left nothing behind


@pytest.mark.parametrize("precision", ["fp16", "bf16", "bf16-sr"])
def test_each_precision_runs(tmp_path, precision):
    summary = train(FAST + ["--precision", precision, "--steps", "12", "--out", str(tmp_path)])
    rows = summary["rows"]
    assert len(rows) == 12 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if precision == "fp16":
        assert rows[0]["loss_scale"] > 1  # the dynamic loss scaler is in charge
    params = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    want = torch.float16 if precision == "fp16" else torch.bfloat16
    assert params["patch_embed.weight"].dtype == want


@pytest.mark.parametrize("attention,optimizer", [("sdpa", "torch"), ("eager", "cogkern")])
def test_ab_paths_run(tmp_path, attention, optimizer):
    summary = train(FAST + ["--attention", attention, "--optimizer", optimizer, "--steps", "6", "--out", str(tmp_path)])
    assert len(summary["rows"]) == 6


def test_attention_paths_agree_at_init():
    """cogkern, sdpa and eager attention give the same first loss from the same seed."""
    losses = {}
    for attention in ("cogkern", "sdpa", "eager"):
        s = train(FAST + ["--attention", attention, "--steps", "1", "--out", f"/tmp/ck-agree-{attention}",
                          "--ckpt-every", "1000"])
        losses[attention] = s["rows"][0]["loss"]
    assert losses["sdpa"] == pytest.approx(losses["cogkern"], rel=1e-5)
    assert losses["eager"] == pytest.approx(losses["cogkern"], rel=1e-5)


def test_resume_equals_uninterrupted_run_bitwise(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = train(FAST + ["--steps", "20", "--out", str(a)])
    train(FAST + ["--steps", "10", "--out", str(b)])
    resumed = train(FAST + ["--steps", "20", "--out", str(b), "--resume"])
    assert [r["loss"] for r in resumed["rows"]] == [r["loss"] for r in full["rows"]]
    ca = torch.load(a / "checkpoint.pt", weights_only=False)["model"]
    cb = torch.load(b / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert [r["step"] for r in read_csv(b / "metrics.csv")] == [str(i) for i in range(20)]


def test_resume_refuses_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(FAST + ["--steps", "4", "--out", str(out), "--resume"])
    train(FAST + ["--steps", "4", "--out", str(out)])
    with pytest.raises(TrainingError, match="different run.*precision"):
        train(FAST + ["--steps", "8", "--out", str(out), "--resume", "--precision", "bf16"])
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(FAST + ["--steps", "8", "--out", str(out), "--resume"]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = train_mod.v_loss
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        loss = real_loss(pred, target)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(train_mod, "v_loss", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 12.*step 10"):
        train(FAST + ["--steps", "30", "--ckpt-every", "10", "--out", str(tmp_path)])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 10


@pytest.mark.parametrize(
    "argv",
    [["--precision", "fp8"], ["--steps", "0"], ["--batch-size", "-1"], ["--lr", "nan"], ["--attention", "flash"],
     ["--config", "huge"], ["--moments", "fp8"]],
)
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        train(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bf16_sr_needs_cogkern_optimizer():
    with pytest.raises(SystemExit, match="bf16-sr needs --optimizer cogkern"):
        train(FAST + ["--precision", "bf16-sr", "--optimizer", "torch", "--steps", "1"])


def _tiny_param_numels():
    torch.manual_seed(0)
    return [p.numel() for p in train_mod.VideoTransformer(train_mod.CONFIGS["tiny"]).parameters() if p.requires_grad]


def _tiny_param_count():
    return sum(_tiny_param_numels())


@pytest.mark.parametrize("precision,moments", [("fp32", "bf16"), ("bf16", "bf16"), ("bf16-sr", "int8"),
                                               ("bf16", "int8")])
def test_lean_moments_run_and_report_their_state_bytes(tmp_path, precision, moments):
    if not moments_available(moments):
        pytest.xfail("int8 moments are not compiled into this build of the optimizer kernels")
    summary = train(FAST + ["--precision", precision, "--moments", moments, "--steps", "12", "--out", str(tmp_path)])
    rows = summary["rows"]
    assert len(rows) == 12 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    n = _tiny_param_count()
    master = 4 * n if precision == "bf16" else 0
    moment_bytes = {"bf16": 4 * n, "int8": 2 * n}[moments]
    state = summary["optimizer_state_bytes"]
    if moments == "int8":  # plus one fp32 scale per started block of 256 of each tensor, both moments
        moment_bytes += sum(2 * 4 * -(-k // 256) for k in _tiny_param_numels())
    assert state == master + moment_bytes
    assert [int(float(r["opt_state_bytes"])) for r in read_csv(tmp_path / "metrics.csv")] == [state] * 12
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["run"]["moments"] == moments
    exp_avg = next(iter(ckpt["stepper"]["opt"]["state"].values()))["exp_avg"]
    assert exp_avg.dtype == {"bf16": torch.bfloat16, "int8": torch.int8}[moments]


def test_param_remainders_train_as_fp32_masters_in_less_memory(tmp_path):
    """bf16 param + int16 remainder is the fp32 master bit for bit. The bf16 param is that master
    rounded with ties away from zero where the master mode rounds ties to even, so the odd exact
    tie makes a param one bf16 ulp apart and the runs drift apart slowly (4.7e-5 relative in the
    loss over these 12 steps when measured), far inside what bf16 itself moves the loss."""
    masters = train(FAST + ["--precision", "bf16", "--steps", "12", "--out", str(tmp_path / "m")])
    remainders = train(FAST + ["--precision", "bf16", "--param-remainders", "--steps", "12",
                               "--out", str(tmp_path / "r")])
    lm, lr_ = [r["loss"] for r in masters["rows"]], [r["loss"] for r in remainders["rows"]]
    assert lm[0] == lr_[0]
    assert max(abs(a - b) / b for a, b in zip(lr_, lm)) < 1e-3
    n = _tiny_param_count()
    assert masters["optimizer_state_bytes"] == 12 * n  # fp32 master, m, v
    assert remainders["optimizer_state_bytes"] == 10 * n  # int16 remainder, fp32 m, v


def test_resume_refuses_other_optimizer_memory_flags(tmp_path):
    out = tmp_path / "r"
    train(FAST + ["--precision", "bf16", "--steps", "4", "--out", str(out)])
    with pytest.raises(TrainingError, match="different run.*param_remainders: checkpoint False vs now True"):
        train(FAST + ["--precision", "bf16", "--param-remainders", "--steps", "8", "--out", str(out), "--resume"])
    with pytest.raises(TrainingError, match="different run.*moments: checkpoint 'fp32' vs now 'bf16'"):
        train(FAST + ["--precision", "bf16", "--moments", "bf16", "--steps", "8", "--out", str(out), "--resume"])
    # a checkpoint from before these flags existed ran with their defaults, and resumes with them
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["run"]["moments"], ckpt["run"]["param_remainders"]
    torch.save(ckpt, out / "checkpoint.pt")
    resumed = train(FAST + ["--precision", "bf16", "--steps", "8", "--out", str(out), "--resume"])
    assert len(resumed["rows"]) == 8


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "torch", "--moments", "int8"], "--moments int8 needs --optimizer cogkern"),
    (["--optimizer", "torch", "--precision", "bf16", "--param-remainders"], "--param-remainders needs --optimizer"),
    (["--precision", "fp16", "--param-remainders"], "--param-remainders needs --precision bf16, got fp16"),
    (["--precision", "bf16-sr", "--param-remainders"], "--param-remainders needs --precision bf16, got bf16-sr"),
])
def test_optimizer_memory_flags_refuse_what_they_cannot_do(argv, message):
    with pytest.raises(SystemExit, match=message):
        train(FAST + argv + ["--steps", "1"])


@pytest.mark.slow
def test_precision_study_measures_the_lean_modes(tmp_path):
    out = tmp_path / "study"
    assert study_main(["--out", str(out), "--steps", "10", "--device", "cpu",
                       "--lean", "bf16+remainders", "bf16-sr+int8-moments"]) == 0
    report = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| ")}
    for name in ("fp32", "fp16", "bf16", "bf16-sr", "bf16+remainders"):
        assert name in rows and (out / name / "metrics.csv").exists()
    cells = lambda name: [c.strip() for c in rows[name].strip("|").split("|")]  # noqa: E731
    # measured optimizer state per param: fp32 m, v; + fp32 master; int16 remainder instead
    assert cells("fp32")[-2:] == ["8.00", "16.00"]
    assert cells("bf16")[-2:] == ["12.00", "16.00"]
    assert cells("bf16+remainders")[-2:] == ["10.00", "14.00"]
    if moments_available("int8"):
        state, kept = map(float, cells("bf16-sr+int8-moments")[-2:])
        assert 2 < state < 2.1 and kept == pytest.approx(state + 4, abs=0.01)
    else:
        assert "not run: int8 moments are not compiled" in rows["bf16-sr+int8-moments"]
    assert "bf16+bf16-moments" not in rows  # only the lean modes asked for
    assert (out / "precision_study.png").stat().st_size > 1000


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train(FAST + ["--steps", "6", "--out", out, "--precision", "fp16"])
    torch.save(summary["params"], os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ranks_stay_identical(tmp_path):
    port = _free_port()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2)
    p0, p1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(p0) == len(p1) > 0
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_audit_flags_fp16_overflow():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[2].weight.fill_(3e4)  # outputs 8 * 8 * 3e4 = 1.9e6
    report = audit(model, torch.ones(2, 8))
    assert report.recommendation == "bf16"
    flagged = {s.name for s in report.unsafe_in_fp16()}
    assert "2" in flagged  # the last Linear's output exceeds 65504
    assert any(s.max_abs > FP16_MAX for s in report.stats if s.name == "2")
    assert "overflow" in report.to_markdown()


def test_audit_recommends_fp16_for_a_tame_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    report = audit(model, torch.randn(4, 8), loss_scale=2.0**10)
    assert report.recommendation == "fp16" and not report.unsafe_in_fp16()
    grads = [s for s in report.stats if s.kind == "grad"]
    assert grads and all(0.0 <= s.underflow_frac <= 1.0 for s in grads)
    with pytest.raises(ValueError, match="loss_scale"):
        audit(model, torch.randn(4, 8), loss_scale=0)


def test_data_is_deterministic_and_rank_disjoint():
    from cogkern.data import VOCAB, ShapesVideos, tokenize

    d = ShapesVideos(seed=3)
    a, ids_a = d.batch(5, 4)
    b, ids_b = ShapesVideos(seed=3).batch(5, 4)
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b)
    r1, _ = d.batch(5, 4, rank=1, world=2)
    assert not torch.equal(d.batch(5, 4, rank=0, world=2)[0], r1)
    assert a.shape == (4, *d.spec.latent_shape)
    caption = d.captions(torch.tensor([0]))[0]
    assert [VOCAB[i] for i in tokenize(caption)] == caption.split()
    with pytest.raises(ValueError, match="more than"):
        tokenize("red square moving right right")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenize("red square moving fast")
