// CPU backend of the fused attention op (math: attention/attention_math.h).
#pragma once

#include "attention/attention_math.h"

namespace cogkern::cpu {

// Writes P.out and P.lse.
void attention_forward(const AttentionParams& P);

// Reads P.out_saved, P.lse, P.grad_out (and P.grad_lse when set); writes
// P.grad_q, P.grad_k, P.grad_v and the norm parameter grads that P asks for.
void attention_backward(const AttentionParams& P);

}  // namespace cogkern::cpu
