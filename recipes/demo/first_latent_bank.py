"""Write a bank of first frames and the latents the demo decoder draws them right from (issue 23).

The demo VAE's encoder gives a black and a dark-blue first frame nearly one latent, so its decoder
draws both as their average: the first-frame flash (docs/first_frame.md). For frames of the demo
world (the first frame of each clip, and frames from inside clips, which an encoder also meets as
first frames), this finds by gradient descent the frame-0 latent from which the frozen decoder
draws each frame (`invert_first_latents`), and writes both to a safetensors file that
`first_latent_bank` in a VAE stage reads as its target (recipes/demo/vae_6_first_frame.toml).

    python recipes/demo/first_latent_bank.py --vae src/vidmoe/assets/demo --frames 512 \
        -o runs/demo/first_latents.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="src/vidmoe/assets/demo", help="a model or VAE folder")
    parser.add_argument("--frames", type=int, default=512, help="how many first frames")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps per frame")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("-o", "--out", required=True, help="the .safetensors file to write")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vidmoe.io.atomic import save_safetensors_atomic
    from vidmoe.models.vae import WanVAE
    from vidmoe.training.cache import read_vae_folder
    from vidmoe.training.first_latents import invert_first_latents
    from vidmoe.world.shapes import demo_world

    config, state = read_vae_folder(args.vae)
    vae = WanVAE(config)
    vae.load_state_dict(state)
    vae.eval().requires_grad_(False)
    world, rng = demo_world(), torch.Generator().manual_seed(args.seed)
    frames = []
    for i in range(args.frames):
        video = world.sample(100_000 + args.seed * 10_000 + i).video  # (3, T, H, W)
        # half the clips' own first frames, half frames from inside a clip
        t = 0 if i % 2 == 0 else int(torch.randint(1, video.shape[1], (1,), generator=rng))
        frames.append(video[:, t : t + 1])
    frames = torch.stack(frames)  # (N, 3, 1, H, W)
    latents = invert_first_latents(vae, frames, steps=args.steps, log=print)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({"frames": frames.contiguous(), "latents": latents.contiguous()}, out)
    print(json.dumps({"wrote": str(out), "frames": len(frames)}))


if __name__ == "__main__":
    main()
