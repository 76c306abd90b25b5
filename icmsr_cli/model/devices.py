"""Choosing the torch device and compute dtype from the user's `auto|...` words."""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import sys
from contextlib import contextmanager

import torch

from ..errors import SetupError

from ..choices import DEVICE_CHOICES, DTYPE_CHOICES
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {name}: CUDA is not available on this machine (this torch build: {torch.__version__})")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise SetupError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise SetupError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    raise SetupError(f"--device {name!r}: expected one of {DEVICE_CHOICES}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA GPUs with native bf16 (compute capability 8.0 on: Ampere, Hopper, ...),
    else fp16 on CUDA/MPS, fp32 on CPU. (torch.cuda.is_bf16_supported() also says yes where bf16 is
    only emulated, and slow.)"""
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise SetupError(f"--dtype {name!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[name]


def memory_format_for(device: torch.device) -> torch.memory_format:
    """Activation and conv-weight layout per device, as measured: on an H100 (bf16, cuDNN) the
    untiled 2048^2 graph took 1248 ms channels-last against 835 ms contiguous (GroupNorm and the
    NCHW<->NHWC conversions around it); on CPU channels-last is no slower (BENCHMARKS.md).
    That H100 figure predates the fused GroupNorm, which takes channels-last as it is, and the
    attention that keeps the layout (before it a contiguous decoder ran channels-last from its
    mid-block on): `benchmarks/speed.py --device cuda` (ours against ours-channels-last) decides
    it again."""
    return torch.contiguous_format if device.type in ("cuda", "mps") else torch.channels_last


def tiles_per_call(device: torch.device) -> int:
    """How many tiles one model call takes. A GPU needs a batch to fill it at small tiles. The CPU
    does not, and a batch only divides its memory budget into smaller tiles, which overlap more:
    full model, 1024x768 output, 64-px tiles, this 2-core machine: batches of 4 took 175-181 s,
    one tile at a time 158-165 s (the decoder 99-104 s against 114-121 s)."""
    return 1 if device.type == "cpu" else 4


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous: one pixel, one channel), else contiguous."""
    channels_last = x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors: free CUDA memory, else the system's available RAM (psutil: Linux,
    macOS and Windows alike)."""
    if device.type == "cuda":
        # memory torch's caching allocator holds but does not use is as good as free to us
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    import psutil

    return psutil.virtual_memory().available


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means memory ran out (torch's CUDA/MPS errors, the CPU allocator's)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


# glibc mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 128 * 1024, 65536


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # musl and others have no such symbol; their malloc differs
    except (OSError, AttributeError):
        return None
    return libc


def _glibc_mallopt():
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    A tiled run frees blocks of many sizes below glibc's mmap threshold; the heap keeps them, and
    what it keeps grows with the image: with 64-px tiles the resident size after a 2048^2 run of the
    tiny model stayed 2.0 GB above the loaded model, 2.9 GB at 3072^2. Trimming after every tiled
    segment and stage brought the 2048^2 decode peak from +3.6 GB to +2.4 GB at no measurable cost
    (86.7 s -> 86.8 s; BENCHMARKS.md, host memory)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def large_blocks_mapped() -> None:
    """From now on glibc serves every block of 128 KB or more with mmap and unmaps it on free
    (process-wide; a no-op off glibc).

    glibc starts at that threshold but raises it to the size of each mmapped block freed, up to
    32 MB. After the first large free, a tiled run's blocks below 32 MB come from the heap, where
    tiles parked for a whole segment sit between freed ones; the heap cannot shrink past them, and
    its size grows with the number of tiles: with 64-px tiles the tiny model's peak grew 1015 MB
    from a 2048^2 to a 3072^2 output, 175 MB with the threshold fixed, and no slower (BENCHMARKS.md,
    host memory). Fixing the threshold turns glibc's adjustment off for good, so this is not undone;
    whole-image runs inside freed_memory_reused take no mmapped blocks at all either way."""
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)


@contextmanager
def freed_memory_reused():
    """While inside, glibc keeps freed memory for reuse instead of handing it back to the OS.

    PyTorch on CPU allocates every activation afresh. glibc serves blocks above 32 MB with mmap and
    unmaps them on free, so each new activation of a 512x512 decode (up to 134 MB) is paid again in
    page faults: about a sixth of the run on a 2-core machine. With mmap and trimming off, big
    blocks come from the heap and are reused. Worth it for an image run whole, not for a tiled one:
    there blocks of many sizes come and go, the heap fragments and the peak grows (3.6 -> 6.3 GB for
    a 2048x2048 output of the tiny model). Process-wide while inside; a no-op off glibc.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
