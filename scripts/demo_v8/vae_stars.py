"""usage: python scripts/demo_v8/vae_stars.py VAE_DIR_A VAE_DIR_B OUT.png

The first four star clips of the validation world (clips 100000+ of the training world, seed 1,
never trained on): for each, the clip and its reconstruction by VAE A and by VAE B (rows), frames
0, 4, ..., 16, upscaled 2x. Prints the analyser's shape reading of each row.
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from vidmoe.config import VAEConfig
from vidmoe.io.video import to_uint8_frames
from vidmoe.models.vae import WanVAE
from vidmoe.world.analyser import analyse
from vidmoe.world.shapes import ShapesWorld

torch.set_num_threads(1)
world = ShapesWorld(64, 64, 17, motions=("left", "right", "up", "down"), sizes=("large",), seed=1)
vaes = []
for folder in sys.argv[1:3]:
    vae = WanVAE(VAEConfig(**json.loads(open(f"{folder}/vae_config.json").read()))).eval()
    vae.load_state_dict(load_file(f"{folder}/vae.safetensors"))
    vaes.append(vae)


stars = [i for i in range(100000, 100128) if world.sample(i).label.shape == "star"][:4]
rows = []
with torch.no_grad():
    for index in stars:
        clip = world.sample(index).video
        videos = [clip] + [vae.decode(vae.encode(clip[None]))[0] for vae in vaes]
        frames = [to_uint8_frames(v) for v in videos]
        print(index, "clip / A / B read as", [analyse(f).shape for f in frames])
        rows += [np.concatenate(list(f[::4]), axis=1) for f in frames]
grid = np.concatenate(rows, axis=0)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
    sys.argv[3]
)
