"""Image conditioning of the three model types, as small functions of one pipeline.

- t2v: nothing.
- i2v (A14B): the first frame's VAE latent (later frames zero video) plus a 4-channel mask of
  the known frames, concatenated to the noisy latents on channels (`y`). Without an explicit
  width and height the frame size follows the image (`release_i2v_size`), as the release's.
- ti2v (5B): the first latent frame is replaced by the image latent after every step, and its
  tokens get sigma = 0 (per-token noise levels). Without an explicit width and height the frame
  size follows the image (`release_ti2v_size`), and the image is scaled to cover the frame and
  centre-cropped (`load_image_cropped`), as the release's.

Shape legend: C latent channels, F/H/W latent frames/height/width, T video frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass
class Conditioning:
    """What a pipeline adds to every expert call and to every solver step."""

    y: torch.Tensor | None = None
    """(1, 4 + C, F, H, W) extra input channels (i2v)."""
    first_latent: torch.Tensor | None = None
    """(1, C, 1, H, W) clean latent of the first frame, re-imposed each step (ti2v)."""

    def sigma_for(
        self, sigma: float, latent_grid: tuple[int, int, int], patch: tuple[int, int, int]
    ) -> torch.Tensor:
        """Sigma per sample (1,) or, with a known first frame, per token (1, L)."""
        if self.first_latent is None:
            return torch.tensor([sigma], dtype=torch.float64)
        f, h, w = (g // p for g, p in zip(latent_grid, patch))
        per_frame = torch.full((f, h * w), sigma, dtype=torch.float64)
        per_frame[0] = 0.0  # the known first frame is clean
        return rearrange(per_frame, "f hw -> 1 (f hw)")  # (1, L)

    def impose(self, latents: torch.Tensor) -> torch.Tensor:
        if self.first_latent is None:
            return latents
        return torch.cat([self.first_latent.to(latents), latents[:, :, 1:]], dim=2)


def image_header_size(path: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header only (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}; give a PNG, JPEG or WebP file") from e


def release_i2v_size(
    image_size: tuple[int, int], area: int, vae_stride: int, patch: int
) -> tuple[int, int]:
    """The release's i2v frame size (width, height) for an image of `image_size` = (w, h): the
    aspect ratio of the image at about `area` pixels, each side floored to `vae_stride * patch`.

    parity: wan/image2video.py (2.2.11) `generate`, its float flooring kept term by term (numpy
    sqrt, `//` on floats, round): an 832x480 image at 832*480 gives 832x464.
    """
    w, h = image_size
    aspect_ratio = h / w
    lat_h = round(np.sqrt(area * aspect_ratio) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(area / aspect_ratio) // vae_stride // patch * patch)
    return lat_w * vae_stride, lat_h * vae_stride


def release_ti2v_size(image_size: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """The release's ti2v frame size (width, height) for an image of `image_size` = (w, h): the
    two sizes of at most `area` pixels with sides multiples of `multiple` (VAE stride x patch)
    got by flooring the width first or the height first; the one whose aspect ratio is nearer
    the image's (the height-first one on a tie).

    parity: wan/utils/utils.py (2.2.11) `best_output_size`, term by term. Where the release
    would divide by zero (an image so narrow that a side floors to 0) a side of 0 is returned,
    which the caller refuses.
    """
    w, h = image_size
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // multiple * multiple)  # width first
    oh1 = int(area / ow1 // multiple * multiple) if ow1 else 0
    oh2 = int(oh // multiple * multiple)  # height first
    ow2 = int(area / oh2 // multiple * multiple) if oh2 else 0
    if 0 in (ow1, oh1):
        return ow1, oh1
    if 0 in (ow2, oh2):
        return ow2, oh2
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def _open_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e


def _to_tensor(image) -> torch.Tensor:
    """(3, h, w) float32 in [-1, 1] of an RGB PIL image."""
    # parity: torchvision's to_tensor (uint8 / 255) then .sub_(0.5).div_(0.5), in float32
    x = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1)  # (3, h, w)
    return x.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def load_image_cropped(path: str, width: int, height: int) -> torch.Tensor:
    """Read an image, scale it (Lanczos, in uint8) to cover width x height and centre-crop it:
    (1, 3, 1, H, W) in [-1, 1]. parity: wan/textimage2video.py (2.2.11) `i2v`."""
    from PIL import Image

    image = _open_rgb(path)
    iw, ih = image.size
    scale = max(width / iw, height / ih)
    image = image.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((x1, y1, x1 + width, y1 + height))
    return _to_tensor(image)[None, :, None]  # (1, 3, 1, H, W)


def load_image(path: str, width: int, height: int) -> torch.Tensor:
    """Read an image, resize it (bicubic, unclamped) to (height, width): (1, 3, 1, H, W), the
    pixels mapped to [-1, 1] (the resize may overshoot that range, as the release's does)."""
    x = _to_tensor(_open_rgb(path))  # (3, h, w)
    # parity: the release resizes with bicubic and no clamp (overshoot reaches 1.25 on noise)
    x = F.interpolate(x[None], size=(height, width), mode="bicubic")  # (1, 3, H, W)
    return x[:, :, None]  # (1, 3, 1, H, W)


def i2v_condition(vae, image: torch.Tensor, num_frames: int) -> Conditioning:
    """First-frame conditioning of the i2v experts: y = [mask (4 ch), latent of image + zeros]."""
    _, _, _, height, width = image.shape
    video = torch.cat([image, image.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    latent = vae.encode(video.to(vae_dtype(vae)))  # (1, C, F, H, W)
    f, h, w = latent.shape[2:]
    stride = vae.config.temporal_stride
    known = torch.zeros(1, 1 + (f - 1) * stride, h, w)  # one mask entry per video frame
    known[:, 0] = 1.0
    # parity: the first frame's mask is repeated `stride` times so frames group evenly into latents
    known = torch.cat([known[:, :1].repeat(1, stride, 1, 1), known[:, 1:]], dim=1)
    mask = rearrange(known, "one (f s) h w -> one s f h w", s=stride)  # (1, 4, F, H, W)
    return Conditioning(y=torch.cat([mask.to(latent), latent], dim=1))


def ti2v_condition(vae, image: torch.Tensor) -> Conditioning:
    """First-frame conditioning of ti2v: the clean first latent frame of `image`
    (`load_image_cropped`'s, already in [-1, 1]: the release does not clamp)."""
    return Conditioning(first_latent=vae.encode(image.to(vae_dtype(vae))))  # (1, C, 1, H, W)


def vae_dtype(vae) -> torch.dtype:
    return next(vae.parameters()).dtype
