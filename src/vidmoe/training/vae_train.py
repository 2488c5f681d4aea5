"""Train a small Wan-style VAE on shapes clips (the demo model's own VAE), then measure the
per-channel latent mean and std that normalise its latents for the diffusion model.

The loss is L1 + MSE reconstruction of a slightly noised posterior mean (the latents are\nnormalised afterwards, so their scale is free). Short
windows and spatial crops keep CPU steps cheap; the network is convolutional, so it encodes whole
17-frame 64x64 clips afterwards. Shape letters: B batch, Z latent channels, T frames, H, W.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.models.vae_blocks import CausalCache
from vidmoe.world.labels import MOTIONS, SHAPES, SIZES


@dataclass(frozen=True, kw_only=True)
class VAETrainConfig:
    """What `train_vae` trains and for how long."""

    vae: VAEConfig = VAEConfig(generation="2.1", dim=16, z_dim=16, num_res_blocks=1)
    """Architecture (latents_mean/std are measured after training)."""
    width: int = 64
    """Width of the rendered shapes clips."""
    height: int = 64
    """Height of the rendered shapes clips."""
    clip_frames: int = 17
    """Frames rendered per clip; training windows are cut from them."""
    window_frames: int = 9
    """Frames per training window (4k+1)."""
    crop: int = 32
    """Side of the square spatial crop (a multiple of 8), centred near the object; 0: whole frames."""
    grad_clip: float = 5.0
    """Max gradient norm (0: no clipping)."""
    batch_size: int = 8
    """Windows per step."""
    lr: float = 3e-4
    """AdamW learning rate (cosine-decayed to 10% over `max_steps`)."""
    latent_noise: float = 0.1
    """Noise added to the posterior mean during training, relative to its std."""
    object_weight: float = 20.0
    """Extra loss weight of pixels that differ from the clip's median (background) colour."""
    latent_weight: float = 1e-5
    """Weight of the mean squared latent (keeps the latent scale bounded)."""
    max_steps: int = 2000
    """Step limit."""
    max_minutes: float = 15.0
    """Wall-clock limit; training stops at whichever limit comes first."""
    seed: int = 0
    """Seed of the world and of the initialisation."""
    freeze_encoder: bool = False
    """Train the decoder only: the latent space (and so a latent cache built from it) stays valid."""
    num_stat_clips: int = 64
    """Whole clips encoded to measure the latent mean and std."""
    sizes: tuple[str, ...] = SIZES
    """Object sizes of the shapes world it trains on."""
    motions: tuple[str, ...] = MOTIONS
    """Motions of the shapes world it trains on."""
    shapes: tuple[str, ...] = SHAPES
    """Shapes of the shapes world it trains on, drawn uniformly: a shape named twice is drawn
    twice as often (("circle", "square", "triangle", "star", "star") gives stars 40%)."""
    edge_weight: float = 0.0
    """Extra loss weight of the pixels on an object's outline (inside or outside it by one pixel),
    on top of `object_weight`: corners and points are a few pixels each, and a VAE that rounds them
    off loses little loss but turns a star into a circle."""


def shapes_windows(cfg: VAETrainConfig, rng: np.random.Generator, world) -> Tensor:
    """A batch of random windows and crops of shapes clips: (B, 3, T, h, w) in [-1, 1]."""
    out = []
    for _ in range(cfg.batch_size):
        video = world.sample(int(rng.integers(2**31))).video  # (3, T, H, W)
        t0 = int(rng.integers(video.shape[1] - cfg.window_frames + 1))
        video = video[:, t0 : t0 + cfg.window_frames]
        if cfg.crop:
            y0, x0 = _object_crop(video, cfg.crop, rng)
            video = video[:, :, y0 : y0 + cfg.crop, x0 : x0 + cfg.crop]
        out.append(video)
    return torch.stack(out)  # (B, 3, T, h, w)


def _object_crop(video: Tensor, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a crop around the pixels that differ from the background (jittered)."""
    _, _, h, w = video.shape
    background = video.flatten(1).median(dim=1).values[:, None, None, None]  # (3, 1, 1, 1)
    ys, xs = ((video - background).norm(dim=0) > 0.15).any(dim=0).nonzero(as_tuple=True)
    cy, cx = (float(ys.float().mean()), float(xs.float().mean())) if len(ys) else (h / 2, w / 2)
    jitter = rng.integers(-crop // 4, crop // 4 + 1, size=2)
    y0 = int(np.clip(cy - crop / 2 + jitter[0], 0, h - crop))
    x0 = int(np.clip(cx - crop / 2 + jitter[1], 0, w - crop))
    return y0, x0


def vae_loss(vae: WanVAE, video: Tensor, cfg: VAETrainConfig) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction loss of one batch (plus a small latent penalty); also the parts to log.

    The posterior mean is perturbed by noise at `latent_noise` times its own std, so the decoder
    learns to tolerate the small errors a diffusion model makes in latent space.
    """
    cache = CausalCache()
    cache.claim("encode")
    with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_encoder):
        h = vae.encoder(video, cache)  # (B, 2Z, F, h, w)
        mu, _log_var = vae.conv1(h).chunk(2, dim=1)  # (B, Z, F, h, w) each
    z = mu + torch.randn_like(mu) * cfg.latent_noise * mu.detach().std()  # (B, Z, F, h, w)
    cache = CausalCache()
    cache.claim("decode")
    recon = vae.decoder(vae.conv2(z), cache)  # (B, 3, T, H, W), unclamped so gradients flow
    # shapes cover a few % of the pixels: weight them up, or a small VAE paints only background
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    is_object = (video - background).norm(dim=1, keepdim=True) > 0.15  # (B, 1, T, H, W)
    weight = 1.0 + cfg.object_weight * is_object.float()
    if cfg.edge_weight:
        weight = weight + cfg.edge_weight * outline(is_object)
    weight = weight / weight.mean()
    l1 = ((recon - video).abs() * weight).mean()
    mse = ((recon - video).pow(2) * weight).mean()
    penalty = mu.pow(2).mean()
    loss = l1 + mse + cfg.latent_weight * penalty
    return loss, {"l1": l1.item(), "mse": mse.item(), "mu2": penalty.item()}


def outline(mask: Tensor) -> Tensor:
    """The pixels of a (B, 1, T, H, W) boolean mask within one pixel of its boundary, as float:
    its 3x3 dilation less its 3x3 erosion, frame by frame."""
    m = mask.float()
    grow = torch.nn.functional.max_pool3d(m, (1, 3, 3), stride=1, padding=(0, 1, 1))
    shrink = -torch.nn.functional.max_pool3d(-m, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return grow - shrink


@torch.no_grad()
def latent_stats(vae: WanVAE, world, num_clips: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the (unnormalised) posterior means of `num_clips` clips."""
    raw = dataclasses.replace(vae.config, latents_mean=(), latents_std=())
    mus = []
    for i in range(num_clips):
        video = world.sample(10_000_000 + i).video[None]  # (1, 3, T, H, W)
        mus.append(vae.encode(video, scale=_unit_scale(raw.z_dim)))  # (1, Z, F, h, w)
    mu = torch.cat(mus)  # (N, Z, F, h, w)
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def _world(cfg: VAETrainConfig, shapes: tuple[str, ...]):
    from vidmoe.world.shapes import ShapesWorld

    return ShapesWorld(
        cfg.width, cfg.height, cfg.clip_frames, sizes=cfg.sizes, motions=cfg.motions,
        shapes=shapes, seed=cfg.seed,
    )  # fmt: skip


def _unit_scale(z_dim: int) -> tuple[Tensor, Tensor]:
    return torch.zeros(z_dim), torch.ones(z_dim)


def train_vae(
    cfg: VAETrainConfig, out_dir: str | Path, *, init: str | Path | None = None, log=print
) -> tuple[WanVAE, VAEConfig]:
    """Train a VAE on shapes clips; write `vae.safetensors` and `vae_config.json` to `out_dir`.

    `init` names a `vae.safetensors` to start from (e.g. to fine-tune on longer windows).

    Returns:
        the trained VAE (in eval mode) and its config with the measured latents_mean/std.
    """
    from safetensors.torch import save_file

    stride = cfg.vae.spatial_stride
    if cfg.crop % stride or cfg.crop < 0:
        raise ValueError(
            f"crop must be 0 or a multiple of {stride} (the VAE's spatial stride); got {cfg.crop}"
        )
    if (cfg.window_frames - 1) % 4 or cfg.window_frames > cfg.clip_frames:
        raise ValueError(
            f"window_frames must be 4k+1 and <= clip_frames ({cfg.clip_frames}); "
            f"got {cfg.window_frames}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = _world(cfg, cfg.shapes)
    vae = WanVAE(dataclasses.replace(cfg.vae, latents_mean=(), latents_std=())).train()
    if init is not None:
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(init)))
    if cfg.freeze_encoder:
        vae.encoder.requires_grad_(False)
        vae.conv1.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s / cfg.max_steps, 1.0)))
    )
    start = time.time()
    step = 0
    while step < cfg.max_steps and time.time() - start < 60 * cfg.max_minutes:
        loss, parts = vae_loss(vae, shapes_windows(cfg, rng, world), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0:
            parts = {k: round(v, 5) for k, v in parts.items()}
            log(json.dumps({"step": step, "seconds": round(time.time() - start, 1), **parts}))
    vae.eval()
    # the statistics are of the world's shapes drawn evenly, however the training drew them, so a
    # decoder-only stage keeps the normalisation its latent cache was built with
    even = _world(cfg, tuple(dict.fromkeys(cfg.shapes)))
    mean, std = latent_stats(vae, even, cfg.num_stat_clips)
    config = dataclasses.replace(cfg.vae, latents_mean=tuple(mean), latents_std=tuple(std))
    vae.config = config
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, str(out_dir / "vae.safetensors"))
    (out_dir / "vae_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    log(json.dumps({"done": step, "seconds": round(time.time() - start, 1), "std": std}))
    return vae, config
