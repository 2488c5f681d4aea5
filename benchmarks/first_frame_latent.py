"""Issue 23's first-frame checks for VAE candidates and train-vae checkpoints (docs/first_frame.md).

For each VAE (the shipped one with --ship, and each FILE: a vae.safetensors or a train-vae
`vae_checkpoint.pt`): the round-trip error of frame 0 against frames 1-16 on 4 clips per
background, and the distance between a black and a dark-blue plain clip's latents per latent
frame. With --invert: how far the latent from which the shipped decoder draws a clip's frame 0
right (60 Adam steps on it, the decoder frozen) lies from the encoder's.

    python benchmarks/first_frame_latent.py --ship runs/demo23/vae6/vae_checkpoint.pt
    python benchmarks/first_frame_latent.py --invert
"""

from __future__ import annotations

import argparse
import copy

import torch
from first_frame import load_vae, roundtrip


def plain_distance(vae) -> list[float]:
    """Per latent frame, |latent(black clip) - latent(dark-blue clip)| at one position."""
    from vidmoe.world.shapes import BACKGROUND_RGB

    def plain(bg: str) -> torch.Tensor:
        rgb = torch.tensor(BACKGROUND_RGB[bg]) * 2 - 1
        return rgb.view(1, 3, 1, 1, 1).expand(1, 3, 17, 64, 64).contiguous()

    with torch.no_grad():
        d = (vae.encode(plain("black")) - vae.encode(plain("dark_blue")))[0, :, :, 4, 4]
    return [round(float(x), 2) for x in d.norm(dim=0)]


def invert_first_frame(vae, steps: int = 60) -> None:
    """Print, per dark background, frame 0's error before and after optimising its latent
    through the frozen decoder, and how far the latent moved."""
    from vidmoe.world.shapes import ShapesWorld

    vae.requires_grad_(False)
    found = {}
    for bg in ("black", "dark_blue"):
        world = ShapesWorld(
            64,
            64,
            17,
            backgrounds=(bg,),
            motions=("left", "right", "up", "down"),
            sizes=("large",),
            seed=2323,
        )
        video = world.sample(0).video[None]  # (1, 3, T, H, W)
        with torch.no_grad():
            start = vae.encode(video)[:, :, :1]  # (1, Z, 1, h, w)
        z0 = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([z0], lr=0.05)
        for step in range(steps + 1):
            loss = (vae.decode(z0, clamp=False) - video[:, :, :1]).abs().mean()
            if step in (0, steps):
                grad = torch.autograd.grad(loss, z0, retain_graph=True)[0]
                moved = float((z0.detach() - start).norm(dim=1).mean())
                print(
                    f"{bg} step {step}: frame-0 error {loss.item() * 127.5:.1f}, "
                    f"gradient norm {float(grad.norm()):.3f}, moved {moved:.2f}"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
        found[bg] = z0.detach()
    apart = float((found["black"] - found["dark_blue"]).norm(dim=1).mean())
    print(f"black - dark_blue distance of the found latents: {apart:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="vae.safetensors or vae_checkpoint.pt files")
    parser.add_argument("--ship", action="store_true", help="include the shipped VAE")
    parser.add_argument("--invert", action="store_true", help="the decoder-inversion probe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vidmoe.loading import load_pipeline

    base = load_pipeline(None, device="cpu").vae.eval()
    if args.invert:
        invert_first_frame(copy.deepcopy(base))
    vaes = {"shipped": base} if args.ship else {}
    vaes.update({f: load_vae(base, f) for f in args.files})
    for name, per_bg in roundtrip(vaes, 4).items():
        for bg, err in per_bg.items():
            rest = err[1:].mean()
            print(f"{name[-40:]} {bg}: frame 0 {err[0]:.1f}, rest {rest:.1f}, x{err[0] / rest:.2f}")
        print(
            f"{name[-40:]} black - dark_blue distance by latent frame", plain_distance(vaes[name])
        )


if __name__ == "__main__":
    main()
