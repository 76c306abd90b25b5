"""Our UNet and VAE (model/unet.py, model/vae.py) against diffusers' own classes on the same random
weights of SD-2.1-base's layout: the same parameter names and the same numbers, op for op."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from icmsr_cli.errors import SetupError
from icmsr_cli.model.unet import UNet2DConditionModel
from icmsr_cli.model.vae import AutoencoderKL


@pytest.fixture(scope="module")
def pairs(tiny_base):
    import diffusers

    return (
        (diffusers.UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval(), UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()),
        (diffusers.AutoencoderKL.from_pretrained(tiny_base / "vae").eval(), AutoencoderKL.from_pretrained(tiny_base / "vae").eval()),
    )


def test_the_parameters_have_diffusers_names_and_shapes(pairs):
    """LoRA targets, the merged-weights cache and every published checkpoint address weights by these names."""
    for theirs, ours in pairs:
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("side", [(8, 8), (5, 7), (9, 11)], ids=["multiple-of-8", "odd", "odd-upsampled-to-skip"])
def test_the_unet_computes_diffusers_numbers(pairs, side):
    """Bit for bit in float32, a batch of two, latents whose sides are and are not multiples of 8
    (diffusers then upsamples to the skip connection's size)."""
    (theirs, ours), _ = pairs
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(2, 4, *side, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 999])
    with torch.no_grad():
        assert torch.equal(ours(z, t, c), theirs(z, t, encoder_hidden_states=c).sample)


def test_the_vae_computes_diffusers_numbers(pairs):
    """Encoder to the posterior's mode and decoder, bit for bit in float32, on a size that is not a
    multiple of the downsampling (the encoder's asymmetric padding)."""
    _, (theirs, ours) = pairs
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand(1, 3, 72, 56, generator=g) * 2 - 1, torch.randn(1, 4, 7, 9, generator=g)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), theirs.encode(x).latent_dist.mode())
        assert torch.equal(ours.decode(z), theirs.decode(z).sample)


def test_channels_last_and_bf16_keep_the_numbers(pairs):
    """The layouts and dtypes the pipeline runs: channels-last to float32 rounding of contiguous;
    bf16 as diffusers computes bf16."""
    import copy

    (theirs, ours), _ = pairs
    g = torch.Generator().manual_seed(2)
    z, c, t = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([999])
    with torch.no_grad():
        want = theirs(z, t, encoder_hidden_states=c).sample
        nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        got = nhwc(z.contiguous(memory_format=torch.channels_last), t, c)
        assert torch.allclose(got, want, atol=1e-5)
        b_theirs, b_ours = copy.deepcopy(theirs).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
        zb, cb = z.to(torch.bfloat16), c.to(torch.bfloat16)
        assert torch.equal(b_ours(zb, t, cb), b_theirs(zb, t, encoder_hidden_states=cb).sample)


def test_transformers_hand_back_their_input_layout(pairs):
    """diffusers' Transformer2DModel returns contiguous whatever it gets, which carried a
    channels-last UNet contiguous from its first transformer on; ours returns the input's layout."""
    import copy

    (_, ours), _ = pairs
    block = copy.deepcopy(ours.down_blocks[0].attentions[0]).to(memory_format=torch.channels_last)
    x = torch.randn(1, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x, torch.randn(1, 77, 32))
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_vae_weights_with_pre_0_14_attention_names_load(tiny_base, tmp_path, pairs):
    """Checkpoints saved before diffusers 0.14 name the mid-block attention's projections
    query/key/value/proj_attn; diffusers renames them on load, and so do we."""
    from safetensors.torch import load_file, save_file

    _, (_, ours) = pairs
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(tiny_base / "vae" / "config.json", folder / "config.json")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(str(tiny_base / "vae" / "diffusion_pytorch_model.safetensors")).items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        state[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    loaded = AutoencoderKL.from_pretrained(folder)
    want = ours.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_configs_of_another_layout_are_refused_by_name(tiny_base, tmp_path):
    """A base model that is not SD-2.1-base's layout fails with the option that differs, not with
    wrong numbers or a traceback from a shape mismatch."""
    config = json.loads((tiny_base / "unet" / "config.json").read_text())
    with pytest.raises(SetupError, match="use_linear_projection=False"):
        UNet2DConditionModel.from_config({**config, "use_linear_projection": False})
    UNet2DConditionModel.from_config({**config, "transformer_layers_per_block": [1, 1, 1, 1]})  # SD's value, per block
    with pytest.raises(SetupError, match=r"transformer_layers_per_block=\[1, 2, 2, 2\]"):
        UNet2DConditionModel.from_config({**config, "transformer_layers_per_block": [1, 2, 2, 2]})
    with pytest.raises(SetupError, match="block types"):
        UNet2DConditionModel.from_config({**config, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
    vae_config = json.loads((tiny_base / "vae" / "config.json").read_text())
    with pytest.raises(SetupError, match="use_quant_conv=False"):
        AutoencoderKL.from_config({**vae_config, "use_quant_conv": False})
    with pytest.raises(SetupError, match="scaling_factor=0.13025"):  # SDXL's VAE: graph.LATENT_SCALE would be wrong for it
        AutoencoderKL.from_config({**vae_config, "scaling_factor": 0.13025})
    AutoencoderKL.from_config({**vae_config, "scaling_factor": 0.18215, "force_upcast": False})  # SD's own values pass
    broken = tmp_path / "broken"
    shutil.copytree(tiny_base / "unet", broken)
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "block_out_channels"}))
    with pytest.raises(SetupError, match=r"config.json: not a usable UNet2DConditionModel config \(KeyError: 'block_out_channels'\)"):
        UNet2DConditionModel.from_pretrained(broken)
    # weights that do not fit their config (a wider model's config beside them)
    folder = tmp_path / "unet"
    shutil.copytree(tiny_base / "unet", folder)
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 64, 64, 64]}))
    with pytest.raises(SetupError, match="does not fit"):
        UNet2DConditionModel.from_pretrained(folder)


@pytest.mark.parametrize("zip_format", [True, False], ids=["bin", "legacy-bin"])
def test_bin_weights_load_in_either_torch_format(tiny_base, tmp_path, pairs, zip_format):
    """Folders with .bin weights instead of safetensors, including torch's pre-1.6 format (which
    cannot be memory-mapped), load the same weights."""
    from safetensors.torch import load_file

    _, (_, ours) = pairs
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(tiny_base / "vae" / "config.json", folder / "config.json")
    state = load_file(str(tiny_base / "vae" / "diffusion_pytorch_model.safetensors"))
    torch.save(state, folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    loaded = AutoencoderKL.from_pretrained(folder)
    want = ours.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
