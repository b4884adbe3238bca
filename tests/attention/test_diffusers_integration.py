"""cogkern inside diffusers' CogVideoX transformer: same outputs and gradients as the stock processor."""
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from cogkern.integrations import diffusers as ck_diffusers  # noqa: E402

HEADS, HEAD_DIM, TEXT_LEN, TEXT_DIM, CHANNELS = 2, 16, 7, 12, 4


def tiny_model(rotary: bool, version: str = "1.0"):
    torch.manual_seed(0)
    extra = dict(patch_size_t=2) if version == "1.5" else {}
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, out_channels=CHANNELS,
        time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=rotary,
        **extra,
    )


def inputs(frames, height, width, version, rotary, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, CHANNELS, height, width, generator=g).to(device, dtype)
    enc = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g).to(device, dtype)
    t = torch.tensor([3, 700], device=device)
    rope = None
    if rotary:
        gh, gw = height // 2, width // 2
        if version == "1.0":  # the pipeline's crop-coordinate (fractional, linspace) positions
            crops = ((0, 0), (gh, gw))
            rope = get_3d_rotary_pos_embed(HEAD_DIM, crops, (gh, gw), frames, device=device)
        else:  # CogVideoX 1.5: integer slices, temporal patches of 2
            rope = get_3d_rotary_pos_embed(HEAD_DIM, None, (gh, gw), frames // 2, grid_type="slice",
                                           max_size=(4, 4), device=device)
    return x, enc, t, rope


def run(model, x, enc, t, rope):
    model.zero_grad(set_to_none=True)
    out = model(x, enc, t, image_rotary_emb=rope).sample
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = [  # version, rotary, frames, height, width
    ("1.0", True, 3, 8, 8),
    ("1.0", True, 2, 6, 10),
    ("1.0", False, 3, 8, 8),
    ("1.5", True, 4, 8, 8),
    ("1.5", True, 2, 6, 8),
]


@pytest.mark.parametrize("version,rotary,frames,height,width", CASES)
def test_outputs_and_gradients_match_stock(version, rotary, frames, height, width):
    model = tiny_model(rotary, version)
    args = inputs(frames, height, width, version, rotary)
    ref_out, ref_grads = run(model, *args)
    assert ck_diffusers.enable(model) == 2
    assert all(type(p).__name__ == "CogVideoXFusedAttnProcessor" for p in model.attn_processors.values())
    out, grads = run(model, *args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any("norm_q" in n for n in grads)  # gradients reach the QK-norm parameters too
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    ck_diffusers.disable(model)
    assert all(type(p).__name__ == "CogVideoXAttnProcessor2_0" for p in model.attn_processors.values())
    torch.testing.assert_close(run(model, *args)[0], ref_out, rtol=0, atol=0)


def test_enable_is_idempotent_and_checks_its_argument():
    model = tiny_model(True)
    assert ck_diffusers.enable(model) == 2
    assert ck_diffusers.enable(model) == 0
    ck_diffusers.disable(model)
    ck_diffusers.disable(model)  # a second disable is a no-op
    with pytest.raises(TypeError, match="diffusers model"):
        ck_diffusers.enable(torch.nn.Linear(2, 2))


def test_processor_rejects_attention_masks():
    model = tiny_model(True)
    ck_diffusers.enable(model)
    attn = model.transformer_blocks[0].attn1
    h, e = torch.randn(1, 4, HEADS * HEAD_DIM), torch.randn(1, 2, HEADS * HEAD_DIM)
    with pytest.raises(ValueError, match="attention_mask"):
        attn.processor(attn, h, e, attention_mask=torch.ones(1, 6))


def test_import_without_diffusers_is_a_clear_import_error():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'diffusers' or name.startswith('diffusers.'): raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import cogkern.integrations.diffusers\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ImportError:" in out.stdout and "pip install 'cogkern[diffusers]'" in out.stdout, out.stdout + out.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", ["1.0", "1.5"])
def test_cuda_within_the_error_rule(dtype, version):
    """Outputs and gradients within 2x the stock processor's own error against an fp32 reference."""
    frames = 3 if version == "1.0" else 4
    ref_model = tiny_model(True, version).cuda()
    ref_out, ref_grads = run(ref_model, *inputs(frames, 8, 8, version, True, "cuda"))
    model = tiny_model(True, version).cuda().to(dtype)
    args = inputs(frames, 8, 8, version, True, "cuda", dtype)
    stock_out, stock_grads = run(model, *args)
    ck_diffusers.enable(model)
    out, grads = run(model, *args)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    def floor(ref):  # one unit of rounding at the tensor's own scale
        return torch.finfo(dtype).eps * ref.abs().max().item()

    assert err(out, ref_out) <= 2 * err(stock_out, ref_out) + floor(ref_out)
    for name in ref_grads:
        bound = 2 * err(stock_grads[name], ref_grads[name]) + floor(ref_grads[name])
        assert err(grads[name], ref_grads[name]) <= bound, name
