import torch
torch.set_num_threads(1)
from vidmoe.config import VAEConfig
from vidmoe.training.vae_train import VAETrainConfig, train_vae
vae = VAEConfig(generation="2.1", dim=24, z_dim=16, num_res_blocks=1, dim_mult=(1, 2, 4),
                temperal_downsample=(True, True))
# stage 3: decoder only (the encoder, so the latent cache and its mean/std, stay fixed), whole clips
cfg = VAETrainConfig(vae=vae, crop=0, batch_size=2, window_frames=17, lr=5e-4, max_steps=2400,
                     max_minutes=80.0, object_weight=10.0, latent_noise=0.1, freeze_encoder=True,
                     num_stat_clips=64, sizes=("large",), motions=("left", "right", "up", "down"))
train_vae(cfg, "runs/demo2/A_s3", init="runs/demo2/A_s2/vae.safetensors",
          log=lambda s: print(s, flush=True))
