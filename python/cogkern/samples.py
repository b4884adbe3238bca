"""What a trained demo model generates: DDIM samples as frame strips (PNG) and GIFs, and measurements of them.

The demo's videos are one colored shape moving across a dark background
(cogkern.data); its "VAE" is a fixed pooling + projection, so generated latents
map back to pixels exactly the way training latents do (``ShapesVideos.decode``).
A sample shows what was learned when it looks like its caption: the right
color, a shape, and the shape moving the way the caption says. The last is
measured, not eyeballed: ``advance_per_frame`` is how far the shape's centroid
moves each frame along the caption's direction (training data: +0.06 to +0.12
of the frame per latent frame, less while the shape leaves the frame).

Images are written with pillow (matplotlib needs pillow too, so without it
neither can write a PNG or GIF): without it the writers say so and return
False; the latents are saved in ``samples.pt`` either way. Non-finite pixels
(a NaN or inf video) are drawn magenta, so a broken sample is visible as such
rather than as black. ``foreground_color`` measures the other thing a sample
can get right: the caption's color.
"""
from __future__ import annotations

import math
import os
import sys

import torch

from .data import COLORS, DIRECTIONS, ShapesVideos, tokenize
from .diffusion import DDPMSchedule, ddim_sample

BACKGROUND = -0.9  # the demo videos' background level in every channel (cogkern.data)
FOREGROUND_MARGIN = 0.5  # above the background: a shape pixel is >= 1.62 above it, noise mostly less
NONFINITE_RGB = (255, 0, 255)
LABEL_HEIGHT = 12


def _pillow():
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    return Image, ImageDraw


def frames_uint8(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) pixels in [-1, 1] -> (T, H, W, 3) uint8; non-finite pixels magenta."""
    v = video.detach().float().cpu()
    bad = ~torch.isfinite(v).all(dim=0)  # (T, H, W)
    rgb = ((v.nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).clone()
    rgb[bad] = torch.tensor(NONFINITE_RGB, dtype=torch.uint8)
    return rgb


def _grid(rows: list[torch.Tensor], labels: list[str], scale: int, frame: int | None = None):
    """One image: a labelled band per row, then that row's frames left to right (or only `frame`)."""
    Image, ImageDraw = _pillow()
    tiles = [frames_uint8(r) for r in rows]
    t, h, w, _ = tiles[0].shape
    cols = range(t) if frame is None else [frame]
    gap = 2
    width = max(len(cols) * (w * scale + gap) - gap, 6 * max(len(s) for s in labels) + 4)
    height = len(rows) * (LABEL_HEIGHT + h * scale + gap)
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for tile, label in zip(tiles, labels):
        draw.text((2, y), label, fill=(230, 230, 230))
        y += LABEL_HEIGHT
        for k, f in enumerate(cols):
            img = Image.fromarray(tile[f].numpy(), "RGB").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(img, (k * (w * scale + gap), y))
        y += h * scale + gap
    return canvas


def write_strip(path: str, rows: list[torch.Tensor], labels: list[str], scale: int = 3) -> bool:
    """PNG: one row per video (3, T, H, W), its frames left to right, each under its label."""
    if _pillow() is None:
        print(f"pillow is not installed (pip install pillow): skipping {path}", file=sys.stderr)
        return False
    _grid(rows, labels, scale).save(path)
    return True


def write_gif(path: str, rows: list[torch.Tensor], labels: list[str], scale: int = 3, ms_per_frame: int = 300) -> bool:
    """Animated GIF, looping: frame t shows frame t of every video, stacked as in `write_strip`."""
    if _pillow() is None:
        print(f"pillow is not installed (pip install pillow): skipping {path}", file=sys.stderr)
        return False
    frames = [_grid(rows, labels, scale, frame=f) for f in range(rows[0].shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return True


def _foreground_weight(v: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) -> (T, H, W): how far each pixel's brightest channel is above the background, past
    FOREGROUND_MARGIN (0 for background, noise and non-finite pixels)."""
    return (v.amax(dim=0) - BACKGROUND - FOREGROUND_MARGIN).clamp(min=0).nan_to_num(0.0)


def foreground_color(video: torch.Tensor) -> str | None:
    """The caption color (cogkern.data.COLORS) closest in hue to the video's foreground: the cosine of
    the weighted mean color above the background against each color, so a shape blurred into the dark
    background by pooling keeps its color. None when nothing stands out of the background."""
    v = video.detach().double().cpu()
    weight = _foreground_weight(v)
    if not weight.sum() > 0:
        return None
    above = ((v.nan_to_num(BACKGROUND) - BACKGROUND) * weight).sum(dim=(1, 2, 3))
    colors = torch.tensor(list(COLORS.values()), dtype=torch.float64)
    cosine = colors @ above / (colors.norm(dim=1) * above.norm())
    return list(COLORS)[int(cosine.argmax())]


def centroid_track(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) pixels -> (T, 2): per frame the (x, y) centroid, in fractions of the frame, of the
    pixels brighter than the background by more than FOREGROUND_MARGIN (NaN for a frame with none)."""
    v = video.detach().double().cpu()
    weight = _foreground_weight(v)
    _, h, w = weight.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    total = weight.sum(dim=(1, 2))
    cx = (weight * xs.view(1, 1, w)).sum(dim=(1, 2)) / total
    cy = (weight * ys.view(1, h, 1)).sum(dim=(1, 2)) / total
    return torch.stack([cx, cy], dim=1)  # 0 / 0 = NaN where a frame has no foreground


def advance_per_frame(video: torch.Tensor, caption: str) -> float:
    """Mean step of the shape's centroid along the direction `caption` names, in frame widths per
    frame: positive when it moves as captioned (NaN when no frame pair has a shape in both)."""
    direction = torch.tensor(DIRECTIONS[caption.split()[-1]], dtype=torch.float64)
    steps = (centroid_track(video).diff(dim=0) @ direction)
    steps = steps[torch.isfinite(steps)]
    return float(steps.mean()) if len(steps) else math.nan


def caption_batch(data: ShapesVideos, count: int) -> tuple[list[str], torch.Tensor]:
    """The captions of the first `count` training samples and their ids."""
    captions = data.captions(torch.arange(count))
    return captions, torch.tensor([tokenize(c) for c in captions])


def training_videos(data: ShapesVideos, count: int) -> torch.Tensor:
    """The first `count` training videos as the model sees them: encoded, then decoded."""
    return data.decode(data.encode(torch.stack([data.video(i) for i in range(count)])))


def write_run_samples(model, data: ShapesVideos, out_dir: str, count: int = 2, steps: int = 50,
                      seed: int = 0) -> dict:
    """The end of a training run: `count` videos for the first training captions, each under the training
    video it was captioned from, into OUT/samples.png (strip), samples.gif and samples.pt (latents).
    Returns the facts: captions, files, each sample's foreground color (`foreground_color`), and how far
    each sample's and each training video's shape moves per frame along its caption's direction."""
    captions, ids = caption_batch(data, count)
    latents = ddim_sample(model, ids, schedule=DDPMSchedule(), steps=steps, seed=seed)
    videos = data.decode(latents.float().cpu())
    reference = training_videos(data, count)
    rows, labels = [], []
    for i, caption in enumerate(captions):
        rows += [reference[i], videos[i]]
        labels += [f"training video: {caption}", f"sample ({steps} DDIM steps, seed {seed})"]
    files = {"samples.pt": os.path.join(out_dir, "samples.pt")}
    torch.save(dict(latents=latents.cpu(), captions=captions, steps=steps, seed=seed), files["samples.pt"])
    for name, writer in (("samples.png", write_strip), ("samples.gif", write_gif)):
        path = os.path.join(out_dir, name)
        if writer(path, rows, labels):
            files[name] = path
    return dict(captions=captions, files=files, steps=steps, seed=seed,
                sample_colors=[foreground_color(v) for v in videos],
                sample_advance=[advance_per_frame(v, c) for v, c in zip(videos, captions)],
                data_advance=[advance_per_frame(v, c) for v, c in zip(reference, captions)])


def inference_facts(model, caption_ids: torch.Tensor, *, dtype: torch.dtype | None = None, steps: int = 50,
                    seed: int = 0) -> dict:
    """Sample in `dtype` and say whether it stayed finite: the final latents' NaN and inf counts and
    largest finite |value| (NaN when none is finite), the first step whose v had a non-finite value
    (None if none), how many v values were not finite over all steps, and the largest finite |v|."""
    record = dict(first_nonfinite_step=None, v_max_abs=0.0, v_nonfinite=0)

    def watch(i, t, v):
        finite = torch.isfinite(v)
        bad = int((~finite).sum())
        if bad and record["first_nonfinite_step"] is None:
            record["first_nonfinite_step"] = i
        record["v_nonfinite"] += bad
        if finite.any():
            record["v_max_abs"] = max(record["v_max_abs"], float(v[finite].abs().max()))

    latents = ddim_sample(model, caption_ids, steps=steps, seed=seed, dtype=dtype, on_step=watch)
    finite = torch.isfinite(latents)
    nonfinite = int((~finite).sum())
    return dict(latents=latents.cpu(), numel=latents.numel(), nonfinite=nonfinite, finite=nonfinite == 0,
                nan=int(torch.isnan(latents).sum()), inf=int(torch.isinf(latents).sum()),
                max_abs=float(latents[finite].abs().max()) if finite.any() else math.nan, steps=steps, **record)
