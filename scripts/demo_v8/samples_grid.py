"""usage: python scripts/demo_v8/samples_grid.py MODEL_DIR OUT.png

Six prompts at seed 0 with the model's own settings; one row per prompt, frames 0, 2, ..., 16,
upscaled 2x (nearest). Prints what the analyser reads in each clip.
"""

import sys

import numpy as np
import torch
from PIL import Image

from vidmoe.loading import load_pipeline
from vidmoe.world.analyser import analyse

PROMPTS = (
    "a red circle moving to the right",
    "a blue star moving up",
    "a green triangle moving left",
    "a yellow square moving down",
    "a white star drifts left",
    "a purple triangle moving down",
)

torch.set_num_threads(1)
pipe = load_pipeline(sys.argv[1], device="cpu", dtype="float32")
rows = []
for prompt in PROMPTS:
    frames = pipe.generate(prompt, seed=0).frames  # (T, H, W, 3) uint8
    read = analyse(frames)
    print(f"{prompt} -> {read.colour} {read.shape} {read.motion}")
    rows.append(np.concatenate(list(frames[::2]), axis=1))
grid = np.concatenate(rows, axis=0)
Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
    sys.argv[2]
)
