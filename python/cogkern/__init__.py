"""cogkern: fused kernels for training CogVideoX-style video diffusion transformers.

Public API:
    RoPE3D, apply_rope3d   3D rotary position embedding (fused, CPU and CUDA)
    build_info()           what the compiled extension was built with
    optim.FusedAdamW       fused multi-tensor mixed-precision AdamW
    amp.DynamicLossScaler  loss scaling with device-resident state and hysteresis
"""
from ._extension import build_info
from .rope import RoPE3D, apply_rope3d, default_axes_dims
from . import amp, optim

__version__ = "0.1.0"

__all__ = ["RoPE3D", "amp", "apply_rope3d", "build_info", "default_axes_dims", "optim", "__version__"]
