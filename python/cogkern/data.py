"""Procedural text-to-video data, made on the fly: no downloads.

Each sample is a short video of one colored shape moving across a dark
background, with a caption such as "red square moving right". Sample i of a
dataset with seed s is a pure function of (s, i), so any batch can be rebuilt
exactly (resume, several ranks). Videos are turned into "latents" the way a
VAE's encoder shapes them — pooled 4x in space and 2x in time, projected to
``latent_channels`` by a fixed matrix — so the transformer sees CogVideoX-like
``(C, T, H, W)`` inputs without a VAE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.9, 0.2),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "purple": (0.6, 0.1, 0.8),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
VOCAB = ("<pad>", "moving", *COLORS, *SHAPES, *DIRECTIONS)
CAPTION_LEN = 4  # color, shape, "moving", direction


def tokenize(caption: str) -> list[int]:
    """Word ids of a caption, padded to CAPTION_LEN."""
    words = caption.split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}")
    if len(words) > CAPTION_LEN:
        raise ValueError(f"caption {caption!r} has more than {CAPTION_LEN} words")
    return [VOCAB.index(w) for w in words] + [0] * (CAPTION_LEN - len(words))


@dataclass(frozen=True)
class VideoSpec:
    frames: int = 8  # pixel frames; latent frames = frames // 2
    size: int = 32  # pixel height and width; latent size = size // 4
    latent_channels: int = 4

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.frames // 2, self.size // 4, self.size // 4)


class ShapesVideos:
    """Deterministic batches of (latents, caption ids, captions)."""

    def __init__(self, spec: VideoSpec = VideoSpec(), seed: int = 0) -> None:
        if spec.frames % 2 or spec.size % 8:
            raise ValueError(f"frames must be even and size a multiple of 8, got {spec}")
        self.spec = spec
        self.seed = seed
        g = torch.Generator().manual_seed(1234)  # the "encoder": fixed across seeds
        proj = torch.randn(spec.latent_channels, 3, generator=g)
        self._proj = proj / proj.norm(dim=1, keepdim=True)

    def captions(self, indices: torch.Tensor) -> list[str]:
        return [self._describe(int(i))[0] for i in indices]

    def _describe(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        color = list(COLORS)[int(torch.randint(len(COLORS), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        direction = list(DIRECTIONS)[int(torch.randint(len(DIRECTIONS), (1,), generator=g))]
        start = torch.rand(2, generator=g) * 0.5 + 0.25  # center, in [0.25, 0.75] of the frame
        radius = float(torch.rand(1, generator=g) * 0.1 + 0.12)
        speed = float(torch.rand(1, generator=g) * 0.03 + 0.03)  # of the frame per pixel frame
        return f"{color} {shape} moving {direction}", color, shape, direction, start, radius, speed

    def video(self, index: int) -> torch.Tensor:
        """Pixel video (3, frames, size, size) in [-1, 1]."""
        return self._render(self._describe(index))

    def _render(self, desc) -> torch.Tensor:
        _, color, shape, direction, start, radius, speed = desc
        n, f = self.spec.size, self.spec.frames
        coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        yy, xx = coords.view(1, n, 1), coords.view(1, 1, n)
        dx, dy = DIRECTIONS[direction]
        t = torch.arange(f, dtype=torch.float32).view(f, 1, 1)
        cx, cy = float(start[0]) + dx * speed * t, float(start[1]) + dy * speed * t  # (f, 1, 1) each
        ax, ay = (xx - cx).abs(), (yy - cy).abs()
        if shape == "square":
            mask = (ax <= radius) & (ay <= radius)
        elif shape == "circle":
            mask = ax**2 + ay**2 <= radius**2
        else:  # triangle pointing up
            mask = (yy - cy <= radius) & (ax <= (yy - cy + radius) * 0.5)
        rgb = torch.tensor(COLORS[color]).view(3, 1, 1, 1)
        return mask.float()[None] * (rgb * 1.8) - 0.9  # background -0.9, shape up to +0.9

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, S, S) pixels -> (B, C, F/2, S/4, S/4) latents of about unit variance."""
        pooled = F.avg_pool3d(videos, kernel_size=(2, 4, 4))
        return torch.einsum("cr,brthw->bcthw", self._proj, pooled) * 1.2

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) latents -> (B, 3, T, 4H, 4W) pixels: the least-squares inverse of `encode`'s
        projection, each latent pixel shown as the 4x4 block it pooled (one frame per latent frame)."""
        pooled = torch.einsum("rc,bcthw->brthw", torch.linalg.pinv(self._proj.double()).to(latents.dtype),
                              latents / 1.2)
        return pooled.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1):
        """The batch of a training step: samples [(step * world + rank) * batch_size, ...)."""
        first = (step * world + rank) * batch_size
        descs = [self._describe(i) for i in range(first, first + batch_size)]
        videos = torch.stack([self._render(d) for d in descs])
        ids = torch.tensor([tokenize(d[0]) for d in descs])
        return self.encode(videos), ids
