"""Train a small CogVideoX-style video transformer: the demo that uses all of cogkern.

    python -m cogkern.train                                  # tiny model, CPU if no GPU, fp32
    python -m cogkern.train --precision fp16 --steps 500 --out runs/fp16
    python -m cogkern.train --attention sdpa --optimizer torch   # the same run, done the diffusers way
    torchrun --nproc_per_node 2 -m cogkern.train ...              # DistributedDataParallel
    torchrun --nproc_per_node 2 -m cogkern.train --fsdp           # FSDP2: params, grads, state sharded
    torchrun --nproc_per_node 2 -m cogkern.train --context-parallel 2   # 2 ranks share each sample

Distributed (torchrun; gloo on the CPU, nccl on GPUs): ``--batch-size`` is per
data-parallel rank. ``--fsdp`` shards each block and then the root with FSDP2's
``fully_shard`` over all ranks; the checkpoint is then a
torch.distributed.checkpoint directory, DIR/checkpoint.dcp. ``--context-parallel
N``: each group of N consecutive ranks shares its samples, each rank holding a
contiguous slice of the joint [text; video] sequence, with Ulysses attention
over the group; the world is data parallel over the groups (world = dp * N),
and combines with ``--fsdp`` (sharded over all ranks).

Precisions: fp32 (reference); fp16 (fp16 params, fp32 master weights, dynamic
loss scaling); bf16 (bf16 params, fp32 master weights); bf16-sr (bf16 params,
no master weights, stochastic rounding). With ``--optimizer torch`` the
16-bit modes are torch's AMP recipe instead: fp32 params under autocast, with
``torch.amp.GradScaler`` for fp16.

Optimizer memory (``--optimizer cogkern``): ``--moments bf16|int8`` keeps Adam's
m and v in bf16 or in 8-bit blocks instead of fp32; ``--param-remainders`` (with
``--precision bf16``) keeps an int16 remainder beside each bf16 param instead of
a fp32 master: the same updates, 2 bytes less per param. The bytes the
optimizer state takes are in metrics.csv (opt_state_bytes) and the last line.

Writes DIR/metrics.csv, DIR/loss.png and DIR/checkpoint.pt (atomically, every
``--ckpt-every`` steps and at the end); ``--resume`` continues a run so that its
losses equal an uninterrupted run's. At the end it generates ``--samples`` videos
(DDIM, v-prediction, ``--sample-steps`` steps) for the first training captions and
writes them beside those training videos as DIR/samples.png (frame strip),
DIR/samples.gif and DIR/samples.pt (cogkern.samples); ``--no-samples`` skips it.
``--watch`` trains under the activation
watch (``cogkern.precision.watch``): each module's largest output per step, on the
device, printed as a table at the end (the first module that went non-finite or
within 2x of fp16's 65504) and written to DIR/watch.csv and watch.png.
``--config stress`` is the tiny model with massive activations, where fp16
overflows and bf16 trains (see cogkern.model).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .data import ShapesVideos
from .diffusion import DDPMSchedule, v_loss
from .model import ATTENTION_IMPLS, CONFIGS, ModelConfig, VideoTransformer
from .samples import write_run_samples
from .precision import watch as watch_activations

PRECISIONS = ("fp32", "fp16", "bf16", "bf16-sr")
TRAIN_CONFIGS = sorted(k for k, c in CONFIGS.items() if c.trainable_on_demo_data)
CKPT_FORMAT = "cogkern-train-v1"
MOMENTS = ("fp32", "bf16", "int8")
METRIC_FIELDS = ("step", "loss", "loss_scale", "skipped", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb",
                 "opt_state_bytes")
# Everything that must match for --resume to continue the same run.
RUN_KEYS = ("config", "precision", "optimizer", "attention", "batch_size", "seed", "lr", "warmup", "weight_decay",
            "max_grad_norm", "world_size", "moments", "param_remainders", "fsdp", "context_parallel")
# What a checkpoint written before a key existed ran with.
RUN_KEY_DEFAULTS = {"moments": "fp32", "param_remainders": False, "fsdp": False, "context_parallel": 1}
DCP_DIR = "checkpoint.dcp"  # --fsdp: a torch.distributed.checkpoint directory instead of checkpoint.pt
DCP_EXTRA = "run.pt"  # in it: the run key, step and the replicated stepper state, written by rank 0
PROCESS_GROUP_TIMEOUT_S = 600


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, bad checkpoint); the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cogkern.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--steps", type=_positive_int, default=200)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--config", choices=TRAIN_CONFIGS, default="tiny")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, default="cogkern")
    p.add_argument("--optimizer", choices=("cogkern", "torch"), default="cogkern")
    p.add_argument("--moments", choices=MOMENTS, default="fp32",
                   help="storage of Adam's m and v (cogkern optimizer): fp32, bf16, or int8 blocks")
    p.add_argument("--param-remainders", action="store_true",
                   help="bf16 params + int16 remainders instead of fp32 master weights (needs --precision bf16)")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--warmup", type=_nonneg_int, default=20, help="linear warm-up steps (counting applied steps)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=_positive_float, default=1.0)
    p.add_argument("--out", default="runs/train")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--ckpt-every", type=_positive_int, default=100)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) over all ranks instead of DDP")
    p.add_argument("--context-parallel", type=_positive_int, default=1, metavar="N",
                   help="N ranks share each sample, each holding a slice of the sequence (Ulysses attention)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--samples", type=_nonneg_int, default=2, help="videos to generate at the end (0: none)")
    p.add_argument("--no-samples", dest="samples", action="store_const", const=0, help="same as --samples 0")
    p.add_argument("--sample-steps", type=_sample_steps, default=50, help="DDIM steps per generated video")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--watch", action="store_true",
                   help="watch every module's output approach fp16's range (cogkern.precision.watch): prints "
                        "its report at the end, writes DIR/watch.csv (and watch.png)")
    return p


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _sample_steps(s: str) -> int:
    v = _positive_int(s)
    if v > DDPMSchedule().num_steps:
        raise argparse.ArgumentTypeError(f"must be at most the {DDPMSchedule().num_steps} training timesteps, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


# ----------------------------------------------------------------------------- precision


@dataclass
class StepOutputs:
    """Device tensors of one step; read on the host only when logging."""

    loss: torch.Tensor
    loss_scale: torch.Tensor
    skipped: torch.Tensor
    grad_norm: torch.Tensor
    lr: torch.Tensor


class Stepper:
    """One precision recipe: owns the optimizer (and loss scaler), runs backward + step.

    The learning rate lives in a device tensor driven by the count of *applied*
    steps, so a step skipped for overflow does not advance the schedule, and no
    step synchronizes with the host.
    """

    def __init__(self, model: nn.Module, args, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.applied = torch.zeros((), dtype=torch.float32, device=device)  # steps taken so far
        self.lr = torch.full((), args.lr, dtype=torch.float32, device=device)
        self._set_lr()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # names: overflow reports
        decay = [(n, p) for n, p in params if p.dim() >= 2]
        no_decay = [(n, p) for n, p in params if p.dim() < 2]
        groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)]
        self.scaler = None
        self.autocast_dtype = None
        if args.optimizer == "cogkern":
            from .amp import DynamicLossScaler
            from .optim import FusedAdamW

            self.opt = FusedAdamW(groups, lr=self.lr, max_grad_norm=args.max_grad_norm,
                                  stochastic_rounding=args.precision == "bf16-sr", seed=args.seed + 1,
                                  moments=args.moments, param_remainders=args.param_remainders)
            if args.precision == "fp16":
                self.scaler = DynamicLossScaler()
        else:
            fused = device.type == "cuda"
            self.opt = torch.optim.AdamW(groups, lr=self.lr if fused else args.lr, fused=fused or None,
                                         foreach=None if fused else True)
            self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision)
            if args.precision == "fp16":
                self.scaler = torch.amp.GradScaler(device.type)

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank allocated (0 before the first step): FusedAdamW's own
        count, or for torch's AdamW its exp_avg / exp_avg_sq (step counters excluded in both)."""
        if self.args.optimizer == "cogkern":
            return self.opt.state_bytes()["total"]
        local = [t.to_local() if hasattr(t, "to_local") else t  # FSDP: this rank's shards
                 for st in self.opt.state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")]
        return sum(t.numel() * t.element_size() for t in local)

    def overflow_report(self):
        """Which gradients overflowed in the last skipped step (one sync), or None for torch's optimizers."""
        report = getattr(self.scaler if self.scaler is not None else self.opt, "overflow_report", None)
        return report() if report is not None else None

    def _set_lr(self) -> None:
        warm = self.args.warmup
        factor = torch.clamp((self.applied + 1) / warm, max=1.0) if warm > 0 else torch.ones_like(self.applied)
        self.lr.copy_(self.args.lr * factor)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, loss: torch.Tensor, params: list[torch.Tensor], report_loss: torch.Tensor | None = None
             ) -> StepOutputs:
        """Backward of ``loss`` and the optimizer step; ``report_loss`` is what the metrics show
        (default ``loss``; context parallelism reports the whole sample's loss)."""
        one = torch.ones((), device=self.device)
        lr = self.lr.clone()
        if self.args.optimizer == "cogkern":
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
                scale = self.scaler.scale_tensor.clone()
            else:
                loss.backward()
                self.opt.step()
                scale = one
            skipped = self.opt.skipped_flag.clone()
            grad_norm = self.opt.grad_norm.clone()
        else:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm).float()
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
            if self.scaler is not None:
                scale_before = self.scaler.get_scale()  # torch's GradScaler syncs here anyway
                self.scaler.step(self.opt)
                self.scaler.update()
                skipped = torch.tensor(float(self.scaler.get_scale() < scale_before), device=self.device)
                scale = torch.tensor(scale_before, device=self.device)
            else:
                self.opt.step()
                skipped = torch.zeros((), device=self.device)
                scale = one
        self.opt.zero_grad(set_to_none=True)
        self.applied += 1 - skipped
        self._set_lr()
        if not torch.is_tensor(self.opt.param_groups[0]["lr"]):
            lr_now = float(self.lr)  # torch's foreach AdamW takes a float lr (free on the CPU)
            for g in self.opt.param_groups:
                g["lr"] = lr_now
        report = loss if report_loss is None else report_loss
        return StepOutputs(report.detach().float(), scale.float(), skipped.float(), grad_norm.float(), lr)

    def state_dict(self, with_optimizer: bool = True) -> dict:
        """``with_optimizer=False``: the replicated part only (FSDP keeps the sharded optimizer
        state in the DCP checkpoint)."""
        state = dict(scaler=None if self.scaler is None else self.scaler.state_dict(), applied=self.applied.cpu())
        return dict(state, opt=self.opt.state_dict()) if with_optimizer else state

    def load_state_dict(self, state: dict) -> None:
        if "opt" in state:
            self.opt.load_state_dict(state["opt"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.applied.copy_(state["applied"])
        self._set_lr()


def cast_model(model: nn.Module, args) -> nn.Module:
    if args.optimizer == "cogkern" and args.precision in ("fp16", "bf16", "bf16-sr"):
        return model.to(torch.float16 if args.precision == "fp16" else torch.bfloat16)
    return model  # fp32 params (torch's AMP keeps fp32 params and autocasts)


# ----------------------------------------------------------------------------- run


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_precision_supported(args, device: torch.device) -> None:
    if args.precision == "bf16-sr" and args.optimizer != "cogkern":
        raise SystemExit("--precision bf16-sr needs --optimizer cogkern (torch has no stochastic-rounding AdamW)")
    if args.optimizer != "cogkern" and (args.moments != "fp32" or args.param_remainders):
        flag = f"--moments {args.moments}" if args.moments != "fp32" else "--param-remainders"
        raise SystemExit(f"{flag} needs --optimizer cogkern (they configure cogkern's FusedAdamW; torch's AdamW "
                         "keeps its state in the params' dtype)")
    if args.param_remainders and args.precision != "bf16":
        raise SystemExit(f"--param-remainders needs --precision bf16, got {args.precision}: the remainders complete "
                         "bf16 params to their fp32 master weights (fp32 params need none, bf16-sr keeps no master)")
    if args.precision in ("bf16", "bf16-sr") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--precision {args.precision}: this GPU ({torch.cuda.get_device_name(device)}) "
                         "has no bfloat16 support; use fp16 or fp32")


def run_key(args, world: int) -> dict:
    return dict(config=args.config, precision=args.precision, optimizer=args.optimizer, attention=args.attention,
                batch_size=args.batch_size, seed=args.seed, lr=args.lr, warmup=args.warmup,
                weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, world_size=world,
                moments=args.moments, param_remainders=args.param_remainders, fsdp=args.fsdp,
                context_parallel=args.context_parallel)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Parallel:
    """How the ranks split the work: data parallel over dp groups of cp ranks (world = dp * cp);
    the cp ranks of a group (consecutive ranks) share its samples, each with a slice of the sequence."""

    world: int
    rank: int
    fsdp: bool
    cp: int
    cp_group: object = None  # the process group of this rank's context-parallel ranks (cp > 1)

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp


def check_parallel_supported(args, world: int, cfg: ModelConfig) -> None:
    cp = args.context_parallel
    if args.fsdp and world == 1:
        raise SystemExit("--fsdp needs more than one process: start the run with torchrun --nproc_per_node N")
    if cp == 1:
        return
    if world % cp:
        raise SystemExit(f"--context-parallel {cp} needs a world size divisible by {cp} (world = data parallel x "
                         f"context parallel), got {world} processes; start it with torchrun --nproc_per_node {cp}")
    if args.attention != "cogkern":
        raise SystemExit(f"--context-parallel needs --attention cogkern (ulysses_attention runs the fused op), got "
                         f"{args.attention}")
    if cfg.heads % cp:
        raise SystemExit(f"--context-parallel {cp}: the {args.config} config's {cfg.heads} heads do not split over "
                         f"{cp} ranks (Ulysses gives each rank heads / {cp} heads)")
    if cfg.seq_len < cp:
        raise SystemExit(f"--context-parallel {cp}: the {args.config} config has only {cfg.seq_len} tokens")


def setup_parallel(args, world: int, rank: int, device: torch.device) -> Parallel:
    """Joins the process group (torchrun's env://) and makes the context-parallel groups."""
    if world > 1 and not dist.is_initialized():
        import datetime

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    par = Parallel(world=world, rank=rank, fsdp=args.fsdp, cp=args.context_parallel)
    if par.cp > 1:
        # every rank takes part in creating every group, in the same order
        for d in range(par.dp):
            group = dist.new_group(ranks=list(range(d * par.cp, (d + 1) * par.cp)))
            if d == par.dp_rank:
                par.cp_group = group
    return par


def wrap_model(model: nn.Module, par: Parallel, device: torch.device) -> nn.Module:
    """The module to call: FSDP2 (each block, then the root, sharded over all ranks), DDP, or as is.
    Both average the gradients over all ranks, data and context parallel alike (see sample_loss)."""
    if par.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (par.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if par.world > 1:
        return nn.parallel.DistributedDataParallel(model)
    return model


def sample_loss(pred: torch.Tensor, v: torch.Tensor, model: VideoTransformer, par: Parallel):
    """(loss to backpropagate, loss to report: the mean over the global batch, the same on every rank).

    Under context parallelism pred is this rank's video tokens: its share of the squared error is
    sum / (all of the sample's elements), and a sample's loss is the sum of its group's shares.
    The gradient wanted is that of the mean of the dp groups' losses; DDP / FSDP average over all
    dp * cp ranks, so each rank backpropagates cp times its share."""
    if par.cp == 1:
        share = loss = v_loss(pred, v)
    else:
        target = model.local_video_tokens(v)
        share = v_loss(pred, target) * (target.numel() / v.numel())
        loss = share * par.cp
    if par.world == 1:
        return loss, loss
    report = share.detach().clone()
    dist.all_reduce(report)  # no host sync: read at the next log line
    return loss, report / par.dp


def full_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every param whole, on the CPU in fp32 (FSDP's shards are gathered: all ranks must call)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu() for p in params]


def save_dcp_checkpoint(path: str, model: nn.Module, stepper: Stepper, extra: dict, rank: int) -> None:
    """--fsdp: each rank writes its shards (torch.distributed.checkpoint) into a fresh directory,
    which rank 0 then swaps in for the old one, so a crash mid-write leaves the last good one."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = f"{path}.tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, stepper.opt)),
             checkpoint_id=tmp)
    if rank == 0:
        torch.save(dict(extra, stepper=stepper.state_dict(with_optimizer=False)), os.path.join(tmp, DCP_EXTRA))
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_dcp_checkpoint(path: str, key: dict, model: nn.Module, stepper: Stepper) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    ckpt = load_checkpoint(os.path.join(path, DCP_EXTRA), key)
    state = dict(model=get_model_state_dict(model), optim=get_optimizer_state_dict(model, stepper.opt))
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, stepper.opt, state["optim"])
    stepper.load_state_dict(ckpt["stepper"])
    return ckpt


def training_batch(data: ShapesVideos, schedule: DDPMSchedule, seed: int, step: int, batch_size: int,
                   rank: int, world: int):
    """(x_t, v, caption ids, t) of a data-parallel rank: each sample's timestep and noise come from
    its global index, so the same global batch gives the same inputs on any number of ranks."""
    latents, ids = data.batch(step, batch_size, rank, world)
    first = (step * world + rank) * batch_size
    ts, noises = [], []
    for index in range(first, first + batch_size):
        g = torch.Generator().manual_seed((seed * 1_000_003 + index) * 2 + 1)  # not the stream describing this sample
        ts.append(schedule.sample_timesteps(1, g))
        noises.append(torch.randn(latents.shape[1:], generator=g))
    t = torch.cat(ts)
    xt, v = schedule.noisy_and_target(latents, torch.stack(noises), t)
    return xt, v, ids, t


def save_checkpoint(path: str, payload: dict) -> None:
    """Atomic: a crash mid-write never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, key: dict) -> dict:
    if not os.path.exists(path):
        raise TrainingError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainingError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TrainingError(f"--resume: {path} is not a cogkern training checkpoint ({CKPT_FORMAT})")
    saved = {k: ckpt["run"].get(k, RUN_KEY_DEFAULTS.get(k)) for k in RUN_KEYS}
    diff = {k: (saved[k], key[k]) for k in RUN_KEYS if saved[k] != key[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise TrainingError(f"--resume: {path} belongs to a different run ({lines})")
    return ckpt


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_metrics(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        # a column a metrics.csv written before it existed lacks reads as NaN
        return [{k: int(v) if k == "step" else float(v) if v not in ("", None) else math.nan
                 for k, v in row.items()} for row in csv.DictReader(f)]


def plot_losses(path: str, rows: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping loss.png", file=sys.stderr)
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], lw=0.8, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("v-prediction loss")
    ax.set_yscale("log")
    if any(r["loss_scale"] != 1.0 for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["loss_scale"] for r in rows], color="tab:orange", lw=0.8, label="loss scale")
        ax2.set_yscale("log", base=2)
        ax2.set_ylabel("loss scale")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train(argv=None) -> dict:
    """Runs training; returns a summary dict (also used by the precision study and tests)."""
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    check_precision_supported(args, device)
    cfg: ModelConfig = CONFIGS[args.config]
    check_parallel_supported(args, world, cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    par = setup_parallel(args, world, rank, device)

    data = ShapesVideos(cfg.video_spec(), seed=args.seed)
    schedule = DDPMSchedule()

    torch.manual_seed(args.seed)
    model = cast_model(VideoTransformer(cfg, attention=args.attention, cp_group=par.cp_group), args).to(device)
    ddp_model = wrap_model(model, par, device)  # before the optimizer: FSDP turns the params into DTensors
    params = [p for p in model.parameters() if p.requires_grad]
    stepper = Stepper(model, args, device)

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, DCP_DIR if par.fsdp else "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.csv")
    key = run_key(args, world)
    start_step, rows = 0, []
    if args.resume:
        if par.fsdp:
            ckpt = load_dcp_checkpoint(ckpt_path, key, model, stepper)
        else:
            ckpt = load_checkpoint(ckpt_path, key)
            model.load_state_dict(ckpt["model"])
            stepper.load_state_dict(ckpt["stepper"])
        start_step = ckpt["step"]
        rows = [r for r in read_metrics(metrics_path) if r["step"] < start_step]
    if start_step >= args.steps:
        raise TrainingError(f"--resume: the checkpoint is at step {start_step}, nothing left of --steps {args.steps}")

    activation_watch = watch_activations(model, start_step=start_step) if args.watch else None
    tokens_per_step = args.batch_size * cfg.seq_len * par.dp
    pending: list[tuple[int, StepOutputs]] = []
    last_log_time, last_log_step = time.perf_counter(), start_step
    show = rank == 0 and not args.quiet
    last_good_step = start_step

    def flush(step_now: int) -> None:
        nonlocal last_log_time, last_log_step
        if not pending:
            return
        stacked = torch.stack([torch.stack([o.loss, o.loss_scale, o.skipped, o.grad_norm, o.lr]) for _, o in pending])
        values = stacked.cpu().tolist()  # the one host sync per log interval
        now = time.perf_counter()
        tps = tokens_per_step * (step_now - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step_now
        mem = peak_memory_mb(device)
        state_bytes = stepper.state_bytes()
        for (s, _), (loss, scale, skipped, gnorm, lr) in zip(pending, values):
            if not math.isfinite(loss) and args.precision != "fp16":
                raise TrainingError(
                    f"loss became {loss} at step {s} in {args.precision}; stopping. The last good checkpoint "
                    f"(step {last_good_step}) is kept in {ckpt_path}")
            rows.append(dict(step=s, loss=loss, loss_scale=scale, skipped=int(skipped), grad_norm=gnorm,
                             lr=lr, tokens_per_s=tps, peak_mem_mb=mem, opt_state_bytes=state_bytes))
        skipped_now = [s for (s, _), v in zip(pending, values) if v[2]]
        pending.clear()
        report = stepper.overflow_report() if skipped_now and show else None  # one sync, at a log step
        if report:
            more = f" ({len(skipped_now) - 1} more skipped since the last log)" if len(skipped_now) > 1 else ""
            print((report.format(f"step {skipped_now[-1] + 1}") + more).ljust(78), file=sys.stderr, flush=True)
        if show:
            r = rows[-1]
            skips = sum(x["skipped"] for x in rows)
            msg = (f"step {r['step'] + 1}/{args.steps}  loss {r['loss']:.4f}  scale {r['loss_scale']:.0f}  "
                   f"skipped {skips}  {tps:,.0f} tok/s")
            end = "\r" if sys.stderr.isatty() and step_now < args.steps else "\n"
            print(msg.ljust(78), end=end, file=sys.stderr, flush=True)

    def checkpoint(step_now: int) -> None:
        nonlocal last_good_step
        flush(step_now)
        extra = dict(format=CKPT_FORMAT, run=key, step=step_now, model_config=cfg.to_dict())
        if par.fsdp:
            save_dcp_checkpoint(ckpt_path, model, stepper, extra, rank)
        elif rank == 0:
            save_checkpoint(ckpt_path, dict(extra, model=model.state_dict(), stepper=stepper.state_dict()))
        if rank == 0:
            write_metrics(metrics_path, rows)
        last_good_step = step_now

    for step in range(start_step, args.steps):
        xt, v, ids, t = training_batch(data, schedule, args.seed, step, args.batch_size, par.dp_rank, par.dp)
        xt, v, ids, t = xt.to(device), v.to(device), ids.to(device), t.to(device)
        with stepper.autocast():
            loss, report_loss = sample_loss(ddp_model(xt, ids, t), v, model, par)
        pending.append((step, stepper.step(loss, params, report_loss)))
        if activation_watch is not None:
            activation_watch.step()
        done = step + 1
        if done % args.log_every == 0:
            flush(done)
        if done % args.ckpt_every == 0 or done == args.steps:
            checkpoint(done)

    summary = dict(rows=rows, out=args.out, precision=args.precision, steps=args.steps, world=world, rank=rank,
                   moments=args.moments, param_remainders=args.param_remainders,
                   optimizer_state_bytes=stepper.state_bytes(),
                   params=full_params(params) if world > 1 else None)
    if rows and any(r["skipped"] for r in rows):
        summary["overflow_report"] = stepper.overflow_report()  # the last skipped step's culprits: one sync
    if activation_watch is not None:
        activation_watch.close()
        summary["watch"] = activation_watch.report()
        if rank == 0:
            activation_watch.to_csv(os.path.join(args.out, "watch.csv"))
            if not args.no_plot:
                activation_watch.plot(os.path.join(args.out, "watch.png"))
    if rank == 0 and not args.no_plot:
        plot_losses(os.path.join(args.out, "loss.png"), rows,
                    f"{args.config}, {args.precision}, attention={args.attention}, optimizer={args.optimizer}"
                    + (f", m/v {args.moments}" if args.moments != "fp32" else "")
                    + (", remainders" if args.param_remainders else ""))
    if args.samples and (par.fsdp or par.cp > 1):
        # The sharded model's forward is collective (FSDP2 all-gathers, Ulysses all-to-alls): one rank sampling
        # alone would wait for the others forever. Not done in these modes yet.
        if rank == 0:
            print("samples: skipped under --fsdp / --context-parallel (sample from the checkpoint on one process)",
                  file=sys.stderr)
    elif rank == 0 and args.samples:
        summary["samples"] = write_run_samples(model, data, args.out, args.samples, args.sample_steps, args.seed)
    if world > 1:
        dist.barrier()
    return summary


def main(argv=None) -> int:
    try:
        summary = train(argv)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = summary["rows"]
    if summary["rank"] == 0 and rows:
        first = sum(r["loss"] for r in rows[:10]) / len(rows[:10])
        last = sum(r["loss"] for r in rows[-10:]) / len(rows[-10:])
        print(f"done: {len(rows)} steps logged, loss {first:.4f} (first 10) -> {last:.4f} (last 10); "
              f"skipped {sum(r['skipped'] for r in rows)}; optimizer state {summary['optimizer_state_bytes']:,} B; "
              f"wrote {summary['out']}")
    if "samples" in summary:
        s = summary["samples"]
        fmt = lambda xs: ", ".join(f"{x:+.3f}" for x in xs)  # noqa: E731
        colors = sum(c.split()[0] == got for c, got in zip(s["captions"], s["sample_colors"]))
        print(f"samples: {len(s['captions'])} videos, {s['steps']} DDIM steps -> {', '.join(s['files'].values())}; "
              f"{colors}/{len(s['captions'])} in their caption's color; shape's advance per frame along its "
              f"caption's direction: {fmt(s['sample_advance'])} (the training videos: {fmt(s['data_advance'])})")
    if "watch" in summary and summary["rank"] == 0:
        print(summary["watch"])
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
