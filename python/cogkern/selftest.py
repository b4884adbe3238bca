"""``python -m cogkern.selftest``: is this build right, and how fast, on this machine?

Run it first on a new GPU, and paste its output into bug reports. It prints the
build (``cogkern.build_info()``), torch and the device, then, for every kernel
this device runs, one row per check as soon as it is measured:

* correctness against a more precise reference, from ``cogkern._validate`` (the
  checks the first-use guard runs): each attention kernel, forward and
  backward, at every head dim and dtype the CUDA kernels are built for
  (FlashAttention's 2x rule); 3D RoPE forward + backward; every optimizer mode
  (CUDA state bit-equal to the CPU functor's);
* a short speed probe: attention at the CogVideoX-5B shape (batch 1, 226 text +
  13x30x45 video tokens = 17,776, 48 heads at D = 64, and 24 heads at D = 128 so
  that the work is the same) in TFLOP/s as FlashAttention counts them
  (4*B*H*S^2*D forward, 2.5x that backward); RoPE at that shape and each
  optimizer mode in GB/s (bytes per param stated); all against ceilings measured
  in the same run (a matmul's TFLOP/s per dtype, a device copy's GB/s).

On a machine without a usable GPU it checks the CPU backend the same way, at a
small shape (stated in the rows).

Each kernel family runs in its own subprocess with a timeout, so a hang or a
fault in one shows as a failed row of that family and the others still run.
The exit status is 1 if any row failed.

    python -m cogkern.selftest [--quick] [--json PATH] [--only FAMILY[,FAMILY]] [--skip-ws]
                               [--timeout S] [--device cuda|cpu] [--list]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _validate
from .attention import _BACKWARD_KERNELS, _FORWARD_KERNELS, CUDA_DTYPES, CUDA_HEAD_DIMS

# A child's records come on its stdout, one JSON object a line after this marker
# (anything else it prints, a library's warning say, is not mistaken for a record).
_RECORD = "@cogkern-selftest-record "
_NOTE = "@cogkern-selftest-note "

# --------------------------------------------------------------------------- what is run

# Speed-probe shapes. GPU: CogVideoX-5B at 480x720, 49 frames (13 latent frames of
# 30x45 after 2x2 patching) with its 226 text tokens; D = 128 at half the heads keeps
# the width (3072) and so the FLOPs equal. CPU: small, so that CI stays quick.
GPU_PROBE = dict(batch=1, text_len=226, grid=(13, 30, 45), width=3072)
CPU_PROBE = dict(batch=1, text_len=16, grid=(4, 8, 12), width=256)

# Dtypes of the CPU checks: the CPU backend's own precisions (fp16/bf16 are computed in fp32 there).
CPU_DTYPES = (torch.float32, torch.float64)


# The optimizer modes, (name, param dtype, FusedAdamW options), from the one list the checks
# use; each has its bytes per param in cogkern._counters (adamw_bytes_per_param).
OPTIMIZER_MODES = _validate.OPTIMIZER_MODES

# The warp-specialized attention modes (COGKERN_ATTENTION_SM90 / _BWD values; attention.py's
# _FORWARD_KERNELS / _BACKWARD_KERNELS name them): --skip-ws leaves them out, since a device
# check once saw them hang.
_WARP_SPECIALIZED = {("forward", 3), ("forward", 4), ("backward", 3)}


@dataclass(frozen=True)
class Family:
    """What one subprocess checks. For attention: the kernel(s) it selects by env var and
    the directions whose rows it reports."""

    name: str
    kind: str  # "ceilings" | "attention" | "rope" | "optimizer"
    kernel: str | None = None
    directions: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)


def _attention_env(forward: int, backward: int) -> dict:
    return {"COGKERN_ATTENTION_SM90": str(forward), "COGKERN_ATTENTION_SM90_BWD": str(backward)}


def _runnable_modes(direction: str, modes: dict[int, str], problems: list[str]) -> list[int]:
    """The Hopper modes attention_kernels confirms on this GPU and build (elsewhere the
    switches silently mean mma.sync, so a mode is listed only when it is what runs).
    A failure to ask goes to `problems` (a failed row), not up: the other families still run."""
    import cogkern

    runnable = []
    for mode, kernel in modes.items():
        if mode == 0:
            continue
        old = {k: os.environ.get(k) for k in ("COGKERN_ATTENTION_SM90", "COGKERN_ATTENTION_SM90_BWD")}
        os.environ.update(_attention_env(mode, 0) if direction == "forward" else _attention_env(0, mode))
        try:
            q = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
            if cogkern.attention_kernels(q)[direction] == kernel:
                runnable.append(mode)
        except Exception as exc:
            problems.append(f"attention_kernels with the {direction} switch at {mode} ({kernel}): {_error_text(exc)}")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return runnable


def plan_families(device: str, skip_ws: bool = False, problems: list[str] | None = None) -> list[Family]:
    """The families this device runs, in order: the ceilings first (the speed rows are
    judged against them), the default attention kernels, the Hopper ones (one family per
    kernel and direction, so a hang in one hides no other), RoPE, the optimizer.
    What went wrong finding the Hopper kernels is appended to `problems`."""
    problems = [] if problems is None else problems
    families = [Family("ceilings", "ceilings")]
    if device == "cpu":
        families.append(Family("attention:cpu", "attention", "cpu", ("forward", "backward")))
    else:
        families.append(Family("attention:mma.sync", "attention", "mma.sync", ("forward", "backward"),
                               _attention_env(0, 0)))
        for direction, modes in (("forward", _FORWARD_KERNELS), ("backward", _BACKWARD_KERNELS)):
            for mode in _runnable_modes(direction, modes, problems):
                if skip_ws and (direction, mode) in _WARP_SPECIALIZED:
                    continue
                env = _attention_env(mode, 0) if direction == "forward" else _attention_env(0, mode)
                families.append(Family(f"attention.{direction}:{modes[mode]}", "attention", modes[mode],
                                       (direction,), env))
    families += [Family("rope", "rope"), Family("optimizer", "optimizer")]
    return families


# --------------------------------------------------------------------------- the child side


def _emit(record: dict) -> None:
    print(_RECORD + json.dumps(record, default=str), flush=True)


def _note(text: str) -> None:
    print(_NOTE + text, flush=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {os.path.basename(last[0].filename)}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}"


def _check_record(check, family: Family, **fields) -> dict:
    """A cogkern._validate.Check as a record."""
    record = dict(dataclasses.asdict(check), family=family.name, kind="check", **fields)
    record["passed"] = bool(record["passed"])
    return record


def _failed(name: str, family: Family, error: str, kind: str = "check", seconds: float = 0.0, **fields) -> dict:
    return dict(name=name, family=family.name, kind=kind, passed=False, error=error, figures={}, seconds=seconds,
                **fields)


@dataclass
class _Timing:
    """time_fn's options for this run: fewer repeats with --quick; on the CPU a short autorange."""

    warmup: int
    repeats: int
    min_run_time: float

    @classmethod
    def for_run(cls, device: str, quick: bool) -> "_Timing":
        if device == "cpu":
            return cls(1, 3, 0.05 if quick else 0.2)
        return cls(2, 5, 0.05) if quick else cls(3, 20, 0.3)

    def kwargs(self) -> dict:
        return dict(warmup=self.warmup, repeats=self.repeats, min_run_time=self.min_run_time)


def _probe(name: str, family: Family, measure: Callable[[], tuple[dict, bool]], kind: str = "speed",
           **fields) -> dict:
    """Runs a speed probe: measure() returns (figures, outputs finite). A probe passes when it
    ran and its output was finite."""
    start = time.perf_counter()
    try:
        figures, finite = measure()
    except Exception as exc:  # a probe that cannot run is a failed row, never a missing one
        return _failed(name, family, _error_text(exc), kind=kind, seconds=time.perf_counter() - start, **fields)
    return dict(name=name, family=family.name, kind=kind, passed=bool(finite),
                error=None if finite else "non-finite output", figures=figures,
                seconds=time.perf_counter() - start, **fields)


def _child_ceilings(family: Family, device: str, quick: bool, timing: _Timing) -> None:
    from ._timing import copy_bandwidth, matmul_rate

    dtypes = CPU_DTYPES if device == "cpu" else CUDA_DTYPES
    n = 512 if device == "cpu" else 8192  # a GPU reaches its peak only at a large size
    # Every speed row is judged against these, so they get a longer look than the probes
    # (on a CPU shared with other work a short autorange can catch a slow moment).
    timing = dataclasses.replace(timing, warmup=max(timing.warmup, 3), min_run_time=max(timing.min_run_time, 0.2))
    for dtype in dtypes:
        def matmul(dtype=dtype):
            rate = matmul_rate(device, n=n, dtype=dtype, **timing.kwargs())
            return {"tflops": rate / 1e12, "n": n}, math.isfinite(rate) and rate > 0
        _emit(_probe(f"ceiling matmul {_dtype_name(dtype)} {n}x{n}x{n}", family, matmul, kind="ceiling",
                     kernel="matmul", dtype=_dtype_name(dtype)))
    nbytes = (64 << 20) if device == "cpu" else ((256 << 20) if quick else (1 << 30))

    def copy():
        rate = copy_bandwidth(device, nbytes=nbytes, **timing.kwargs())
        return {"gbps": rate / 1e9, "bytes": nbytes}, math.isfinite(rate) and rate > 0
    _emit(_probe(f"ceiling copy {nbytes >> 20} MiB", family, copy, kind="ceiling", kernel="copy"))


def _probe_shape(device: str, head_dim: int) -> tuple[int, int, int, tuple[int, int, int]]:
    """(batch, seq, heads, grid) of the attention / RoPE probe at this head dim."""
    shape = CPU_PROBE if device == "cpu" else GPU_PROBE
    grid = shape["grid"]
    seq = shape["text_len"] + grid[0] * grid[1] * grid[2]
    return shape["batch"], seq, shape["width"] // head_dim, grid


def _attention_probe(device: str, dtype: torch.dtype, head_dim: int, timing: _Timing) -> dict:
    """Forward and backward seconds and TFLOP/s of fused_attention as CogVideoX calls it
    (LayerNorm QK-norm, 3D RoPE on the video tokens)."""
    import cogkern
    from ._counters import attention_flops
    from ._timing import time_forward_backward

    batch, seq, heads, grid = _probe_shape(device, head_dim)
    text_len = (CPU_PROBE if device == "cpu" else GPU_PROBE)["text_len"]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale + shift

    q, k, v = (randn(batch, seq, heads, head_dim).requires_grad_() for _ in range(3))
    # Trained norm weights, as in CogVideoX: the backward computes their gradients too.
    wq, bq, wk, bk = (randn(head_dim, scale=0.1, shift=shift).requires_grad_() for shift in (1.0, 0.0, 1.0, 0.0))
    rope = cogkern.RoPE3D(grid, head_dim)

    def fn():
        return cogkern.fused_attention(q, k, v, rope=rope, text_len=text_len, qk_norm="layer_norm", q_norm_weight=wq,
                                       q_norm_bias=bq, k_norm_weight=wk, k_norm_bias=bk)

    grad = randn(batch, seq, heads, head_dim)
    out = fn()
    out.backward(grad)
    finite = {"forward": bool(torch.isfinite(out).all()),
              "backward": all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))}
    t_fwd, t_bwd, _ = time_forward_backward(fn, grad, device, **timing.kwargs())
    flops = {d: attention_flops(batch, seq, heads, head_dim, pass_=p) for d, p in (("forward", "fwd"),
                                                                                    ("backward", "bwd"))}
    seconds = {"forward": t_fwd, "backward": t_bwd}
    shape = f"B={batch} S={seq} H={heads} D={head_dim}"
    return {d: ({"ms": seconds[d] * 1e3, "tflops": flops[d] / seconds[d] / 1e12, "seq": seq, "heads": heads},
                finite[d], shape) for d in ("forward", "backward")}


def _child_attention(family: Family, device: str, quick: bool, timing: _Timing) -> None:
    import cogkern

    dtypes = CPU_DTYPES if device == "cpu" else CUDA_DTYPES
    head_dims = (64, 128) if device == "cpu" else CUDA_HEAD_DIMS  # the CPU: CogVideoX's two
    for dtype in dtypes:
        for head_dim in head_dims:
            config = dict(dtype=_dtype_name(dtype), head_dim=head_dim)
            label = f"{_dtype_name(dtype)} D={head_dim}"
            try:
                kernels = cogkern.attention_kernels(torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype))
            except Exception as exc:
                _emit(_failed(f"attention {label}: which kernels run", family, _error_text(exc), **config))
                continue
            directions = [d for d in family.directions if kernels[d] == family.kernel]
            if not directions:
                _note(f"{family.name}: {label} runs {kernels} here, not {family.kernel}: not checked in this family")
                continue
            start = time.perf_counter()
            try:
                checks = _validate.check_attention(dtype, head_dim, device)
            except Exception as exc:  # an exception fails these rows; the next config still runs
                for d in directions:
                    _emit(_failed(f"attention.{d}[{kernels[d]}] {label}", family, _error_text(exc),
                                  seconds=time.perf_counter() - start, kernel=kernels[d], direction=d, **config))
                checks = []
            for direction, check in zip(("forward", "backward"), checks):
                if direction in directions:
                    _emit(_check_record(check, family, kernel=kernels[direction], direction=direction, **config))
                elif not check.passed:
                    # The other direction's (default) kernel, run on this family's kernel's output: a
                    # failure here that its own family does not show points at this family's kernel
                    # (say, a forward with a wrong lse), so it is reported; a pass repeats that family's row.
                    check = dataclasses.replace(check, name=f"{check.name} after {family.kernel} {directions[0]}")
                    _emit(_check_record(check, family, kernel=kernels[direction], direction=direction, **config))
            probes: dict = {}

            def measure(direction):
                if not probes:
                    probes.update(_attention_probe(device, dtype, head_dim, timing))
                figures, finite, _ = probes[direction]
                return figures, finite

            _, seq, heads, _ = _probe_shape(device, head_dim)
            for d in directions:
                _emit(_probe(f"speed attention.{d}[{kernels[d]}] {label} S={seq} H={heads}", family,
                             lambda d=d: measure(d), kernel=kernels[d], direction=d, **config))
            if device == "cuda":
                torch.cuda.empty_cache()


def _child_rope(family: Family, device: str, quick: bool, timing: _Timing) -> None:
    import cogkern
    from ._counters import rope_bytes
    from ._timing import time_fn

    check_dtypes = CPU_DTYPES if device == "cpu" else (torch.float32, *CUDA_DTYPES)
    for dtype in check_dtypes:
        start = time.perf_counter()
        try:
            check = _validate.check_rope(dtype, device)
            _emit(_check_record(check, family, kernel="rope3d", direction="forward+backward",
                                dtype=_dtype_name(dtype)))
        except Exception as exc:
            _emit(_failed(f"rope3d {_dtype_name(dtype)}", family, _error_text(exc),
                          seconds=time.perf_counter() - start, kernel="rope3d", dtype=_dtype_name(dtype)))
    head_dim = 64
    batch, seq, heads, grid = _probe_shape(device, head_dim)
    text_len = (CPU_PROBE if device == "cpu" else GPU_PROBE)["text_len"]
    for dtype in (CPU_DTYPES[:1] if device == "cpu" else CUDA_DTYPES):
        def measure(dtype=dtype):
            x = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype)
            rope = cogkern.RoPE3D(grid, head_dim)
            out = cogkern.apply_rope3d(x, rope, text_len=text_len)
            t = time_fn(lambda: cogkern.apply_rope3d(x, rope, text_len=text_len), device, **timing.kwargs())
            nbytes = rope_bytes(batch, seq, heads, head_dim, _dtype_name(dtype), text_len=text_len)
            return {"ms": t * 1e3, "gbps": nbytes / t / 1e9, "bytes": nbytes}, bool(torch.isfinite(out).all())
        _emit(_probe(f"speed rope3d out-of-place {_dtype_name(dtype)} S={seq} H={heads} D={head_dim}", family,
                     measure, kernel="rope3d", direction="forward", dtype=_dtype_name(dtype), head_dim=head_dim))


def _probe_params(device: str, quick: bool) -> int:
    if device == "cpu":
        return 1 << 20 if quick else 4 << 20
    return 64 << 20 if quick else 256 << 20


def _child_optimizer(family: Family, device: str, quick: bool, timing: _Timing) -> None:
    from ._counters import adamw_bytes, adamw_bytes_per_param
    from ._timing import time_fn
    from .optim import FusedAdamW

    for name, param_dtype, options in OPTIMIZER_MODES:
        fields = dict(kernel=f"adamw[{name}]", direction="step", dtype=_dtype_name(param_dtype))
        start = time.perf_counter()
        try:
            check = _validate.check_optimizer(device, param_dtype, **options)
            _emit(_check_record(check, family, **fields))
        except Exception as exc:
            _emit(_failed(f"optimizer[{name}]", family, _error_text(exc), seconds=time.perf_counter() - start,
                          **fields))
    n = _probe_params(device, quick)
    # Odd sizes, several tensors: the multi-tensor packing at work, not one flat buffer.
    sizes = [n // 2 + 3, n // 4 - 5, n // 8 + 7]
    sizes.append(n - sum(sizes))
    for name, param_dtype, options in OPTIMIZER_MODES:
        def measure(name=name, param_dtype=param_dtype, options=options):
            params = [torch.randn(s, device=device).to(param_dtype) for s in sizes]
            for p in params:
                p.grad = (torch.randn(p.shape, device=device) * 1e-3).to(param_dtype)
            opt = FusedAdamW(params, lr=1e-4, **options)
            t = time_fn(opt.step, device, **timing.kwargs())
            finite = all(bool(torch.isfinite(p).all()) for p in params)
            return ({"ms": t * 1e3, "gbps": adamw_bytes(n, name) / t / 1e9,
                     "bytes_per_param": adamw_bytes_per_param(name), "params": n}, finite)
        _emit(_probe(f"speed optimizer[{name}] {n / 2**20:g} Mi params", family, measure,
                     kernel=f"adamw[{name}]", direction="step", dtype=_dtype_name(param_dtype)))
        if device == "cuda":
            torch.cuda.empty_cache()


_CHILDREN = {"ceilings": _child_ceilings, "attention": _child_attention, "rope": _child_rope,
             "optimizer": _child_optimizer}


def _child_main(family_name: str, device: str, quick: bool, skip_ws: bool) -> int:
    families = {f.name: f for f in plan_families(device, skip_ws)}
    family = families[family_name]
    if device == "cpu":
        torch.manual_seed(0)
    _CHILDREN[family.kind](family, device, quick, _Timing.for_run(device, quick))
    return 0


# --------------------------------------------------------------------------- the parent side


@dataclass
class ChildResult:
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str
    seconds: float


def run_child(argv: list[str], env: dict, timeout: float, on_record: Callable[[dict], None],
              on_note: Callable[[str], None] = lambda text: None) -> ChildResult:
    """Runs argv, handing each record line to on_record as it arrives; kills the child's
    whole process group at the timeout."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        pending = b""
        timed_out = False

        def handle(line: bytes) -> None:
            text = line.decode(errors="replace")
            if text.startswith(_RECORD):
                try:
                    on_record(json.loads(text[len(_RECORD):]))
                except json.JSONDecodeError:
                    pass  # a line cut by a crash; the exit status tells what happened
            elif text.startswith(_NOTE):
                on_note(text[len(_NOTE):])

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        try:
            while True:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    timed_out = True
                    break
                if not sel.select(timeout=min(left, 1.0)):
                    continue
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    handle(line)
            if pending:
                handle(pending)
            if not timed_out:
                try:  # stdout closed; the exit itself (a CUDA teardown, say) may still hang
                    proc.wait(timeout=max(timeout - (time.monotonic() - start), 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            if timed_out or proc.poll() is None:  # also on Ctrl-C: no child outlives the selftest
                kill()
            sel.close()
            proc.stdout.close()
        returncode = proc.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    return ChildResult(None if timed_out else returncode, tail, time.monotonic() - start)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"exit code {returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return f"exit code {returncode}"


def _stderr_lines(tail: str, lines: int = 8) -> str:
    # torch's import-time chatter on a CUDA-less box is no clue to a crash.
    kept = [ln for ln in tail.splitlines() if ln.strip() and "No CUDA runtime is found" not in ln]
    return "\n".join(kept[-lines:])


def device_info(device: str) -> dict:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
                "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_info() -> dict:
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "python": platform.python_version()}


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary(record: dict) -> str:
    """The row's figures in words: rates against their ceilings; a check's measured errors."""
    f = record.get("figures") or {}
    if record["kind"] in ("speed", "ceiling") and "tflops" in f:
        text = f"{f['tflops']:.4g} TFLOP/s"
        if "ms" in f:
            text += f"  {f['ms']:.3g} ms"
        if "pct_of_ceiling" in f:
            text += f"  ({f['pct_of_ceiling']:.0f}% of the {record.get('dtype')} matmul's {f['ceiling_tflops']:.4g})"
        return text
    if record["kind"] in ("speed", "ceiling") and "gbps" in f:
        text = f"{f['gbps']:.4g} GB/s"
        if "bytes_per_param" in f:
            text += f" at {f['bytes_per_param']} B/param"
        if "ms" in f:
            text += f"  {f['ms']:.3g} ms"
        if "pct_of_ceiling" in f:
            text += f"  ({f['pct_of_ceiling']:.0f}% of copy's {f['ceiling_gbps']:.4g})"
        return text
    pairs = {k[: -len("_eager_err")]: (f[k[: -len("_eager_err")] + "_err"], v) for k, v in f.items()
             if k.endswith("_eager_err") and k[: -len("_eager_err")] + "_err" in f}
    if pairs:  # FlashAttention's rule, error <= 2x eager's: the worst ratio says how close it came
        name, (err, eager) = max(pairs.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-300))
        ratio = err / max(eager, 1e-300)
        return f"error / eager's at most {ratio:.2f}x (rule: 2x), worst {name}: {err:.3g} vs {eager:.3g}"
    return "  ".join(f"{k} {_fmt(v)}" for k, v in f.items())


class Report:
    """The records so far, printed as rows as they come and written to --json after each family."""

    NAME_WIDTH = 62

    def __init__(self, header: dict, json_path: str | None, out=sys.stdout) -> None:
        self.header = header
        self.json_path = json_path
        self.out = out
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.ceilings: dict = {}

    def add(self, record: dict) -> None:
        record.setdefault("error", None)
        record.setdefault("figures", {})
        for key in ("kernel", "direction", "dtype", "head_dim"):
            record.setdefault(key, None)
        self._judge_against_ceiling(record)
        self.records.append(record)
        mark = "PASS" if record["passed"] else "FAIL"
        print(f"{mark}  {record['name']:<{self.NAME_WIDTH}}  {summary(record)}  [{record.get('seconds', 0.0):.2f} s]",
              file=self.out, flush=True)
        if record["error"]:
            for line in str(record["error"]).splitlines():
                print(f"      {line}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"      note: {text}", file=self.out, flush=True)

    def _judge_against_ceiling(self, record: dict) -> None:
        f = record["figures"]
        if record["kind"] == "ceiling" and record["passed"]:
            if record["kernel"] == "matmul":
                self.ceilings[("tflops", record["dtype"])] = f["tflops"]
            elif record["kernel"] == "copy":
                self.ceilings[("gbps", None)] = f["gbps"]
            return
        if record["kind"] != "speed":
            return
        if "tflops" in f and ("tflops", record["dtype"]) in self.ceilings:
            f["ceiling_tflops"] = self.ceilings[("tflops", record["dtype"])]
            f["pct_of_ceiling"] = 100 * f["tflops"] / f["ceiling_tflops"]
        elif "gbps" in f and ("gbps", None) in self.ceilings:
            f["ceiling_gbps"] = self.ceilings[("gbps", None)]
            f["pct_of_ceiling"] = 100 * f["gbps"] / f["ceiling_gbps"]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if not r["passed"]]

    def write_json(self, complete: bool) -> None:
        if not self.json_path:
            return
        doc = dict(self.header, complete=complete, passed=not self.failed, notes=self.notes, checks=self.records)
        tmp = f"{self.json_path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(_json_safe(doc), fh, indent=1, default=str, allow_nan=False)
        os.replace(tmp, self.json_path)  # a run killed mid-write leaves the last whole file


def _json_safe(value):
    """value with inf/NaN figures as null: strict JSON, which every reader takes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def default_timeout(device: str, quick: bool) -> float:
    # A family's real work takes seconds (--quick) to tens of seconds on an H200; the timeout
    # is what a hang costs. The CPU's is generous for slow, shared CI machines.
    if device == "cpu":
        return 180.0
    return 90.0 if quick else 300.0


def _choose_device(requested: str | None) -> tuple[str, str | None]:
    """(device, why it is not the GPU when one is present)."""
    from . import build_info

    if requested == "cpu":
        return "cpu", None
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise SystemExit("cogkern.selftest: --device cuda, but torch sees no CUDA GPU")
        return "cpu", None
    if not build_info()["cuda_kernels"]:
        return "cpu", "a CUDA GPU is present, but this cogkern build has no CUDA kernels (a CPU-only build)"
    return "cuda", None


def _print_header(header: dict, device: str, out) -> None:
    b = header["build_info"]
    t = header["torch"]
    d = header["device"]
    print(f"cogkern {header['cogkern']}: built against torch {b['torch_version']}"
          f"{', CUDA ' + b['cuda_version'] if b['cuda_kernels'] else ', no CUDA kernels'}"
          f"{', archs ' + ','.join(b['cuda_archs']) if b['cuda_archs'] else ''}", file=out)
    print(f"build_info: {json.dumps(b)}", file=out)
    print(f"torch {t['version']} (CUDA {t['cuda']}, available: {t['cuda_available']}), python {t['python']}", file=out)
    if device == "cuda":
        print(f"device: {d['name']}, compute capability {d['compute_capability']}, {d['memory_gib']} GiB, "
              f"{d['multiprocessors']} SMs", file=out)
    else:
        shape = CPU_PROBE
        print(f"device: CPU {d['name']}, {d['threads']} threads; speed probes at a small shape (text "
              f"{shape['text_len']} + {'x'.join(map(str, shape['grid']))} video tokens, width {shape['width']})",
              file=out)
    print(flush=True, file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogkern.selftest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller speed probes")
    ap.add_argument("--json", metavar="PATH", help="write one record per row here (rewritten after each family)")
    ap.add_argument("--only", metavar="FAMILY[,FAMILY]",
                    help="run only the families whose names start with one of these (the ceilings always run)")
    ap.add_argument("--skip-ws", action="store_true", help="skip the warp-specialized Hopper attention kernels")
    ap.add_argument("--timeout", type=float, metavar="S", help="seconds per family before it is killed")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: the GPU when there is one")
    ap.add_argument("--list", action="store_true", help="print the families this device would run, then exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        ap.error(f"--json: the folder of {args.json} does not exist")
    import cogkern

    device, why_not_gpu = _choose_device(args.device)
    if args.child:
        # The first-use guard must not swap kernels under the selftest's feet (the parent
        # sets this in the children's environment too; here for a child started by hand).
        os.environ["COGKERN_VALIDATE"] = "0"
        return _child_main(args.child, device, args.quick, args.skip_ws)

    problems: list[str] = []
    families = plan_families(device, args.skip_ws, problems)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(f.name.startswith(w) for f in families)]
        if unknown:
            ap.error(f"--only: no family starts with {', '.join(unknown)}; "
                     f"this device runs {', '.join(f.name for f in families)}")
        families = [f for f in families if f.kind == "ceilings" or any(f.name.startswith(w) for w in wanted)]
    if args.list:
        for f in families:
            print(f.name)
        return 0
    timeout = args.timeout or default_timeout(device, args.quick)

    header = {"cogkern": cogkern.__version__, "build_info": cogkern.build_info(), "device": device_info(device),
              "torch": torch_info(), "options": {"quick": args.quick, "skip_ws": args.skip_ws, "timeout_s": timeout,
                                                  "only": args.only}}
    _print_header(header, device, sys.stdout)
    report = Report(header, args.json)
    if why_not_gpu:
        report.add(dict(name="build has CUDA kernels", family="build", kind="check", passed=False,
                        error=why_not_gpu + "; the CPU backend is checked instead", figures={}, seconds=0.0))
    report.write_json(complete=False)  # an unwritable --json fails now, not after the first family
    for problem in problems:
        report.add(dict(name="attention: which Hopper kernels run", family="plan", kind="check", passed=False,
                        error=problem, figures={}, seconds=0.0))
    start = time.monotonic()
    for family in families:
        env = dict(os.environ, COGKERN_VALIDATE="0", PYTHONUNBUFFERED="1", **family.env)
        child_argv = [sys.executable, "-m", "cogkern.selftest", "--child", family.name, "--device", device]
        child_argv += ["--quick"] * args.quick + ["--skip-ws"] * args.skip_ws

        def on_record(record, family=family):
            record["family"] = family.name
            report.add(record)

        result = run_child(child_argv, env, timeout, on_record, report.note)
        if result.returncode != 0:
            what = f"timeout after {timeout:g} s" if result.returncode is None else _exit_text(result.returncode)
            tail = _stderr_lines(result.stderr_tail)
            report.add(dict(name=f"{family.name} (subprocess)", family=family.name, kind="process", passed=False,
                            error=what + (f"; stderr:\n{tail}" if tail else ""), figures={},
                            seconds=result.seconds))
        report.write_json(complete=False)
    report.write_json(complete=True)
    failed = report.failed
    verdict = "all passed" if not failed else f"{len(failed)} FAILED: " + "; ".join(r["name"] for r in failed)
    print(f"\ncogkern.selftest on {header['device']['name']}: {len(report.records)} rows, {verdict} "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
