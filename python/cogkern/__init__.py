"""cogkern: fused kernels for training CogVideoX-style video diffusion transformers.

Public API:
    RoPE3D, apply_rope3d            3D rotary position embedding (fused, CPU and CUDA)
    fused_attention, FusedAttention QK-norm + 3D RoPE + attention in one op
    parallel.ulysses_attention      context parallelism: fused attention over a sequence split across ranks
    attention_kernels(q)            which attention kernels run for q (CPU, mma.sync, Hopper wgmma)
    optim.FusedAdamW                multi-tensor mixed-precision AdamW
    amp.DynamicLossScaler           device-resident dynamic loss scaling (FP16)
    precision.audit                 FP16 or BF16? measured on your model
    build_info()                    what the compiled extension was built with
"""
from ._extension import build_info
from .rope import RoPE3D, apply_rope3d, default_axes_dims
from .attention import FusedAttention, attention_kernels, fused_attention
from . import amp, optim, parallel, precision
from . import _validate  # noqa: F401  (registers the first-use checks with _guard; imports the ops above)

__version__ = "0.1.0"

__all__ = [
    "FusedAttention",
    "RoPE3D",
    "amp",
    "apply_rope3d",
    "attention_kernels",
    "build_info",
    "default_axes_dims",
    "fused_attention",
    "optim",
    "parallel",
    "precision",
    "__version__",
]
