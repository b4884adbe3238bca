"""cogkern: fused kernels for training CogVideoX-style video diffusion transformers.

Public API:
    RoPE3D, apply_rope3d   3D rotary position embedding (fused, CPU and CUDA)
    build_info()           what the compiled extension was built with
"""
from ._extension import build_info
from .rope import RoPE3D, apply_rope3d, default_axes_dims
from .attention import FusedAttention, fused_attention

__version__ = "0.1.0"

__all__ = ["RoPE3D", "apply_rope3d", "build_info", "default_axes_dims", "__version__"]
__all__ += ["FusedAttention", "fused_attention"]
