"""Random-weight models with the exact module layout of Stable Diffusion 2.1-base, saved in its
published folder layout, plus random OSEDiff-format LoRA checkpoints made with peft itself.

`full=True` gives the real SD-2.1-base configs (for benchmarks); the default shrinks only widths
(same block types, layers per block, attention layout and parameter names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The published configs of stabilityai/stable-diffusion-2-1-base (mirrored by sd2-community).
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Narrow widths, same structure: 32 GroupNorm groups still divide every width; head dim 32.
TINY_UNET = {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": [1, 2, 2, 2], "cross_attention_dim": 32}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64]}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 16}


def configs(full: bool = False) -> tuple[dict, dict, dict]:
    if full:
        return dict(UNET_CONFIG), dict(VAE_CONFIG), dict(TEXT_ENCODER_CONFIG)
    return {**UNET_CONFIG, **TINY_UNET}, {**VAE_CONFIG, **TINY_VAE}, {**TEXT_ENCODER_CONFIG, **TINY_TEXT}


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer with the byte alphabet and a few merges; returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "a n", "an d</w>", "p h", "o t", "ph ot", "phot o</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    )
    return len(tokens)


def write_base_model(folder: Path, *, full: bool = False, seed: int = 0, fp16_variant: bool = False) -> Path:
    """Save a random SD-2.1-base-layout model as a diffusers folder (safetensors weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    unet_cfg, vae_cfg, text_cfg = configs(full)
    vocab = write_tokenizer(folder / "tokenizer")
    if not full:
        text_cfg["vocab_size"] = vocab
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_cfg.items() if k != "architectures"}))
    variant = "fp16" if fp16_variant else None
    dtype = torch.float16 if fp16_variant else torch.float32
    unet.to(dtype).save_pretrained(folder / "unet", variant=variant)
    vae.to(dtype).save_pretrained(folder / "vae", variant=variant)
    text.to(dtype).save_pretrained(folder / "text_encoder", variant=variant)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return folder


# ------------------------------------------------------------------ OSEDiff-format checkpoints


def osediff_unet_targets(unet) -> tuple[list[str], list[str], list[str]]:
    """OSEDiff's initialize_unet: which UNet modules get the encoder/decoder/others adapters."""
    grep = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
            "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    enc, dec, others = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in grep:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            if pattern in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            if pattern in n:
                others.append(n.replace(".weight", ""))
                break
    return enc, dec, others


def osediff_vae_targets(vae) -> list[str]:
    """OSEDiff's initialize_vae: encoder convs/attention and quant_conv (the list repeats names)."""
    grep = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    targets = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in grep:
            if pattern in n and "encoder" in n:
                targets.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                targets.append(n.replace(".weight", ""))
    return targets


def add_osediff_adapters(unet, vae, ckpt: dict) -> None:
    """Attach peft adapters exactly as OSEDiff's load_ckpt does and copy the checkpoint into them."""
    from peft import LoraConfig

    for adapter, key in (("default_encoder", "unet_lora_encoder_modules"), ("default_decoder", "unet_lora_decoder_modules"),
                         ("default_others", "unet_lora_others_modules")):
        unet.add_adapter(LoraConfig(r=ckpt["rank_unet"], init_lora_weights="gaussian", target_modules=ckpt[key]), adapter_name=adapter)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora" in n or "conv_in" in n:
                p.copy_(ckpt["state_dict_unet"][n])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.add_adapter(LoraConfig(r=ckpt["rank_vae"], init_lora_weights="gaussian", target_modules=ckpt["vae_lora_encoder_modules"]),
                    adapter_name="default_encoder")
    with torch.no_grad():
        for n, p in vae.named_parameters():
            if "lora" in n:
                p.copy_(ckpt["state_dict_vae"][n])
    vae.set_adapter(["default_encoder"])


def make_osediff_checkpoint(base: Path, *, rank: int = 4, seed: int = 1, lora_std: float = 0.05) -> dict:
    """A random checkpoint in the exact OSEDiff `.pkl` layout: peft adapters on the base model with
    non-zero B matrices and a changed conv_in, saved the way OSEDiff's save_model saves them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    enc, dec, others = osediff_unet_targets(unet)
    vae_targets = osediff_vae_targets(vae)
    torch.manual_seed(seed)
    for adapter, targets in (("default_encoder", enc), ("default_decoder", dec), ("default_others", others)):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), adapter_name=adapter)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=vae_targets), adapter_name="default_encoder")
    with torch.no_grad():
        for model in (unet, vae):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, lora_std)
        unet.conv_in.base_layer.weight.add_(torch.randn_like(unet.conv_in.base_layer.weight) * 0.05)
        unet.conv_in.base_layer.bias.add_(torch.randn_like(unet.conv_in.base_layer.bias) * 0.05)
    return {
        "unet_lora_encoder_modules": enc,
        "unet_lora_decoder_modules": dec,
        "unet_lora_others_modules": others,
        "rank_unet": rank,
        "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "vae_lora_encoder_modules": vae_targets,
        "rank_vae": rank,
        "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k},
    }
