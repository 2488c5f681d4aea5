"""usage: python check_vae.py VAE_DIR [N]: held-out reconstructions: analyser adherence + PSNR"""
import json, sys, time, torch, numpy as np
torch.set_num_threads(1)
from safetensors.torch import load_file
from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.world.shapes import ShapesWorld
from vidmoe.world.analyser import analyse, adherence
d = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
cfg = VAEConfig(**json.loads(open(f"{d}/vae_config.json").read()))
vae = WanVAE(cfg); vae.load_state_dict(load_file(f"{d}/vae.safetensors")); vae.eval()
world = ShapesWorld(64, 64, 17, motions=("left", "right", "up", "down"), sizes=("large",), seed=99)
keys = ("colour", "shape", "motion", "all"); ok = {k: 0 for k in keys}; psnr = []
t = time.time()
with torch.no_grad():
    for i in range(n):
        c = world.sample(i)
        rec = vae.decode(vae.encode(c.video[None]))[0]
        psnr.append(10 * np.log10(4 / (rec.clamp(-1, 1) - c.video).pow(2).mean().item()))
        a = adherence(analyse(rec), c.label)
        for k in keys: ok[k] += a[k]
print(d, {k: f"{v}/{n}" for k, v in ok.items()}, f"PSNR {np.mean(psnr):.1f} dB {time.time()-t:.0f}s", flush=True)
