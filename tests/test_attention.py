"""The VAE attention's query-block route (model/attention.py) against SDPA and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from icmsr_cli.model import attention
from icmsr_cli.model.attention import chunked_attention
from icmsr_cli.model.vae import AutoencoderKL


def _reference(q, k, v, scale):
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return w @ v.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_blocks_are_as_exact_as_sdpa(dtype):
    """Several blocks, a short last one, two batch items: within twice SDPA's distance from float64
    (in bf16 the probabilities are rounded to bf16 before the product with v, as flash attention does)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 300, 64).mul(2).to(dtype) for _ in range(3))
    scale = 64**-0.5
    ref = _reference(q, k, v, scale)
    ours = chunked_attention(q, k, v, scale=scale, block=128)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert ours.shape == sdpa.shape and ours.dtype == dtype
    err, sdpa_err = float((ours.double() - ref).abs().max()), float((sdpa.double() - ref).abs().max())
    assert err <= 2 * sdpa_err + 1e-6, (err, sdpa_err)


def test_the_vae_through_query_blocks_equals_diffusers(tiny_base, monkeypatch):
    """Our VAE (vae.py, attention through attention.attend): exactly diffusers' numbers with SDPA,
    and within float32 rounding with the query-block route forced (small blocks: several per image)."""
    from diffusers import AutoencoderKL as DiffusersVAE

    vae = DiffusersVAE.from_pretrained(tiny_base / "vae").eval()
    ours = AutoencoderKL.from_pretrained(tiny_base / "vae").eval()
    torch.manual_seed(0)
    x, z = torch.rand(1, 3, 64, 48) * 2 - 1, torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        want_z, want_y = vae.encode(x).latent_dist.mode(), vae.decode(z).sample
        assert torch.equal(ours.encode(x), want_z)
        assert torch.equal(ours.decode(z), want_y)
        monkeypatch.setattr(attention, "_chunked_pays", lambda q: True)
        monkeypatch.setattr(attention, "QUERY_BLOCK", 20)  # 48 tokens: blocks of 20, 20 and 8
        assert torch.allclose(ours.encode(x), want_z, atol=1e-5)
        assert torch.allclose(ours.decode(z), want_y, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_vae_attention_hands_back_its_input_layout(tiny_base, layout):
    """The mid-block attention's output is laid out as its input, with diffusers' numbers: diffusers
    hands back channels-last whatever it is given, which would carry a contiguous decoder
    channels-last from the mid-block on (on CUDA convolutions follow their input's layout), so the
    layout chosen per device would not hold for the VAE."""
    from diffusers import AutoencoderKL as DiffusersVAE

    vae = DiffusersVAE.from_pretrained(tiny_base / "vae").eval()
    ours = AutoencoderKL.from_pretrained(tiny_base / "vae").eval().to(memory_format=layout)
    h = torch.randn(2, 64, 8, 6, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    with torch.no_grad():
        out = ours.decoder.mid_block.attentions[0](h)
        want = vae.decoder.mid_block.attentions[0](h)
        assert out.is_contiguous(memory_format=layout)
        assert torch.allclose(out, want, atol=1e-6)
        # the tiled VAE's route keeps the layout too
        assert attention.attend(ours.decoder.mid_block.attentions[0], h).is_contiguous(memory_format=layout)
