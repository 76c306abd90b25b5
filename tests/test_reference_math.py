"""`icmsr upscale` against an independent computation of the published OSEDiff/ICM-SR graph:
peft adapters on a second copy of the same weights (unmerged), the scheduler from its formulas,
Pillow bicubic, numpy padding, and the colour fixes written out as StableSR writes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from conftest import photo_like
from icmsr_cli.cli import app
from sd21_factory import add_osediff_adapters


def _calc_mean_std(feat, eps=1e-5):
    b, c = feat.shape[:2]
    var = feat.reshape(b, c, -1).var(dim=2) + eps
    return feat.reshape(b, c, -1).mean(dim=2).view(b, c, 1, 1), var.sqrt().view(b, c, 1, 1)


def ref_adain(content, style):
    s_mean, s_std = _calc_mean_std(style)
    c_mean, c_std = _calc_mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


def _wavelet_blur(image, radius):
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]]).repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, kernel, groups=3, dilation=radius)


def _wavelet_decomposition(image, levels=5):
    high = torch.zeros_like(image)
    for i in range(levels):
        low = _wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def ref_wavelet(content, style):
    return _wavelet_decomposition(content)[0] + _wavelet_decomposition(style)[1]


class Reference:
    """The published graph, computed with peft adapters left unmerged."""

    def __init__(self, base, ckpt):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(base / "vae").eval()
        add_osediff_adapters(self.unet, self.vae, ckpt)
        tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
        ids = tok("", max_length=tok.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            self.c = CLIPTextModel.from_pretrained(base / "text_encoder")(ids)[0]
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        self.a = float(np.cumprod(1.0 - betas)[999])

    @torch.no_grad()
    def __call__(self, lr: np.ndarray, scale: float, color_fix: str) -> np.ndarray:
        h, w = lr.shape[:2]
        out_w, out_h = round(w * scale), round(h * scale)
        run_w, run_h = out_w, out_h
        if min(out_w, out_h) < 512:  # run with the short side at 512, then resize down
            f = 512 / min(out_w, out_h)
            run_w, run_h = (512, max(512, round(out_h * f))) if out_w <= out_h else (max(512, round(out_w * f)), 512)
        x_img = Image.fromarray(lr).resize((run_w, run_h), Image.BICUBIC)
        x_np = np.asarray(x_img, dtype=np.float32) / 255.0
        x_pad = np.pad(x_np, ((0, -run_h % 8), (0, -run_w % 8), (0, 0)), mode="reflect")
        x = torch.from_numpy(x_pad).permute(2, 0, 1)[None]
        z = self.vae.encode(x * 2 - 1).latent_dist.mode() * 0.18215
        eps = self.unet(z, torch.tensor([999]), encoder_hidden_states=self.c).sample
        x0 = (z - (1 - self.a) ** 0.5 * eps) / self.a**0.5
        y = self.vae.decode(x0 / 0.18215).sample.clamp(-1, 1) * 0.5 + 0.5
        y = {"adain": ref_adain, "wavelet": ref_wavelet, "none": lambda c, s: c}[color_fix](y, x)
        y = y.clamp(0, 1)[0, :, :run_h, :run_w].permute(1, 2, 0).numpy()
        if (run_w, run_h) != (out_w, out_h):
            y = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(y[..., c], dtype=np.float32)).resize((out_w, out_h), Image.BICUBIC)) for c in range(3)], 2)
        return np.clip(y, 0, 1) * 255


@pytest.fixture(scope="module")
def reference(tiny_base, tiny_ckpt):
    return Reference(tiny_base, tiny_ckpt)


def _cli_upscale(tmp_path, lr, base, lora, *args):
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(lr).save(src)
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(dst), "--base", str(base), "--lora", str(lora), "--tile", "off", *args])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(dst), dtype=np.float64)


# scale 4 from 131x97 exercises the 512-px minimum (runs at 691x512, padded to 696x512);
# scale 1 from 517x515 runs at the output size, padded to 520x520.
CASES = [(4.0, (131, 97)), (1.0, (517, 515))]


@pytest.mark.parametrize("color_fix", ["adain", "wavelet", "none"])
@pytest.mark.parametrize("scale,size", CASES)
def test_cli_matches_published_graph(tmp_path, tiny_base, tiny_lora, reference, scale, size, color_fix):
    lr = photo_like(*size, seed=3)
    ours = _cli_upscale(tmp_path, lr, tiny_base, tiny_lora, "--scale", str(scale), "--color-fix", color_fix)
    ref = reference(lr, scale, color_fix)
    assert ours.shape == (round(size[1] * scale), round(size[0] * scale), 3)
    diff = np.abs(ours - ref)
    assert diff.mean() <= 1.0, f"mean difference {diff.mean():.3f} levels"
    assert np.percentile(diff, 99.9) <= 3.0, f"99.9th percentile {np.percentile(diff, 99.9):.2f} levels"
    assert ref.std() > 10, "the reference output is flat: the comparison would prove nothing"


def test_lora_and_conv_in_matter(tiny_base, tiny_ckpt, reference):
    """Dropping the adapters visibly changes the output, so the agreement above is not vacuous."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    plain = Reference.__new__(Reference)
    plain.__dict__.update(reference.__dict__)
    plain.unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
    plain.vae = AutoencoderKL.from_pretrained(tiny_base / "vae").eval()
    lr = photo_like(131, 97, seed=3)
    diff = np.abs(plain(lr, 4.0, "none") - reference(lr, 4.0, "none"))
    assert diff.mean() > 3.0, f"LoRA changes the output by only {diff.mean():.3f} levels"


def test_each_stage_matches_published_graph(tiny_base, tiny_lora, reference):
    """Stage by stage at float32 precision: catches constants the clamped 8-bit output hides
    (a random decoder is nearly scale-invariant, so a 1% latent-scale error barely shows at the end)."""
    from icmsr_cli.model.loading import load_pipeline

    pipe = load_pipeline(tiny_base, tiny_lora, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.from_numpy(photo_like(96, 64, seed=5).astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        z_ref = reference.vae.encode(x * 2 - 1).latent_dist.mode() * 0.18215
        eps = reference.unet(z_ref, torch.tensor([999]), encoder_hidden_states=reference.c).sample
        x0_ref = (z_ref - (1 - reference.a) ** 0.5 * eps) / reference.a**0.5
        y_ref = reference.vae.decode(x0_ref / 0.18215).sample.clamp(-1, 1) * 0.5 + 0.5
    z = pipe.encode(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
    x0 = pipe.denoise(z_ref)
    torch.testing.assert_close(x0, x0_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(pipe.decode(x0_ref), y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pipe.prompt_embeds, reference.c, rtol=1e-5, atol=1e-6)
