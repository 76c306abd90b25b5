"""The VAE's mid-block attention: one head of 512 channels over every latent pixel.

Why a route of our own: PyTorch's fast attention kernels (flash, cuDNN) take heads of at most 256
channels, so SDPA falls to its memory-efficient kernel, which spent 163 ms on one 2048^2 output on
an H100 (65k tokens, 8.8 TFLOP: about 54 TFLOP/s; issue 10's profile). Queries are independent
rows of the softmax, so attention can run a block of queries at a time through cuBLAS with no
approximation: scores as float32 products of the 16-bit inputs (exact products, float32 sums, as
the fused kernels keep them), a float32 softmax, the probabilities rounded to the input's dtype for
the product with V (as flash and memory-efficient attention round them). A block of `QUERY_BLOCK`
queries holds three score matrices of that many rows, so the memory stays linear in the pixels.

Used for 16-bit inputs on CUDA with heads wider than SDPA's fast kernels take; everywhere else
SDPA, as diffusers runs it. The VAE's attention (vae.py) and the tiled VAE both call `attend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .devices import layout_of

#: queries per block of the chunked route
QUERY_BLOCK = 1024
#: the widest head SDPA's flash and cuDNN kernels take
_FAST_SDPA_HEAD = 256

_out_dtype_ok: dict[str, bool] = {}  # per device type: whether baddbmm takes out_dtype (torch >= 2.8 on CUDA)


def attend(attn, x: torch.Tensor) -> torch.Tensor:
    """The VAE's attention (vae.Attention) on x (B, C, H, W) without its group norm and residual: the q/k/v
    projections, attention, the output projection; the result in x's memory layout."""
    b, c, h, w = x.shape
    layout = layout_of(x)
    x = x.view(b, c, h * w).transpose(1, 2)
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = dot_product_attention(q, k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    # (B, H*W, C) read as (B, C, H, W) is channels-last. Left so, it would carry the rest of a
    # contiguous decoder channels-last through the residual adds (on CUDA, cuDNN follows the
    # input's layout), against contiguous weights, and the layout chosen for the device
    # (devices.memory_format_for) would hold only up to the mid-block.
    return out.transpose(-1, -2).reshape(b, c, h, w).contiguous(memory_format=layout)


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, N, D): in query blocks where SDPA has no fast
    kernel for the head width (see the module's note), else SDPA."""
    if _chunked_pays(q):
        return chunked_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _chunked_pays(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] > _FAST_SDPA_HEAD and _has_out_dtype(q)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block: int | None = None) -> torch.Tensor:
    """Exact attention one block of queries at a time: float32 scores and softmax, probabilities
    in v's dtype for the product with v. Shapes (B, heads, N, D); returns q's shape in v's dtype."""
    b, heads, n = q.shape[:3]
    block = block or QUERY_BLOCK
    q3, k3, v3 = (t.reshape(b * heads, -1, t.shape[-1]) for t in (q, k, v))
    kt = k3.transpose(1, 2)
    out = torch.empty(b * heads, n, v.shape[-1], dtype=v.dtype, device=v.device)
    for start in range(0, n, block):
        scores = _scores(q3[:, start : start + block], kt, scale)
        probs = torch.softmax(scores, dim=-1)
        del scores
        torch.bmm(probs.to(v.dtype), v3, out=out[:, start : start + block])
        del probs
    return out.view(b, heads, n, -1)


def _scores(q: torch.Tensor, kt: torch.Tensor, scale: float) -> torch.Tensor:
    """q kt * scale in float32; the products of 16-bit inputs are exact in float32 either way."""
    empty = torch.empty(q.shape[0], q.shape[1], kt.shape[2], dtype=torch.float32, device=q.device)
    if q.dtype != torch.float32 and q.is_cuda:
        return torch.baddbmm(empty, q, kt, out_dtype=torch.float32, beta=0, alpha=scale)  # tensor cores, float32 sums
    return torch.baddbmm(empty, q.float(), kt.float(), beta=0, alpha=scale)


def _has_out_dtype(q: torch.Tensor) -> bool:
    kind = q.device.type
    if kind not in _out_dtype_ok:
        try:
            a = torch.zeros(1, 1, 8, dtype=q.dtype, device=q.device)
            torch.baddbmm(torch.empty(1, 1, 1, device=q.device), a, a.transpose(1, 2), out_dtype=torch.float32, beta=0, alpha=0.5)
            _out_dtype_ok[kind] = True
        except (TypeError, RuntimeError):
            _out_dtype_ok[kind] = False
    return _out_dtype_ok[kind]
