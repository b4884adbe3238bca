"""Where a wrong Hopper tile gets its numbers from: layout probes for the first
GPU run of the wgmma / TMA building blocks, and an error profile for whole
attention outputs.

``torch.ops.cogkern._sm90_wgmma_selftest(q, k, v, tma)`` computes, on one
64-row tile, S = Q K^T, O = 16bit(S) V and U = V[:, :64]^T V. Fed with an
identity on one side and integer "address codes" on the other (the row index + 1
in one run, the column index + 1 in a second; exact in fp16 and bf16), every
output element is exactly one element of the probed operand, so a layout fault
(swizzle, descriptor, fragment order, TMA box) shows up as a map: output
(i, j) <- operand (row, col). A right kernel reproduces the expected map; a
wrong one shows which 16-byte chunks moved where.

Everything here is plain torch and runs on the CPU: scripts/wgmma_probe.py
feeds it the GPU's outputs, tests/attention/test_wgmma_probe.py simulated faulty kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ROWS = 64  # the selftest tile: 64 queries, 64 keys
CHUNK = 8  # 16-bit elements per 16-byte chunk, the unit of the 128-byte swizzle

Selftest = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def eye_panel(d: int, panel: int) -> torch.Tensor:
    """[64][d] float, 1 at (i, 64 * panel + i), else 0."""
    x = torch.zeros(ROWS, d)
    x[torch.arange(ROWS), 64 * panel + torch.arange(ROWS)] = 1.0
    return x


def row_codes(d: int) -> torch.Tensor:
    return (torch.arange(ROWS, dtype=torch.float32) + 1).unsqueeze(1).expand(ROWS, d).contiguous()


def col_codes(d: int) -> torch.Tensor:
    return (torch.arange(d, dtype=torch.float32) + 1).unsqueeze(0).expand(ROWS, d).contiguous()


def decode(x: torch.Tensor, limit: int) -> torch.Tensor:
    """Code c + 1 -> c; anything that is not an exact integer in 1..limit (a sum of
    several elements, a zero, NaN) -> -1."""
    x = x.double().cpu()
    r = torch.round(x)
    ok = (r == x) & (r >= 1) & (r <= limit)
    return torch.where(ok, r.long() - 1, torch.full_like(r, -1, dtype=torch.long))


@dataclass
class Probe:
    """One operand read of the selftest, seen through one output.

    operand: which read it measures (a key of OPERANDS);
    build(codes) -> (q, k, v) as float [64][d] (codes in the probed operand);
    output: 0 (S), 1 (O) or 2 (U); cols: the output columns it looks at;
    expected(i, j) -> (operand row, operand column) for output element (i, j)."""

    name: str
    operand: str
    build: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    output: int
    cols: slice
    expected: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def probes(d: int) -> list[Probe]:
    """The probes for head dim d (64 or 128): each operand of each product, each 64-column panel."""
    out: list[Probe] = []
    for p in range(d // 64):
        out.append(Probe(f"S <- k (B, K-major), k columns {64 * p}..{64 * p + 63}", "k",
                         lambda c, p=p: (eye_panel(d, p), c, eye_panel(d, 0)), 0, slice(0, ROWS),
                         lambda i, j, p=p: (j, 64 * p + i)))
        out.append(Probe(f"S <- q (A, K-major), q columns {64 * p}..{64 * p + 63}", "q",
                         lambda c, p=p: (c, eye_panel(d, p), eye_panel(d, 0)), 0, slice(0, ROWS),
                         lambda i, j, p=p: (i, 64 * p + j)))
    # S = I exactly, so O = V.
    out.append(Probe("O <- v (B, MN-major)", "v_o", lambda c: (eye_panel(d, 0), eye_panel(d, 0), c), 1, slice(0, d),
                     lambda i, j: (i, j)))
    # S = Q[:, :64] (k = I), V = I: O[:, :64] = 16bit(S), through the S accumulators -> A registers move.
    out.append(Probe("O <- S accumulators as A registers (S = q[:, :64])", "s_regs",
                     lambda c: (c, eye_panel(d, 0), eye_panel(d, 0)), 1, slice(0, ROWS), lambda i, j: (i, j)))
    if d >= 128:
        # U = V[:, :64]^T V. With V[:, 64:128] = I, U[:, 64 + b] = V[b, :64]^T: the MN-major A read.
        def with_eye_right(c):
            v = c.clone()
            v[:, 64:128] = eye_panel(64, 0)
            return eye_panel(d, 0), eye_panel(d, 0), v

        out.append(Probe("U <- v[:, :64] (A, MN-major)", "v_ua", with_eye_right, 2, slice(64, 128), lambda i, j: (j, i)))

        # With V[:, :64] = I, U[:, 64:] = V[:64, 64:]: the MN-major B read of the second panel.
        def with_eye_left(c):
            v = c.clone()
            v[:, :64] = eye_panel(64, 0)
            return eye_panel(d, 0), eye_panel(d, 0), v

        out.append(Probe("U <- v[:, 64:] (B, MN-major)", "v_ub", with_eye_left, 2, slice(64, 128), lambda i, j: (i, 64 + j)))
    return out


@dataclass
class ProbeResult:
    name: str
    operand: str
    wrong: int  # output elements whose source is not the expected one
    total: int
    lines: list[str]  # the map of the first rows when wrong, else empty
    got: tuple[torch.Tensor, torch.Tensor]  # (operand row, column) each output element came from; -1: not one
    expected: tuple[torch.Tensor, torch.Tensor]


def source_grid(got_r: torch.Tensor, got_c: torch.Tensor, exp_r: torch.Tensor, exp_c: torch.Tensor,
                rows: int = 16, chunk0: int = 0) -> list[str]:
    """One cell per row and 8-column group (headed by its chunk number, from
    chunk0): 'row.chunk' of the stored element the group came from ('chunk' =
    column // 8) when its 8 elements are one 16-byte chunk in order, '??' when
    mixed, '--' when undecodable; '!' marks a wrong cell."""
    n = got_r.shape[1]
    lines = ["  chunk: " + "".join(f"{chunk0 + g // CHUNK:>6} " for g in range(0, n, CHUNK))]
    for i in range(min(rows, got_r.shape[0])):
        cells = []
        for g in range(0, n, CHUNK):
            r, c = got_r[i, g:g + CHUNK], got_c[i, g:g + CHUNK]
            bad = bool(((r != exp_r[i, g:g + CHUNK]) | (c != exp_c[i, g:g + CHUNK])).any())
            if (r < 0).any() or (c < 0).any():
                cell = "--"
            elif (r == r[0]).all() and c[0] % CHUNK == 0 and (c == c[0] + torch.arange(len(c))).all():
                cell = f"{int(r[0])}.{int(c[0]) // CHUNK}"
            else:
                cell = "??"
            cells.append(f"{cell:>6}{'!' if bad else ' '}")
        lines.append(f"  row {i:2d}:" + "".join(cells))
    return lines


def run_probe(selftest: Selftest, probe: Probe, d: int, dtype: torch.dtype) -> ProbeResult:
    """Runs the probe's two code runs (row codes, column codes) and compares the map."""
    maps = []
    for codes, limit in ((row_codes(d), ROWS), (col_codes(d), d)):
        q, k, v = (t.to(dtype) for t in probe.build(codes))
        out = selftest(q, k, v)[probe.output]
        maps.append(decode(out[:, probe.cols], limit))
    got_r, got_c = maps
    n = got_r.shape[1]
    i = torch.arange(ROWS).unsqueeze(1).expand(ROWS, n)
    j = torch.arange(n).unsqueeze(0).expand(ROWS, n)
    exp_r, exp_c = probe.expected(i, j)
    wrong = (got_r != exp_r) | (got_c != exp_c)
    lines = []
    if wrong.any():
        # In the operand's own coordinates: logical element (r, c) was read from stored (r', c').
        c0 = int(exp_c.min())
        read_r = torch.full((ROWS, int(exp_c.max()) - c0 + 1), -1, dtype=torch.long)
        read_c = read_r.clone()
        read_r[exp_r, exp_c - c0], read_c[exp_r, exp_c - c0] = got_r, got_c
        want_r = torch.arange(ROWS).unsqueeze(1).expand_as(read_r)
        want_c = (torch.arange(read_r.shape[1]) + c0).unsqueeze(0).expand_as(read_r)
        bad = (read_r != want_r) | (read_c != want_c)
        lines.append(f"  first misread {probe.operand} elements, (row, col) <- (row, col) read instead: " + ", ".join(
            f"({r},{c + c0}) <- ({int(read_r[r, c])},{int(read_c[r, c])})" for r, c in bad.nonzero()[:6].tolist()))
        lines.append(f"  how {probe.operand}'s rows 0..15 were read, per 16-byte chunk (columns {c0}.. in chunks of 8): "
                     "the stored row.chunk each came from, '!' where not its own; ?? = not one chunk in order, "
                     "-- = not one element")
        lines += source_grid(read_r, read_c, want_r, want_c, chunk0=c0 // CHUNK)
    return ProbeResult(probe.name, probe.operand, int(wrong.sum()), wrong.numel(), lines, (got_r, got_c), (exp_r, exp_c))


# The operand reads of the selftest a probe can measure, and their logical widths
# ("d": the head dim): S = q k^T, O = 16bit(S) v (S from the accumulator
# registers), U = v[:, :64]^T v (both read MN-major).
OPERANDS = {"q": "d", "k": "d", "v_o": "d", "s_regs": ROWS, "v_ua": ROWS, "v_ub": "d"}


def read_model(reads: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Selftest:
    """A selftest that reads each operand through a measured map (logical element
    (r, c) <- stored element reads[name][0][r, c], reads[name][1][r, c]; -1 or a
    place outside the operand reads NaN); operands without a map are read right.
    In float64 on the CPU."""

    def read(x, name):
        if name not in reads:
            return x
        r, c = reads[name]
        # A measured source outside this operand (the probe's codes name another
        # operand's element: the fault lies upstream) reads as NaN, like -1.
        outside = (r < 0) | (c < 0) | (r >= x.shape[0]) | (c >= x.shape[1])
        y = x[r.clamp(0, x.shape[0] - 1), c.clamp(0, x.shape[1] - 1)]
        return torch.where(outside, torch.full_like(y, float("nan")), y)

    def run(q, k, v):
        dtype = q.dtype
        q, k, v = (t.double().cpu() for t in (q, k, v))
        s = read(q, "q") @ read(k, "k").T
        o = read(s.to(dtype).double(), "s_regs") @ read(v, "v_o")
        u = read(v[:, :ROWS], "v_ua").T @ read(v, "v_ub")
        return s, o, u

    return run


def measured_reads(results: list[ProbeResult], d: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each operand read that some probe found wrong, as a full map (right where unmeasured)."""
    reads = {}
    for r in results:
        if not r.wrong:
            continue
        if r.operand not in reads:
            w = d if OPERANDS[r.operand] == "d" else OPERANDS[r.operand]
            reads[r.operand] = (torch.arange(ROWS).unsqueeze(1).expand(ROWS, w).clone(),
                                torch.arange(w).unsqueeze(0).expand(ROWS, w).clone())
        (mr, mc), (er, ec) = reads[r.operand], r.expected
        mr[er, ec], mc[er, ec] = r.got
    return reads


def explain(results: list[ProbeResult], plist: list[Probe], d: int, dtype: torch.dtype) -> dict[str, str]:
    """For each wrong probe, whose read is to blame. Every probe stands on an
    identity in another operand, so one misread operand spoils several probes:
    a probe whose map the other operands' measured reads alone reproduce may
    well read its own operand right. Where two reads of one product each explain
    the other, the fault is a permutation of the contraction index (keys, or
    head-dim columns), which reads the same on either side: both are named."""
    reads = measured_reads(results, d)
    by_operand = {r.operand: r for r in results if r.wrong}

    def reproduces(r: ProbeResult, p: Probe, names: list[str]) -> bool:
        again = run_probe(read_model({n: reads[n] for n in names}), p, d, dtype)
        return all(torch.equal(a, b) for a, b in zip(again.got, r.got))

    causes: dict[str, list[str]] = {}
    for r, p in zip(results, plist):
        if not r.wrong:
            continue
        others = sorted(n for n in reads if n != r.operand)
        single = [n for n in others if reproduces(r, p, [n])]
        causes[r.name] = single or (others if others and reproduces(r, p, others) else [])
    # A read whose own probe nothing else explains is wrong for sure; prefer it as the cause.
    roots = {r.operand for r in results if r.wrong and not causes[r.name]}
    verdicts = {}
    for r in results:
        if not r.wrong:
            continue
        cause = causes[r.name]
        mutual = [n for n in cause if r.operand in causes.get(by_operand[n].name, [])]
        if r.operand in roots:
            verdicts[r.name] = f"the {r.operand} read itself is wrong"
        elif roots & set(cause):
            verdicts[r.name] = f"explained by the wrong read of {', '.join(sorted(roots & set(cause)))}; this read may be right"
        elif mutual:
            verdicts[r.name] = (f"the {r.operand} or the {', '.join(mutual)} read is wrong: the same permutation of "
                                "the contraction index on either side reads alike")
        else:
            verdicts[r.name] = f"explained by the wrong read of {', '.join(cause)}; this read may be right"
    return verdicts


def block_error_map(out: torch.Tensor, ref: torch.Tensor, rel_tol: float = 1e-5) -> tuple[int, list[str]]:
    """Wrong elements of a [64][n] product against its reference, and an 8 x (n / 8)
    map of 8 x 8 blocks ('.' right, 'X' any element wrong)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    tol = rel_tol * ref.abs().max().item()
    bad = ~((out - ref).abs() <= tol)  # NaN counts as wrong
    rows = []
    for bi in range(0, out.shape[0], 8):
        rows.append("  " + "".join("X" if bad[bi:bi + 8, bj:bj + 8].any() else "." for bj in range(0, out.shape[1], 8)))
    return int(bad.sum()), rows


def random_check(selftest: Selftest, d: int, dtype: torch.dtype, device: str) -> list[tuple[str, int, list[str]]]:
    """The conformance products on random data (as the GPU test), each with its block error map."""
    q, k, v = (torch.randn(ROWS, d, device=device).to(dtype) for _ in range(3))
    s, o, u = (t.cpu() for t in selftest(q, k, v))
    q, k, v = (t.cpu().double() for t in (q, k, v))
    refs = (q @ k.T, s.to(dtype).double() @ v, v[:, :64].T @ v)
    return [(name, *block_error_map(got, ref)) for name, got, ref in zip("SOU", (s, o, u), refs)]


def error_profile(x: torch.Tensor, ref: torch.Tensor, tol: float, row_group: int = 64) -> tuple[int, list[str]]:
    """Where a [batch, seq, heads, head_dim] (or [batch, heads, seq] for lse) result
    differs from a reference by more than tol: counts of wrong elements by batch,
    head, group of `row_group` rows, 16-row warp slice within the group, and (for
    4-D) 8-column chunk. Zero counts are left out."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~((x - ref).abs() <= tol)
    n = int(bad.sum())
    if n == 0:
        return 0, []
    if bad.dim() == 3:  # lse: [batch, heads, seq] -> [batch, seq, heads, 1]
        bad = bad.transpose(1, 2).unsqueeze(-1)
    b, s, h, d = bad.shape

    def counts(label, per):
        nz = [(i, int(c)) for i, c in enumerate(per.tolist()) if c]
        shown = ", ".join(f"{i}:{c}" for i, c in nz[:16]) + (" ..." if len(nz) > 16 else "")
        return f"  by {label}: {shown}"

    groups = (s + row_group - 1) // row_group
    pad = groups * row_group - s
    rows = torch.nn.functional.pad(bad.sum(dim=(0, 2, 3)), (0, pad))
    lines = [counts("batch", bad.sum(dim=(1, 2, 3))), counts("head", bad.sum(dim=(0, 1, 3))),
             counts(f"{row_group}-row group", rows.view(groups, row_group).sum(1)),
             counts(f"16-row slice within a {row_group}-row group", rows.view(groups, row_group // 16, 16).sum((0, 2)))]
    if d > 1:
        lines.append(counts("8-column chunk", bad.sum(dim=(0, 1, 2)).view(-1, CHUNK).sum(1)))
    return n, lines
