"""usage: python build_cache.py VAE_DIR START COUNT OUT_DIR  (demo v2 world: large objects, 4 directions)"""
import json, sys, time, torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.models.text_encoder import build_text_encoder
from vidmoe.training.data import build_latent_cache
from vidmoe.world.shapes import demo_world
vae_dir, start, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = VAEConfig(**json.loads(open(f"{vae_dir}/vae_config.json").read()))
vae = WanVAE(cfg); vae.load_state_dict(load_file(f"{vae_dir}/vae.safetensors")); vae.eval().requires_grad_(False)
text = build_text_encoder("minilm", max_length=32)
world = demo_world()
def clips():
    for i in range(start, start + count):
        c = world.sample(i)
        yield {"video": c.video, "caption": c.caption}
t = time.time()
build_latent_cache(clips(), vae, text, out, text_len=32, shard_size=1024, batch_size=16)
print("cache seconds", time.time() - t, flush=True)
