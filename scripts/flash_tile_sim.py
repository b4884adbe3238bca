"""CPU check of the flash kernels' tile logic (csrc/attention/flash/flash_fwd_launch.cu, flash_bwd_launch.cu).

A tile-level numpy transliteration of flash_fwd_kernel, flash_bwd_kv_kernel (atomic dq)
and flash_bwd_dq_kernel at their tile shapes: block and tile ranges (causal
ordering, kv_end, m_first), zero-filled tails, the per-warp need_mask tests, the
online softmax with the shared softmax_* rules, lse shifts and delta; checked
against a dense float64 reference for S in {1, 17, 77, 130, 200}, causal or not.
Mirrors the CUDA by hand (fragment addressing: flash_fragment_sim.py).
    python scripts/flash_tile_sim.py
"""
# Tile-level transliteration of flash_fwd_kernel / flash_bwd_kv_kernel / flash_bwd_dq_kernel
# (ranges, masks, online softmax, zero-filled tails), fp32 numpy, vs. a dense reference.
import numpy as np, math
rng = np.random.default_rng(1)
def cdiv(a, b): return (a + b - 1) // b
LOG2E = 1.4426950408889634

def smax(a, b):
    return b if (b > a or b != b) else a

def fwd(Q, K, V, scale, causal, BM, BN):
    S, D = Q.shape
    c = np.float32(scale * LOG2E)
    O = np.full((S, D), np.nan, np.float32); L = np.full(S, np.nan, np.float32)
    nm = cdiv(S, BM)
    for blk in range(nm):
        mt = nm - 1 - blk if causal else blk
        m0 = mt * BM
        kv_end = min(m0 + BM, S) if causal else S
        q = np.zeros((BM, D), np.float32); n = min(BM, S - m0); q[:n] = Q[m0:m0+n]
        acc = np.zeros((BM, D), np.float32); mx = np.full(BM, -np.inf, np.float32); l = np.zeros(BM, np.float32)
        for j in range(cdiv(kv_end, BN)):
            n0 = j * BN
            k = np.zeros((BN, D), np.float32); v = np.zeros((BN, D), np.float32)
            nn = min(BN, S - n0); k[:nn] = K[n0:n0+nn]; v[:nn] = V[n0:n0+nn]
            s = q @ k.T
            for w in range(BM // 16):
                need = n0 + BN > S or (causal and n0 + BN - 1 > m0 + w * 16)
                if need:
                    for r in range(w*16, w*16+16):
                        for cc in range(BN):
                            key = n0 + cc
                            if key >= S or (causal and key > m0 + r): s[r, cc] = -np.inf
            for r in range(BM):
                tm = -np.inf
                for x in s[r]: tm = smax(tm, x)
                nmx = smax(mx[r], tm)
                alpha = 0.0 if mx[r] == -np.inf else 2.0 ** (mx[r] * c - (0 if nmx == -np.inf else nmx * c))
                shift = 0 if nmx == -np.inf else nmx * c
                p = np.exp2(s[r] * c - shift)
                l[r] = l[r] * alpha + p.sum(); mx[r] = nmx
                acc[r] *= alpha
                s[r] = p
            acc += s @ v
        for r in range(BM):
            row = m0 + r
            if row >= S: continue
            O[row] = acc[r] / l[r]
            L[row] = -np.inf if mx[r] == -np.inf else math.log(l[r]) + scale * mx[r]
    return O, L

def bwd(Q, K, V, dO, Lse, delta, scale, causal, BM, BN, BMq, BNq):
    S, D = Q.shape
    c = np.float32(scale * LOG2E)
    dQa = np.zeros((S, D), np.float32); dK = np.full((S, D), np.nan, np.float32); dV = np.full((S, D), np.nan, np.float32)
    for nt in range(cdiv(S, BN)):
        n0 = nt * BN
        k = np.zeros((BN, D), np.float32); v = np.zeros((BN, D), np.float32)
        nn = min(BN, S - n0); k[:nn] = K[n0:n0+nn]; v[:nn] = V[n0:n0+nn]
        m_first = n0 // BM if causal else 0
        adk = np.zeros((BN, D), np.float32); adv = np.zeros((BN, D), np.float32)
        for it in range(cdiv(S, BM) - m_first):
            m0 = (m_first + it) * BM
            q = np.zeros((BM, D), np.float32); do = np.zeros((BM, D), np.float32)
            n = max(0, min(BM, S - m0)); q[:n] = Q[m0:m0+n]; do[:n] = dO[m0:m0+n]
            lsh = np.array([Lse[m0+i] * LOG2E if m0 + i < S else np.inf for i in range(BM)], np.float32)
            dl = np.array([delta[m0+i] if m0 + i < S else 0 for i in range(BM)], np.float32)
            st = k @ q.T; dpt = v @ do.T
            pt = np.exp2(st * c - lsh[None, :]); dst = pt * (dpt - dl[None, :]) * scale
            need = n0 + BN > S or (causal and n0 + BN - 1 > m0)
            if need:
                for kr in range(BN):
                    for qc in range(BM):
                        key = n0 + kr
                        if key >= S or (causal and key > m0 + qc): pt[kr, qc] = dst[kr, qc] = 0
            adv += pt @ do; adk += dst @ q
            dq = dst.T @ k
            for r in range(BM):
                if m0 + r < S: dQa[m0 + r] += dq[r]
        for r in range(BN):
            if n0 + r < S: dK[n0 + r] = adk[r]; dV[n0 + r] = adv[r]
    # deterministic dq kernel
    dQd = np.full((S, D), np.nan, np.float32)
    nm = cdiv(S, BMq)
    for blk in range(nm):
        mt = nm - 1 - blk if causal else blk
        m0 = mt * BMq
        kv_end = min(m0 + BMq, S) if causal else S
        q = np.zeros((BMq, D), np.float32); do = np.zeros((BMq, D), np.float32)
        n = min(BMq, S - m0); q[:n] = Q[m0:m0+n]; do[:n] = dO[m0:m0+n]
        lsh = np.array([Lse[m0+i] * LOG2E if m0 + i < S else np.inf for i in range(BMq)], np.float32)
        dl = np.array([delta[m0+i] if m0 + i < S else 0 for i in range(BMq)], np.float32)
        acc = np.zeros((BMq, D), np.float32)
        for j in range(cdiv(kv_end, BNq)):
            n0 = j * BNq
            k = np.zeros((BNq, D), np.float32); v = np.zeros((BNq, D), np.float32)
            nn = min(BNq, S - n0); k[:nn] = K[n0:n0+nn]; v[:nn] = V[n0:n0+nn]
            s = q @ k.T; dp = do @ v.T
            p = np.exp2(s * c - lsh[:, None]); ds = p * (dp - dl[:, None]) * scale
            for w in range(BMq // 16):
                need = n0 + BNq > S or (causal and n0 + BNq - 1 > m0 + w * 16)
                if need:
                    for r in range(w*16, w*16+16):
                        for cc in range(BNq):
                            key = n0 + cc
                            if key >= S or (causal and key > m0 + r): ds[r, cc] = 0
            acc += ds @ k
        for r in range(BMq):
            if m0 + r < S: dQd[m0 + r] = acc[r]
    return dQa, dQd, dK, dV

def ref(Q, K, V, dO, dlse, scale, causal):
    Q, K, V, dO = (x.astype(np.float64) for x in (Q, K, V, dO))
    S = Q.shape[0]
    s = Q @ K.T * scale
    if causal: s = np.where(np.triu(np.ones((S, S), bool), 1), -np.inf, s)
    lse = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    P = np.exp(s - lse[:, None]); O = P @ V
    dP = dO @ V.T; delta = (dO * O).sum(1) - dlse
    dS = P * (dP - delta[:, None]) * scale
    return O, lse, dS @ K, dS.T @ Q, P.T @ dO

for D, fBM, fBN, BM, BN, BMq, BNq in [(64, 128, 64, 64, 128, 64, 64), (128, 64, 64, 32, 128, 64, 32)]:
    for S in (1, 17, 77, 130, 200):
        for causal in (False, True):
            Q, K, V, dO = (rng.standard_normal((S, D)).astype(np.float32) for _ in range(4))
            dlse = rng.standard_normal(S).astype(np.float32)
            scale = 1 / math.sqrt(D)
            O, L = fwd(Q, K, V, scale, causal, fBM, fBN)
            Or, Lr, dQr, dKr, dVr = ref(Q, K, V, dO, dlse, scale, causal)
            delta = (dO * O).sum(1) - dlse
            dQa, dQd, dK, dV = bwd(Q, K, V, dO, L, delta, scale, causal, BM, BN, BMq, BNq)
            errs = [np.abs(a - b).max() for a, b in ((O, Or), (L, Lr), (dQa, dQr), (dQd, dQr), (dK, dKr), (dV, dVr))]
            assert max(errs) < 1e-3, (D, S, causal, errs)
    print("tile logic ok for D", D)
