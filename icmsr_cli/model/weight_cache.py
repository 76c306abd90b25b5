"""The merged-weights cache: UNet and VAE with the LoRA merged in, stored in the compute dtype with
their memory layout (channels-last convolution weights) and every tensor 64-byte aligned.

Merging and converting touch every weight (seconds on a CPU: about a fifth of a 512x512 run on two
cores); a later run maps this file instead and starts computing at once. An entry is keyed by the
identity of the base weights and configs, the LoRA file, the dtype and the entry FORMAT, so
any change makes a new entry; the oldest entries beyond `KEEP` are deleted.

The files are torch.save archives, whose records are 64-byte aligned, mapped with torch.load(mmap=True).
Alignment matters for the numbers, not only for speed: MKL's sgemm sums in another order for
operands that are not 64-byte aligned on some CPUs, so a mapped safetensors file (tensors at any
4-byte offset) gave outputs 2e-6 away from the freshly merged model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..io import atomic
from ..cache import MERGED_READY, merged_entries

logger = logging.getLogger(__name__)

#: the layout of an entry: the modules' parameter names (unet.py, vae.py) and the file format;
#: a change to either needs a new value
FORMAT = "icmsr-merged-3"
KEEP = 3  # entries kept: e.g. two models, or one model in fp32 and in bf16
_PARTS = ("unet", "vae")
_SPARE = 1 << 30  # free bytes left beside a new entry, for the outputs and everything else


def enabled() -> bool:
    """Off with ICMSR_MERGED_CACHE=0 (it takes the size of the merged model on disk: 3.5 GB in fp32)."""
    return os.environ.get("ICMSR_MERGED_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def file_identity(path: Path) -> str:
    """A file's identity without reading it: resolved path (a Hub blob's name is its hash), size, mtime."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def entry_dir(root: Path, base: Path, lora: Path, dtype: torch.dtype, weight_files: dict[str, list[Path]]) -> Path:
    h = hashlib.sha256(f"{FORMAT}|{dtype}|{file_identity(lora)}".encode())
    for part in _PARTS:
        h.update(b"\0" + (base / part / "config.json").read_bytes())
        for path in weight_files[part]:
            h.update(f"\0{file_identity(path)}".encode())
    return root / h.hexdigest()[:32]


ALIGNMENT = 64  # bytes: what MKL and oneDNN want, and what torch.save gives every record


def aligned(module: nn.Module) -> nn.Module:
    """Every parameter and buffer at a 64-byte aligned address (copies only those that are not),
    so the numbers do not depend on where the weights were read from (see the module docstring)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() % ALIGNMENT:
            tensor.data = tensor.data.clone(memory_format=torch.preserve_format)
    return module


def load(entry: Path, base: Path, classes: dict[str, type[nn.Module]]) -> dict[str, nn.Module] | None:
    """The merged modules of a complete entry, their weights mapped from disk; None on a miss.

    A damaged or mismatched entry is a miss (and is deleted), never an error: the caller merges afresh.
    """
    if not (entry / MERGED_READY).is_file():
        return None
    try:
        modules = _mapped(entry, base, classes)
    except Exception as exc:  # noqa: BLE001 - any failure to read the cache means: rebuild it
        logger.warning("merged-weights cache %s is unusable (%s); merging again", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    os.utime(entry / MERGED_READY)  # most recently used: kept longest
    return modules


def _mapped(folder: Path, base: Path, classes: dict[str, type[nn.Module]]) -> dict[str, nn.Module]:
    modules = {}
    for part in _PARTS:
        cls = classes[part]
        with torch.device("meta"):  # no memory for weights the file is about to provide
            module = cls.from_config(cls.load_config(base / part))
        state = torch.load(folder / f"{part}.pt", map_location="cpu", mmap=True, weights_only=True)
        module.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            raise ValueError(f"{part}: tensors left without weights")
        modules[part] = module
    return modules


_writing: list[threading.Thread] = []


def save(entry: Path, modules: dict[str, nn.Module], *, about: dict) -> None:
    """Write an entry in a thread, while the first image computes, and return at once.

    The first run must not pay for the cache on the user's clock (issue 13: writing it made the first
    run 1.4x the reference script). torch.save's CRC32 is turned off (3.5 GB took 8.8 s with it and
    2.2 s without; torch.load does not check it). The thread is not a daemon: the interpreter finishes
    the write before it exits; a killed write leaves a temporary that the next save removes.
    """
    # the tensors as they are now: the caller goes on to move and convert the modules for its device
    states = {part: module.state_dict() for part, module in modules.items()}
    thread = threading.Thread(target=_write, args=(entry, states, about), name="icmsr-merged-cache")
    _writing.append(thread)
    thread.start()


def wait_for_saves() -> None:
    """Block until this process's entries are written (a second load in the same process then maps
    the first's entry instead of merging beside it)."""
    while _writing:
        _writing.pop().join()


def _write(entry: Path, states: dict[str, dict[str, torch.Tensor]], about: dict) -> None:
    """The entry as a temporary folder, synced and renamed into place, then old entries pruned. A
    failure to write (disk full, read-only cache) is a one-line warning: the run goes on without the
    cache, and nothing of the attempt is left on disk."""
    needed = sum(t.numel() * t.element_size() for state in states.values() for t in state.values())
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(entry.parent).free < needed + _SPARE:  # a cache must not fill the disk outputs need
            raise atomic.no_space_error(entry, needed)
        with atomic.replacing(entry, folder=True, needed=needed) as tmp:
            for part in _PARTS:
                # through a Python file, so a full disk is an OSError (torch's own writer raises RuntimeError)
                with open(tmp / f"{part}.pt", "wb") as f, _without_crc32():
                    torch.save({k: v.cpu() for k, v in states[part].items()}, f)
            (tmp / MERGED_READY).write_text(json.dumps({"format": FORMAT, **about}, indent=1))
    except Exception as exc:  # noqa: BLE001 - the cache is optional: failing to write it is a warning, in a thread nobody joins on error
        reason = exc.strerror or exc if isinstance(exc, OSError) else exc
        logger.warning("could not save the merged-weights cache in %s (%s); the next run merges again", entry.parent, reason)
        return
    _prune(entry.parent)


@contextmanager
def _without_crc32():
    """torch.save computes a CRC32 per record (torch >= 2.6 can turn it off; older ones just pay)."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    previous, config.save.compute_crc32 = config.save.compute_crc32, False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


def _prune(root: Path) -> None:
    """Keep the `KEEP` most recently used entries; drop what an interrupted save left over an hour ago."""
    for stale in root.glob(".*" + atomic.TEMP_SUFFIX):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    entries = sorted(merged_entries(root), key=lambda p: (p / MERGED_READY).stat().st_mtime_ns, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
