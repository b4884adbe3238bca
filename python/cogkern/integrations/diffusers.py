"""cogkern's fused attention inside diffusers' CogVideoX models.

    from cogkern.integrations import diffusers as ck_diffusers
    ck_diffusers.enable(pipe.transformer)    # every CogVideoX attention now runs cogkern.fused_attention
    ck_diffusers.disable(pipe.transformer)   # back to diffusers' own processors

The processor uses the model's own parameters (to_q/to_k/to_v, norm_q/norm_k,
to_out), the ``image_rotary_emb`` (cos, sin) the pipeline passes (CogVideoX 1.0
and 1.5; none for the 2B model's absolute embeddings) and the text prefix length
the model uses (the encoder_hidden_states' length). Training works: gradients
reach the same parameters as with the stock processor.
"""
from __future__ import annotations

import torch

try:
    import diffusers  # noqa: F401
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "cogkern.integrations.diffusers needs the diffusers package: pip install 'cogkern[diffusers]' "
        f"(or pip install diffusers). ({exc})"
    ) from exc

from ..attention import fused_attention

_SAVED = "_cogkern_saved_attn_processors"


def _qk_norm_args(attn) -> dict:
    norm_q, norm_k = attn.norm_q, attn.norm_k
    if norm_q is None and norm_k is None:
        return {}
    if norm_q is None or norm_k is None or type(norm_q) is not type(norm_k):
        raise ValueError("cogkern's fused attention needs the same norm on q and k (or none)")
    if isinstance(norm_q, torch.nn.LayerNorm):
        kind = "layer_norm"
    elif isinstance(norm_q, torch.nn.RMSNorm) or type(norm_q).__name__ == "RMSNorm":
        kind = "rms_norm"
    else:
        raise ValueError(f"cogkern's fused attention supports LayerNorm or RMSNorm QK-norm, got {type(norm_q).__name__}")
    eps = norm_q.eps if norm_q.eps is not None else torch.finfo(attn.to_q.weight.dtype).eps
    return dict(
        qk_norm=kind,
        q_norm_weight=getattr(norm_q, "weight", None),
        q_norm_bias=getattr(norm_q, "bias", None),
        k_norm_weight=getattr(norm_k, "weight", None),
        k_norm_bias=getattr(norm_k, "bias", None),
        norm_eps=float(eps),
    )


class CogVideoXFusedAttnProcessor:
    """Computes CogVideoXAttnProcessor2_0's attention with one cogkern.fused_attention call:
    QK-norm, RoPE on the video tokens and attention fused; no (B, H, S, D) copies."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("CogVideoXFusedAttnProcessor: attention_mask is not supported (CogVideoX uses none)")
        if attn.is_cross_attention:
            raise ValueError("CogVideoXFusedAttnProcessor: cross-attention is not supported (CogVideoX uses self-attention)")
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = x.shape
        q = attn.to_q(x)
        head_dim = q.shape[-1] // attn.heads
        q = q.view(batch, seq, attn.heads, head_dim)
        k = attn.to_k(x).view(batch, seq, attn.heads, head_dim)
        v = attn.to_v(x).view(batch, seq, attn.heads, head_dim)
        rope = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            rope = (cos.to(x.device), sin.to(x.device))
        out = fused_attention(q, k, v, rope=rope, text_len=text_len, **_qk_norm_args(attn))
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, seq, attn.heads * head_dim)))
        encoder_out, hidden_out = out.split([text_len, seq - text_len], dim=1)
        return hidden_out, encoder_out


def enable(model) -> int:
    """Swaps every CogVideoXAttnProcessor2_0 of ``model`` (a CogVideoXTransformer3DModel, or any
    diffusers model with attn_processors) for CogVideoXFusedAttnProcessor. Returns how many."""
    if not hasattr(model, "attn_processors") or not hasattr(model, "set_attn_processor"):
        raise TypeError(f"model must be a diffusers model with attention processors, got {type(model).__name__}")
    current = model.attn_processors
    if not any(isinstance(p, CogVideoXAttnProcessor2_0) for p in current.values()):
        if any(isinstance(p, CogVideoXFusedAttnProcessor) for p in current.values()):
            return 0  # already enabled
        raise ValueError("model has no CogVideoXAttnProcessor2_0 to replace (is it a CogVideoX transformer?)")
    fused = CogVideoXFusedAttnProcessor()
    if not hasattr(model, _SAVED):
        setattr(model, _SAVED, dict(current))
    model.set_attn_processor(
        {name: fused if isinstance(p, CogVideoXAttnProcessor2_0) else p for name, p in current.items()}
    )
    return sum(isinstance(p, CogVideoXAttnProcessor2_0) for p in current.values())


def disable(model) -> None:
    """Restores the processors ``enable`` replaced."""
    saved = getattr(model, _SAVED, None)
    if saved is None:
        return
    model.set_attn_processor(saved)
    delattr(model, _SAVED)
