"""Building blocks of the causal 3D VAE and the cache that streams them chunk by chunk.

Every layer that looks at past frames reads and writes its trailing frames in an explicit
`CausalCache`; layers keep no state between calls. A clip run as one chunk with a fresh cache and
the same clip run chunk by chunk give the same result (up to float rounding).

Shape letters: B batch, C channels, F frames, H height, W width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

__all__ = [
    "AttentionBlock",
    "CausalCache",
    "CausalConv3d",
    "DownLevel",
    "FirstFrameHead",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "UpLevel",
    "run_layers",
]


@dataclass
class CausalCache:
    """Trailing frames each causal layer keeps between the chunks of one encode or decode stream."""

    frames: dict[nn.Module, Tensor] = field(default_factory=dict, repr=False)
    """Per layer (keyed by the module itself): its last input frames, at most its history."""
    num_chunks: int = 0
    """Chunks already run through this cache."""
    stream: str | None = None
    """'encode' or 'decode': which stream the cache belongs to (set by its first chunk)."""

    @property
    def is_first_chunk(self) -> bool:
        return self.num_chunks == 0

    def claim(self, stream: str) -> None:
        """Mark the cache as `stream`'s; a cache cannot carry both an encode and a decode."""
        if self.stream not in (None, stream):
            raise ValueError(
                f"this CausalCache carries a {self.stream} stream; use a fresh CausalCache() "
                f"for {stream}"
            )
        self.stream = stream


class CausalConv3d(nn.Conv3d):
    """3D convolution padded in time on the past side only (zeros before the stream's start)."""

    uses_cache = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=0)
        pad_f, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        self.history = 2 * pad_f  # past frames each output frame looks at
        self.pad_hw = (pad_w, pad_w, pad_h, pad_h)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        past = self.history
        if past and cache is not None:
            prev = cache.frames.get(self)  # (B, C, <=history, H, W) or None
            if prev is not None:
                x = torch.cat([prev, x], dim=2)  # (B, C, f + F, H, W)
                past -= prev.shape[2]
            # clone: a view would keep the whole chunk alive until the next one
            cache.frames[self] = x[:, :, -self.history :].clone()
        x = F.pad(x, (*self.pad_hw, past, 0))  # zeros stand for frames before the stream
        return super().forward(x)  # (B, C', F', H', W')


class RMSNorm(nn.Module):
    """RMS norm over channels (axis 1) with a learned gain; `num_axes` axes follow the channels."""

    def __init__(self, dim: int, num_axes: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * num_axes))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def run_layers(layers: nn.Module, x: Tensor, cache: CausalCache | None) -> Tensor:
    """Run a Sequential, giving the cache to the layers that stream (`uses_cache`)."""
    for layer in layers:
        x = layer(x, cache) if getattr(layer, "uses_cache", False) else layer(x)
    return x


class ResidualBlock(nn.Module):
    """Norm, SiLU, causal conv, twice, plus a (1x1x1 conv when widths differ) shortcut."""

    uses_cache = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # parity: the release's (p=0) Dropout sits here; keeps names residual.6.*
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        return run_layers(self.residual, x, cache) + self.shortcut(x)  # (B, C', F, H, W)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (frames do not see each other)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, num_axes=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, _, _, h, w = x.shape
        y = rearrange(x, "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
        qkv = self.to_qkv(self.norm(y))  # (B*F, 3C, H, W)
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # (B*F, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*F, 1, HW, C)
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h, w=w))  # (B*F, C, H, W)
        return x + rearrange(y, "(b f) c h w -> b c f h w", b=b)  # (B, C, F, H, W)


class Resample(nn.Module):
    """Halve or double H and W (a 2D conv per frame), and with a `3d` mode also halve or double F."""

    uses_cache = True

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        out_dim = dim if out_dim is None else out_dim
        if mode.startswith("up"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, out_dim, 3, padding=1))
        else:
            # parity: pad right and bottom only, then a stride-2 conv without padding
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, 2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        cache = CausalCache() if cache is None else cache
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)  # (B, C, 2F - [first chunk], H, W)
        f = x.shape[2]
        x = rearrange(x, "b c f h w -> (b f) c h w")  # (B*F, C, H, W)
        x = self.resample(x)  # (B*F, C', H*2 or H/2, W*2 or W/2)
        x = rearrange(x, "(b f) c h w -> b c f h w", f=f)  # (B, C', F, H', W')
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)  # (B, C', (F+1)/2 first chunk, F/2 later, H', W')
        return x

    def _double_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        first = x[:, :, :0]
        if cache.is_first_chunk:
            # parity: the stream's first frame is not doubled (it decodes to one image frame);
            # the time conv starts at the second frame, with zeros as its past.
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            x = self.time_conv(x, cache)  # (B, 2C, F, H, W)
            x = rearrange(x, "b (two c) f h w -> b c (f two) h w", two=2)  # (B, C, 2F, H, W)
        return torch.cat([first, x], dim=2)

    def _halve_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        prev = cache.frames.get(self)  # (B, C, 1, H, W): the previous chunk's last frame
        cache.frames[self] = x[:, :, -1:].clone()
        if prev is None:
            # parity: the stream's first frame passes through without the time conv
            first, x = x[:, :, :1], x
        else:
            first, x = x[:, :, :0], torch.cat([prev, x], dim=2)  # (B, C, 1 + F, H, W)
        if x.shape[2] >= 3:
            x = self.time_conv(x)  # (B, C, (F - 1) / 2, H, W), windows (0,1,2), (2,3,4), ...
        else:
            x = x[:, :, :0]
        return torch.cat([first, x], dim=2)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of a 2.2 down level: fold (F, H, W) blocks into channels, average."""

    def __init__(self, in_dim: int, out_dim: int, factor_f: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_f, self.factor_s = out_dim, factor_f, factor_s

    def forward(self, x: Tensor) -> Tensor:
        ff, fs = self.factor_f, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ff, 0))  # parity: zero frames at the front
        x = rearrange(
            x, "b c (f ff) (h fh) (w fw) -> b (c ff fh fw) f h w", ff=ff, fh=fs, fw=fs
        )  # (B, C*ff*fs*fs, F/ff, H/fs, W/fs)
        return reduce(x, "b (o g) f h w -> b o f h w", "mean", o=self.out_dim)  # (B, C', ...)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a 2.2 up level: repeat channels, unfold into (F, H, W) blocks."""

    def __init__(self, in_dim: int, out_dim: int, factor_f: int, factor_s: int) -> None:
        super().__init__()
        self.factor_f, self.factor_s = factor_f, factor_s
        self.repeats = out_dim * factor_f * factor_s * factor_s // in_dim

    def forward(self, x: Tensor, is_first_chunk: bool) -> Tensor:
        ff, fs = self.factor_f, self.factor_s
        x = repeat(x, "b c f h w -> b (c r) f h w", r=self.repeats)  # (B, C*r, F, H, W)
        x = rearrange(
            x, "b (o ff fh fw) f h w -> b o (f ff) (h fh) (w fw)", ff=ff, fh=fs, fw=fs
        )  # (B, C', F*ff, H*fs, W*fs)
        # parity: like the main path, the stream's first frame is not multiplied in time
        return x[:, :, ff - 1 :] if is_first_chunk else x


def _level_blocks(in_dim: int, out_dim: int, num_blocks: int, mode: str | None) -> nn.Sequential:
    """Residual blocks (the first changes the width) then an optional resample."""
    blocks: list[nn.Module] = [ResidualBlock(in_dim, out_dim)]
    blocks += [ResidualBlock(out_dim, out_dim) for _ in range(num_blocks - 1)]
    if mode is not None:
        blocks.append(Resample(out_dim, mode))
    return nn.Sequential(*blocks)


class DownLevel(nn.Module):
    """One 2.2 encoder level: residual blocks and a resample, plus an averaging shortcut."""

    uses_cache = True

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, mode: str | None) -> None:
        super().__init__()
        self.downsamples = _level_blocks(in_dim, out_dim, num_blocks, mode)
        factor_f = 2 if mode == "downsample3d" else 1
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_f, 2 if mode else 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        return run_layers(self.downsamples, x, cache) + self.avg_shortcut(x)  # (B, C', ...)


class UpLevel(nn.Module):
    """One 2.2 decoder level: residual blocks and a resample, plus a duplicating shortcut."""

    uses_cache = True

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, mode: str | None) -> None:
        super().__init__()
        self.upsamples = _level_blocks(in_dim, out_dim, num_blocks, mode)
        factor_f = 2 if mode == "upsample3d" else 1
        self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_f, 2) if mode else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        y = run_layers(self.upsamples, x, cache)  # (B, C', F', H', W')
        if self.avg_shortcut is None:
            return y
        is_first = cache is None or cache.is_first_chunk
        return y + self.avg_shortcut(x, is_first)


def border_band(h: int, w: int, width: int, device: torch.device | None = None) -> Tensor:
    """(H, W) bool: the pixels within `width` of an H x W frame's border, all four sides."""
    band = torch.ones(h, w, dtype=torch.bool, device=device)
    band[width : h - width, width : w - width] = False
    return band


class FirstFrameHead(nn.Module):
    """Redraws a clip's first frames with the next latent frame in view (issue 23's flash).

    The causal encoder codes frame 0 alone, and a small VAE's first-frame path can lose what the
    later latents keep (the demo VAE gives a black and a dark-blue first frame nearly the same
    latent). Latent frame 1 covers frames 1-4, which share frame 0's background, so the
    information is still in the clip's latents: this head reads latent frames 0 and 1 and adds
    a correction to the first `frames` decoded frames, seen together (1: frame 0 alone; 5 also
    latent frame 1's four, which the causal decoder draws with zeros in its temporal padding and
    whose colour the demo VAE lets drift). Frame 0's correction is full resolution; the later
    frames' is smooth at the scale of the latent grid (`smooth`: averaged over blocks of that
    many pixels, then interpolated), so the head shifts their colour and leaves their detail
    as the decoder drew it, except in a band `edge` pixels wide along the frame's border, where
    it stays per pixel (the decoder's zero padding draws the outermost pixels worst). Its last
    convolution starts at zero (the head starts as the identity), and the frames after the
    first `frames` are never touched.
    """

    def __init__(
        self,
        z_dim: int,
        width: int,
        pixels: int,
        frames: int = 1,
        smooth: int = 1,
        edge: int = 0,
    ) -> None:
        super().__init__()
        self.frames, self.smooth, self.edge = frames, smooth, edge
        self.latent = nn.Sequential(
            nn.Conv2d(2 * z_dim, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
        )
        self.pixel = nn.Sequential(
            nn.Conv2d(frames * pixels + width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, frames * pixels, 3, padding=1),
        )
        nn.init.zeros_(self.pixel[-1].weight)
        nn.init.zeros_(self.pixel[-1].bias)

    def forward(self, video: Tensor, z0: Tensor, z1: Tensor) -> Tensor:
        """(B, C, `frames`, H, W) the first decoded frames, (B, Z, h, w) latent frames 0 and 1
        (the posterior's scale, as the decoder reads them) -> the same frames corrected."""
        b, c, n, h, w = video.shape
        if n != self.frames:
            raise ValueError(f"this head redraws {self.frames} frames together; got {n}")
        features = self.latent(torch.cat([z0, z1], dim=1).to(video.dtype))  # (B, width, h', w')
        features = F.interpolate(features, size=(h, w), mode="bilinear")
        flat = video.reshape(b, c * n, h, w)  # (B, C*n, H, W): channels grouped by channel
        delta = self.pixel(torch.cat([flat, features], dim=1)).reshape(b, c, n, h, w)
        if n > 1 and self.smooth > 1:  # frames 1+: a colour shift, smooth at the latent scale
            fine = delta[:, :, 1:].flatten(1, 2)  # (B, C*(n-1), H, W)
            later = F.interpolate(F.avg_pool2d(fine, self.smooth), size=(h, w), mode="bilinear")
            if self.edge:  # per pixel in a band along the border, where the padding acts
                band = border_band(h, w, self.edge, fine.device)
                later = torch.where(band, fine, later)
            delta = torch.cat([delta[:, :, :1], later.reshape(b, c, n - 1, h, w)], dim=2)
        return video + delta  # (B, C, n, H, W)
