"""The fused GroupNorm(+SiLU) route (model/norms.py) against eager PyTorch.

The Triton kernels run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, chosen when the
kernels are first built, so in a fresh interpreter); on CUDA the same kernels are compiled."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icmsr_cli.model.norms import fuse_group_norms

HERE = Path(__file__).parent


def _tiny_vae(tiny_base):
    from icmsr_cli.model.vae import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_base / "vae").eval()


def test_fusing_keeps_the_vae_exact_and_its_weights_named(tiny_base):
    """Where the kernels do not run (here: the CPU), the swapped modules compute exactly what the
    originals did; every GroupNorm is swapped and every SiLU after one absorbed."""
    vae = _tiny_vae(tiny_base)
    fused = copy.deepcopy(vae)
    groupnorms = sum(isinstance(m, nn.GroupNorm) for part in (vae.encoder, vae.decoder) for m in part.modules())
    assert fuse_group_norms(fused) == groupnorms
    for part in (fused.encoder, fused.decoder):
        assert all(type(m) is not nn.GroupNorm for m in part.modules())
        assert not any(isinstance(m, nn.SiLU) for m in part.modules())
    assert list(fused.state_dict()) == list(vae.state_dict())
    torch.manual_seed(0)
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fused.encode(x), vae.encode(x))
        z = torch.randn(1, 4, 6, 5)
        assert torch.equal(fused.decode(z), vae.decode(z))


def test_fusing_keeps_the_unet_exact_and_its_time_embedding_activated(tiny_base):
    """The UNet's norms too: the resnets' SiLU after their norms is absorbed, the one on the time
    embedding stays (a shared SiLU module would have lost it), and the numbers are the same."""
    from icmsr_cli.model.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
    fused = copy.deepcopy(unet)
    assert fuse_group_norms(fused) == sum(isinstance(m, nn.GroupNorm) for m in unet.modules())
    assert all(type(m) is not nn.GroupNorm for m in fused.modules())
    assert [name for name, m in fused.named_modules() if isinstance(m, nn.SiLU)] == ["time_embedding.act"]
    assert list(fused.state_dict()) == list(unet.state_dict())
    g = torch.Generator().manual_seed(0)
    z, c, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([999])
    with torch.no_grad():
        # not torch.equal: the copy's weights sit at other addresses, and MKL's sgemm sums in another
        # order for operands aligned otherwise (weight_cache.py); 8e-7 here
        torch.testing.assert_close(fused(z, t, c), unet(z, t, c), rtol=0, atol=1e-5)


_INTERPRETED = textwrap.dedent(
    """
    import copy, json, sys
    import torch
    import torch.nn.functional as F
    from icmsr_cli.model import norms
    from icmsr_cli.model.norms import FusedGroupNorm, fuse_group_norms, normalize

    part = sys.argv[3]  # norms | unet | decode: each in its own interpreter process, side by side
    norms._CHUNK, norms._SPLIT_BLOCK = 1000, 4  # rows of several chunks, merged over several steps
    torch.manual_seed(0)
    out = {}
    launches = []  # the normalising pass ends every fused route: counted, so eager cannot pass for fused
    _apply = norms._apply
    norms._apply = lambda x, *a: launches.append(norms._layout(x)) or _apply(x, *a)
    channels_last = lambda x: x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)


    def few_groups(folder):
        # the tiny model's layout and widths in 8 groups, not 32: the interpreter pays ~10 ms a
        # program and the statistics kernels run one per group (a minute at 32); 4-16 channels
        # a group, nearer SD-2.1's 10-40 than the tiny model's 1-4
        return {**json.load(open(folder + "/config.json")), "norm_num_groups": 8}


    def reference(x, norm, act):
        y = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
        return F.silu(y) if act else y


    def single_norms():
        cases = [("fp32", (2, 64, 13, 17), torch.float32, 0.0),
                 ("fp32-offset", (2, 64, 13, 17), torch.float32, 100.0),
                 ("fp32-3d", (2, 64, 300), torch.float32, 0.0),
                 ("bf16", (1, 32, 40, 40), torch.bfloat16, 0.0),
                 ("fp16", (1, 32, 40, 40), torch.float16, 0.0)]
        for name, shape, dtype, offset in cases + [(n + "-nhwc", *rest) for n, *rest in cases]:
            for act in (False, True):
                norm = FusedGroupNorm(8, shape[1], act=act)
                with torch.no_grad():
                    norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
                norm.requires_grad_(False)
                x = (torch.randn(shape) * 3 + offset).to(dtype)
                x = channels_last(x) if name.endswith("-nhwc") else x
                norm.to(dtype)
                with torch.no_grad():
                    y = norm(x)
                    assert launches.pop() == ("nhwc" if name.endswith("-nhwc") else "nchw") and not launches, name
                    assert y.stride() == x.stride(), name
                    eager = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
                    eager = F.silu(eager) if act else eager
                ref = reference(x, norm, act)
                assert norms._failed is None, norms._failed
                # largest error against float64 of the fused route and of eager PyTorch in the same
                # dtype, and how far the fused route strays beyond one unit in the last place
                err = (y.double() - ref).abs()
                beyond_ulp = float((err - torch.finfo(dtype).eps * ref.abs()).max())
                out[f"{name}-act{int(act)}"] = [float(err.max()), float((eager.double() - ref).abs().max()), beyond_ulp, str(y.dtype)]

        # the shared-statistics path of the tiled VAE: given statistics, a batch of tiles
        norm = FusedGroupNorm(8, 64, act=True)
        with torch.no_grad():
            norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
        plain = torch.nn.GroupNorm(8, 64)
        plain.load_state_dict(norm.state_dict())
        x = torch.randn(3, 64, 11, 19)
        mean, var = torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5
        for layout, x in (("nchw", x), ("nhwc", channels_last(x))):
            with torch.no_grad():
                out[f"tiled-{layout}"] = float((normalize(x, mean, var, norm, True) - normalize(x, mean, var, plain, True)).abs().max())
            assert launches == [layout], launches
            launches.clear()


    def unet():
        # the tiny UNet (norms on 32-128 channels, the transformers' without SiLU), contiguous
        from icmsr_cli.model.unet import UNet2DConditionModel
        plain = UNet2DConditionModel.from_config(few_groups(sys.argv[2])).eval()
        fused = copy.deepcopy(plain)
        fuse_group_norms(fused)
        z, c, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32), torch.tensor([999])
        out["unet-nchw"] = float((fused(z, t, c) - plain(z, t, c)).abs().max())
        assert set(launches) == {"nchw"} and len(launches) >= 20, launches


    def decode():
        # the tiny VAE's decoder (all its norm kinds: resnets', the attention's on (B, C, H*W), the
        # last), both ways
        from icmsr_cli.model.vae import AutoencoderKL
        vae = AutoencoderKL.from_config(few_groups(sys.argv[1])).eval()
        fused = copy.deepcopy(vae)
        fuse_group_norms(fused)
        z = torch.randn(1, 4, 4, 3)
        want = vae.decode(z)
        out["decode-nchw"] = float((fused.decode(z) - want).abs().max())
        assert set(launches) == {"nchw"}, launches
        launches.clear()
        fused.to(memory_format=torch.channels_last)  # as load_pipeline lays it out where channels-last is chosen
        out["decode-nhwc"] = float((fused.decode(channels_last(z)) - want).abs().max())
        assert set(launches) == {"nhwc"}, launches


    if part != "norms":
        norms._CHUNK, norms._SPLIT_BLOCK = 16384, 1024  # one chunk per row: the interpreter pays per program
    with torch.no_grad():
        {"norms": single_norms, "unet": unet, "decode": decode}[part]()
    assert norms._failed is None, norms._failed
    print(json.dumps(out))
    """
)


def test_triton_kernels_equal_eager_groupnorm(tiny_base):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE.parent)}
    # the interpreter pays per program (~10 ms), minutes in all: three processes share the cores
    procs = [subprocess.Popen([sys.executable, "-c", _INTERPRETED, str(tiny_base / "vae"), str(tiny_base / "unet"), part],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for part in ("norms", "unet", "decode")]
    out = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    assert len([k for k in out if "-act" in k]) == 20, sorted(out)
    for key in [k for k in out if "-act" in k]:
        fused, eager, beyond_ulp, dtype = out[key]
        assert dtype == {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(key.split("-")[0], "torch.float32"), key
        if dtype == "torch.float32":  # no further from float64 than PyTorch's own GroupNorm
            assert fused <= 2 * eager + 1e-6, (key, fused, eager)
        else:  # within one unit in the last place: the interpreter truncates float32 -> bf16, CUDA rounds to nearest
            assert beyond_ulp <= 1e-6, (key, fused, eager, beyond_ulp)
    assert out["tiled-nchw"] < 1e-5 and out["tiled-nhwc"] < 1e-5, out
    assert out["decode-nchw"] < 1e-4 and out["decode-nhwc"] < 1e-4 and out["unet-nchw"] < 1e-4, out


def test_load_pipeline_fuses_the_vae_and_unet_where_the_kernels_run(tiny_base, tiny_lora, monkeypatch):
    """Where the kernels are available the loaded VAE and UNet hold FusedGroupNorms (and nowhere
    else), and a whole upscale through them, here on their eager fallback, gives the unfused
    pipeline's numbers."""
    from icmsr_cli.model import loading
    from icmsr_cli.model.norms import FusedGroupNorm

    cpu = torch.device("cpu")
    plain = loading.load_pipeline(tiny_base, tiny_lora, device=cpu, dtype=torch.float32)
    assert not any(isinstance(m, FusedGroupNorm) for m in plain.vae.modules())
    monkeypatch.setattr(loading, "fused_available", lambda device: True)
    fused = loading.load_pipeline(tiny_base, tiny_lora, device=cpu, dtype=torch.float32)
    assert any(isinstance(m, FusedGroupNorm) for m in fused.vae.modules())
    assert not any(type(m) is torch.nn.GroupNorm for part in (fused.vae, fused.unet) for m in part.modules())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fused(x, "adain", None), plain(x, "adain", None))


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_ampere_and_hopper(capability, tmp_path, monkeypatch):
    """The interpreter runs what CUDA may refuse to compile; Triton compiles for a GPU without one
    (down to a cubin, through its bundled ptxas), so every variant the pipeline can launch is built
    here for sm_80 and sm_90."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from icmsr_cli.model import norms

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; fused multiply-adds, as on the GPU by default
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(norms, "_kernels", None)  # built afresh, compiled rather than interpreted
    k = norms._build()
    target = GPUTarget("cuda", capability, 32)
    ints = dict.fromkeys(("splits", "chunk", "row_len", "groups", "per_group"), "i32")
    for dt in ("bf16", "fp16", "fp32"):
        jobs = [(k.moments, {"x_ptr": f"*{dt}", "sum_ptr": "*fp32", "m2_ptr": "*fp32", "row_len": "i32", "chunk": "i32", "BLOCK": "constexpr"},
                 {"BLOCK": norms._BLOCK})]
        jobs += [(k.normalize, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "hw": "i32",
                                "ACT": "constexpr", "BLOCK": "constexpr"}, {"ACT": act, "BLOCK": norms._BLOCK}) for act in (False, True)]
        jobs += [(k.finalize, {"sum_ptr": "*fp32", "m2_ptr": "*fp32", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "scale_ptr": "*fp32",
                               "shift_ptr": "*fp32", **ints, "eps": "fp32", "AFFINE": "constexpr", "BLOCK": "constexpr", "CHANNELS": "constexpr"},
                  {"AFFINE": affine, "BLOCK": norms._SPLIT_BLOCK, "CHANNELS": 16}) for affine in (False, True)]
        jobs += [(k.moments_nhwc, {"x_ptr": f"*{dt}", "sum_ptr": "*fp32", "m2_ptr": "*fp32", "pixels": "i32", "chunk": "i32", "splits": "i32",
                                   "CHANNELS": "constexpr", "GROUPS": "constexpr", "PIXELS": "constexpr"},
                  {"CHANNELS": c, "GROUPS": 32, "PIXELS": max(norms._BLOCK // c, 1)}) for c in (128, 512)]  # the VAE's widest and narrowest
        jobs += [(k.normalize_nhwc, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "size": "i64",
                                     "channels": "i32", "ACT": "constexpr", "BLOCK": "constexpr"}, {"ACT": True, "BLOCK": norms._BLOCK})]
        for fn, signature, constants in jobs:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target)
            assert compiled.asm.get("cubin"), (fn, dt)


def test_a_failing_kernel_falls_back_to_eager_once_but_out_of_memory_propagates(monkeypatch, caplog):
    """If Triton cannot compile or launch here the norm gives eager's numbers, with one warning, and
    the kernels are not tried again; out of memory is no kernel failure: it reaches the tile-halving retry."""
    from icmsr_cli.model import norms

    monkeypatch.setattr(norms, "_failed", None)
    monkeypatch.setattr(norms, "fused_available", lambda device: norms._failed is None)
    calls = []

    def broken(x, norm, act):
        calls.append(1)
        raise RuntimeError("PTX .version 9.0 does not support .target sm_120")

    monkeypatch.setattr(norms, "_group_norm", broken)
    norm = norms.FusedGroupNorm(4, 16, act=True)
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        want = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
        assert torch.equal(norm(x), want) and torch.equal(norm(x), want)
    assert len(calls) == 1 and norms._failed is not None
    assert sum("fused GroupNorm kernels failed" in r.getMessage() for r in caplog.records) == 1

    monkeypatch.setattr(norms, "_failed", None)

    def out_of_memory(x, norm, act):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(norms, "_group_norm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
        norm(x)
    assert norms._failed is None
