"""Building the model: SD-2.1-base from a diffusers folder, the LoRA merged into plain modules once
(so inference has no adapter overhead), the merged modules kept on disk (weight_cache.py) so later
runs skip the merge, and the prompt embedding computed once per (base model, prompt) and cached, so
later runs never load the text encoder.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch

from ..cache import writable_cache_dir
from ..errors import DiskFullError, ModelNotFoundError
from ..io import atomic
from . import weight_cache
from .devices import memory_format_for, tiles_per_call
from .folders import WEIGHTS_STEM, read_json
from .graph import MEMORY_FORMAT, TIMESTEP, OneStepSR, Progress, alphas_cumprod
from .lora import LoraCheckpoint, load_lora_checkpoint, merge_lora
from .norms import fuse_group_norms, fused_available
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

BASE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pipeline(
    base: str | Path,
    lora: str | Path | LoraCheckpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    prompt: str = "",
    merged_cache: bool | None = None,
    reuse_freed_memory: bool = False,
    notify: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> OneStepSR:
    """Load SD-2.1-base from a local diffusers folder, merge the LoRA, fetch the prompt embedding.

    With a LoRA file and `merged_cache` (default: on unless ICMSR_MERGED_CACHE=0), the merged modules
    are kept on disk under `cache.cache_dir()` and later loads map them instead of merging again.
    `reuse_freed_memory`, `notify` and `progress` are OneStepSR's fields of those names.
    """
    base = Path(base)
    _check_base_folder(base)
    scheduler_config = read_json(base / "scheduler" / "scheduler_config.json")
    alpha_t = float(alphas_cumprod(scheduler_config)[TIMESTEP])
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    entry = None
    use_cache = not isinstance(lora, LoraCheckpoint) and (weight_cache.enabled() if merged_cache is None else merged_cache)
    if use_cache and (root := writable_cache_dir()) is not None:
        weights = {part: _weight_files(base / part) for part in classes}
        try:
            entry = weight_cache.entry_dir(root / "merged", base, Path(lora), dtype, weights)
        except OSError:
            pass  # a missing LoRA file or config: the merge below reports it in its own words
    weight_cache.wait_for_saves()
    modules = weight_cache.load(entry, base, classes) if entry else None
    if modules is None:
        modules = _merge(base, lora, classes, device=device, dtype=dtype)
        if entry:
            about = {"base": str(base.resolve()), "lora": str(Path(lora).resolve()), "dtype": str(dtype)}
            weight_cache.save(entry, modules, about=about)
    layout = memory_format_for(device)
    for module in modules.values():
        module.requires_grad_(False).eval().to(device)
        if layout != MEMORY_FORMAT:
            module.to(memory_format=layout)
    if fused_available(device):  # GroupNorm(+SiLU) through Triton: norms.py says why
        for module in modules.values():
            fuse_group_norms(module)
    embeds = prompt_embedding(base, prompt)
    if device.type == "cpu" and dtype == torch.float16 and notify:  # chosen, never picked by auto: said, as it is slow
        notify("fp16 on a CPU is usually several times slower than the default fp32 (most CPUs have no fast "
               "half-precision arithmetic: 128 -> 512 px took 5.8 s against 1.0 s on a 2-core AMD EPYC); "
               "use --dtype auto or fp32")
    return OneStepSR(vae=modules["vae"], unet=modules["unet"], prompt_embeds=embeds, alpha_t=alpha_t, device=device, dtype=dtype,
                     memory_format=layout, tile_batch=tiles_per_call(device), reuse_freed_memory=reuse_freed_memory, progress=progress,
                     **({"notify": notify} if notify else {}))


def _merge(base: Path, lora: str | Path | LoraCheckpoint, classes: dict, *, device: torch.device, dtype: torch.dtype) -> dict:
    """Base modules with the LoRA merged in, convs channels-last, on `device`."""
    ckpt = lora if isinstance(lora, LoraCheckpoint) else load_lora_checkpoint(lora)
    loras = {"unet": (ckpt.state_dict_unet, ckpt.rank_unet, "UNet"), "vae": (ckpt.state_dict_vae, ckpt.rank_vae, "VAE")}
    modules = {}
    for part, cls in classes.items():
        module = cls.from_pretrained(base / part, torch_dtype=dtype, **_variant(base / part, WEIGHTS_STEM))
        # onto the device first so a GPU does the merging; the merge writes its convs channels-last
        # directly and the final .to() converts only the convs without a LoRA. The LoRA is merged
        # in the compute dtype, with float32 arithmetic inside merge_lora.
        module.to(device)
        state_dict, rank, what = loras[part]
        merge_lora(module, state_dict, rank, what=what, memory_format=MEMORY_FORMAT)
        # aligned like the cached copy, so both give the same numbers (weight_cache.py says why)
        modules[part] = weight_cache.aligned(module.to(memory_format=MEMORY_FORMAT))
    return modules


def _check_base_folder(base: Path) -> None:
    if not base.is_dir():
        raise ModelNotFoundError(f"{base}: base model folder not found")
    missing = [sub for sub in BASE_SUBFOLDERS if not (base / sub).is_dir()]
    if missing:
        raise ModelNotFoundError(f"{base}: not a Stable Diffusion 2.1-base folder (missing {', '.join(missing)}/)")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def _variant(folder: Path, stem: str) -> dict:
    """Use the fp16 variant when it is the only weights file present (a download for fp16/bf16 runs)."""
    plain = any(folder.glob(f"{stem}.safetensors")) or any(folder.glob(f"{stem}.bin"))
    if not plain and any(folder.glob(f"{stem}.fp16.*")):
        return {"variant": "fp16"}
    return {}


# ------------------------------------------------------------------------------ prompt embedding


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
        h.update(f"{weight_cache.file_identity(path)}\0".encode())
    return h.hexdigest()


def prompt_embedding(base: Path, prompt: str) -> torch.Tensor:
    """Text-encoder output [0] (1 x 77 x D, float32) for `prompt`, cached on disk per base model."""
    embeds, tokens = _embedding(base, prompt)
    _say_if_cut(tokens, embeds)
    return embeds


def _embedding(base: Path, prompt: str) -> tuple[torch.Tensor, int]:
    """The embedding and the prompt's length in tokens: from the cache, or computed and cached."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = writable_cache_dir()
    if root is None:
        return _encode_prompt(base, prompt)
    key = hashlib.sha256((_text_encoder_identity(base) + "\0" + prompt).encode()).hexdigest()[:32]
    path = root / "prompt-embeddings" / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("prompt_embeds"), int((f.metadata() or {}).get("tokens", 0))
        except Exception as exc:  # a damaged cache entry is recomputed, not fatal
            logger.warning("ignoring unreadable prompt-embedding cache %s (%s)", path, exc)
    embeds, tokens = _encode_prompt(base, prompt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as tmp:
            save_file({"prompt_embeds": embeds.contiguous()}, str(tmp), metadata={"prompt": prompt, "tokens": str(tokens)})
    except (OSError, DiskFullError) as exc:
        logger.warning("could not save the prompt embedding in %s (%s); the next run computes it again", path.parent, exc)
    return embeds, tokens


def _say_if_cut(tokens: int, embeds: torch.Tensor) -> None:
    """A prompt longer than the text encoder reads (its context, the embedding's length: 77 tokens
    with the start and end marks) is cut, as OSEDiff's own code cuts it; said on every run (the
    count is kept with the cached embedding), not only the first."""
    if tokens > embeds.shape[1]:
        logger.warning("note: the prompt is %d tokens long; the text encoder reads the first %d, the rest is ignored",
                       tokens, embeds.shape[1])


def _encode_prompt(base: Path, prompt: str) -> tuple[torch.Tensor, int]:
    """The embedding, and the prompt's length in tokens before the cut."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    logger.info("computing the prompt embedding (once per base model and prompt)")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would land in the middle of ours
    try:
        encoder = CLIPTextModel.from_pretrained(
            base / "text_encoder", torch_dtype=torch.float32, **_variant(base / "text_encoder", "model")
        ).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    ids = tokenizer(
        prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0].float(), len(tokenizer(prompt, verbose=False).input_ids)  # (verbose: transformers would warn of the length)
