"""CPU check of the fragment addressing in csrc/common/cuda/ptx_sm80.cuh and csrc/attention/flash/flash_common.cuh.

Re-implements, in numpy, ldmatrix.x4 (plain and .trans) and
mma.m16n8k16 as the PTX ISA defines their fragments, plus the swizzled tile
layout (SmemTile::offset) and the per-lane addresses of load_a, load_a_trans,
load_b_nk, load_b_kn, and runs every product the flash kernels compute
(S = q k^T, O = P v with P repacked from C fragments, S^T = k q^T,
dk = dS^T q, dS^T stored to shared memory by 32-bit stores and read back
transposed for dq = dS k) at the kernels' tile shapes, against numpy matmuls.
Mirrors the C++ by hand: keep the two in step when either changes.
    python scripts/flash_fragment_sim.py
"""
import numpy as np
rng = np.random.default_rng(0)

def swizzle(cols, row, chunk):
    k = cols // 8
    if k >= 8: return chunk ^ (row & 7)
    if k == 4: return chunk ^ ((row >> 1) & 3)
    return chunk ^ ((row >> 2) & 1)
def offset(cols, row, col):
    return row * cols + swizzle(cols, row, col >> 3) * 8 + (col & 7)

def store_tile(tile):  # returns flat smem
    rows, cols = tile.shape
    sm = np.full(rows * cols, np.nan)
    for r in range(rows):
        for c in range(cols):
            sm[offset(cols, r, c)] = tile[r, c]
    assert not np.isnan(sm).any()
    return sm

def ldmatrix_x4(sm, addr_of_lane, trans):
    # addr_of_lane(l) -> element offset of the 8-element row given by lane l
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        mat = np.array([sm[addr_of_lane(8 * i + r): addr_of_lane(8 * i + r) + 8] for r in range(8)])
        for l in range(32):
            g, t = l // 4, l % 4
            if not trans:
                regs[l, i] = mat[g, 2 * t: 2 * t + 2]
            else:
                regs[l, i] = [mat[2 * t, g], mat[2 * t + 1, g]]
    return regs

def load_a(sm, cols, r0, c0):
    return ldmatrix_x4(sm, lambda l: offset(cols, r0 + (l & 15), c0 + (l >> 4) * 8), False)
def load_a_trans(sm, cols, k0, m0):
    return ldmatrix_x4(sm, lambda l: offset(cols, k0 + (l & 7) + (l >> 4) * 8, m0 + ((l >> 3) & 1) * 8), True)
def load_b_nk(sm, cols, n0, k0):
    return ldmatrix_x4(sm, lambda l: offset(cols, n0 + (l & 7) + (l >> 4) * 8, k0 + ((l >> 3) & 1) * 8), False)
def load_b_kn(sm, cols, k0, n0):
    return ldmatrix_x4(sm, lambda l: offset(cols, k0 + (l & 7) + ((l >> 3) & 1) * 8, n0 + (l >> 4) * 8), True)

def mma(c, a, b0, b1):
    # c: (32,4), a: (32,4,2), b0,b1: (32,2)
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2*t:2*t+2] = a[l, 0]; A[g+8, 2*t:2*t+2] = a[l, 1]
        A[g, 2*t+8:2*t+10] = a[l, 2]; A[g+8, 2*t+8:2*t+10] = a[l, 3]
        B[2*t:2*t+2, g] = b0[l]; B[2*t+8:2*t+10, g] = b1[l]
    C = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        C[g, 2*t:2*t+2] = c[l, 0:2]; C[g+8, 2*t:2*t+2] = c[l, 2:4]
    C = C + A @ B
    out = np.zeros((32, 4))
    for l in range(32):
        g, t = l // 4, l % 4
        out[l, 0:2] = C[g, 2*t:2*t+2]; out[l, 2:4] = C[g+8, 2*t:2*t+2]
    return out

def frag_to_mat(acc, n):  # acc: list of n/8 tiles of (32,4) -> 16 x n
    M = np.zeros((16, n))
    for j, c in enumerate(acc):
        for l in range(32):
            g, t = l // 4, l % 4
            M[g, j*8+2*t:j*8+2*t+2] = c[l, 0:2]; M[g+8, j*8+2*t:j*8+2*t+2] = c[l, 2:4]
    return M

def c_to_a(acc, kk):  # pack C tiles 2kk, 2kk+1 into an A fragment
    a = np.zeros((32, 4, 2))
    a[:, 0] = acc[2*kk][:, 0:2]; a[:, 1] = acc[2*kk][:, 2:4]
    a[:, 2] = acc[2*kk+1][:, 0:2]; a[:, 3] = acc[2*kk+1][:, 2:4]
    return a

def gemm_rows_nk(smA, colsA, r0, smB, colsB, N, K):
    """16 x N = A[r0:r0+16, :K] @ Bstored[:N, :K]^T (load_a + load_b_nk)."""
    acc = [np.zeros((32, 4)) for _ in range(N // 8)]
    for kk in range(K // 16):
        a = load_a(smA, colsA, r0, kk * 16)
        for nn in range(N // 16):
            b = load_b_nk(smB, colsB, nn * 16, kk * 16)
            acc[2*nn] = mma(acc[2*nn], a, b[:, 0], b[:, 1])
            acc[2*nn+1] = mma(acc[2*nn+1], a, b[:, 2], b[:, 3])
    return acc

for D, BM, BN in [(64, 64, 128), (128, 64, 64), (128, 32, 64), (64, 64, 64), (128, 32, 128), (128, 64, 32)]:
    Q = rng.standard_normal((BM, D)); K = rng.standard_normal((BN, D)); V = rng.standard_normal((BN, D))
    sQ, sK, sV = store_tile(Q), store_tile(K), store_tile(V)
    for w in range(BM // 16):
        # forward: S = Q K^T, O = S V via register repack
        s = gemm_rows_nk(sQ, D, w * 16, sK, D, BN, D)
        assert np.allclose(frag_to_mat(s, BN), Q[w*16:w*16+16] @ K.T)
        o = [np.zeros((32, 4)) for _ in range(D // 8)]
        for kk in range(BN // 16):
            a = c_to_a(s, kk)
            for dd in range(D // 16):
                b = load_b_kn(sV, D, kk * 16, dd * 16)
                o[2*dd] = mma(o[2*dd], a, b[:, 0], b[:, 1]); o[2*dd+1] = mma(o[2*dd+1], a, b[:, 2], b[:, 3])
        assert np.allclose(frag_to_mat(o, D), (Q[w*16:w*16+16] @ K.T) @ V)
    # backward kv: warp owns keys; S^T = K_w Q^T (load_a on K, load_b_nk on Q); dK = S^T Q (load_b_kn on Q)
    for w in range(BN // 16):
        st = gemm_rows_nk(sK, D, w * 16, sQ, D, BM, D)
        ST = K[w*16:w*16+16] @ Q.T
        assert np.allclose(frag_to_mat(st, BM), ST)
        dk = [np.zeros((32, 4)) for _ in range(D // 8)]
        for kk in range(BM // 16):
            a = c_to_a(st, kk)
            for dd in range(D // 16):
                b = load_b_kn(sQ, D, kk * 16, dd * 16)
                dk[2*dd] = mma(dk[2*dd], a, b[:, 0], b[:, 1]); dk[2*dd+1] = mma(dk[2*dd+1], a, b[:, 2], b[:, 3])
        assert np.allclose(frag_to_mat(dk, D), ST @ Q)
    # dS^T stored [key][query] (BN x BM) via the kernel's 32-bit stores, then dQ = dS K
    DS = rng.standard_normal((BN, BM))
    sdS = np.full(BN * BM, np.nan)
    for w in range(BN // 16):
        # build the C fragments of DS rows w*16.. and store them like the kernel
        for kk in range(BM // 16):
            for l in range(32):
                g, t = l // 4, l % 4
                kl = w * 16 + g
                for (row, col) in [(kl, kk*16+2*t), (kl+8, kk*16+2*t), (kl, kk*16+8+2*t), (kl+8, kk*16+8+2*t)]:
                    o = offset(BM, row, col)
                    sdS[o:o+2] = DS[row, col:col+2]
    assert not np.isnan(sdS).any()
    for mm in range(BM // 16):
        for dd in range(D // 16):
            acc = [np.zeros((32, 4)), np.zeros((32, 4))]
            for kk in range(BN // 16):
                a = load_a_trans(sdS, BM, kk * 16, mm * 16)
                b = load_b_kn(sK, D, kk * 16, dd * 16)
                acc[0] = mma(acc[0], a, b[:, 0], b[:, 1]); acc[1] = mma(acc[1], a, b[:, 2], b[:, 3])
            want = (DS.T @ K)[mm*16:mm*16+16, dd*16:dd*16+16]
            assert np.allclose(frag_to_mat(acc, 16), want)
    print("ok", D, BM, BN)
# swizzle is a permutation within each row
for cols in (32, 64, 128):
    for r in range(16):
        assert sorted(swizzle(cols, r, c) for c in range(cols // 8)) == list(range(cols // 8))
print("all fragment helpers consistent")
