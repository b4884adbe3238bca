"""Reference implementations, one of each kind, shared by the tests, benchmarks and scripts.

- :mod:`.attention_math`: CogVideoX attention written from the formulas (norm, 3D
  rotation, softmax), in its inputs' dtype (float64 for exactness), differentiable.
- :mod:`.rope_math`: 3D RoPE and the (cos, sin) table mix from the formulas (float64).
- :mod:`.diffusers_attention`: the one diffusers-style eager path: diffusers' RoPE table
  and ``apply_rotary_emb``, and the attention as ``CogVideoXAttnProcessor2_0`` writes it
  (``--attention eager`` of the training demo, the benchmarks' eager peer, the eager side
  of FlashAttention's rule).
- :mod:`.flash_rule`: FlashAttention's acceptance rule (error against an fp32
  reference at most 2x plain PyTorch's in the same dtype).
- :mod:`.wgmma_layout`: the layout probes' analysis for the Hopper building blocks.

None of them shares code with the kernels they check.
"""
