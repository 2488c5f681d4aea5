"""usage: VAE_DIR=... [CKPTS=a,b] [TRAIN_TOML=...] [SEEDS=0,1] [PROMPTS=train] python export_eval.py OUT_DIR NUM_PROMPTS [gh gl steps shift sampler] [EMA=1]"""
import json, os, sys, time, torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from safetensors.torch import load_file
from vidmoe.config import ModelConfig, MoEConfig, SchedulerConfig, VAEConfig
from vidmoe.training.checkpoint import export_model
from vidmoe.training.config import load_train_config
out, n = sys.argv[1], int(sys.argv[2])
gh, gl, steps, shift, sampler = (float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
    float(sys.argv[6]), sys.argv[7]) if len(sys.argv) > 3 else (5.0, 4.0, 25, 3.0, "euler")
tc = load_train_config(os.environ.get("TRAIN_TOML", "scripts/demo_v2/train_moe.toml"))
vae_dir = os.environ["VAE_DIR"]
vae_cfg = VAEConfig(**json.loads(open(f"{vae_dir}/vae_config.json").read()))
config = ModelConfig(
    name="shapes-demo", transformer=tc.transformer, vae=vae_cfg,
    moe=MoEConfig(boundaries=tc.moe.boundaries, guidance=(gh, gl)),
    scheduler=SchedulerConfig(sampler=sampler, num_steps=steps, shift=shift),
    text_encoder="minilm", default_size=(64, 64), default_num_frames=17, fps=8,
    expert_overrides=tc.expert_overrides,
)
ckpts = os.environ.get("CKPTS", "runs/demo2/moe/checkpoint.pt").split(",")
export_model(ckpts, config, load_file(f"{vae_dir}/vae.safetensors"), out, use_ema=os.environ.get("EMA", "1") == "1")
from vidmoe.evaluation import evaluate, prompt_set
from vidmoe.loading import load_pipeline
pipe = load_pipeline(out, device="cpu", dtype="float32")
items = prompt_set(n)
if os.environ.get("PROMPTS") == "train":  # the same triples in the training captions' phrasing
    import dataclasses, numpy as np
    from vidmoe.world.labels import ShapeLabel, caption_for
    rng = np.random.default_rng(0)
    items = [dataclasses.replace(it, prompt=caption_for(ShapeLabel(it.colour, it.shape, it.motion, size="large"), rng)) for it in items]
t = time.time()
res = evaluate(pipe, items, seeds=tuple(int(x) for x in os.environ.get("SEEDS", "0").split(",")), name="demo")
print(sys.argv[3:], json.dumps(res.summary()), "wall", round(time.time() - t, 1), flush=True)
for r in res.rows:
    if not r["all"]:
        print("MISS", r["prompt"], r["read"])
