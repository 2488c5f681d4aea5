"""usage: [THREADS=1] [LR=5e-4] [STEPS=2400] [EDGE_WEIGHT=0] [SHAPES=circle,square,...]
       python train_dec.py INIT_DIR OUT_DIR MINUTES  (run from /work: paths are relative to it)

Decoder-only stage of the demo VAE: the encoder, hence the latent cache and its mean/std, stay
fixed; whole 17-frame clips. Stage 3: `train_dec.py runs/demo2/A_s2 runs/demo2/A_s3 80`;
stage 4 (shipped with demo v3): `train_dec.py runs/demo2/A_s3 runs/demo2/A_s4 27`;
stage 5 (outlines and stars): `THREADS=2 LR=2e-4 EDGE_WEIGHT=20
SHAPES=circle,square,triangle,star,star,star STEPS=1600 train_dec.py runs/demo2/A_s4 runs/demo7/A_s5 60`
(the same as `vidmoe train-vae src/vidmoe/assets/demo/train_vae_decoder.toml`).
"""

import os
import sys

import torch

from vidmoe.config import VAEConfig
from vidmoe.training.vae_train import VAETrainConfig, train_vae
from vidmoe.world.labels import SHAPES

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
init_dir, out_dir, minutes = sys.argv[1], sys.argv[2], float(sys.argv[3])
shapes = tuple(os.environ["SHAPES"].split(",")) if os.environ.get("SHAPES") else SHAPES
vae = VAEConfig(generation="2.1", dim=24, z_dim=16, num_res_blocks=1, dim_mult=(1, 2, 4),
                temperal_downsample=(True, True))  # fmt: skip
cfg = VAETrainConfig(vae=vae, crop=0, batch_size=2, window_frames=17,
                     lr=float(os.environ.get("LR", "5e-4")),
                     max_steps=int(os.environ.get("STEPS", "2400")), max_minutes=minutes,
                     object_weight=10.0, edge_weight=float(os.environ.get("EDGE_WEIGHT", "0")),
                     latent_noise=0.1, freeze_encoder=True, num_stat_clips=64, sizes=("large",),
                     motions=("left", "right", "up", "down"), shapes=shapes)  # fmt: skip
train_vae(cfg, out_dir, init=f"{init_dir}/vae.safetensors", log=lambda s: print(s, flush=True))
