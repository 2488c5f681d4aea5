"""Demo VAE v2 (4x4x4): usage python train_vae.py NAME DIM MULT(e.g. 1,2,4)"""
import sys, torch
torch.set_num_threads(1)
from vidmoe.config import VAEConfig
from vidmoe.training.vae_train import VAETrainConfig, train_vae
name, dim, mult = sys.argv[1], int(sys.argv[2]), tuple(int(v) for v in sys.argv[3].split(","))
vae = VAEConfig(generation="2.1", dim=dim, z_dim=16, num_res_blocks=1, dim_mult=mult,
                temperal_downsample=(True,) * (len(mult) - 1))
world = dict(sizes=("large",), motions=("left", "right", "up", "down"))
log = lambda s: print(s, flush=True)
# stage 1: 32x32 crops around the object, 9-frame windows
s1 = VAETrainConfig(vae=vae, crop=32, batch_size=8, window_frames=9, lr=1e-3, max_steps=900,
                    max_minutes=24.0, object_weight=10.0, num_stat_clips=8, **world)
train_vae(s1, f"runs/demo2/{name}_s1", log=log)
# stage 2: whole 17-frame 64x64 clips
s2 = VAETrainConfig(vae=vae, crop=0, batch_size=2, window_frames=17, lr=4e-4, max_steps=500,
                    max_minutes=16.0, object_weight=10.0, num_stat_clips=64, **world)
train_vae(s2, f"runs/demo2/{name}_s2", init=f"runs/demo2/{name}_s1/vae.safetensors", log=log)
