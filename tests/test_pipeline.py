"""The pieces of the pipeline that are easy to get subtly wrong."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from conftest import photo_like
from icmsr_cli.model.devices import resolve_device, resolve_dtype
from icmsr_cli.errors import NumericalError, SetupError
from icmsr_cli.io.images import Picture
from icmsr_cli.model.graph import alphas_cumprod, pad_to_multiple
from icmsr_cli.model.loading import load_pipeline
from icmsr_cli.upscaler import UpscaleOptions, output_size, processing_size, upscale_picture


def test_alphas_cumprod_999_of_sd_schedule():
    a = alphas_cumprod({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000})
    assert a.shape == (1000,)
    assert abs(float(a[999]) - 0.0046600) < 1e-6
    with pytest.raises(SetupError, match="epsilon"):
        alphas_cumprod({"prediction_type": "v_prediction"})


@pytest.mark.parametrize(
    "size,scale,expected",
    [((37, 53), 4, (148, 212)), ((33, 17), 1.5, (50, 26)), ((101, 7), 2.5, (252, 18)), ((640, 480), 0.5, (320, 240)), ((3, 3), 3.3, (10, 10))],
)
def test_output_size_is_round_of_scaled_size(size, scale, expected):
    assert output_size(size, scale) == expected


def test_processing_size_lifts_short_side_to_512():
    assert processing_size((212, 148), 512) == (733, 512)
    assert processing_size((100, 100), 512) == (512, 512)
    assert processing_size((600, 512), 512) == (600, 512)


@pytest.mark.parametrize("h,w", [(17, 23), (8, 16), (64, 57), (5, 3)])
def test_padding_keeps_the_image_and_reaches_multiples_of_8(h, w):
    x = torch.rand(1, 3, h, w)
    p = pad_to_multiple(x)
    assert p.shape[-2] % 8 == 0 and p.shape[-1] % 8 == 0 and p.shape[-2] - h < 8 and p.shape[-1] - w < 8
    assert torch.equal(p[..., :h, :w], x)  # never stretched: the original pixels sit untouched
    if h > 8 and w > 8 and p.shape[-1] > w:
        torch.testing.assert_close(p[..., :h, w], x[..., :h, w - 2])  # reflect, not replicate


@pytest.fixture(scope="module")
def pipe(tiny_base, tiny_lora, tmp_path_factory):
    return load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("size,scale", [((23, 17), 2.0), ((31, 9), 1.7), ((40, 41), 0.75)])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_output_size_mode_and_alpha(pipe, size, scale, channels):
    rng = np.random.default_rng(0)
    px = rng.random((size[1], size[0], channels)).astype(np.float32)
    out = upscale_picture(pipe, Picture(px, bit_depth=16), UpscaleOptions(scale=scale, min_side=16))
    w, h = output_size(size, scale)
    assert out.pixels.shape == (h, w, channels)
    assert out.pixels.dtype == np.float32 and 0 <= out.pixels.min() and out.pixels.max() <= 1
    if channels in (2, 4):  # alpha is bicubic-resized input alpha, untouched by the model
        from icmsr_cli.io.images import resize_planes

        expected = np.clip(resize_planes(px[..., -1:], (w, h), exact_8bit=False), 0, 1)
        np.testing.assert_allclose(out.pixels[..., -1:], expected, atol=1e-6)


def test_bf16_runs_and_returns_float32(pipe, tiny_base, tiny_lora):
    bf = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.bfloat16)
    x = torch.from_numpy(photo_like(64, 48).astype(np.float32) / 255).permute(2, 0, 1)[None]
    y_bf, y_32 = bf(x, "adain"), pipe(x, "adain")
    assert y_bf.dtype == torch.float32 and y_bf.shape == y_32.shape
    assert (y_bf - y_32).abs().mean() < 0.05


def test_nan_output_is_reported(tiny_base, tiny_lora):
    bad = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        bad.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NumericalError, match="NaN/Inf in float32") as raised:
        bad(torch.rand(1, 3, 64, 64))
    assert "--dtype fp32" not in str(raised.value), "advice to use fp32 when already in fp32"


def test_a_prompt_longer_than_the_text_encoder_reads_is_said_on_every_run(tiny_base, caplog):
    """A prompt past CLIP's 77 tokens was cut in silence (and, once cached, ever after)."""
    from icmsr_cli.model.loading import prompt_embedding

    long_prompt = "a sharp photo of a red brick house " * 12
    for run in range(2):  # the first computes the embedding, the second reads it from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="icmsr_cli"):
            embeds = prompt_embedding(tiny_base, long_prompt)
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith("note: the prompt is ") and said[0].endswith(
            " tokens long; the text encoder reads the first 77, the rest is ignored"), (run, said)
        assert int(said[0].split()[4]) > 77 and embeds.shape[1] == 77
    caplog.clear()
    with caplog.at_level("WARNING", logger="icmsr_cli"):
        prompt_embedding(tiny_base, "a photo")
    assert caplog.records == []


def test_prompt_embedding_cached_so_text_encoder_not_built_again(tiny_base, tiny_lora, monkeypatch):
    import transformers

    built = []
    original = transformers.CLIPTextModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        built.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", classmethod(counting))
    first = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    assert len(built) == 1
    second = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    assert len(built) == 1, "the second load must read the cached embedding"
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)
    other = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32, prompt="a photo")
    assert len(built) == 2 and not torch.equal(other.prompt_embeds, first.prompt_embeds)


def test_device_and_dtype_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SetupError, match="--dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(SetupError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="CUDA is not available"):
            resolve_device("cuda:0")
        assert resolve_device("auto").type in ("cpu", "mps")


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("unet", "vae") for k, v in getattr(pipe, part).state_dict().items()}


def test_merged_weights_cache_serves_the_same_weights_without_merging(tiny_base, tiny_lora, tmp_path, monkeypatch, caplog):
    import shutil

    from icmsr_cli.model import loading, weight_cache

    lora = tmp_path / "osediff.pkl"
    shutil.copy(tiny_lora, lora)
    root = tmp_path / "icmsr-cache" / "merged"
    first = load_pipeline(tiny_base, lora, device=torch.device("cpu"), dtype=torch.float32)
    weight_cache.wait_for_saves()  # written while the first image computes; what the next process finds
    entries = [p for p in root.iterdir() if (p / "entry.json").is_file()]
    assert len(entries) == 1

    def no_merge(*args, **kwargs):
        raise AssertionError("a cached load must not merge")

    with monkeypatch.context() as patched:
        patched.setattr(loading, "_merge", no_merge)
        second = load_pipeline(tiny_base, lora, device=torch.device("cpu"), dtype=torch.float32)
    a, b = _weights(first), _weights(second)
    # MKL sums differently for unaligned operands on some CPUs: both ways must give aligned weights
    unaligned = [k for k in a if a[k].data_ptr() % 64 or b[k].data_ptr() % 64]
    assert not unaligned, f"weights not 64-byte aligned: {unaligned[:3]}"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() for k in a), "cached weights differ"
    assert second.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 32, 40)
    assert torch.equal(first(x, "adain", None), second(x, "adain", None))

    # a damaged entry is a miss: a one-line warning, a fresh merge, the same weights
    unet_file = entries[0] / "unet.pt"
    unet_file.write_bytes(unet_file.read_bytes()[: unet_file.stat().st_size // 2])
    third = load_pipeline(tiny_base, lora, device=torch.device("cpu"), dtype=torch.float32)
    assert "merged-weights cache" in caplog.text and "unusable" in caplog.text
    assert all(torch.equal(a[k], v) for k, v in _weights(third).items())

    # another LoRA file (same path, new contents) is another entry; only the newest KEEP stay
    for i in range(weight_cache.KEEP + 1):
        lora.write_bytes(tiny_lora.read_bytes())
        os.utime(lora, ns=(10**18 + i, 10**18 + i))
        load_pipeline(tiny_base, lora, device=torch.device("cpu"), dtype=torch.bfloat16 if i % 2 else torch.float32)
    weight_cache.wait_for_saves()
    kept = [p for p in root.iterdir() if (p / "entry.json").is_file()]
    assert len(kept) == weight_cache.KEEP
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_merged_weights_cache_can_be_turned_off(tiny_base, tiny_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("ICMSR_MERGED_CACHE", "0")
    load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    assert not (tmp_path / "icmsr-cache" / "merged").exists()


_OVERFLOWING = {  # a conv whose sums pass fp16's 65504, followed by a GroupNorm that brings them back
    "encode": lambda p: p.vae.encoder.mid_block.resnets[0].conv1,
    "unet": lambda p: p.unet.mid_block.resnets[0].conv1,
    "decode": lambda p: p.vae.decoder.mid_block.resnets[0].conv1,
}


@pytest.mark.parametrize("stage", ["encode", "unet", "decode"])
def test_fp16_overflow_moves_only_that_stage_to_fp32(tiny_base, tiny_lora, stage):
    """In fp16 the image would be NaN; the pipeline says so once, runs that stage in fp32 from then
    on, and gives a finite image close to the float32 pipeline's."""
    def overflowing(pipe):
        with torch.no_grad():
            conv = _OVERFLOWING[stage](pipe)
            gain = 3e4 / float(conv.weight.abs().max())  # weights stay representable in fp16; their sums do not
            conv.weight.mul_(gain)
            # a bias near fp16's largest value: the sums overflow whatever the random weights (with
            # CI's lowest-versions run the scaled weights alone stayed in range for the UNet)
            conv.bias.fill_(6e4)
        return pipe

    half = overflowing(load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float16))
    full = overflowing(load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32))
    x = torch.from_numpy(photo_like(48, 40).astype(np.float32) / 255).permute(2, 0, 1)[None]
    notes = []
    half.notify = notes.append
    with torch.no_grad():
        assert not torch.isfinite(half.decode(half.denoise(half.encode(x)))).all(), "the test needs an fp16 overflow"
    y = half(x, "none", None)
    name = {"encode": "the VAE encoder", "unet": "the UNet", "decode": "the VAE decoder"}[stage]
    assert notes == [f"{name} overflowed in fp16; running it in fp32 from now on"]
    assert torch.isfinite(y).all() and _OVERFLOWING[stage](half).weight.dtype == torch.float32
    assert half.stage_dtypes == {stage: torch.float32}  # the other stages stay in fp16
    assert (y - full(x, "none", None)).abs().mean() < 0.03  # only the fp16 stages differ
    half(x, "none", 16)  # later images, tiled too, run that stage in fp32 without another note
    assert len(notes) == 1


# glibc's own accounting of one process's allocations, for the allocator probes below
_MALLINFO = """
import ctypes, ctypes.util

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int) for name in fields]
mallinfo = getattr(libc, "mallinfo2", None) or libc.mallinfo
mallinfo.restype = Info
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def block(mb):
    # (bytes mmapped for the block, heap bytes glibc still holds once it is freed)
    before = mallinfo().hblkhd
    block = libc.malloc(mb << 20)
    mapped = mallinfo().hblkhd - before
    libc.free(block)
    return mapped, mallinfo().arena
"""

_REUSE_PROBE = _MALLINFO + """
from icmsr_cli.model.devices import freed_memory_reused

before = block(256)
with freed_memory_reused():
    inside = block(256)
# larger than what the heap kept from inside: mmapped again only if the defaults are back
after = block(512)
print(*before, *inside, *after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_inside_the_context_only():
    """Inside freed_memory_reused a 256 MB block comes from the heap (no mmap) and stays in the heap
    once freed (no trim); before and after, glibc's defaults hold and big blocks are mmapped. Read from
    glibc's own accounting (mallinfo), so it does not depend on the kernel or the machine's load
    as a page-fault count does (that figure belongs to the speed benchmark)."""
    import subprocess

    from icmsr_cli.model.devices import _glibc_mallopt

    if _glibc_mallopt() is None:
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], capture_output=True, text=True, check=True).stdout
    mapped_before, _, mapped_inside, heap_inside, mapped_after, _ = map(int, out.split())
    assert mapped_before >= 256 << 20, mapped_before
    assert mapped_inside == 0 and heap_inside >= 256 << 20, (mapped_inside, heap_inside)
    assert mapped_after >= 512 << 20, mapped_after


_TRIM_PROBE = """
import ctypes
from icmsr_cli.model.devices import release_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MB in blocks below the mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)
full = rss()
for b in blocks[:-1]:  # the last block pins the heap's top: glibc's own top-trim cannot return the rest
    libc.free(b)
kept = rss()
release_freed_memory()
print(full, kept, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_freed_memory_hands_the_heaps_free_pages_back():
    """What a tiled run frees stays in glibc's heap and grows with the image (BENCHMARKS.md, host
    memory); release_freed_memory, called between tiled segments and stages, returns it."""
    import subprocess

    from icmsr_cli.model.devices import _glibc_mallopt

    if _glibc_mallopt() is None:
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True).stdout
    full, kept, released = map(int, out.split())
    assert kept > full - (20 << 20), "freed heap blocks stay resident until trimmed"
    assert released < kept - (150 << 20), (full, kept, released)


_MAPPED_PROBE = _MALLINFO + """
import sys
from icmsr_cli.model.devices import large_blocks_mapped

libc.free(libc.malloc(16 << 20))  # a freed 16 MB mmapped block raises glibc's threshold past 8 MB
if sys.argv[1] == "fixed":
    large_blocks_mapped()
print(block(8)[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_stay_mapped_once_fixed():
    """glibc's threshold rises after a large free, so a tiled run's tile-sized blocks land in the
    heap and its peak grows with the image (BENCHMARKS.md, host memory); large_blocks_mapped keeps
    them mmapped, so each is handed back when freed. Read from glibc's own accounting."""
    import subprocess

    from icmsr_cli.model.devices import _glibc_mallopt

    if _glibc_mallopt() is None:
        pytest.skip("not glibc")
    def run(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", _MAPPED_PROBE, mode], capture_output=True, text=True, check=True).stdout.split()

    assert run("default") == ["0"], "glibc's default: after a 16 MB free, an 8 MB block comes from the heap"
    assert int(run("fixed")[0]) >= 8 << 20


def test_missing_lora_file_is_a_checkpoint_error_not_a_traceback(tiny_base, tmp_path):
    from icmsr_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="absent.pkl.*not found"):
        load_pipeline(tiny_base, tmp_path / "absent.pkl", device=torch.device("cpu"), dtype=torch.float32)


def test_device_quantisation_gives_the_cpu_paths_bytes(pipe):
    """The colour is rounded to uint8 where the model ran; the bytes equal images.quantise's on
    the same floats, rounding halves to even and clamping out-of-range values alike."""
    from icmsr_cli.io.images import quantise
    from icmsr_cli.upscaler import quantise_on_device

    torch.manual_seed(0)
    y = torch.rand(64, 48, 3) * 1.2 - 0.1
    y[0, :6, 0] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255, -0.0, 1.0])  # halves and ends
    assert np.array_equal(quantise_on_device(y).numpy(), quantise(y.numpy(), 8))
    # end to end: an 8-bit RGBA picture at the model's own size comes back as uint8, equal to
    # quantising the pipeline's float output on the CPU; alpha is quantised the same way
    rgba = np.dstack([photo_like(512, 512), np.full((512, 512), 200, np.uint8)]).astype(np.float32) / 255
    out = upscale_picture(pipe, Picture(rgba), UpscaleOptions(scale=1.0, tile=None))
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (512, 512, 4)
    floats = pipe(torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1)[None], "adain", None)
    assert np.array_equal(out.pixels[..., :3], quantise(floats[0].permute(1, 2, 0).numpy(), 8))
    assert (out.pixels[..., 3] == 200).all()


@pytest.mark.parametrize("tile", [None, 16], ids=["whole", "tiled"])
def test_8bit_samples_give_the_float_inputs_image(pipe, tile):
    """prepare_picture hands 8-bit sources over as uint8 (a quarter of the bytes to the device);
    the pipeline reads k as numpy's float32 k / 255, so the image is the float input's, bit for bit."""
    from icmsr_cli.model.graph import unit_float

    k = np.arange(256, dtype=np.uint8)
    assert np.array_equal(unit_float(torch.from_numpy(k), torch.float32).numpy(), k.astype(np.float32) / np.float32(255))
    rgb = photo_like(200, 136)
    as_bytes = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    as_floats = torch.from_numpy(rgb.astype(np.float32) / np.float32(255)).permute(2, 0, 1)[None]
    assert torch.equal(pipe(as_bytes, "adain", tile), pipe(as_floats, "adain", tile))


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_every_conv_sees_the_layout_chosen_for_the_device(tiny_base, tiny_lora, layout, monkeypatch):
    """The activations keep the layout load_pipeline chose, through the UNet's transformer blocks
    (diffusers' hand back contiguous there; unet.py's do not) and the whole upscale: a conv fed the
    other layout converts its input or its weights on every call."""
    from icmsr_cli.model import loading

    monkeypatch.setattr(loading, "memory_format_for", lambda device: layout)
    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    seen = {}

    def check(name):
        def hook(module, args):
            seen.setdefault(name, args[0].is_contiguous(memory_format=layout))
        return hook

    for part in ("unet", "vae"):
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_pre_hook(check(f"{part}.{name}"))
    # large enough that the UNet's deepest maps are wider than 1x1 (one pixel is both layouts)
    pipe(torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(0)), "adain", None)
    assert len(seen) > 20 and all(seen.values()), [name for name, ok in seen.items() if not ok]


def test_fp16_chosen_on_a_cpu_is_said_to_be_slow(tiny_base, tiny_lora):
    """--dtype fp16 on a CPU ran about 6x slower than fp32 (the 2-core test machine: 5.8 s against
    1.0 s for 128 -> 512 px) without a word. It is said once, at load; fp32 says nothing."""
    cpu = torch.device("cpu")
    for dtype, said in ((torch.float16, True), (torch.float32, False)):
        notes = []
        load_pipeline(tiny_base, tiny_lora, device=cpu, dtype=dtype, notify=notes.append)
        slow = [n for n in notes if n.startswith("fp16 on a CPU is usually several times slower than the default fp32")]
        assert len(slow) == (1 if said else 0), (dtype, notes)
