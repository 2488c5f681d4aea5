"""Train a small Wan-style VAE on shapes clips (the demo model's own VAE), then measure the
per-channel latent mean and std that normalise its latents for the diffusion model.

The loss is L1 + MSE reconstruction of a slightly noised posterior mean (the latents are
normalised afterwards, so their scale is free). Short windows and spatial crops keep CPU steps
cheap; the network is convolutional, so it encodes whole 17-frame 64x64 clips afterwards. Shape
letters: B batch, Z latent channels, T frames, H, W.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vidmoe.config import VAEConfig
from vidmoe.io.atomic import save_safetensors_atomic, write_text_atomic
from vidmoe.models.vae import FIRST_FRAME_HEAD, WanVAE
from vidmoe.models.vae_blocks import CausalCache, border_band
from vidmoe.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vidmoe.training.first_latents import FirstLatentBank, posterior_mean
from vidmoe.training.vae_config import VAETrainConfig, load_vae_train_config


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


def vae_loss(
    vae: WanVAE, video: Tensor, cfg: VAETrainConfig, teacher: WanVAE | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Reconstruction loss of one batch (plus a small latent penalty, and with `teacher` and
    `cfg.anchor_weight` the anchor of latent frames 1+ to the teacher's); also the parts to log.

    The posterior mean is perturbed by noise at `latent_noise` times its own std, so the decoder
    learns to tolerate the small errors a diffusion model makes in latent space.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.freeze_encoder):
        mu = posterior_mean(vae, video)  # (B, Z, F, h, w)
    penalty = mu.pow(2).mean()
    loss, parts = cfg.latent_weight * penalty, {"mu2": penalty.item()}
    if cfg.reconstruction:
        l1, mse, recon = _reconstruction(vae, video, mu, cfg)
        loss = loss + l1 + mse
        parts |= {"l1": l1.item(), "mse": mse.item()}
        if cfg.border_change_weight:
            change = border_change_error(recon, video, cfg.border_width)
            loss = loss + cfg.border_change_weight * change
            parts["change"] = change.item()
    if cfg.anchor_weight and teacher is not None and mu.shape[2] > 1:
        anchor = anchor_distance(mu, teacher, video)
        loss = loss + cfg.anchor_weight * anchor
        parts["anchor"] = anchor.item()
    return loss, parts


def _reconstruction(
    vae: WanVAE, video: Tensor, mu: Tensor, cfg: VAETrainConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted L1 and MSE of decoding `mu` (noised by `latent_noise`) against `video`, and
    the decoded (B, 3, T, H, W) video."""
    z = mu + torch.randn_like(mu) * cfg.latent_noise * mu.detach().std()  # (B, Z, F, h, w)
    cache = CausalCache()
    cache.claim("decode")
    recon = vae.decoder(vae.conv2(z), cache)  # (B, 3, T, H, W), unclamped so gradients flow
    recon = vae.redraw_first_frame(recon, z)  # the first-frame head, where the VAE has one
    # shapes cover a few % of the pixels: weight them up, or a small VAE paints only background
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    is_object = (video - background).norm(dim=1, keepdim=True) > 0.15  # (B, 1, T, H, W)
    weight = 1.0 + cfg.object_weight * is_object.float()
    if cfg.edge_weight:
        weight = weight + cfg.edge_weight * outline(is_object)
    if cfg.border_weight:
        weight = weight + cfg.border_weight * border_band(
            *video.shape[-2:], cfg.border_width, video.device
        )
    if cfg.first_frame_weight != 1.0:
        weight[:, :, :1] = weight[:, :, :1] * cfg.first_frame_weight  # (B, 1, 1, H, W): frame 0
    weight = weight / weight.mean()
    l1 = ((recon - video).abs() * weight).mean()
    mse = ((recon - video).pow(2) * weight).mean()
    return l1, mse, recon


def border_change_error(recon: Tensor, video: Tensor, width: int) -> Tensor:
    """Mean absolute difference between the reconstruction's and the clip's change of the border
    band's mean colour (the pixels within `width` of the border) from each frame to the next:
    (B, 3, T, H, W) twice -> scalar. A decoder whose border colour is off by the same amount in
    every frame scores 0; one whose first frames are off differently from the later ones (issue
    23's flash, or a seam where a first-frame head stops) does not."""
    band = border_band(*video.shape[-2:], width, video.device)

    def colour(x: Tensor) -> Tensor:  # (B, 3, T)
        return x[..., band].mean(dim=-1)

    return (colour(recon).diff(dim=2) - colour(video).diff(dim=2)).abs().mean()


def _teacher_mu(teacher: WanVAE, video: Tensor) -> Tensor:
    """The teacher's posterior means (no gradient): (B, 3, T, H, W) -> (B, Z, F, h, w)."""
    with torch.no_grad():
        return posterior_mean(teacher, video)


def anchor_distance(mu: Tensor, teacher: WanVAE, video: Tensor) -> Tensor:
    """Mean squared distance of `mu`'s latent frames 1+ to the `teacher` encoder's for `video`,
    each channel over the variance of the teacher's in the batch (the channels' scales differ
    by 8x): (B, Z, F, h, w), (B, 3, T, H, W) -> scalar."""
    target = _teacher_mu(teacher, video)[:, :, 1:]  # (B, Z, F-1, h, w)
    var = target.var(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-6)  # (1, Z, 1, 1, 1)
    return ((mu[:, :, 1:] - target).pow(2) / var).mean()


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
        cfg.width,
        cfg.height,
        cfg.clip_frames,
        sizes=cfg.sizes,
        motions=cfg.motions,
        shapes=shapes,
        seed=cfg.seed,
    )


def _param_groups(vae: WanVAE, cfg: VAETrainConfig) -> list[dict]:
    """The trained parameters as AdamW groups: one at `lr`, or with `encoder_lr` the encoder's
    (encoder and posterior conv) apart at theirs."""
    params = [p for p in vae.parameters() if p.requires_grad]
    if not cfg.encoder_lr:
        return [{"params": params}]
    enc = {id(p) for m in (vae.encoder, vae.conv1) for p in m.parameters()}
    return [
        {"params": [p for p in params if id(p) not in enc]},
        {"params": [p for p in params if id(p) in enc], "lr": cfg.encoder_lr},
    ]


def _teacher(cfg: VAETrainConfig, vae: WanVAE, init: str | Path | None) -> WanVAE | None:
    """A frozen copy of the VAE as `init` loaded it (before any resume), for `anchor_weight`."""
    if not cfg.anchor_weight:
        return None
    if init is None:
        raise ValueError(
            "anchor_weight steers the latents by those of the VAE it starts from: give init "
            "(the VAE to fine-tune), or set it to 0"
        )
    import copy

    return copy.deepcopy(vae).eval().requires_grad_(False)


def _unit_scale(z_dim: int) -> tuple[Tensor, Tensor]:
    return torch.zeros(z_dim), torch.ones(z_dim)


def train_vae(
    cfg: VAETrainConfig, out_dir: str | Path, *, init: str | Path | None = None, log=print
) -> tuple[WanVAE, VAEConfig]:
    """Train a VAE on shapes clips; write `vae.safetensors` and `vae_config.json` to `out_dir`.

    `init` names a `vae.safetensors` to start from (e.g. to fine-tune on longer windows). A run
    whose `out_dir` holds `vae_checkpoint.pt` resumes from it (and ignores `init`); its config
    must be the same but for `max_minutes`.

    Returns:
        the trained VAE (in eval mode) and its config with the measured latents_mean/std.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world = _world(cfg, cfg.shapes)
    vae = WanVAE(dataclasses.replace(cfg.vae, latents_mean=(), latents_std=())).train()
    if init is not None:
        from vidmoe.io.checkpoints import load_into
        from vidmoe.io.tensors import open_tensors

        try:
            report = load_into(vae, open_tensors(init), strict=not cfg.vae.first_frame_head)
        except ValueError as e:
            raise ValueError(f"init {init} does not fit this config's VAE: {e}") from None
        # a VAE given a first-frame head starts it new (as the identity); nothing else may miss
        missing = tuple(n for n in report.missing if not n.startswith(FIRST_FRAME_HEAD))
        if missing or report.unexpected:
            report = dataclasses.replace(report, missing=missing)
            raise ValueError(f"init {init} does not fit this config's VAE: {report.describe()}")
    teacher = _teacher(cfg, vae, init)
    bank = None
    if cfg.first_latent_weight:
        bank = FirstLatentBank.load(cfg.first_latent_bank, cfg.vae, (cfg.height, cfg.width))
    if cfg.freeze_encoder:
        vae.encoder.requires_grad_(False)
        vae.conv1.requires_grad_(False)
    if cfg.freeze_decoder:
        vae.decoder.requires_grad_(False)
        vae.conv2.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(_param_groups(vae, cfg), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s / cfg.max_steps, 1.0))))
    )
    start = time.time()
    step, records = 0, []
    ckpt_path, identity = out_dir / VAE_CHECKPOINT_FILE, _comparable(cfg)
    if ckpt_path.is_file():
        step, records = _resume(ckpt_path, identity, vae, opt, sched, rng)
        log(json.dumps({"resumed": str(ckpt_path), "step": step}))
    last = cfg.stop_step or cfg.max_steps
    while step < last and time.time() - start < 60 * cfg.max_minutes:
        loss, parts = vae_loss(vae, shapes_windows(cfg, rng, world), cfg, teacher)
        if bank is not None:
            first = bank.distance(vae, rng.integers(len(bank.frames), size=cfg.first_latent_batch))
            loss = loss + cfg.first_latent_weight * first
            parts["first"] = first.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0:
            parts = {k: round(v, 5) for k, v in parts.items()}
            records.append({"step": step, "seconds": round(time.time() - start, 1), **parts})
            log(json.dumps(records[-1]))
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == last):
            state = {
                "config": identity,
                "step": step,
                "records": records,
                "vae": vae.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "world_rng": rng.bit_generator.state,
                "rng": rng_state(),
            }
            save_checkpoint(state, ckpt_path)
    vae.eval()
    # the statistics are of the world's shapes drawn evenly, however the training drew them, so a
    # decoder-only stage keeps the normalisation its latent cache was built with
    even = _world(cfg, tuple(dict.fromkeys(cfg.shapes)))
    mean, std = latent_stats(vae, even, cfg.num_stat_clips)
    config = dataclasses.replace(cfg.vae, latents_mean=tuple(mean), latents_std=tuple(std))
    vae.config = config
    save_safetensors_atomic(vae.state_dict(), out_dir / "vae.safetensors")
    write_text_atomic(json.dumps(dataclasses.asdict(config), indent=2), out_dir / "vae_config.json")
    write_text_atomic("".join(json.dumps(r) + "\n" for r in records), out_dir / "log.jsonl")
    _plot_loss(records, out_dir / "loss.png")
    log(json.dumps({"done": step, "seconds": round(time.time() - start, 1), "std": std}))
    return vae, config


VAE_CHECKPOINT_FILE = "vae_checkpoint.pt"


_FIELD_DEFAULTS = json.loads(
    json.dumps(
        {
            f.name: f.default
            for f in dataclasses.fields(VAETrainConfig)
            if f.default is not dataclasses.MISSING
            and isinstance(f.default, (bool, int, float, str))
        }
    )
)  # the plain fields' defaults, as a checkpoint stores them


def _comparable(cfg: VAETrainConfig) -> dict[str, Any]:
    """The config as a checkpoint stores it, less what a resumed run may change."""
    d = dataclasses.asdict(cfg)
    for free in ("max_minutes", "num_threads", "stop_step"):
        del d[free]
    return json.loads(json.dumps(d))  # tuples as lists, as they read back


def _resume(path: Path, identity: dict, vae, opt, sched, rng) -> tuple[int, list[dict]]:
    """Load `path` into the run's objects if it was written by a run of the config `identity`
    (`_comparable`); returns the step and the log records so far."""
    state = load_checkpoint(path)
    # a field the checkpoint's version of vidmoe did not have reads as its default, which is
    # what that version trained with: an upgrade does not strand a run in progress
    now = identity
    saved = {k: v for k, v in _FIELD_DEFAULTS.items() if k in now} | (state.get("config") or {})
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(
            f"{path} is a checkpoint of another VAE config (differs in {changed}; only max_minutes, "
            "num_threads and stop_step may change): remove it to start afresh, or choose another out_dir"
        )
    vae.load_state_dict(state["vae"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["world_rng"]
    set_rng_state(state["rng"])
    return int(state["step"]), list(state["records"])


def _plot_loss(records: list[dict], path: Path) -> None:
    """The logged loss parts (weighted L1 and MSE, the anchor and first-latent targets, the
    border's change), log scale."""
    from vidmoe.io.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for part in ("l1", "mse", "anchor", "first", "change"):
        if records and part in records[0]:
            ax.plot([r["step"] for r in records], [r[part] for r in records], label=part)
    ax.set(xlabel="step", ylabel="loss part", yscale="log", title="VAE loss")
    if records:
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def train_vae_main(path: str | Path, log=print) -> Path:
    """`vidmoe train-vae CONFIG`: train (or fine-tune) a VAE; returns its out_dir."""
    cfg, out_dir, init = load_vae_train_config(path)
    if init is not None:
        init = init / "vae.safetensors" if init.is_dir() else init
        if not init.is_file():
            raise ValueError(f"VAE train config {path}: init {init} does not exist")
    train_vae(cfg, out_dir, init=init, log=log)
    return out_dir
