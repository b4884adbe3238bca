"""Which gradients overflowed: the grad check's per-param inf/NaN flags (same pass,
cogkern::amp_grad_check_), kept on the device for the last skipped step, and
DynamicLossScaler.overflow_report() / FusedAdamW.overflow_report() reading them
with one host read. CPU tests, plus the same injections marked `cuda` (a GPU, or
the CPU backend under COGKERN_CUDA_TESTS_DEVICE=cpu)."""
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogkern._overflow import GRAD_FOUND_INF_IN, GRAD_INF, GRAD_NAN, GRAD_SCANNED, OverflowEntry
from cogkern.amp import DynamicLossScaler
from cogkern.optim import FusedAdamW
from conftest import GPU_TEST_DEVICE

CPU_DRY_RUN = True  # the `cuda` tests run against the CPU backend under COGKERN_CUDA_TESTS_DEVICE=cpu
CHUNK = 32768  # csrc/common/multi_tensor.h: kMultiTensorChunk
DEVICES = ["cpu", pytest.param(GPU_TEST_DEVICE, marks=pytest.mark.cuda, id="cuda")]
needs_gpu = pytest.mark.skipif(GPU_TEST_DEVICE != "cuda" or not torch.cuda.is_available(),
                               reason="needs a real CUDA device")

# (name, shape, dtype): fp32, fp16 (fp32 masters), bf16 (fp32 masters); odd sizes; one over several chunks.
NAMED = [
    ("patch_embed.proj.weight", (37, 5), torch.float32),
    ("blocks.0.attn.to_q.bias", (129,), torch.float16),
    ("blocks.3.ff.net.2.weight", (3, 2 * CHUNK // 3 + 1001), torch.bfloat16),  # 3 chunks
    ("blocks.3.ff.net.2.bias", (1,), torch.float16),
    ("norm_out.weight", (257,), torch.bfloat16),
    ("proj_out.weight", (7, 3), torch.float32),
]
# Injections: name -> [(flat element, value)]; the bf16 tensor gets NaN in its first chunk and inf in its last.
BAD = {
    "patch_embed.proj.weight": [(36 * 5 + 4, math.inf)],
    "blocks.0.attn.to_q.bias": [(64, -math.inf)],
    "blocks.3.ff.net.2.weight": [(11, math.nan), (2 * CHUNK + 17, math.inf)],
    "norm_out.weight": [(200, math.nan)],
}
EXPECTED = [("patch_embed.proj.weight", "inf"), ("blocks.0.attn.to_q.bias", "inf"),
            ("blocks.3.ff.net.2.weight", "inf and NaN"), ("norm_out.weight", "NaN")]


def named_params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g).to(dtype).to(device)) for name, shape, dtype in NAMED]


def set_grads(params, step, bad=None):
    """Fresh random gradients (never zero); `bad` maps a name to (flat element, value) injections."""
    g = torch.Generator().manual_seed(100 + step)
    for name, p in params:
        grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
        for i, value in (bad or {}).get(name, []):
            grad.view(-1)[i] = value
        p.grad = grad.to(p.device)


def scaled_step(scaler, opt, params, step, bad=None):
    scaler.scale(torch.ones((), device=params[0][1].device))
    set_grads(params, step, bad)
    scaler.step(opt)
    scaler.update()


def names_kinds(report):
    return [(e.name, e.kind) for e in report.entries]


@pytest.mark.parametrize("device", DEVICES)
def test_report_names_exactly_the_injected_params_and_survives_clean_steps(device):
    params = named_params(device)
    opt = FusedAdamW(params, lr=1e-3)
    scaler = DynamicLossScaler(init_scale=2.0**10, hysteresis=1)
    scaled_step(scaler, opt, params, 1)
    assert not scaler.overflow_report() and scaler.overflow_report().cause == "none"
    assert str(scaler.overflow_report()) == "no step was skipped: no gradient overflowed"

    scaled_step(scaler, opt, params, 2, BAD)
    for report, counted in ((scaler.overflow_report(), "iteration"), (opt.overflow_report(), "step")):
        assert report.step == 2 and report.cause == "overflow"
        assert names_kinds(report) == EXPECTED
        assert str(report) == f"{counted} 2 skipped: inf in patch_embed.proj.weight.grad (+3 more)"
        assert [(e.group, e.index) for e in report.entries] == [(0, 0), (0, 1), (0, 2), (0, 4)]

    for step in (3, 4):  # clean steps keep the last skipped one's report
        scaled_step(scaler, opt, params, step)
    assert not opt.last_step_skipped
    assert scaler.overflow_report().step == 2 and names_kinds(scaler.overflow_report()) == EXPECTED
    assert opt.overflow_report().step == 2 and names_kinds(opt.overflow_report()) == EXPECTED

    # A later overflow replaces it, with its own culprits only.
    scaled_step(scaler, opt, params, 5, {"proj_out.weight": [(20, math.nan)]})
    report = scaler.overflow_report()
    assert report.step == 5 and names_kinds(report) == [("proj_out.weight", "NaN")]
    assert str(report) == "iteration 5 skipped: NaN in proj_out.weight.grad"


@pytest.mark.parametrize("device", DEVICES)
def test_unnamed_params_are_reported_by_group_and_index(device):
    params = [p for _, p in named_params(device, seed=1)]
    opt = FusedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-3,
                     max_grad_norm=1.0)
    scaler = DynamicLossScaler(init_scale=2.0**8, hysteresis=2)
    set_grads([(None, p) for p in params], 1)
    params[3].grad.view(-1)[0] = math.inf  # group 1, index 1
    params[1].grad.view(-1)[128] = math.nan  # group 0, index 1
    scaler.scale(torch.ones((), device=device))
    scaler.step(opt)
    scaler.update()
    report = scaler.overflow_report()
    assert report.entries == (OverflowEntry(None, 0, 1, "NaN"), OverflowEntry(None, 1, 1, "inf"))
    assert str(report) == "iteration 1 skipped: NaN in param_groups[0]['params'][1].grad (+1 more)"
    assert opt.overflow_report().entries == report.entries


@pytest.mark.parametrize("device", DEVICES)
def test_op_flags_match_torch_isinf_isnan_over_many_tensors_and_launches(device):
    """800 tensors (past one launch's 768), dtypes interleaved (the op packs them by dtype, so
    chunk order differs from list order), flags at permuted indices, random inf / NaN."""
    g = torch.Generator().manual_seed(5)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    sizes = torch.randint(1, 300, (800,), generator=g).tolist()
    sizes[17], sizes[400] = CHUNK * 2 + 3, CHUNK + 1  # several chunks
    grads = [torch.randn(n, generator=g).to(dtypes[i % 3]) for i, n in enumerate(sizes)]
    for t in grads:
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            t[int(torch.randint(0, t.numel(), (1,), generator=g))] = [math.inf, -math.inf, math.nan][
                int(torch.randint(0, 3, (1,), generator=g))]
    grads.append(torch.empty(0))  # an empty grad: flag 0
    indices = torch.randperm(len(grads) + 10, generator=g)[: len(grads)].tolist()
    expected = [0] * (len(grads) + 10)
    for t, k in zip(grads, indices):
        expected[k] = int(torch.isinf(t).any()) * GRAD_INF + int(torch.isnan(t).any()) * GRAD_NAN
    summary = GRAD_SCANNED
    for bits in expected:
        summary |= bits
    grads = [t.to(device) for t in grads]
    flags = torch.full((len(expected) + 1,), -7, dtype=torch.int32, device=device)  # every entry rewritten
    out = torch.zeros(4, device=device)
    scale = torch.tensor([512.0], device=device)
    torch.ops.cogkern.amp_grad_check_(grads, scale, None, 0.0, True, False, out, flags, indices)
    assert flags.tolist() == expected + [summary]
    assert out[0].item() == float(summary & (GRAD_INF | GRAD_NAN) != 0)
    # Default indices, and the found_inf passed in shows in the summary.
    flags = torch.full((len(grads) + 1,), -7, dtype=torch.int32, device=device)
    found_in = torch.ones(1, device=device)
    torch.ops.cogkern.amp_grad_check_(grads, scale, found_in, 0.0, True, False, out, flags)
    assert flags.tolist() == [expected[k] for k in indices] + [summary | GRAD_FOUND_INF_IN]
    # No scan: zeros, and a summary without kGradScanned.
    torch.ops.cogkern.amp_grad_check_(grads, scale, found_in, 0.0, False, False, out, flags)
    assert flags.tolist() == [0] * len(grads) + [GRAD_FOUND_INF_IN]


def test_op_checks_the_flag_arguments_before_any_kernel_runs():
    grads = [torch.tensor([math.inf, 1.0]), torch.randn(3)]
    out = torch.full((4,), 9.0)
    flags = torch.full((3,), 5, dtype=torch.int32)
    op = torch.ops.cogkern.amp_grad_check_
    cases = [
        ((torch.zeros(3, dtype=torch.int32), [0, 1]), None, "flag_indices need tensor_flags"),
        ((torch.zeros(3), None), None, "tensor_flags must be a contiguous 1-D int32"),
        ((torch.zeros(2, dtype=torch.int32), None), None, "tensor_flags needs one entry per grad"),
        ((torch.zeros(0, dtype=torch.int32), None), None, "at least its last entry"),
        ((flags, [0]), None, "flag_indices must have one entry per grad"),
        ((flags, [0, 2]), None, r"flag_indices\[1\] must be in \[0, 2\)"),
        ((flags, [1, 1]), None, r"flag_indices\[1\] = 1 appears twice"),
    ]
    for (tensor_flags, indices), _, match in cases:
        if match.startswith("flag_indices need"):
            with pytest.raises(ValueError, match=match):
                op(grads, None, None, 0.0, True, False, out, None, indices)
            continue
        with pytest.raises(ValueError, match=match):
            op(grads, None, None, 0.0, True, False, out, tensor_flags, indices)
    assert torch.equal(out, torch.full((4,), 9.0)) and flags.tolist() == [5, 5, 5]  # nothing ran


def test_torch_grad_scaler_flag_is_reported_as_coming_from_it():
    params = named_params("cpu", seed=2)
    for max_grad_norm, cause in ((None, "found_inf_in"), (1.0, "overflow")):
        opt = FusedAdamW(params, lr=1e-3, max_grad_norm=max_grad_norm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        scaler.scale(torch.ones(()))
        set_grads(params, 1, {"norm_out.weight": [(3, math.inf)]})
        scaler.step(opt)
        scaler.update()
        report = opt.overflow_report()
        assert report.step == 1 and report.cause == cause
        if cause == "found_inf_in":  # FusedAdamW did not scan (no clipping): it says where the flag came from
            assert report.entries == ()
            assert "found_inf flag passed in (e.g. by torch.amp.GradScaler)" in str(report)
        else:  # it scanned for the norm, so it names the culprit too
            assert names_kinds(report) == [("norm_out.weight", "inf")]


def test_plain_torch_optimizer_through_unscale_is_reported_too():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    scaler = DynamicLossScaler(init_scale=2.0**4, hysteresis=1)
    scaler.scale(model(torch.randn(2, 5)).sum()).backward()
    model[1].bias.grad[1] = math.nan
    scaler.step(opt)
    scaler.update()
    report = scaler.overflow_report()
    assert str(report) == "iteration 1 skipped: NaN in 1.bias.grad"


def test_several_optimizers_of_one_scaler_are_told_apart():
    a = named_params("cpu", seed=3)[:2]
    b = named_params("cpu", seed=4)[4:]
    opt_a, opt_b = FusedAdamW(a, lr=1e-3), torch.optim.AdamW(b, lr=1e-3)
    scaler = DynamicLossScaler(init_scale=2.0**8, hysteresis=1)
    scaler.scale(torch.ones(()))
    set_grads(a, 1)
    set_grads(b, 1, {"proj_out.weight": [(0, math.inf)]})
    scaler.step(opt_a)
    scaler.step(opt_b)
    scaler.update()
    report = scaler.overflow_report()
    assert report.entries == (OverflowEntry("proj_out.weight", 0, 1, "inf", optimizer=1),)
    assert str(report) == "iteration 1 skipped: inf in optimizer 1: proj_out.weight.grad"
    # Each optimizer is skipped on its own flag (as with torch's GradScaler): opt_a stepped.
    assert not opt_a.last_step_skipped and opt_a.overflow_report().cause == "none"


# ----------------------------------------------------------------------------- no host sync in the step


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class CountHostReads:
    """Counts the Python-level reads of tensor values on the host (on a GPU each one is a sync)."""

    def __enter__(self):
        self.count, self._saved = 0, {}
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_step_reads_nothing_on_the_host_and_the_report_reads_once():
    params = named_params("cpu")
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    scaler = DynamicLossScaler(init_scale=2.0**10, hysteresis=1)
    scaled_step(scaler, opt, params, 1)  # first use: the kernel check (cogkern._guard) reads once, here
    loss = torch.ones(())
    for step, bad in ((2, BAD), (3, None)):  # an overflow, then a clean step
        set_grads(params, step, bad)
        with CountHostReads() as reads:
            scaler.scale(loss)
            scaler.step(opt)
            scaler.update()
        assert reads.count == 0
    with CountHostReads() as reads:
        report = scaler.overflow_report()
    assert reads.count == 1 and report.step == 2 and names_kinds(report) == EXPECTED
    with CountHostReads() as reads:
        report = opt.overflow_report()
    assert reads.count == 1 and report.step == 2


@needs_gpu
@pytest.mark.cuda
def test_no_sync_in_the_cuda_step_and_one_for_the_report():
    params = named_params("cuda")
    opt = FusedAdamW(params, lr=1e-3, max_grad_norm=1.0)
    scaler = DynamicLossScaler(init_scale=2.0**10, hysteresis=1)
    scaled_step(scaler, opt, params, 1)
    loss = torch.ones((), device="cuda")
    grads = []
    for step, bad in ((2, BAD), (3, None)):
        set_grads(params, step, bad)
        grads.append([p.grad for _, p in params])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            for (_, p), g in zip(params, step_grads):
                p.grad = g
            scaler.scale(loss)
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = scaler.overflow_report()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1 and report.step == 2 and names_kinds(report) == EXPECTED


# ----------------------------------------------------------------------------- named params, checkpoints


def test_named_parameters_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7)).to(torch.bfloat16)
    opt = FusedAdamW(model.named_parameters(), lr=1e-2)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    renamed = FusedAdamW([(f"m.{n}", p) for n, p in model.named_parameters()], lr=1e-2)
    renamed.load_state_dict(sd)
    assert renamed.param_groups[0]["param_names"][0] == "m.0.weight"  # as torch: its own names win
    for p in model.parameters():
        assert torch.equal(renamed.state[p]["master_param"], opt.state[p]["master_param"])
    unnamed = FusedAdamW(model.parameters(), lr=1e-2)
    unnamed.load_state_dict(sd)  # takes the saved names
    assert unnamed.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


# ----------------------------------------------------------------------------- torch.distributed


def _worker(rank: int, world: int, out_dir: str):
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        params = named_params("cpu")
        opt = FusedAdamW(params, lr=1e-3)
        scaler = DynamicLossScaler(init_scale=2.0**8, hysteresis=1)
        scaled_step(scaler, opt, params, 1, {"norm_out.weight": [(5, math.nan)]} if rank == 1 else None)
        scaled_step(scaler, opt, params, 2)
        out = [(str(r), r.cause, r.step) for r in (scaler.overflow_report(), opt.overflow_report())]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~40 s on a loaded 2-core machine
def test_a_rank_whose_gradients_were_finite_says_another_rank_overflowed(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r1[0] == ("iteration 1 skipped: NaN in norm_out.weight.grad", "overflow", 1)
    assert r0[0] == ("iteration 1 skipped because another rank overflowed (this rank's gradients were all finite)",
                     "other_rank", 1)
    assert r0[1][1:] == ("other_rank", 1) and r1[1][1:] == ("overflow", 1)


# ----------------------------------------------------------------------------- the training demo


@pytest.mark.slow  # ten demo steps: ~20 s on a loaded 2-core machine
def test_training_demo_prints_the_report_of_a_skipped_step(tmp_path, monkeypatch, capsys):
    from cogkern import train as train_mod

    real_init = train_mod.Stepper.__init__
    backwards = {"n": 0}

    def init_and_poison(self, model, args, device):
        real_init(self, model, args, device)

        def inf_in_the_7th_backward(grad):
            backwards["n"] += 1
            if backwards["n"] != 7:
                return grad
            grad = grad.clone()
            grad.view(-1)[3] = math.inf
            return grad

        dict(model.named_parameters())["blocks.1.ff.2.weight"].register_hook(inf_in_the_7th_backward)

    monkeypatch.setattr(train_mod.Stepper, "__init__", init_and_poison)
    summary = train_mod.train(["--device", "cpu", "--no-plot", "--log-every", "5", "--precision", "fp16",
                               "--steps", "10", "--out", str(tmp_path)])
    assert [r["skipped"] for r in summary["rows"]] == [0] * 6 + [1] + [0] * 3
    lines = [line.rstrip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines()]
    assert [line for line in lines if "skipped:" in line] == ["step 7 skipped: inf in blocks.1.ff.2.weight.grad"]
