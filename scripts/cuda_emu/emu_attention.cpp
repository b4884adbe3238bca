// The CUDA fused attention, run on the CPU under the emulator
// (cuda_emu_prelude.h), behind a C API for run_emu.py: the real host entry
// points launch_attention_forward / _backward (csrc/attention/attention_launch.cu,
// compiled into the emulator with the launchers flash_fwd_launch.cu, flash_bwd_launch.cu,
// flash_fwd_sm90_launch.cu, flash_bwd_sm90_launch.cu), which pick the kernels from
// COGKERN_ATTENTION_SM90 / _BWD and the emulated device as on a GPU. The
// AttentionParams are built here from plain arguments, as the op's packing
// (csrc/attention/attention_op.h) builds them, for contiguous [B, S, H, D] tensors.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention/attention_launch.h"

using namespace cogkern;

namespace {

BshdTensor bshd(const AttentionParams& P, const void* p) {
  return {p, P.seq * P.heads * P.head_dim, P.heads * P.head_dim, P.head_dim};
}
BshdTensorMut bshd_mut(const AttentionParams& P, void* p) {
  return {p, P.seq * P.heads * P.head_dim, P.heads * P.head_dim, P.head_dim};
}

// Forward, or backward, through the real launch path; the scratch as the torch glue allocates it.
int run(const AttentionParams& P, bool backward, bool deterministic) {
  const int64_t n = P.batch * P.heads * P.seq, d = P.head_dim;
  std::vector<uint16_t> q_hat(n * d), k_hat(n * d);
  std::vector<float> delta(n, NAN), dq_hat(n * d, NAN), dk_hat(n * d, NAN);
  std::vector<float> partials(4 * d * attention_norm_partial_blocks(P), NAN);
  AttentionScratch s;
  s.q_hat = q_hat.data();
  s.k_hat = k_hat.data();
  s.delta = delta.data();
  s.dq_hat = dq_hat.data();
  s.dk_hat = dk_hat.data();
  s.norm_partials = partials.data();
  const cudaError_t err = backward ? launch_attention_backward(P, s, deterministic, nullptr)
                                   : launch_attention_forward(P, s, nullptr);
  if (err != cudaSuccess) std::fprintf(stderr, "cuda_emu: the attention launch returned error %d\n", int(err));
  return err == cudaSuccess ? 0 : 1;
}

}  // namespace

extern "C" {

// A problem: dtype 0 = fp16, 1 = bf16; no norm, no RoPE until set below.
AttentionParams* emu_attention_new(int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int dtype,
                                   int64_t text_len, double scale, int causal) {
  auto* P = new AttentionParams();
  P->batch = batch;
  P->seq = seq;
  P->heads = heads;
  P->head_dim = head_dim;
  P->dtype = dtype == 0 ? DType::kHalf : DType::kBFloat16;
  P->text_len = text_len;
  P->rope.text_len = text_len;
  P->scale = scale;
  P->causal = causal != 0;
  return P;
}
void emu_attention_free(AttentionParams* P) { delete P; }

// norm: NormKind code; the weights and biases float [D] or null.
void emu_attention_set_norm(AttentionParams* P, int norm, double eps, const void* qw, const void* qb, const void* kw,
                            const void* kb) {
  P->norm = NormKind(norm);
  P->norm_eps = eps;
  P->q_norm.weight = qw;
  P->q_norm.bias = qb;
  P->k_norm.weight = kw;
  P->k_norm.bias = kb;
}

// Turns RoPE on and returns its parameters, for emu_rope_set_angles / emu_rope_set_table (emu_rope.cpp).
// table_in_dtype: the tables (table mode) are in the input dtype, else float.
RopeParams* emu_attention_rope(AttentionParams* P, int table_in_dtype) {
  P->has_rope = true;
  P->rope_table_dtype = table_in_dtype ? P->dtype : DType::kFloat;
  return &P->rope;
}

// q, k, v, out: contiguous [B, S, H, D]; lse float [B, H, S].
int emu_attention_forward(AttentionParams* P, const void* q, const void* k, const void* v, void* out, float* lse) {
  P->q = bshd(*P, q);
  P->k = bshd(*P, k);
  P->v = bshd(*P, v);
  P->out = bshd_mut(*P, out);
  P->lse = lse;
  return run(*P, false, false);
}

// The backward of the forward above (its q, k, v, out and lse), with dO and dlse (or null); writes dq, dk, dv and
// the norm parameter grads dqw, dqb, dkw, dkb (float [D], or null where the parameter is absent).
int emu_attention_backward(AttentionParams* P, const void* dout, const float* dlse, void* dq, void* dk, void* dv,
                           float* dqw, float* dqb, float* dkw, float* dkb, int deterministic) {
  P->out_saved = bshd(*P, P->out.ptr);
  P->grad_out = bshd(*P, dout);
  P->grad_lse = dlse;
  P->grad_q = bshd_mut(*P, dq);
  P->grad_k = bshd_mut(*P, dk);
  P->grad_v = bshd_mut(*P, dv);
  P->q_norm.grad_weight = dqw;
  P->q_norm.grad_bias = dqb;
  P->k_norm.grad_weight = dkw;
  P->k_norm.grad_bias = dkb;
  return run(*P, true, deterministic != 0);
}

// The kernel switches, as a user sets them (flash_params.h: sm90_opt_in_mode).
void emu_set_sm90_forward(int mode) { setenv("COGKERN_ATTENTION_SM90", std::to_string(mode).c_str(), 1); }
void emu_set_sm90_backward(int mode) { setenv("COGKERN_ATTENTION_SM90_BWD", std::to_string(mode).c_str(), 1); }
// The kernels the launchers pick now (attention_kernel_modes): forward and backward mode, or -1.
int emu_kernel_modes(int dtype, int head_dim, int* forward, int* backward) {
  const cudaError_t err =
      attention_kernel_modes(dtype == 0 ? DType::kHalf : DType::kBFloat16, head_dim, forward, backward);
  return err == cudaSuccess ? 0 : -1;
}
// The emulated GPU: compute capability and shared memory per block (opt-in), e.g. 8.9 with 99 KB.
void emu_set_device(int cc_major, int cc_minor, int smem_per_block_optin) {
  cuda_emu::EmuDevice& d = cuda_emu::emu_device();
  d.cc_major = cc_major;
  d.cc_minor = cc_minor;
  d.smem_per_block_optin = smem_per_block_optin;
}

}  // extern "C"
