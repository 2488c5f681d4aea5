"""The causal 3D VAE of Wan2.1 (Z=16, stride 4x8x8) and Wan2.2 (Z=48, 4x16x16): one code path.

`WanVAE.encode` maps a clip in [-1, 1] to the normalised posterior mean; `WanVAE.decode` maps
latents back to a clip. Both stream the clip chunk by chunk through an explicit `CausalCache`
(the release's schedule: the first frame, then 4 frames per chunk; one latent per chunk), so
memory does not grow with the clip's length. Parameter names equal the released checkpoints'.

Shape letters: B batch, C channels, T pixel frames, F latent frames, H height, W width,
Z latent channels, P the 2.2 pixel patch (1 for 2.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from vidmoe.config import VAEConfig
from vidmoe.models.vae_blocks import (
    AttentionBlock,
    CausalCache,
    CausalConv3d,
    DownLevel,
    FirstFrameHead,
    Resample,
    ResidualBlock,
    RMSNorm,
    UpLevel,
    run_layers,
)

__all__ = ["FIRST_FRAME_HEAD", "CausalCache", "Decoder3d", "Encoder3d", "WanVAE"]

FIRST_FRAME_HEAD = "first_frame_head."
"""The name prefix of the first-frame head's tensors (`WanVAE.first_frame_head`), vidmoe's own."""


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _flag(flags: Sequence[bool], i: int) -> bool:
    return flags[i] if i < len(flags) else False


class Encoder3d(nn.Module):
    """Pixels (2.2: 2x2 pixel patches) to 2Z channels: conv, downsampling levels, middle, head."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c = config
        dims = [c.dim * m for m in (1, *c.dim_mult)]
        self.conv1 = CausalConv3d(3 * c.patch_size**2, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None
            if i != len(c.dim_mult) - 1:
                mode = "downsample3d" if _flag(c.temperal_downsample, i) else "downsample2d"
            if c.generation == "2.2":  # one module per level, with an averaging shortcut
                layers.append(DownLevel(in_dim, out_dim, c.num_res_blocks, mode))
                continue
            for j in range(c.num_res_blocks):  # 2.1: the level's blocks flat in `downsamples`
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(out_dim))
            if mode is not None:
                layers.append(Resample(out_dim, mode))
                scale /= 2
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1])
        self.head = _head(dims[-1], 2 * c.z_dim)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x = self.conv1(x, cache)  # (B, dim, T, H/P, W/P)
        x = run_layers(self.downsamples, x, cache)  # (B, C, F, h, w)
        x = run_layers(self.middle, x, cache)  # (B, C, F, h, w)
        return run_layers(self.head, x, cache)  # (B, 2Z, F, h, w)


class Decoder3d(nn.Module):
    """Z channels to pixels (2.2: 2x2 pixel patches): conv, middle, upsampling levels, head."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c = config
        dec_dim = c.dec_dim if c.dec_dim is not None else c.dim
        dims = [dec_dim * m for m in (c.dim_mult[-1], *reversed(c.dim_mult))]
        temperal_upsample = c.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(c.dim_mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None
            if i != len(c.dim_mult) - 1:
                mode = "upsample3d" if _flag(temperal_upsample, i) else "upsample2d"
            if c.generation == "2.2":  # one module per level, with a duplicating shortcut
                layers.append(UpLevel(in_dim, out_dim, c.num_res_blocks + 1, mode))
                continue
            if i > 0:
                in_dim //= 2  # parity: the 2.1 upsampling conv halves the width
            for j in range(c.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
                if scale in c.attn_scales:
                    layers.append(AttentionBlock(out_dim))
            if mode is not None:
                layers.append(Resample(out_dim, mode, out_dim=out_dim // 2))
                scale *= 2
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3 * c.patch_size**2)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        x = self.conv1(x, cache)  # (B, C, F, h, w)
        x = run_layers(self.middle, x, cache)  # (B, C, F, h, w)
        x = run_layers(self.upsamples, x, cache)  # (B, C', T, H/P, W/P)
        return run_layers(self.head, x, cache)  # (B, 3*P*P, T, H/P, W/P)


class WanVAE(nn.Module):
    """Causal 3D VAE of either generation: encoder, posterior `conv1`, latent `conv2`, decoder."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.generation == "2.2" and config.attn_scales:
            raise ValueError(
                f"attn_scales must be empty for the 2.2 VAE (its levels have no attention); "
                f"got {list(config.attn_scales)}"
            )
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # -> posterior (mean, log-variance)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)
        self.first_frame_head = (
            FirstFrameHead(
                z,
                config.first_frame_head,
                3,
                config.first_frame_head_frames,
                smooth=config.spatial_stride,
                edge=config.first_frame_head_edge,
            )
            if config.first_frame_head
            else None
        )

    @classmethod
    def from_config(cls, config: VAEConfig) -> WanVAE:
        return cls(config)

    def encode(
        self,
        video: Tensor,
        *,
        scale: tuple[Tensor, Tensor] | None = None,
        cache: CausalCache | None = None,
        chunked: bool = True,
    ) -> Tensor:
        """Encode a clip to its normalised posterior mean.

        Args:
            video: (B, 3, T, H, W) in [-1, 1]; T = 4k+1 and H, W divisible by the spatial
                stride (8 for 2.1, 16 for 2.2). With a `cache` that already holds a stream,
                `video` continues that clip and T must be a multiple of 4.
            scale: (mean, std), each (Z,), overriding the config's latents_mean / latents_std.
            cache: carry the stream across calls (encode a long clip piece by piece); None
                starts and ends a stream inside this call.
            chunked: True runs the release's schedule (first frame, then 4 frames at a time);
                False runs the clip in one pass (same result, memory grows with T).

        Returns:
            (B, Z, F, H/s, W/s), F = (T-1)/4 + 1 (T/4 for a continuing piece), equal to
            (mu - mean) / std, in the weights' dtype.
        """
        cache = CausalCache() if cache is None else cache
        cache.claim("encode")
        self._check_video(video, cache.is_first_chunk)
        p, stride = self.config.patch_size, self.config.temporal_stride
        x = video.to(self.conv1.weight.dtype)
        # parity: the 2.2 patch channels are ordered (c, w offset, h offset)
        x = rearrange(x, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=p, pw=p)  # (B, 3PP, T, ..)
        pieces = [x]
        if chunked:
            first = [x[:, :, :1]] if cache.is_first_chunk else []
            rest = x[:, :, len(first) :]
            pieces = first + (list(rest.split(stride, dim=2)) if rest.shape[2] else [])
        mu = torch.cat([self._encode_piece(piece, cache) for piece in pieces], dim=2)
        mean, std = self._scale(scale, mu)
        return (mu - mean) / std  # (B, Z, F, h, w)

    def decode(
        self,
        latent: Tensor,
        *,
        scale: tuple[Tensor, Tensor] | None = None,
        cache: CausalCache | None = None,
        chunked: bool = True,
        progress: bool = False,
        clamp: bool = True,
        callback: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Decode normalised latents to a clip clamped to [-1, 1].

        A VAE with a first-frame head (`VAEConfig.first_frame_head`) redraws the first frame of a
        decode that starts a clip from latent frames 0 and 1 (`redraw_first_frame`): a stream's
        first piece should hold two latents for the stream to equal the whole clip's decode.

        Args:
            latent: (B, Z, F, h, w), normalised as `encode` returns it.
            scale: (mean, std), each (Z,), overriding the config's latents_mean / latents_std.
            cache: carry the stream across calls (decode latents piece by piece); None starts
                and ends a stream inside this call.
            chunked: True decodes one latent frame at a time (the release's schedule); False
                decodes all F in one pass (same result, memory grows with F).
            progress: show a tqdm bar over the chunks.
            clamp: clamp to [-1, 1] (False returns the raw output, e.g. for a training loss).
            callback: called as callback(chunk_index, num_chunks) after each chunk; raising from
                it stops the decode (a server cancels a long decode this way).

        Returns:
            (B, 3, T, h*s, w*s) with T = 4(F-1) + 1 (4F for a continuing piece).
        """
        cache = CausalCache() if cache is None else cache
        cache.claim("decode")
        starts_clip = cache.is_first_chunk
        z_dim = self.config.z_dim
        if latent.ndim != 5 or latent.shape[1] != z_dim or latent.shape[2] == 0:
            raise ValueError(
                f"latent must be (B, {z_dim}, F>=1, h, w) for this VAE; got {tuple(latent.shape)}"
            )
        z = latent.to(self.conv2.weight.dtype)
        mean, std = self._scale(scale, z)
        z = z * std + mean  # (B, Z, F, h, w): back to the posterior's scale
        pieces = z.split(1, dim=2) if chunked else (z,)
        bar = tqdm(pieces, desc="VAE decode", unit="latent", disable=not progress)
        decoded = []
        for i, piece in enumerate(bar):
            decoded.append(self._decode_piece(piece, cache))
            if callback is not None:
                callback(i, len(pieces))
        x = torch.cat(decoded, dim=2)
        p = self.config.patch_size
        x = rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)  # (B, 3, T, H, W)
        if starts_clip:
            x = self.redraw_first_frame(x, z)
        return x.clamp(-1.0, 1.0) if clamp else x

    def redraw_first_frame(self, video: Tensor, z: Tensor) -> Tensor:
        """The first frames of a decoded clip (`first_frame_head_frames` of them) redrawn by the
        `first_frame_head` from latent frames 0 and 1 (latent 0 read twice when the clip has one
        latent); the clip as it is without a head.

        Args:
            video: (B, 3, T, H, W), decoded from `z`, starting at the clip's first frame.
            z: (B, Z, F, h, w) latents at the posterior's scale (as the decoder reads them).
        """
        head = self.first_frame_head
        if head is None:
            return video
        z1 = z[:, :, 1] if z.shape[2] > 1 else z[:, :, 0]
        n = min(head.frames, video.shape[2])
        first = video[:, :, :n]  # (B, 3, n, H, W)
        if n < head.frames:  # a clip shorter than the head's frames: its last frame repeated
            pad = first[:, :, -1:].expand(-1, -1, head.frames - n, -1, -1)
            first = torch.cat([first, pad], dim=2)
        first = head(first, z[:, :, 0], z1)[:, :, :n]  # (B, 3, n, H, W)
        return torch.cat([first, video[:, :, n:]], dim=2)

    def _encode_piece(self, x: Tensor, cache: CausalCache) -> Tensor:
        out = self.encoder(x, cache)  # (B, 2Z, f, h, w)
        cache.num_chunks += 1
        mu, _log_var = self.conv1(out).chunk(2, dim=1)  # (B, Z, f, h, w) each
        return mu

    def _decode_piece(self, z: Tensor, cache: CausalCache) -> Tensor:
        x = self.decoder(self.conv2(z), cache)  # (B, 3PP, t, H/P, W/P)
        cache.num_chunks += 1
        return x

    def _scale(self, scale: tuple[Tensor, Tensor] | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std), each shaped (Z, 1, 1, 1) on `like`'s device and dtype."""
        z = self.config.z_dim
        if scale is None:
            mean = self.config.latents_mean or (0.0,) * z
            std = self.config.latents_std or (1.0,) * z
        else:
            mean, std = scale
        out = []
        for name, value in (("mean", mean), ("std", std)):
            t = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
            if t.numel() != z:
                raise ValueError(
                    f"latent {name} must have {z} values (one per channel); got {t.numel()}"
                )
            out.append(t.view(z, 1, 1, 1))
        return out[0], out[1]

    def _check_video(self, video: Tensor, is_first_chunk: bool) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W) in [-1, 1]; got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        s = self.config.temporal_stride
        if is_first_chunk and (t - 1) % s:
            low, high = t - (t - 1) % s, t - (t - 1) % s + s
            fix = f"use {low} or {high}" if low >= 1 else f"use {high}"
            raise ValueError(
                f"num_frames must be {s}k+1 (the VAE's temporal stride is {s}); got {t}: {fix}"
            )
        if not is_first_chunk and (t == 0 or t % s):
            low, high = t - t % s, t - t % s + s
            fix = f"use {low} or {high}" if low >= s else f"use {high}"
            raise ValueError(
                f"a piece that continues a clip must have a multiple of {s} frames (the VAE's "
                f"temporal stride); got {t}: {fix}"
            )
        ss = self.config.spatial_stride
        for name, size in (("height", h), ("width", w)):
            if size % ss:
                low, high = size - size % ss, size - size % ss + ss
                fix = f"use {low} or {high}" if low else f"use {high}"
                raise ValueError(
                    f"{name} must be divisible by {ss} (the VAE's spatial stride); got {size}: {fix}"
                )
