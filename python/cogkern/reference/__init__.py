"""Reference implementations, one of each kind, shared by the tests, benchmarks and scripts.

- :mod:`.attention_math`: CogVideoX attention written from the formulas (norm, 3D
  rotation, softmax), in its inputs' dtype (float64 for exactness), differentiable.
- :mod:`.rope_math`: 3D RoPE from the formulas, and diffusers' table form.
- :mod:`.diffusers_attention`: the attention as diffusers' ``CogVideoXAttnProcessor2_0``
  writes it (``--attention eager`` of the training demo, the benchmarks' eager peer).
- :mod:`.flash_rule`: FlashAttention's acceptance rule (error against an fp32
  reference at most 2x plain PyTorch's in the same dtype).
- :mod:`.wgmma_layout`: the layout probes' analysis for the Hopper building blocks.

None of them shares code with the kernels they check.
"""
