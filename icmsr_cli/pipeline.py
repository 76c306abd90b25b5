"""The one-step model on tensors: encode -> UNet at t=999 -> x0 -> decode -> colour fix.

Loading merges the LoRA into plain diffusers modules once, so inference has no adapter overhead.
The prompt embedding is computed once per (base model, prompt) and cached on disk, so later
runs never load the text encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import LoraCheckpoint, load_lora_checkpoint, merge_lora
from .color import apply_color_fix
from .errors import ModelNotFoundError, NumericalError, SetupError

logger = logging.getLogger(__name__)

#: SD's latent scaling constant: z = E(2x-1).mode() * LATENT_SCALE
LATENT_SCALE = 0.18215
#: the single UNet step runs at the last training timestep
TIMESTEP = 999
#: the VAE downsamples by 8; inputs are reflect-padded to a multiple of it
VAE_FACTOR = 8
BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """Scaled-linear schedule in float64: betas = linspace(sqrt(b0), sqrt(b1), T)**2, cumprod(1 - betas)."""
    if scheduler_config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise SetupError(f"base model scheduler uses {scheduler_config['beta_schedule']!r}; SD-2.1-base's scaled_linear is required")
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise SetupError(
            f"base model predicts {scheduler_config['prediction_type']!r}; the one-step upscaler needs an epsilon model (SD-2.1-base, not SD-2.1 768)"
        )
    b0 = scheduler_config.get("beta_start", 0.00085)
    b1 = scheduler_config.get("beta_end", 0.012)
    steps = scheduler_config.get("num_train_timesteps", 1000)
    betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def pad_to_multiple(x: torch.Tensor, multiple: int = VAE_FACTOR) -> torch.Tensor:
    """Reflect-pad the bottom and right edges up to a multiple (never stretch the image)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    # reflect needs the pad to be smaller than the side; tiny images fall back to replicate
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@dataclass
class OneStepSR:
    """ICM-SR / OSEDiff inference graph on float tensors in [0, 1], with merged LoRA weights."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    prompt_embeds: torch.Tensor  # (1, 77, D) text-encoder output [0]
    alpha_t: float  # alphas_cumprod[999]
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = E(2x - 1).mode() * 0.18215 (the posterior mode keeps runs reproducible)."""
        x = (x.to(self.device, self.dtype) * 2 - 1).contiguous(memory_format=torch.channels_last)
        return self.vae.encode(x).latent_dist.mode() * LATENT_SCALE

    @torch.no_grad()
    def denoise(self, z: torch.Tensor) -> torch.Tensor:
        """One UNet call at t=999, then x0 = (z - sqrt(1-a) eps) / sqrt(a) in float32.

        The 1/sqrt(a) ~ 14.6x gain would magnify bf16 rounding, hence the float32 arithmetic.
        """
        c = self.prompt_embeds.to(self.device, self.dtype).expand(z.shape[0], -1, -1)
        t = torch.full((z.shape[0],), TIMESTEP, device=self.device, dtype=torch.long)
        eps = self.unet(z.to(self.dtype), t, encoder_hidden_states=c).sample
        a = self.alpha_t
        x0 = (z.float() - math.sqrt(1 - a) * eps.float()) / math.sqrt(a)
        return x0.to(self.dtype)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """y = clamp(D(x0 / 0.18215), -1, 1) * 0.5 + 0.5, returned in float32."""
        y = self.vae.decode(x0 / LATENT_SCALE).sample
        return y.float().clamp(-1, 1) * 0.5 + 0.5

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, color_fix: str = "adain") -> torch.Tensor:
        """Run the graph on x (B, 3, H, W) in [0, 1] at the output size; returns float32 in [0, 1]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        x = pad_to_multiple(x.to(self.device, torch.float32))
        y = self.decode(self.denoise(self.encode(x)))
        if not bool(torch.isfinite(y).all()):
            raise NumericalError(
                f"the model produced NaN/Inf in {str(self.dtype).removeprefix('torch.')} on {self.device}; rerun with --dtype fp32"
            )
        y = apply_color_fix(color_fix, y, x)
        return y.clamp(0, 1)[..., :h, :w]


# ---------------------------------------------------------------------------------------- loading


def load_pipeline(
    base: str | Path,
    lora: str | Path | LoraCheckpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prompt: str = "",
) -> OneStepSR:
    """Load SD-2.1-base from a local diffusers folder, merge the LoRA, fetch the prompt embedding."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = Path(base)
    _check_base_folder(base)
    ckpt = lora if isinstance(lora, LoraCheckpoint) else load_lora_checkpoint(lora)
    scheduler_config = _read_json(base / "scheduler" / "scheduler_config.json")
    alpha_t = float(alphas_cumprod(scheduler_config)[TIMESTEP])

    # the LoRA is merged in the compute dtype, with float64 accumulation inside merge_lora
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=dtype, **_variant(base / "unet", "diffusion_pytorch_model"))
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=dtype, **_variant(base / "vae", "diffusion_pytorch_model"))
    merge_lora(unet, ckpt.state_dict_unet, ckpt.rank_unet, what="UNet")
    merge_lora(vae, ckpt.state_dict_vae, ckpt.rank_vae, what="VAE")
    for module in (unet, vae):
        module.requires_grad_(False).eval().to(device, memory_format=torch.channels_last)
    embeds = prompt_embedding(base, prompt)
    return OneStepSR(vae=vae, unet=unet, prompt_embeds=embeds, alpha_t=alpha_t, device=device, dtype=dtype)


def _check_base_folder(base: Path) -> None:
    if not base.is_dir():
        raise ModelNotFoundError(f"{base}: base model folder not found")
    missing = [sub for sub in BASE_SUBFOLDERS if not (base / sub).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{base}: not a Stable Diffusion 2.1-base folder (missing {', '.join(missing)}/)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}: unreadable ({exc})") from exc


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def _variant(folder: Path, stem: str) -> dict:
    """Use the fp16 variant when it is the only weights file present (a download for fp16/bf16 runs)."""
    plain = any(folder.glob(f"{stem}.safetensors")) or any(folder.glob(f"{stem}.bin"))
    if not plain and any(folder.glob(f"{stem}.fp16.*")):
        return {"variant": "fp16"}
    return {}


# ------------------------------------------------------------------------------ prompt embedding


def cache_dir() -> Path:
    """Where icmsr keeps derived data: $ICMSR_CACHE_DIR, else the platform's user cache dir."""
    if env := os.environ.get("ICMSR_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("icmsr"))


def _text_encoder_identity(base: Path) -> str:
    """Hash of what determines the embedding: configs, tokenizer files, and the weights' identity.

    Weight files are identified by resolved name, size and mtime rather than hashed (1.3 GB);
    in a Hub cache the resolved name is the blob's content hash.
    """
    h = hashlib.sha256()
    for path in sorted((base / "tokenizer").iterdir()) + [base / "text_encoder" / "config.json"]:
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in _weight_files(base / "text_encoder"):
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def prompt_embedding(base: Path, prompt: str) -> torch.Tensor:
    """Text-encoder output [0] (1 x 77 x D, float32) for `prompt`, cached on disk per base model."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256((_text_encoder_identity(base) + "\0" + prompt).encode()).hexdigest()[:32]
    path = cache_dir() / "prompt-embeddings" / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["prompt_embeds"]
        except Exception as exc:  # a damaged cache entry is recomputed, not fatal
            logger.warning("ignoring unreadable prompt-embedding cache %s (%s)", path, exc)
    embeds = _encode_prompt(base, prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"prompt_embeds": embeds.contiguous()}, str(tmp), metadata={"prompt": prompt})
    os.replace(tmp, path)
    return embeds


def _encode_prompt(base: Path, prompt: str) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    logger.info("computing the prompt embedding (once per base model and prompt)")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(
        base / "text_encoder", torch_dtype=torch.float32, **_variant(base / "text_encoder", "model")
    ).eval()
    ids = tokenizer(
        prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()
