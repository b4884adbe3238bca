"""A small video diffusion transformer with CogVideoX's structure.

Video latents (C, T, H, W) are cut into 2x2 patches; a caption's word
embeddings form a text prefix; every block runs one attention over the joint
[text; video] sequence (``cogkern.FusedAttention``: LayerNorm QK-norm, 3D RoPE
on the video tokens) and a GELU MLP, each modulated by the timestep through
adaptive LayerNorm (CogVideoX's ``CogVideoXLayerNormZero``: separate shift,
scale and gate for video and text). The model predicts v.

Massive activations (``--config stress``). Large transformers develop a few
channels whose values stand thousands of times above the rest ("massive
activations": Sun et al. 2024 for LLMs, Darcet et al. 2024 for ViTs, and
diffusion transformers alike), carried by the residual stream and scaled up by
the learned gains of the normalization layers. They are why CogVideoX-5B trains
in bf16: in fp16 they pass its largest value, 65504, and become inf. The tiny
demo does not grow them in a few hundred steps, so the stress config starts
where such a model ends up: the first ``massive_channels`` (2) channels of the
gain of every block's adaptive LayerNorm (norm1 and norm2: the inputs of
attention and of the MLP) start at ``massive_gain`` instead of 1; every other
weight, the data and the learning rate are the tiny config's. Those channels'
normalized values (up to ~4 on the demo data) times the gain put the norms'
outputs at tens of thousands. Measured with seed 0 (fp16 run, 60 steps): gain
1e4 peaks at 4.3e4 and fp16 trains; 1.6e4 peaks at 5.2e4 at step 0 and
overflows on some batches (the loss scale falls 65536 -> 4096 by step 60);
2.2e4 (the stress config) overflows in the forward from step 0, the loss
scale backs off to its floor (1) by step 20 and every step is skipped, while
bf16, with fp32's exponent range, holds the same values and trains.

``attention="cogkern"`` uses the fused op; ``"sdpa"`` and ``"eager"`` compute
the same attention from the same parameters the way diffusers writes it
(cogkern.reference.diffusers_attention), for A/B runs.

Context parallelism (``cp_group``): the ranks of the group share each sample,
each holding a contiguous slice of the joint [text; video] sequence in rank
order (:func:`sequence_shard`). Every token-wise layer runs on the slice; the
adaptive norms pick text or video modulation by the tokens' global positions;
the attention is ``cogkern.parallel.ulysses_attention`` over the group.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import FusedAttention
from .data import CAPTION_LEN, VOCAB, VideoSpec
from .reference.diffusers_attention import cogvideox_attention
from .rope import RoPE3D

ATTENTION_IMPLS = ("cogkern", "sdpa", "eager")


def sequence_shard(seq_len: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``seq_len`` tokens are cut into ``parts`` contiguous
    slices in order, the first ``seq_len % parts`` one token longer."""
    base, extra = divmod(seq_len, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class ModelConfig:
    latent_channels: int = 4
    latent_frames: int = 4
    latent_size: int = 8  # latent height (and width, unless latent_width is set)
    latent_width: int = 0  # 0: square latents
    patch: int = 2
    dim: int = 64
    heads: int = 2
    layers: int = 2
    vocab: int = 16
    text_len: int = 4
    time_embed_dim: int = 128
    mlp_ratio: int = 4
    # Massive activations (the "stress" config, see the module docstring): the first `massive_channels`
    # channels of every block's adaptive-LayerNorm gains start at `massive_gain` instead of 1.
    massive_channels: int = 0
    massive_gain: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.latent_frames, self.latent_size, self.latent_width or self.latent_size)

    @property
    def grid(self) -> tuple[int, int, int]:
        _, t, h, w = self.latent_shape
        return (t, h // self.patch, w // self.patch)

    @property
    def seq_len(self) -> int:
        t, h, w = self.grid
        return self.text_len + t * h * w

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def trainable_on_demo_data(self) -> bool:
        """The procedural captions and square videos fit this config."""
        return self.text_len == CAPTION_LEN and self.vocab >= len(VOCAB) and self.latent_width in (0, self.latent_size)

    def video_spec(self) -> VideoSpec:
        """The pixel videos whose latents have this config's shape."""
        return VideoSpec(frames=self.latent_frames * 2, size=self.latent_size * 4, latent_channels=self.latent_channels)


# Named sizes. tiny: the CPU demo; small/base: GPU runs; stress: tiny with massive activations (fp16's wall).
CONFIGS = {
    "tiny": ModelConfig(),
    "stress": ModelConfig(massive_channels=2, massive_gain=22000.0),
    "small": ModelConfig(latent_frames=4, latent_size=16, dim=256, heads=4, layers=4, time_embed_dim=256),
    "base": ModelConfig(latent_channels=16, latent_frames=8, latent_size=32, dim=768, heads=12, layers=8,
                        time_embed_dim=512),
    # CogVideoX-5B's width, heads and sequence (480x720, 49 frames: 226 text + 13x30x45 video tokens), 4 blocks:
    # for benchmarking a training step at the real shape.
    "cogvideox-5b-4blocks": ModelConfig(latent_channels=16, latent_frames=13, latent_size=60, latent_width=90,
                                        dim=3072, heads=48, layers=4, vocab=32, text_len=226, time_embed_dim=512),
}


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of integer timesteps, cos first (diffusers' flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class LayerNormZero(nn.Module):
    """CogVideoX's adaptive LayerNorm: shift/scale/gate for video and for text, from the timestep."""

    def __init__(self, time_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, video, text, temb):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb)).chunk(6, dim=1)
        video = self.norm(video) * (1 + scale[:, None]) + shift[:, None]
        text = self.norm(text) * (1 + t_scale[:, None]) + t_shift[:, None]
        return video, text, gate[:, None], t_gate[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cp_group=None) -> None:
        super().__init__()
        self.norm1 = LayerNormZero(cfg.time_embed_dim, cfg.dim)
        # group: FusedAttention runs ulysses_attention over it (the joint sequence is sharded)
        group = {} if cp_group is None else dict(group=cp_group)
        self.attn1 = FusedAttention(cfg.dim, cfg.heads, qk_norm="layer_norm", eps=1e-6, **group)
        self.norm2 = LayerNormZero(cfg.time_embed_dim, cfg.dim)
        self.ff = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim),
        )

    def forward(self, video, text, temb, rope, rope_table, attention: str, global_text_len: int, seq_lens=None):
        """video, text: this rank's video and text tokens (all of them without context parallelism);
        the attention's text_len is the global one; seq_lens: every rank's slice length (context
        parallelism: known in advance, so the attention need not gather them)."""
        text_len = text.shape[1]
        nv, nt, gate, t_gate = self.norm1(video, text, temb)
        joint = torch.cat([nt, nv], dim=1)
        if attention == "cogkern":
            cp = {} if seq_lens is None else dict(seq_lens=seq_lens)
            out = self.attn1(joint, rope=rope, text_len=global_text_len, **cp)
        else:
            out = cogvideox_attention(self.attn1, joint, rope_table, text_len, impl=attention)
        video = video + gate * out[:, text_len:]
        text = text + t_gate * out[:, :text_len]
        nv, nt, gate, t_gate = self.norm2(video, text, temb)
        ff = self.ff(torch.cat([nt, nv], dim=1))
        return video + gate * ff[:, text_len:], text + t_gate * ff[:, :text_len]


class VideoTransformer(nn.Module):
    """v-prediction transformer: (latents (B, C, T, H, W), caption ids (B, L), timesteps (B,)) -> v."""

    def __init__(self, cfg: ModelConfig, attention: str = "cogkern", cp_group=None) -> None:
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        if cp_group is not None and attention != "cogkern":
            raise ValueError(f"cp_group (context parallelism) needs attention='cogkern' (ulysses_attention runs the "
                             f"fused op), got attention={attention!r}")
        self.cfg = cfg
        self.attention = attention
        self.cp_group = cp_group
        p, c = cfg.patch, cfg.latent_channels
        self.patch_embed = nn.Linear(c * p * p, cfg.dim)
        self.text_embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.time_proj = nn.Sequential(
            nn.Linear(cfg.dim, cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        )
        self.blocks = nn.ModuleList(Block(cfg, cp_group) for _ in range(cfg.layers))
        if cfg.massive_channels:
            with torch.no_grad():  # after the random init, so every other weight is the default config's
                for block in self.blocks:
                    for norm in (block.norm1.norm, block.norm2.norm):
                        norm.weight[: cfg.massive_channels] = cfg.massive_gain
        self.norm_final = nn.LayerNorm(cfg.dim, eps=1e-5)
        self.norm_out = nn.Linear(cfg.time_embed_dim, 2 * cfg.dim)  # AdaLayerNorm's shift and scale
        self.proj_out = nn.Linear(cfg.dim, c * p * p)
        self.rope = RoPE3D(cfg.grid, cfg.head_dim)
        self._rope_table = None

    def rope_table(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_table is None or self._rope_table[0].device != device:
            self._rope_table = self.rope.cos_sin(device)
        return self._rope_table

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p = self.cfg.patch
        x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t, hp, wp = self.cfg.grid
        p, c = self.cfg.patch, self.cfg.latent_channels
        x = x.reshape(b, t, hp, wp, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, t, hp * p, wp * p)

    def cp_seq_lens(self) -> list[int] | None:
        """Every context-parallel rank's slice length, in rank order (None without a group)."""
        if self.cp_group is None:
            return None
        import torch.distributed as dist

        n = dist.get_world_size(self.cp_group)
        return [end - start for start, end in (sequence_shard(self.cfg.seq_len, n, i) for i in range(n))]

    def local_slices(self) -> tuple[slice, slice]:
        """This rank's (text, video) token ranges, each counted within its own part of the sequence."""
        cfg = self.cfg
        if self.cp_group is None:
            return slice(0, cfg.text_len), slice(0, cfg.seq_len - cfg.text_len)
        import torch.distributed as dist

        start, end = sequence_shard(cfg.seq_len, dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group))
        text_end = min(end, cfg.text_len)
        return slice(min(start, text_end), text_end), slice(max(start - cfg.text_len, 0), max(end - cfg.text_len, 0))

    def local_video_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> this rank's video tokens, (B, n, C * patch**2): the layout of the
        output under context parallelism (a target is compared with it there)."""
        return self.patchify(x)[:, self.local_slices()[1]]

    def forward(self, latents: torch.Tensor, caption_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v, shaped as latents; under context parallelism this rank's video tokens of it
        (:meth:`local_video_tokens`), since the other ranks hold the rest."""
        expected = self.cfg.latent_shape
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents must be (batch, *{expected}), got {tuple(latents.shape)}")
        dtype = self.patch_embed.weight.dtype
        text_part, video_part = self.local_slices()
        video = self.patch_embed(self.local_video_tokens(latents.to(dtype)))
        text = self.text_embed(caption_ids[:, text_part])
        temb = self.time_proj(timestep_features(timesteps, self.cfg.dim).to(dtype))
        table = self.rope_table(latents.device) if self.attention != "cogkern" else None
        seq_lens = self.cp_seq_lens()
        for block in self.blocks:
            video, text = block(video, text, temb, self.rope, table, self.attention, self.cfg.text_len, seq_lens)
        shift, scale = self.norm_out(F.silu(temb)).chunk(2, dim=1)
        video = self.proj_out(self.norm_final(video) * (1 + scale[:, None]) + shift[:, None])
        return video if self.cp_group is not None else self.unpatchify(video)
