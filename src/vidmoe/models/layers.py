"""Building blocks of the expert transformer: norms, modulation, timestep embedding, 3D RoPE;
attention and its backends live in models/attention.py (re-exported here).

Shape legend: B batch, L video tokens, S text tokens, D width, N heads, Dh head width,
F/H/W latent grid after patchify.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidmoe.models.attention import attention, band_mask, window_mask  # noqa: F401 (re-exported)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except bfloat16 on a CPU without bf16 instructions: there the same bf16 values
    are multiplied by float32 GEMM and the result rounded once to bf16, which is what a bf16 GEMM
    computes (exact products, float32 accumulation, one rounding) in another summation order, and
    2.6x faster than torch 2.13's bf16 kernel on an AVX-512 Xeon without AVX512-BF16 (measured:
    docs/performance.md; 5e-5 of the outputs differ from that kernel's, by one bf16 ulp).

    Args:
        x: (..., I); weight: (O, I); bias: (O,) or None.
    Returns:
        (..., O) in x's dtype.
    """
    if (
        x.dtype is torch.bfloat16
        and weight.dtype is torch.bfloat16
        and x.device.type == "cpu"
        and not cpu_has_bf16_matmul()
    ):
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(torch.bfloat16)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict) run by `linear` (fast bf16 on any CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Conv3d whose stride equals its kernel (a patch embedding), as one matmul over flattened
    patches: the same map as `F.conv3d(x, weight, bias, stride=kernel)`, but exact in bf16, where
    the CPU convolution kernels of torch 2.13 with a stride of 4 or more are not (measured:
    relative error 1.2 against fp32, so a bf16 or autocast run of a (1, 4, 4)-patch expert gave
    noise).

    Args:
        x: (B, C, F, H, W); F, H, W divisible by the kernel (p, q, r).
        weight: (O, C, p, q, r); bias: (O,) or None.
    Returns:
        (B, O, F/p, H/q, W/r).
    """
    (p, q, r), (f, h, w) = weight.shape[2:], x.shape[2:]
    if f % p or h % q or w % r:
        raise ValueError(
            f"latent grid {(f, h, w)} (frames, height, width) is not divisible by the patch "
            f"size {(p, q, r)}; choose a frame count and size that are"
        )
    patches = rearrange(x, "b c (f p) (h q) (w r) -> b f h w (c p q r)", p=p, q=q, r=r)
    out = linear(patches, weight.flatten(1), bias)  # (B, f, h, w, O)
    return rearrange(out, "b f h w o -> b o f h w")


class PatchEmbedding(nn.Conv3d):
    """The transformer's patch embedding: an `nn.Conv3d` (same parameters and state_dict, and
    LoRA adapters still attach to it) whose stride is its kernel, run by `patch_conv` (its
    `_conv_forward`, which LoRA's deltas call too)."""

    def _conv_forward(self, x, weight, bias):
        return patch_conv(x, weight, bias)


class RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled by a learned weight (q/k norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in one fused kernel (bit-identical to those five ops on
        # the CPU, checked by tests/models/test_layers.py)
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # parity: normalise in fp32, cast back, then scale (the release's order)
        return xf.type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


@dataclass(frozen=True)
class Modulation:
    """Shift, scale and gate of one adaptive-norm site, each (B, L, D) in float32."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, 1 + self.scale)  # x * (1 + scale) + shift, one pass

    def gated(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gated residual x + y * gate, in one pass."""
        return torch.addcmul(x, y, self.gate)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of timesteps, computed in float64.

    Args:
        timestep: (...) timesteps on the 0..1000 scale.
        dim: embedding width (even).
    Returns:
        (..., dim) float32 embedding.
    """
    half = dim // 2
    t = timestep.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()  # (..., dim)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary widths (in rotated pairs) of the frame, height and width axes."""
    pairs = head_dim // 2
    # parity: the release gives height and width pairs//3 each and the rest to frames
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def rope_angles(
    grid: tuple[int, int, int],
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles of 3D RoPE for an (F, H, W) token grid.

    Returns:
        (L, Dh/2) float64 angles, token order f-major then h then w.
    """
    axes = []
    for size, pairs in zip(grid, rope_split(head_dim)):
        inv = 1.0 / theta ** (
            torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device) / (2 * pairs)
        )
        axes.append(torch.outer(torch.arange(size, dtype=torch.float64, device=device), inv))
    f, h, w = grid
    af = axes[0][:, None, None, :].expand(f, h, w, -1)
    ah = axes[1][None, :, None, :].expand(f, h, w, -1)
    aw = axes[2][None, None, :, :].expand(f, h, w, -1)
    return rearrange(torch.cat([af, ah, aw], dim=-1), "f h w p -> (f h w) p")  # (L, Dh/2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x by the given angles (one complex product).

    Args:
        x: (B, L, N, Dh).
        freqs: (L, Dh/2) complex64 rotations, cos + i sin of the angles.
    Returns:
        (B, L, N, Dh) float32.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, N, Dh/2)
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)  # (B, L, N, Dh)
