"""The DDIM v-prediction sampler, the sample strips and GIFs, sampling at the end of training, and what
fp16 inference does (cogkern.diffusion, cogkern.samples, the precision study's samples section)."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn

from cogkern.data import ShapesVideos
from cogkern.diffusion import DDIMSampler, DDPMSchedule, ddim_sample
from cogkern.model import CONFIGS, ModelConfig, VideoTransformer
from cogkern.precision_study import samples_section
from cogkern.samples import (LABEL_HEIGHT, NONFINITE_RGB, advance_per_frame, centroid_track, foreground_color,
                             inference_facts, training_videos, write_gif, write_strip)
from cogkern.train import main

ODD = ModelConfig(latent_channels=3, latent_frames=3, latent_size=6, latent_width=10)


def hand_alphas_cumprod():
    """CogVideoX's schedule from its definition, in Python floats: scaled-linear betas, then zero terminal SNR."""
    lo, hi, n = 0.00085**0.5, 0.012**0.5, 1000
    prod, sqrt_ac = 1.0, []
    for i in range(n):
        prod *= 1 - (lo + (hi - lo) * i / (n - 1)) ** 2
        sqrt_ac.append(prod**0.5)
    first, last = sqrt_ac[0], sqrt_ac[-1]
    return [((s - last) * first / (first - last)) ** 2 for s in sqrt_ac]


class OracleV(nn.Module):
    """Predicts the exact v of a known x0 from any x_t: v = sqrt(a) eps - sqrt(1 - a) x0."""

    def __init__(self, cfg, x0):
        super().__init__()
        self.cfg, self.x0 = cfg, x0
        self.anchor = nn.Parameter(torch.zeros((), dtype=x0.dtype))  # the sampler takes dtype and device from it
        self.ac = DDPMSchedule().alphas_cumprod.double()

    def forward(self, x, ids, t):
        a = self.ac[t].view(-1, 1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * self.x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * self.x0).to(x.dtype)


class Recorder(nn.Module):
    """A v-predictor that is a plain function of its inputs, and remembers them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.seen = []

    def forward(self, x, ids, t):
        self.seen.append((x.clone(), t.clone()))
        return 0.3 * x - 0.2 + t.view(-1, 1, 1, 1, 1) / 2000


def caption_ids(batch, cfg=ODD):
    return torch.randint(1, cfg.vocab, (batch, cfg.text_len))


def test_timesteps_are_trailing_and_end_clean():
    s = DDIMSampler(DDPMSchedule(), 50)
    assert s.timesteps.tolist() == list(range(999, 0, -20))
    assert s.alphas[0] == 0 and s.alphas_prev[-1] == 1  # starts at pure noise, ends on a clean video
    seven = DDIMSampler(DDPMSchedule(), 7)
    assert seven.timesteps.tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert torch.equal(seven.alphas_prev[:-1], seven.alphas[1:]) and seven.alphas_prev[-1] == 1


@pytest.mark.parametrize("steps", [50, 7, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_oracle_v_recovers_x0(steps, dtype, tol):
    x0 = torch.randn(2, *ODD.latent_shape, dtype=torch.float64) * 1.3 + 0.2
    out = ddim_sample(OracleV(ODD, x0).to(dtype), caption_ids(2), steps=steps, seed=11)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (out.double() - x0).abs().max() < tol * x0.abs().max()


def test_first_two_steps_match_a_hand_computation():
    ac = hand_alphas_cumprod()
    rec = Recorder(ODD)
    ddim_sample(rec, caption_ids(3), steps=50, seed=7)
    (x_t, t0), (x1, t1), (x2, t2) = rec.seen[:3]
    assert t0.tolist() == [999] * 3 and t1.tolist() == [979] * 3 and t2.tolist() == [959] * 3
    assert torch.equal(x_t, torch.randn((3, *ODD.latent_shape), generator=torch.Generator().manual_seed(7),
                                        dtype=torch.float64))
    v0 = 0.3 * x_t - 0.2 + 999 / 2000
    # t = 999 has zero SNR (a = 0): x0 = -v, eps = x_t; then x_979 = sqrt(a') x0 + sqrt(1 - a') eps
    a1 = ac[979]
    assert ac[999] == 0
    want1 = math.sqrt(a1) * -v0 + math.sqrt(1 - a1) * x_t
    torch.testing.assert_close(x1, want1, rtol=1e-6, atol=1e-6)  # the schedule is stored in fp32
    v1 = 0.3 * x1 - 0.2 + 979 / 2000
    x0 = math.sqrt(a1) * x1 - math.sqrt(1 - a1) * v1
    eps = math.sqrt(1 - a1) * x1 + math.sqrt(a1) * v1
    a2 = ac[959]
    torch.testing.assert_close(x2, math.sqrt(a2) * x0 + math.sqrt(1 - a2) * eps, rtol=1e-6, atol=1e-6)


def test_sampling_is_deterministic_per_seed_and_leaves_the_model_alone():
    torch.manual_seed(3)
    model = VideoTransformer(CONFIGS["tiny"])
    ids = caption_ids(2, CONFIGS["tiny"])
    a = ddim_sample(model, ids, steps=3, seed=5)
    assert torch.equal(a, ddim_sample(model, ids, steps=3, seed=5))
    assert not torch.equal(a, ddim_sample(model, ids, steps=3, seed=6))
    half = ddim_sample(model, ids, steps=3, seed=5, dtype=torch.bfloat16)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert next(model.parameters()).dtype == torch.float32 and model.training
    assert 0 < (half - a).abs().max() < 0.2 * a.abs().max()  # bf16 rounds, but it is the same sample


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an int in"), (dict(steps=1001), "steps must be an int in"),
    (dict(steps=2.5), "steps must be an int in"), (dict(dtype=torch.int32), "dtype must be one of"),
])
def test_bad_sampler_arguments_are_named(kwargs, match):
    model = OracleV(ODD, torch.randn(1, *ODD.latent_shape, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        ddim_sample(model, caption_ids(1), **kwargs)
    with pytest.raises(ValueError, match="caption_ids must be int64"):
        ddim_sample(model, caption_ids(1)[:, :3])


def test_centroid_advance_measures_motion():
    video = torch.full((3, 5, 16, 16), -0.9)
    for f in range(5):
        video[1, f, 6:9, 2 + 2 * f : 5 + 2 * f] = 0.8  # a green 3x3 block, 2 pixels right per frame
    torch.testing.assert_close(centroid_track(video)[:, 0], (torch.arange(5) * 2 + 3.5).double() / 16)  # pixel centers
    assert advance_per_frame(video, "green square moving right") == pytest.approx(2 / 16)
    assert advance_per_frame(video, "green square moving left") == pytest.approx(-2 / 16)
    assert advance_per_frame(video, "green square moving up") == pytest.approx(0)
    assert math.isnan(advance_per_frame(torch.full((3, 4, 8, 8), -0.9), "red circle moving up"))
    # the training videos, through the "VAE": every shape advances as captioned, 0.06-0.12 of the frame per frame
    data = ShapesVideos(seed=1)
    videos, captions = training_videos(data, 8), data.captions(torch.arange(8))
    advances = [advance_per_frame(v, c) for v, c in zip(videos, captions)]
    assert all(0.03 < a < 0.13 for a in advances), advances
    assert all(advance_per_frame(v.flip(1), c) == pytest.approx(-a) for v, c, a in zip(videos, captions, advances))


def test_foreground_color_names_the_captions_color():
    data = ShapesVideos(seed=2)
    captions = data.captions(torch.arange(24))
    assert len({c.split()[0] for c in captions}) == 6  # every color is there
    assert [foreground_color(v) for v in training_videos(data, 24)] == [c.split()[0] for c in captions]
    assert foreground_color(torch.full((3, 2, 8, 8), -0.9) + 0.1 * torch.rand(3, 2, 8, 8)) is None


def _videos(frames=5, h=7, w=9):
    rows = [torch.rand(3, frames, h, w) * 2 - 1 for _ in range(3)]
    rows[2][:, 1, 2, 3] = float("nan")  # one broken pixel, drawn magenta
    return rows


def test_strip_and_gif_are_written_and_readable(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rows, labels = _videos(), ["a", "bb", "ccc"]
    assert write_strip(str(tmp_path / "s.png"), rows, labels, scale=2)
    assert write_gif(str(tmp_path / "s.gif"), rows, labels, scale=2)
    with Image.open(tmp_path / "s.png") as png:
        assert png.size == (5 * (9 * 2 + 2) - 2, 3 * (LABEL_HEIGHT + 7 * 2 + 2))
        row2_top = 2 * (LABEL_HEIGHT + 16) + LABEL_HEIGHT
        assert png.convert("RGB").getpixel((1 * 20 + 3 * 2, row2_top + 2 * 2)) == NONFINITE_RGB
        assert png.convert("RGB").getpixel((0 * 20 + 3 * 2, row2_top + 2 * 2)) != NONFINITE_RGB
    with Image.open(tmp_path / "s.gif") as gif:
        assert gif.n_frames == 5 and gif.is_animated
        assert gif.size == (max(9 * 2, 6 * 3 + 4), 3 * (LABEL_HEIGHT + 7 * 2 + 2))


def test_writers_say_so_without_pillow(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    assert not write_strip(str(tmp_path / "s.png"), _videos(), ["a", "b", "c"])
    assert not write_gif(str(tmp_path / "s.gif"), _videos(), ["a", "b", "c"])
    assert capsys.readouterr().err.count("pillow is not installed") == 2
    assert not os.listdir(tmp_path)


def test_training_ends_with_samples(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--device", "cpu", "--quiet", "--no-plot", "--steps", "2", "--log-every", "1",
                 "--samples", "2", "--sample-steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples: 2 videos, 3 DDIM steps" in printed and "samples.gif" in printed and "/2 in their caption" in printed
    saved = torch.load(out / "samples.pt", weights_only=False)
    assert saved["latents"].shape == (2, *CONFIGS["tiny"].latent_shape) and torch.isfinite(saved["latents"]).all()
    assert saved["captions"] == ShapesVideos(CONFIGS["tiny"].video_spec()).captions(torch.arange(2))
    Image = pytest.importorskip("PIL.Image")
    frames = CONFIGS["tiny"].latent_frames
    with Image.open(out / "samples.png") as png:
        assert png.size[0] >= frames * 32 * 3 and png.size[1] == 4 * (LABEL_HEIGHT + 32 * 3 + 2)  # 2 x (data, sample)
    with Image.open(out / "samples.gif") as gif:
        assert gif.n_frames == frames
    assert main(["--device", "cpu", "--quiet", "--no-plot", "--steps", "1", "--no-samples",
                 "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "samples.pt").exists()


@pytest.mark.parametrize("argv", [["--sample-steps", "0"], ["--sample-steps", "1001"], ["--samples", "-1"]])
def test_bad_sample_flags_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "--sample" in capsys.readouterr().err


def overflowing_model():
    """The tiny model with its last MLP's output weights at 2e4: fine in fp16 as weights, but the MLP's
    output (about 256 x 2e4 x mean GELU) is far beyond fp16's 65504."""
    torch.manual_seed(1)
    model = VideoTransformer(CONFIGS["tiny"])
    with torch.no_grad():
        model.blocks[-1].ff[2].weight.fill_(2e4)
    return model


def test_inference_facts_count_what_fp16_breaks():
    ids = caption_ids(2, CONFIGS["tiny"])
    model = overflowing_model()
    wide = inference_facts(model, ids, steps=3, seed=0)
    assert wide["finite"] and wide["nonfinite"] == 0 and wide["first_nonfinite_step"] is None
    assert math.isfinite(wide["max_abs"]) and wide["v_max_abs"] > 0
    fp16 = inference_facts(model, ids, dtype=torch.float16, steps=3, seed=0)
    assert not fp16["finite"] and fp16["first_nonfinite_step"] == 0
    assert fp16["nonfinite"] == fp16["nan"] + fp16["inf"] > 0 and fp16["numel"] == 2 * 4 * 4 * 8 * 8
    assert fp16["v_nonfinite"] > 0


def _checkpoint_dirs(tmp_path, bf16_model):
    torch.manual_seed(2)
    dirs = {}
    for name, model in (("fp32", VideoTransformer(CONFIGS["tiny"])), ("bf16", bf16_model.to(torch.bfloat16))):
        dirs[name] = str(tmp_path / name)
        os.makedirs(dirs[name])
        torch.save(dict(model=model.state_dict()), os.path.join(dirs[name], "checkpoint.pt"))
    return dirs


def test_study_samples_section_shows_fp16_inference(tmp_path):
    torch.manual_seed(4)
    tame = _checkpoint_dirs(tmp_path / "tame", VideoTransformer(CONFIGS["tiny"]))
    result = samples_section(str(tmp_path / "tame"), "tiny", tame, seed=0, device="cpu", steps=3)
    assert list(result["facts"]) == ["fp32", "bf16", "bf16 -> fp16 inference"]
    assert all(f["finite"] for f in result["facts"].values())
    assert result["facts"]["bf16 -> fp16 inference"]["inference"] == "fp16"
    assert "did not go wrong on `tiny`" in result["verdict"]
    assert any(line.startswith("| bf16-trained | fp16 | yes |") for line in result["markdown"])
    broken = _checkpoint_dirs(tmp_path / "broken", overflowing_model())
    result = samples_section(str(tmp_path / "broken"), "tiny", broken, seed=0, device="cpu", steps=3)
    f = result["facts"]["bf16 -> fp16 inference"]
    assert result["facts"]["bf16"]["finite"] and not f["finite"]
    assert f"went wrong on `tiny`: {f['nan']} NaN and {f['inf']} inf of its 1024 latent values" in result["verdict"]
    assert "first non-finite at step 1 of 3" in result["verdict"]
    Image = pytest.importorskip("PIL.Image")
    with Image.open(result["image"]) as png:  # rows: the training video, fp32, bf16, bf16 -> fp16
        assert png.size[1] == 4 * (LABEL_HEIGHT + 32 * 3 + 2)
