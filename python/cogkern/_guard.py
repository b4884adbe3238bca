"""The first-use guard: a CUDA kernel configuration is checked once per process, on a small
input against a more precise reference, before its first real use.

No kernel here ran on a GPU before its first user did, and a subtly wrong kernel would spoil a
training run quietly. So the first time a process would run a configuration (kernel family,
dtype, head dim, device, and the kernel the switches select), :mod:`cogkern._validate` checks it
(a few milliseconds on a GPU) and the verdict holds for the life of the process:

- attention and RoPE: a kernel that fails is never used again; the next validated kernel takes
  over (a Hopper wgmma mode falls back to mma.sync), and finally the composite path (eager norm +
  RoPE + torch SDPA). One warning names the kernel and its error.
- the optimizer: a RuntimeError that names the failed check (an optimizer has no slower twin
  that keeps the same state, and a wrong update must not be applied).

``COGKERN_VALIDATE`` (read at each first use): ``0`` skips the checks, ``strict`` raises on any
failure, anything else (default ``1``) checks and falls back.

This module is the mechanism only: the op modules ask it for a route, :mod:`cogkern._validate`
registers the checks. It imports nothing of cogkern's, so it sits below everything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
import warnings
from typing import Callable, Iterator

import torch

KERNEL, COMPOSITE = "kernel", "composite"
_ENV = "COGKERN_VALIDATE"


@dataclasses.dataclass
class Decision:
    """A checker's verdict on one configuration: where calls go, and the checks that failed
    (each with a .name and an .error) on the way there."""

    route: str  # KERNEL or COMPOSITE
    failures: list
    fatal: bool = False  # the optimizer: a failure is an error, not a fallback
    fallback: str = ""  # what now runs, in words (for the warning)


# family -> checker(key, device) -> Decision. Registered by cogkern._validate.
_CHECKERS: dict[str, Callable[[tuple, torch.device], Decision]] = {}
_SWITCHES: dict[str, tuple[str, ...]] = {}
_FORGET: dict[str, Callable[[], None]] = {}
_DESCRIBE: dict[str, Callable[[tuple], str]] = {}
_VERDICTS: dict[tuple, str] = {}
_FATAL: dict[tuple, str] = {}
_COSTS: dict[tuple, float] = {}  # seconds each first-use check took
_LOCK = threading.RLock()
_STATE = threading.local()  # .checking: a check is running on this thread (its own calls pass)
_CPU_FOR_TESTS = False  # tests: apply the guard to CPU tensors too
_INJECTED: set[tuple[str, str]] = set()  # tests: (family, kernel) whose outputs the checks corrupt


def setting() -> str:
    """'off', 'on' or 'strict', from COGKERN_VALIDATE."""
    raw = os.environ.get(_ENV, "1").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw == "strict":
        return "strict"
    if raw in ("", "1", "on", "true", "yes"):
        return "on"
    raise ValueError(f"{_ENV} must be 0, 1 or strict, got {os.environ[_ENV]!r}")


def register_checker(family: str, checker: Callable[[tuple, torch.device], Decision],
                     switches: tuple[str, ...] = (), forget: Callable[[], None] | None = None,
                     describe: Callable[[tuple], str] | None = None) -> None:
    """checker(key, device) decides a configuration of `family`; `switches`: the environment
    variables that select the family's kernels; forget(): undoes what the checker retired (tests);
    describe(key): the configuration in words, for messages."""
    _CHECKERS[family] = checker
    if describe is not None:
        _DESCRIBE[family] = describe
    _SWITCHES[family] = switches
    if forget is not None:
        _FORGET[family] = forget


def verdict(family: str, key: tuple, device: torch.device) -> str | None:
    """The verdict already reached for a configuration (None: not checked yet, or the guard is off)."""
    return _VERDICTS.get(_full_key(family, key, device))


def _full_key(family: str, key: tuple, device: torch.device) -> tuple:
    # The environment switches that select a family's kernels belong to the key: another
    # selection is another configuration, checked at its own first use.
    return (family, *key, *(os.environ.get(n, "") for n in _SWITCHES.get(family, ())), str(device))


def _applies(device: torch.device) -> bool:
    return device.type == "cuda" or (_CPU_FOR_TESTS and device.type == "cpu")


def checking() -> bool:
    return getattr(_STATE, "checking", False)


@contextlib.contextmanager
def bypass() -> Iterator[None]:
    """The checks' own calls of the ops go straight to the kernels (no guard, no recursion)."""
    old = checking()
    _STATE.checking = True
    try:
        yield
    finally:
        _STATE.checking = old


def _route(family: str, key: tuple, device: torch.device) -> str:
    if not _applies(device) or checking():
        return KERNEL
    mode = setting()
    if mode == "off":
        return KERNEL
    full = _full_key(family, key, device)
    known = _VERDICTS.get(full)
    if known is None:
        return _decide(family, key, device, full, mode)
    if full in _FATAL:
        raise RuntimeError(_FATAL[full])
    return known


# Under torch.compile, the route is taken once while tracing (the check runs then, eagerly) and
# the traced graph keeps it: no graph break.
route = torch._dynamo.assume_constant_result(_route) if hasattr(torch, "_dynamo") else _route


@torch.compiler.disable
def _decide(family: str, key: tuple, device: torch.device, full: tuple, mode: str) -> str:
    with _LOCK:
        if full in _VERDICTS:  # another thread decided meanwhile
            if full in _FATAL:
                raise RuntimeError(_FATAL[full])
            return _VERDICTS[full]
        what = f"{_DESCRIBE[family](key) if family in _DESCRIBE else family + ' ' + str(key)} on {device}"
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"cogkern: {what} is first used inside a CUDA graph capture, where its first-use check "
                "cannot run. Run the step once before capturing (the usual warm-up), or set COGKERN_VALIDATE=0."
            )
        checker = _CHECKERS.get(family)
        if checker is None:
            raise RuntimeError(f"cogkern: no first-use check is registered for {family!r} (import cogkern first)")
        start = time.perf_counter()
        try:
            with bypass():
                decision = checker(key, device)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        _COSTS[full] = time.perf_counter() - start
        if decision.failures:
            detail = "; ".join(f"{c.name}: {c.error}" for c in decision.failures)
            if decision.fatal:
                message = (f"cogkern: the first-use check of {what} failed ({detail}). The optimizer will not "
                           "apply an update from a kernel that failed; please report this with the output of "
                           "`python -m cogkern.selftest`.")
                _FATAL[full] = message
                _VERDICTS[full] = KERNEL
                raise RuntimeError(message)
            if mode == "strict":
                raise RuntimeError(f"cogkern: the first-use check of {what} failed ({detail}) (COGKERN_VALIDATE=strict)")
            warnings.warn(
                f"cogkern: the first-use check of {what} failed ({detail}); this process now uses "
                f"{decision.fallback}. Please report this with the output of `python -m cogkern.selftest`.",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )
        _VERDICTS[full] = decision.route
        return decision.route


def _caller_stacklevel() -> int:
    """The stacklevel that points a warning at the first frame outside cogkern and torch."""
    package = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((package, torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


def check_costs() -> dict[tuple, float]:
    """Seconds each first-use check took in this process, by configuration."""
    return dict(_COSTS)


def reset(retired: bool = False) -> None:
    """Forgets every verdict (tests); with `retired`, also un-retires the kernels the checkers
    retired in the extension (otherwise a retired Hopper mode stays retired)."""
    with _LOCK:
        _VERDICTS.clear()
        _FATAL.clear()
        _COSTS.clear()
        if retired:
            for forget in _FORGET.values():
                forget()


# ---------------------------------------------------------------------------- test hooks


@contextlib.contextmanager
def cpu_for_tests() -> Iterator[None]:
    """Applies the guard to CPU tensors as if they were CUDA ones (the CPU backend is the kernel)."""
    global _CPU_FOR_TESTS
    old, _CPU_FOR_TESTS = _CPU_FOR_TESTS, True
    reset()
    try:
        yield
    finally:
        _CPU_FOR_TESTS = old
        reset()


@contextlib.contextmanager
def inject_failure(family: str, kernel: str) -> Iterator[None]:
    """While active, the checks of `kernel` in `family` ("attention", "rope", "optimizer"; kernel as
    attention_kernels() names it, "cpu" for the CPU backend, "*" for any) corrupt that kernel's
    results before comparing them, so the check fails the way a wrong kernel would."""
    _INJECTED.add((family, kernel))
    try:
        yield
    finally:
        _INJECTED.discard((family, kernel))


def injected(family: str, kernel: str) -> bool:
    return (family, kernel) in _INJECTED or (family, "*") in _INJECTED
