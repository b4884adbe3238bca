// The CUDA fused attention's kernels, run on the CPU under the emulator
// (cuda_emu_prelude.h, cuda_emu_ptx.h), behind a C API for run_emu.py.
// The launch sequence mirrors csrc/kernels/attention_prologue.cu
// (forward_typed / backward_typed) and the launchers of flash_fwd.cu and
// flash_bwd.cu: keep them in step.
#include <cstdio>
#include <stdexcept>

#include "kernels/attention_rows.cuh"
#include "kernels/flash_bwd_kernel.cuh"
#include "kernels/flash_bwd_sm90_ws_kernel.cuh"
#include "kernels/flash_fwd_kernel.cuh"
#include "kernels/flash_fwd_sm90_ws_kernel.cuh"

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

int g_sm90_forward = 0;   // emu_set_sm90_forward: 0 mma.sync, 1 sm90 plain, 2 sm90 pipelined, 3 sm90 warp-specialized, 4 with ping-pong
int g_sm90_backward = 0;  // emu_set_sm90_backward: 0 mma.sync; the sm90 key-tile kernel, 1: two warpgroups, 2: one,
                          // 3: warp-specialized

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

template <typename T, int D, int WARPGROUPS>
void sm90_backward(const AttentionParams& P, const flash::FlashArgs& a, bool deterministic) {
  using S = flash::Sm90BwdConfig<D, WARPGROUPS>;
  const unsigned blocks = unsigned(P.batch * P.heads * ceil_div(P.seq, S::kBN));
  constexpr size_t smem = flash::sm90_bwd_smem_bytes<D, WARPGROUPS>();
  if (deterministic)
    cuda_emu::launch(blocks, S::kThreads, smem,
                     [&] { flash::flash_bwd_sm90_body<T, D, WARPGROUPS, false>(a, cuda_emu::dynamic_smem()); });
  else
    cuda_emu::launch(blocks, S::kThreads, smem,
                     [&] { flash::flash_bwd_sm90_body<T, D, WARPGROUPS, true>(a, cuda_emu::dynamic_smem()); });
}

template <typename T, typename table_t, int D>
void run(const EmuSpec& spec, bool backward) {
  const AttentionParams P = params_of(spec);
  const int64_t n = P.batch * P.heads * P.seq;
  std::vector<T> q_hat(n * D), k_hat(n * D);
  std::vector<float> delta(n, NAN), dq_hat(n * D, NAN), dk_hat(n * D, NAN);
  const int64_t n_blocks = ceil_div(P.seq, rows::kTokens);
  std::vector<float> partials(4 * D * n_blocks, NAN);
  AttentionScratch s;
  s.q_hat = q_hat.data();
  s.k_hat = k_hat.data();
  s.delta = delta.data();
  s.dq_hat = dq_hat.data();
  s.dk_hat = dk_hat.data();
  s.norm_partials = partials.data();
  const flash::FlashArgs a = flash::flash_args(P, s);
  const unsigned row_blocks = unsigned(n_blocks);

  if (!backward) {
    cuda_emu::launch(row_blocks, rows::kRowThreads, 0,
                     [&] { rows::attention_prologue_kernel<T, table_t, D, false>(P, s); });
    if (g_sm90_forward >= 3) {  // the warp-specialized Hopper forward, as run_flash_fwd_sm90 launches it
      using C = flash::Sm90WsFwdConfig<D>;
      alignas(128) flash::Sm90FwdMaps maps;
      if (!flash::make_sm90_fwd_maps<D>(a, &maps)) throw std::runtime_error("tensor maps refused");
      const unsigned blocks = unsigned(P.batch * P.heads * ceil_div(P.seq, C::kBM));
      if (g_sm90_forward == 4)
        cuda_emu::launch(blocks, C::kThreads, flash::sm90_ws_fwd_smem_bytes<D>(),
                         [&] { flash::flash_fwd_sm90_ws_body<T, D, true>(a, maps, cuda_emu::dynamic_smem()); });
      else
        cuda_emu::launch(blocks, C::kThreads, flash::sm90_ws_fwd_smem_bytes<D>(),
                         [&] { flash::flash_fwd_sm90_ws_body<T, D, false>(a, maps, cuda_emu::dynamic_smem()); });
      return;
    }
    if (g_sm90_forward) {  // the Hopper (wgmma) forward, as run_flash_fwd picks it
      using C = flash::Sm90FwdConfig<D>;
      const unsigned blocks = unsigned(P.batch * P.heads * ceil_div(P.seq, C::kBM));
      if (g_sm90_forward == 2)
        cuda_emu::launch(blocks, C::kThreads, flash::sm90_fwd_smem_bytes<D, true>(),
                         [&] { flash::flash_fwd_sm90_body<T, D, true>(a, cuda_emu::dynamic_smem()); });
      else
        cuda_emu::launch(blocks, C::kThreads, flash::sm90_fwd_smem_bytes<D, false>(),
                         [&] { flash::flash_fwd_sm90_body<T, D, false>(a, cuda_emu::dynamic_smem()); });
      return;
    }
    using C = flash::FwdConfig<D>;
    cuda_emu::launch(unsigned(P.batch * P.heads * ceil_div(P.seq, C::kBM)), C::kWarps * 32,
                     flash::fwd_smem_bytes<T, D>(),
                     [&] { flash::flash_fwd_kernel<T, D, C::kBM, C::kBN, C::kWarps>(a); });
    return;
  }
  cuda_emu::launch(row_blocks, rows::kRowThreads, 0, [&] { rows::attention_prologue_kernel<T, table_t, D, true>(P, s); });
  using C = flash::BwdConfig<D>;
  const unsigned kv_blocks = unsigned(P.batch * P.heads * ceil_div(P.seq, C::kBN));
  if (!spec.deterministic) std::fill(dq_hat.begin(), dq_hat.end(), 0.f);
  if (g_sm90_backward == 3) {  // the warp-specialized Hopper key-tile kernel, as run_flash_bwd_kv_sm90 launches it
    using W = flash::Sm90WsBwdConfig<D>;
    alignas(128) flash::Sm90BwdMaps maps;
    if (!flash::make_sm90_bwd_maps<D>(a, &maps)) throw std::runtime_error("tensor maps refused");
    const unsigned blocks = unsigned(P.batch * P.heads * ceil_div(P.seq, W::kBN));
    if (spec.deterministic)
      cuda_emu::launch(blocks, W::kThreads, flash::sm90_ws_bwd_smem_bytes<D>(),
                       [&] { flash::flash_bwd_sm90_ws_body<T, D, false>(a, maps, cuda_emu::dynamic_smem()); });
    else
      cuda_emu::launch(blocks, W::kThreads, flash::sm90_ws_bwd_smem_bytes<D>(),
                       [&] { flash::flash_bwd_sm90_ws_body<T, D, true>(a, maps, cuda_emu::dynamic_smem()); });
  } else if (g_sm90_backward == 1) {  // the Hopper (wgmma) key-tile kernel, as run_flash_bwd picks it
    sm90_backward<T, D, 2>(P, a, spec.deterministic);
  } else if (g_sm90_backward == 2) {
    sm90_backward<T, D, 1>(P, a, spec.deterministic);
  } else if (spec.deterministic) {
    cuda_emu::launch(kv_blocks, C::kWarps * 32, flash::bwd_kv_smem_bytes<T, D, false>(),
                     [&] { flash::flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, false>(a); });
  } else {
    cuda_emu::launch(kv_blocks, C::kWarps * 32, flash::bwd_kv_smem_bytes<T, D, true>(),
                     [&] { flash::flash_bwd_kv_kernel<T, D, C::kBM, C::kBN, C::kWarps, true>(a); });
  }
  if (spec.deterministic)
    cuda_emu::launch(unsigned(P.batch * P.heads * ceil_div(P.seq, C::kDqBM)), C::kDqWarps * 32,
                     flash::bwd_dq_smem_bytes<T, D>(),
                     [&] { flash::flash_bwd_dq_kernel<T, D, C::kDqBM, C::kDqBN, C::kDqWarps>(a); });
  cuda_emu::launch(row_blocks, rows::kRowThreads, 0, [&] { rows::attention_epilogue_kernel<T, table_t, D>(P, s); });
  if (P.norm != NormKind::kNone)
    cuda_emu::launch(4 * D, 256, 0, [&] { rows::norm_grad_reduce_kernel<D>(P, partials.data(), n_blocks); });
}

template <typename T>
int run_dtype(const EmuSpec& s, bool backward) {
  const bool table_t_is_T = s.rope == 2 && s.table_in_dtype;
  if (s.head_dim == 64) {
    table_t_is_T ? run<T, T, 64>(s, backward) : run<T, float, 64>(s, backward);
  } else if (s.head_dim == 128) {
    table_t_is_T ? run<T, T, 128>(s, backward) : run<T, float, 128>(s, backward);
  } else {
    return 1;
  }
  return 0;
}

}  // namespace

extern "C" int emu_attention(const EmuSpec* s, int backward) {
  return s->dtype == 0 ? run_dtype<__half>(*s, backward != 0) : run_dtype<__nv_bfloat16>(*s, backward != 0);
}
extern "C" void emu_set_sm90_forward(int mode) { g_sm90_forward = mode; }
extern "C" void emu_set_sm90_backward(int mode) { g_sm90_backward = mode; }
extern "C" int emu_spec_size() { return int(sizeof(EmuSpec)); }
