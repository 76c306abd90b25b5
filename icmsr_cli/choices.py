"""The words and limits users pass on the command line, in one torch-free place, so `--help`,
`--version` and `weights list` answer without importing the model stack."""

from __future__ import annotations

COLOR_FIXES = ("adain", "wavelet", "none")
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
#: output formats for --format, with the suffix they give file names (the input suffixes' spellings all count)
FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpeg", "webp": ".webp", "tiff": ".tiff", "tif": ".tif", "bmp": ".bmp"}
#: the smallest latent tile --tile takes (8N image pixels a side): a VAE tile's overlap is an eighth of it
LEAST_TILE = 8
#: Pillow's own default decompression-bomb limit (~89.5 megapixels)
DEFAULT_MAX_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)
