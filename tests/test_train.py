"""The training demo on the CPU: learning, every precision, resume, DDP, the audit, bad input."""
import csv
import os
import socket

import pytest
import torch
import torch.nn as nn

from cogkern import train as train_mod
from cogkern.precision import FP16_MAX, audit
from cogkern.train import TrainingError, main, train

FAST = ["--device", "cpu", "--quiet", "--no-plot", "--log-every", "5"]


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
     ["--config", "huge"]],
)
def test_bad_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        train(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bf16_sr_needs_cogkern_optimizer():
    with pytest.raises(SystemExit, match="bf16-sr needs --optimizer cogkern"):
        train(FAST + ["--precision", "bf16-sr", "--optimizer", "torch", "--steps", "1"])


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
