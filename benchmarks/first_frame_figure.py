"""Frames 0-5 (`--frames`) of four held-out prompts (seed 0), each decoded by v14's VAE (the
shipped VAE without its first-frame head), by each `--vae NAME=FILE` and by the shipped VAE
(the same latents: the experts are the same). Run from the repository root:

    python benchmarks/first_frame_figure.py --vae v17=runs/demo/v17/vae.safetensors \
        --vae v20=VAE_FILE --frames 7 --out docs/first_frame_v21.png

(docs/first_frame_v17.png was made when v17 shipped, with no --vae; docs/first_frame_v20.png
when v20 did, with v17 and v19 as the --vae rows.)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from first_frame import headless, load_vae
from PIL import Image, ImageDraw

PROMPTS = (
    "watch a yellow triangle ascending",
    "one white circle, gliding leftwards",
    "here a purple circle is heading right",
    "a violet box descending",
)


def row(label: str, frames: np.ndarray, width: int) -> np.ndarray:
    """A strip of (T, H, W, 3) uint8 frames with grey gaps, after a label `width` pixels wide."""
    tiles = [np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=128) for f in frames]
    tag = Image.new("RGB", (width, tiles[0].shape[0]), (255, 255, 255))
    ImageDraw.Draw(tag).text((4, tiles[0].shape[0] // 2 - 6), label, fill=(0, 0, 0))
    return np.concatenate([np.asarray(tag), *tiles], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/first_frame_v21.png")
    parser.add_argument("--vae", action="append", default=[], help="NAME=FILE, a row per VAE")
    parser.add_argument("--frames", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import vidmoe
    from vidmoe.io.video import to_uint8_frames

    pipe = vidmoe.load_pipeline(None, device="cpu")
    vaes = {"v14": headless(pipe.vae)}
    for spec in args.vae:
        name, _, path = spec.partition("=")
        vaes[name] = load_vae(pipe.vae, path)
    vaes["shipped"] = pipe.vae
    label = 8 + 6 * max(map(len, vaes))  # pixels: the longest name in the default font
    rows = []
    for prompt in PROMPTS:
        latents = pipe.generate(prompt, seed=0, output="latents").latents
        for name, vae in vaes.items():
            with torch.no_grad():
                frames = to_uint8_frames(vae.decode(latents))  # (T, H, W, 3)
            rows.append(row(name, frames[: args.frames], label))
    image = np.concatenate(rows, axis=0)
    size = (image.shape[1] * 2, image.shape[0] * 2)
    Image.fromarray(image).resize(size, Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
