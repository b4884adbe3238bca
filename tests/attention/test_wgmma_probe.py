"""The layout probes of cogkern.reference.wgmma_layout (run on the GPU by
scripts/wgmma_probe.py) against simulated selftest kernels: a right one must
pass every probe, each simulated layout fault must be caught by the probe of
the operand it breaks, and only by that one."""
import pytest
import torch

from cogkern.reference.wgmma_layout import CHUNK, ROWS, decode, error_profile, explain, probes, random_check, run_probe


def swizzled_read(x: torch.Tensor) -> torch.Tensor:
    """What a K-major read with the swizzle left out sees: chunk c of row r comes from chunk c ^ (r % 8)."""
    out = x.clone()
    for r in range(x.shape[0]):
        for c in range(x.shape[1] // CHUNK):
            panel, cc = divmod(c, 8)
            src = panel * 8 + (cc ^ (r % 8))
            out[r, c * CHUNK:(c + 1) * CHUNK] = x[r, src * CHUNK:(src + 1) * CHUNK]
    return out


def fake_selftest(fault: str | None = None):
    """S = Q K^T, O = 16bit(S) V, U = V[:, :64]^T V in fp32, with one simulated fault."""

    def run(q, k, v):
        dtype = q.dtype
        q, k, v = (t.float() for t in (q, k, v))
        if fault == "k_swizzle":
            k = swizzled_read(k)
        s = q @ k.T
        a = s.to(dtype).float()
        if fault == "a_fragment":  # the two halves of each 8-column group of the A registers swapped
            perm = torch.arange(ROWS).view(-1, 2, 4).flip(1).reshape(-1)
            a = a[:, perm]
        o = a @ v
        lhs = v[:, :64]
        if fault == "u_a_rows":  # the MN-major A read with its rows (keys) reversed
            lhs = lhs.flip(0)
        u = lhs.T @ v
        return s, o, u

    return run


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_right_kernel_passes_every_probe(d, dtype):
    results = [run_probe(fake_selftest(), p, d, dtype) for p in probes(d)]
    assert len(results) == (4 if d == 64 else 8)
    for r in results:
        assert r.wrong == 0 and r.lines == [], r.name
    for name, wrong, grid in random_check(fake_selftest(), d, dtype, "cpu"):
        assert wrong == 0 and set("".join(grid).replace(" ", "")) == {"."}, name


def test_a_row_dependent_misread_is_blamed_on_its_own_read():
    """k read without its swizzle spoils every probe that stands on k's identity;
    explain() must blame the k read alone."""
    d = 128
    plist = probes(d)
    results = [run_probe(fake_selftest("k_swizzle"), p, d, torch.bfloat16) for p in plist]
    verdicts = explain(results, plist, d, torch.bfloat16)
    own = {r.name for r in results if r.operand == "k"}
    assert own < set(verdicts)
    for name, verdict in verdicts.items():
        want = "the k read itself is wrong" if name in own else "explained by the wrong read of k; this read may be right"
        assert verdict == want, (name, verdict)
    assert any(r.wrong == 0 for r in results)


@pytest.mark.parametrize("fault, pair", [("a_fragment", ("s_regs", "v_o")), ("u_a_rows", ("v_ua", "v_ub"))])
def test_a_contraction_permutation_names_both_sides(fault, pair):
    """A permutation of the summed index reads the same on either operand: both named, nothing else."""
    d = 128
    plist = probes(d)
    results = [run_probe(fake_selftest(fault), p, d, torch.bfloat16) for p in plist]
    verdicts = explain(results, plist, d, torch.bfloat16)
    operand_of = {r.name: r.operand for r in results}
    assert {operand_of[n] for n in verdicts} == set(pair)
    for name, verdict in verdicts.items():
        a = operand_of[name]
        b = pair[1] if a == pair[0] else pair[0]
        assert verdict.startswith(f"the {a} or the {b} read is wrong"), (name, verdict)


def test_two_wrong_reads_are_both_blamed():
    d = 64
    plist = probes(d)

    def both(q, k, v):
        s, _, u = fake_selftest("k_swizzle")(q, k, v)
        _, o, _ = fake_selftest("a_fragment")(q, k, v)
        return s, o, u

    # The O probes stand on S (both q and k reads), so combine in one kernel: S from
    # the k fault, O from the fragment fault (its own S is right).
    results = [run_probe(both, p, d, torch.bfloat16) for p in plist]
    verdicts = explain(results, plist, d, torch.bfloat16)
    assert verdicts["S <- k (B, K-major), k columns 0..63"] == "the k read itself is wrong"
    assert verdicts["S <- q (A, K-major), q columns 0..63"].startswith("explained by the wrong read of k;")
    assert verdicts["O <- S accumulators as A registers (S = q[:, :64])"].startswith("the s_regs or the v_o read")


def test_the_map_shows_where_the_chunks_came_from():
    probe = next(p for p in probes(64) if p.name.startswith("S <- k"))
    r = run_probe(fake_selftest("k_swizzle"), probe, 64, torch.bfloat16)
    # With the swizzle left out, key j's chunk c comes from chunk c ^ (j % 8): right only where j % 8 == 0.
    assert r.wrong == ROWS * 64 * 7 // 8
    assert r.lines[0].startswith("  first misread k elements, (row, col) <- (row, col) read instead: (1,0) <- (1,8), ")
    # The map is in k's own coordinates: row 0 read right, row 1 with neighbouring chunks swapped.
    assert r.lines[2].split() == ["chunk:", "0", "1", "2", "3", "4", "5", "6", "7"]
    assert r.lines[3].split(":", 1)[1].split() == [f"0.{c}" for c in range(8)]
    assert r.lines[4].split(":", 1)[1].split() == ["1.1!", "1.0!", "1.3!", "1.2!", "1.5!", "1.4!", "1.7!", "1.6!"]
    # The q probe stands on the misread identity k: key j reads q column
    # 8 * ((j // 8) ^ (j % 8)) + j % 8.
    q_probe = next(p for p in probes(64) if p.name.startswith("S <- q"))
    seen = run_probe(fake_selftest("k_swizzle"), q_probe, 64, torch.bfloat16)
    j = torch.arange(64)
    assert torch.equal(seen.got[1], (8 * ((j // 8) ^ (j % 8)) + j % 8).expand(64, 64))
    assert torch.equal(seen.got[0], torch.arange(64).unsqueeze(1).expand(64, 64))


def test_the_map_of_a_second_panel_is_headed_by_its_chunks():
    probe = next(p for p in probes(128) if p.name.startswith("S <- k") and "64.." in p.name)
    r = run_probe(fake_selftest("k_swizzle"), probe, 128, torch.bfloat16)
    assert r.lines[2].split() == ["chunk:"] + [str(c) for c in range(8, 16)]
    assert r.lines[4].split(":", 1)[1].split() == ["1.9!", "1.8!", "1.11!", "1.10!", "1.13!", "1.12!", "1.15!", "1.14!"]


def test_decode_rejects_anything_but_one_code():
    x = torch.tensor([1.0, 64.0, 65.0, 0.0, 2.5, float("nan"), -3.0])
    assert decode(x, 64).tolist() == [0, 63, -1, -1, -1, -1, -1]


def test_error_profile_names_the_slice_that_is_wrong():
    ref = torch.randn(2, 300, 3, 64)
    x = ref.clone()
    x[1, 64 + 16:64 + 32, 2, 8:16] += 1.0  # batch 1, head 2, rows 80..95, chunk 1
    n, lines = error_profile(x, ref, tol=1e-3)
    assert n == 16 * 8
    assert lines == ["  by batch: 1:128", "  by head: 2:128", "  by 64-row group: 1:128",
                     "  by 16-row slice within a 64-row group: 1:128", "  by 8-column chunk: 1:128"]
    assert error_profile(ref, ref, tol=0.0) == (0, [])
    lse = torch.randn(2, 3, 300)
    bad = lse.clone()
    bad[0, 1, 299] = float("nan")
    n, lines = error_profile(bad, lse, tol=1e-3)
    assert n == 1 and lines[2] == "  by 64-row group: 4:1" and len(lines) == 4


def test_the_gpu_probe_script_runs_end_to_end_on_the_cpu():
    """scripts/wgmma_probe.py --cpu-dry-run: its plumbing (a right model tile, the CPU
    attention for every kernel mode), so the one GPU run does not die of a typo."""
    import subprocess
    import sys
    from pathlib import Path

    # cogkern is whichever this process imports (installed or PYTHONPATH).
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "scripts" / "wgmma_probe.py"), "--cpu-dry-run"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last == "wgmma_probe: 52 checks, 0 failed", last
