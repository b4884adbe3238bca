// The CUDA fused attention, run on the CPU under the emulator
// (cuda_emu_prelude.h), behind a C API for run_emu.py: the real host entry
// points launch_attention_forward / _backward (csrc/attention/attention_launch.cu,
// compiled into the emulator with the launchers flash_fwd_launch.cu, flash_bwd_launch.cu,
// flash_fwd_sm90_launch.cu, flash_bwd_sm90_launch.cu), which pick the kernels from
// COGKERN_ATTENTION_SM90 / _BWD and the emulated device as on a GPU.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention/attention_launch.h"

using namespace cogkern;

extern "C" {
struct EmuSpec {
  int64_t batch, seq, heads, head_dim;
  int32_t dtype;  // 0 = fp16, 1 = bf16
  int32_t norm;   // NormKind
  double eps;
  void *qw, *qb, *kw, *kb;  // float [D] or null
  int32_t rope;             // 0 none, 1 angles, 2 table
  int32_t grid[3], axes[3];
  int32_t interleaved;
  double theta;
  void* positions;  // float [T+H+W] or null
  void *cos, *sin;  // [n_video, D]
  int64_t table_stride;
  int32_t table_in_dtype;
  int64_t text_len;
  double scale;
  int32_t causal, deterministic;
  void *q, *k, *v, *out;  // contiguous [B, S, H, D]
  float* lse;
  void* dout;
  float* dlse;  // or null
  void *dq, *dk, *dv;
  float *dqw, *dqb, *dkw, *dkb;
};
}

namespace {

BshdTensor bshd(const EmuSpec& s, const void* p) { return {p, s.seq * s.heads * s.head_dim, s.heads * s.head_dim, s.head_dim}; }
BshdTensorMut bshd_mut(const EmuSpec& s, void* p) { return {p, s.seq * s.heads * s.head_dim, s.heads * s.head_dim, s.head_dim}; }

AttentionParams params_of(const EmuSpec& s) {
  AttentionParams P;
  P.batch = s.batch;
  P.seq = s.seq;
  P.heads = s.heads;
  P.head_dim = s.head_dim;
  P.dtype = s.dtype == 0 ? DType::kHalf : DType::kBFloat16;
  P.q = bshd(s, s.q);
  P.k = bshd(s, s.k);
  P.v = bshd(s, s.v);
  P.out = bshd_mut(s, s.out);
  P.lse = s.lse;
  P.out_saved = bshd(s, s.out);
  P.grad_out = bshd(s, s.dout);
  P.grad_lse = s.dlse;
  P.grad_q = bshd_mut(s, s.dq);
  P.grad_k = bshd_mut(s, s.dk);
  P.grad_v = bshd_mut(s, s.dv);
  P.norm = NormKind(s.norm);
  P.norm_eps = s.eps;
  P.q_norm = {s.qw, s.qb, s.dqw, s.dqb};
  P.k_norm = {s.kw, s.kb, s.dkw, s.dkb};
  P.has_rope = s.rope != 0;
  P.rope.text_len = s.text_len;
  if (s.rope == 1) {
    P.rope.mode = RopeMode::kAngles;
    for (int i = 0; i < 3; ++i) {
      P.rope.grid[i] = s.grid[i];
      P.rope.axes[i] = s.axes[i];
    }
    P.rope.interleaved = s.interleaved != 0;
    P.rope.log2_theta = std::log2(s.theta);
    P.rope.positions = s.positions;
  } else if (s.rope == 2) {
    P.rope.mode = RopeMode::kTable;
    P.rope.interleaved = true;
    P.rope.cos = s.cos;
    P.rope.sin = s.sin;
    P.rope.table_stride = s.table_stride;
  }
  P.rope_table_dtype = s.table_in_dtype ? P.dtype : DType::kFloat;
  P.text_len = s.text_len;
  P.scale = s.scale;
  P.causal = s.causal != 0;
  return P;
}

// Forward, or backward, through the real launch path; the scratch as the torch glue allocates it.
int run(const EmuSpec& spec, bool backward) {
  const AttentionParams P = params_of(spec);
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
  const cudaError_t err = backward ? launch_attention_backward(P, s, spec.deterministic != 0, nullptr)
                                   : launch_attention_forward(P, s, nullptr);
  if (err != cudaSuccess) std::fprintf(stderr, "cuda_emu: the attention launch returned error %d\n", int(err));
  return err == cudaSuccess ? 0 : 1;
}

}  // namespace

extern "C" int emu_attention(const EmuSpec* s, int backward) { return run(*s, backward != 0); }
// The kernel switches, as a user sets them (flash_params.h: sm90_opt_in_mode).
extern "C" void emu_set_sm90_forward(int mode) { setenv("COGKERN_ATTENTION_SM90", std::to_string(mode).c_str(), 1); }
extern "C" void emu_set_sm90_backward(int mode) { setenv("COGKERN_ATTENTION_SM90_BWD", std::to_string(mode).c_str(), 1); }
// The kernels the launchers pick now (attention_kernel_modes): forward and backward mode, or -1.
extern "C" int emu_kernel_modes(int dtype, int head_dim, int* forward, int* backward) {
  const cudaError_t err =
      attention_kernel_modes(dtype == 0 ? DType::kHalf : DType::kBFloat16, head_dim, forward, backward);
  return err == cudaSuccess ? 0 : -1;
}
// The emulated GPU: compute capability and shared memory per block (opt-in), e.g. 8.9 with 99 KB.
extern "C" void emu_set_device(int cc_major, int cc_minor, int smem_per_block_optin) {
  cuda_emu::EmuDevice& d = cuda_emu::emu_device();
  d.cc_major = cc_major;
  d.cc_minor = cc_minor;
  d.smem_per_block_optin = smem_per_block_optin;
}
extern "C" int emu_spec_size() { return int(sizeof(EmuSpec)); }
