"""The CUDA routes on a real GPU: the fused GroupNorm kernels compiled (not interpreted), the
query-block attention through cuBLAS with float32 scores, and the pipeline as load_pipeline sets
it up on CUDA. Skipped without a GPU (CI has none); `benchmarks/gpu_check.sh` runs them on a lent
device. The CPU-side checks of the same code are in test_norms.py and test_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from icmsr_cli.model import attention, norms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture
def launches(monkeypatch):
    """The layout of every fused normalising pass (it ends every fused route): eager cannot pass for fused."""
    seen = []
    apply = norms._apply
    monkeypatch.setattr(norms, "_apply", lambda x, *a: seen.append(norms._layout(x)) or apply(x, *a))
    monkeypatch.setattr(norms, "_failed", None)
    return seen


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_group_norm_on_the_gpu_is_as_exact_as_eager(dtype, layout, launches, monkeypatch):
    """Against float64: fp32 no further than PyTorch's own GroupNorm (within 2x); 16-bit within
    one unit in the last place (CUDA rounds to nearest, once). Rows of many chunks, a mean offset."""
    monkeypatch.setattr(norms, "_CHUNK", 4096)  # rows of several chunks at these sizes
    torch.manual_seed(0)
    for channels, side in ((128, 200), (512, 48)):
        for act in (False, True):
            norm = norms.FusedGroupNorm(32, channels, act=act).to(CUDA, dtype).requires_grad_(False)
            with torch.no_grad():
                norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
            x = (torch.randn(2, channels, side, side + 8, device=CUDA) * 3 + 20).to(dtype).contiguous(memory_format=layout)
            with torch.no_grad():
                y = norm(x)
                eager = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)
                eager = F.silu(eager) if act else eager
                ref = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
                ref = F.silu(ref) if act else ref
            assert launches == ["nchw" if layout == torch.contiguous_format else "nhwc"], launches
            launches.clear()
            assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
            err = (y.double() - ref).abs()
            if dtype == torch.float32:
                assert float(err.max()) <= 2 * float((eager.double() - ref).abs().max()) + 1e-6
            else:
                # + 1e-5: where the output crosses zero, the fp32 arithmetic's own rounding remains
                # (inputs near 20: x * scale and the shift, ~16 each, cancel; ~1e-6 apiece), which
                # no 16-bit unit covers. Seen under Triton's interpreter. Wrong statistics or
                # 16-bit intermediates stray by ~1e-3 and more.
                assert float((err - torch.finfo(dtype).eps * ref.abs()).max()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_query_blocks_on_the_gpu_are_as_exact_as_sdpa(dtype):
    """The VAE's head of 512 takes the query-block route on CUDA (baddbmm straight to float32), and
    is no further from float64 than SDPA; several blocks and a short last one."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 2500, 512, device=CUDA).to(dtype) for _ in range(3))
    scale = 512**-0.5
    assert attention._chunked_pays(q), "no baddbmm(out_dtype=float32) on this torch: the VAE attention falls back to SDPA"
    with torch.no_grad():
        ours = attention.dot_product_attention(q, k, v, scale=scale)
        sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
        ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1) @ v.double()
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    assert float((ours.double() - ref).abs().max()) <= 2 * float((sdpa.double() - ref).abs().max()) + 1e-6


def test_the_pipeline_on_cuda_keeps_its_layout_and_equals_the_eager_routes(tiny_base, tiny_lora, launches, monkeypatch):
    """load_pipeline on CUDA fuses the VAE's norms and routes its attention; every fused norm of a
    whole upscale sees the layout chosen for the device (the attention hands it back), and the
    image equals the one through PyTorch's GroupNorm (fp32, same GPU) to float32 rounding. bf16 and
    fp16 give finite images."""
    from icmsr_cli.model import loading
    from icmsr_cli.model.devices import memory_format_for

    x = torch.rand(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    pipe = loading.load_pipeline(tiny_base, tiny_lora, device=CUDA, dtype=torch.float32)
    assert any(isinstance(m, norms.FusedGroupNorm) for m in pipe.vae.modules())
    fused = pipe(x, "adain", None)
    want = "nchw" if memory_format_for(CUDA) == torch.contiguous_format else "nhwc"
    assert launches and set(launches) == {want}, launches
    launches.clear()

    monkeypatch.setattr(norms, "_failed", RuntimeError("eager, for the comparison"))  # fused_available says no from here on
    eager = pipe(x, "adain", None)
    assert not launches
    assert float((fused - eager).abs().max()) < 1e-3

    monkeypatch.setattr(norms, "_failed", None)
    for dtype in (torch.bfloat16, torch.float16):
        out = loading.load_pipeline(tiny_base, tiny_lora, device=CUDA, dtype=dtype)(x, "adain", None)
        assert torch.isfinite(out).all(), dtype


def test_8bit_input_becomes_the_hosts_floats_on_the_gpu():
    """uint8 samples cross as bytes and become k / 255 on the device: the same float32 values the
    host's numpy division gives (a plain division by 255 on CUDA multiplies by the reciprocal)."""
    import numpy as np

    from icmsr_cli.model.graph import unit_float

    k = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    host = np.arange(256, dtype=np.uint8).astype(np.float32).reshape(1, 1, 16, 16) / np.float32(255)
    assert torch.equal(unit_float(k.to(CUDA), torch.float32).cpu(), torch.from_numpy(host))
