"""LoRA merge against peft's own adapters; safe loading; the safetensors conversion."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from icmsr_cli.model.lora import load_lora_checkpoint, merge_lora, save_lora_safetensors
from icmsr_cli.errors import CheckpointError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 16, 1)
        self.proj = nn.Linear(16, 12)

    def forward(self, x):
        h = self.skip(self.down(self.conv_in(x)))
        return self.proj(h.mean(dim=(2, 3)))


def _peft_block(rank: int, seed: int):
    """A peft-adapted copy (two adapters, as OSEDiff has several) with non-zero B, and its state dict."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    plain = Block()
    adapted = Block()
    adapted.load_state_dict(plain.state_dict())
    adapted = inject_adapter_in_model(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=["conv_in", "down"]), adapted, adapter_name="enc")
    adapted = inject_adapter_in_model(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=["skip", "proj"]), adapted, adapter_name="others")
    for module in adapted.modules():
        if hasattr(module, "set_adapter"):
            module.set_adapter(["enc", "others"])
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
        adapted.conv_in.base_layer.weight.add_(0.1)  # a trained conv_in, as OSEDiff ships
    state = {k: v for k, v in adapted.state_dict().items() if "lora" in k or "conv_in" in k}
    return plain, adapted, state


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("rank", [4, 2])
def test_merge_matches_peft_for_conv_and_linear(rank, memory_format):
    plain, adapted, state = _peft_block(rank, seed=rank)
    assert any(".lora_B.enc." in k for k in state) and any("proj.lora_A.others" in k for k in state)
    x = torch.randn(2, 3, 17, 19)
    with torch.no_grad():
        before = plain(x)
        assert merge_lora(plain, state, rank, what="test", memory_format=memory_format) == 4
        expected, got = adapted(x), plain(x)
    assert (expected - before).abs().max() > 0.1, "the adapters must change the output for the test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in ("conv_in", "down", "skip"):  # merged straight into the requested layout
        weight = getattr(plain, name).weight
        assert weight.is_contiguous(memory_format=memory_format), name
        torch.testing.assert_close(weight, getattr(adapted, name).get_delta_weight("enc" if name != "skip" else "others")
                                   + getattr(adapted, name).base_layer.weight, rtol=1e-5, atol=1e-6)


def test_scaling_is_alpha_8_over_rank():
    """With peft's default lora_alpha=8, r=2 gives dW = 4 * B @ A."""
    layer = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(layer.weight)
    a, b = torch.ones(2, 3), torch.ones(2, 2)
    wrapper = nn.Module()
    wrapper.lin = layer
    merge_lora(wrapper, {"lin.lora_A.x.weight": a, "lin.lora_B.x.weight": b}, 2, what="t")
    torch.testing.assert_close(layer.weight, torch.full((2, 3), 8.0))


def test_merge_rejects_names_the_model_lacks():
    with pytest.raises(CheckpointError, match="no module 'nope'"):
        merge_lora(Block(), {"nope.lora_A.a.weight": torch.zeros(1, 1), "nope.lora_B.a.weight": torch.zeros(1, 1)}, 1, what="UNet")
    with pytest.raises(CheckpointError, match="does not fit"):
        merge_lora(Block(), {"proj.lora_A.a.weight": torch.zeros(4, 5), "proj.lora_B.a.weight": torch.zeros(12, 4)}, 4, what="UNet")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save({"rank_unet": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_lora_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pkl").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_lora_checkpoint(tmp_path / "text.pkl")
    torch.save({"rank_unet": 4}, tmp_path / "partial.pkl")
    with pytest.raises(CheckpointError, match="missing rank_vae"):
        load_lora_checkpoint(tmp_path / "partial.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        load_lora_checkpoint(tmp_path / "absent.pkl")


def test_safetensors_conversion_round_trips(tiny_lora, tmp_path):
    ckpt = load_lora_checkpoint(tiny_lora)
    out = tmp_path / "osediff.safetensors"
    save_lora_safetensors(ckpt, out)
    back = load_lora_checkpoint(out)
    assert (back.rank_unet, back.rank_vae) == (ckpt.rank_unet, ckpt.rank_vae)
    assert back.module_lists == ckpt.module_lists
    assert back.state_dict_unet.keys() == ckpt.state_dict_unet.keys()
    for k, v in ckpt.state_dict_unet.items():
        assert torch.equal(back.state_dict_unet[k], v)
    for k, v in ckpt.state_dict_vae.items():
        assert torch.equal(back.state_dict_vae[k], v)
