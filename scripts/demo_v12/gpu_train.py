"""usage: [DEVICE=cuda] python gpu_train.py OUT NUM_CLIPS SECONDS: fine-tune the demo's experts on a
CUDA GPU, several runs at once (one process each), all done within about SECONDS of this script's
start (the caches' time included). Made for a lent GPU with a time limit; demo v12 was trained so.

1. Cache: clips 0..NUM_CLIPS-1 of the demo world (`vidmoe.world.shapes.demo_world`), 8
   phrasings each, through the demo VAE's encoder and MiniLM on the GPU (`build_latent_cache`); a copy with the extended motion vocabulary (`recaption_cache`).
2. Runs: each is an asset config (src/vidmoe/assets/demo/train_*_gpu.toml: init weights, batch
   128, bf16 autocast, warm-up then cosine to 10%, device "cuda") with its paths put under WORK and
   its length set from 40 timed steps so that the cosine ends inside SECONDS (a time limit of 1.1x
   stops it if the steps slow down): `low_noise` (base vocabulary, stars twice per epoch),
   `high_noise_x` (extended vocabulary) and `high_noise` (the latter on the base vocabulary).
3. Each run's EMA weights go to OUT/<run>.safetensors (bfloat16, the layout of
   src/vidmoe/assets/demo/experts/), its log, plots, timing and resolved config to OUT/logs.tar.gz.
Environment: RUNS (a comma list of run names: only these), SEED (the runs' seed, 0), INIT (the
model folder the runs start from; default the repository's demo), WORK (scratch folder), DEVICE,
BATCH. Where the MiniLM package cannot be installed (the lent machines reach no package index),
pack_minilm.py / unpack_minilm.py make a stand-in."""
import json, os, subprocess, sys, tarfile, time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "src/vidmoe/assets/demo"
WORK = Path(os.environ.get("WORK", "/tmp/vidmoe_gpu"))
DEVICE = os.environ.get("DEVICE", "cuda")
START = time.time()
INIT = os.environ.get("INIT", str(DEMO))
RUNS = {  # name: (asset config, cache)
    "low_noise": ("train_low_noise_gpu.toml", "cache"),
    "high_noise_x": ("train_high_noise_gpu.toml", "cache_x"),
    "high_noise": ("train_high_noise_gpu.toml", "cache"),
}
if os.environ.get("RUNS"):
    RUNS = {n: RUNS[n] for n in os.environ["RUNS"].split(",")}


def build_caches(num_clips):
    """WORK/cache (base vocabulary) and, when a run needs it, WORK/cache_x (extended); each
    built only if missing."""
    from vidmoe.io.checkpoints import detect_layout, load_vae
    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.training.data import build_latent_cache, recaption_cache
    from vidmoe.world.shapes import demo_world

    need_x = any(cache == "cache_x" for _, cache in RUNS.values())
    if (WORK / "cache" / "index.json").is_file() and (
        not need_x or (WORK / "cache_x" / "index.json").is_file()
    ):
        return
    text = build_text_encoder("minilm", max_length=32, device=DEVICE)
    if not (WORK / "cache" / "index.json").is_file():
        torch.backends.cudnn.allow_tf32 = False  # latents as a float32 CPU encode makes them
        torch.backends.cuda.matmul.allow_tf32 = False
        vae = load_vae(detect_layout(DEMO), device=DEVICE)
        base = demo_world()

        def clips():
            for i in range(num_clips):
                yield {"video": base.sample(i).video, "captions": base.captions(i, 8)}

        t = time.time()
        build_latent_cache(clips(), vae, text, WORK / "cache", text_len=32, shard_size=2000,
                           batch_size=64)
        print(f"cache: {num_clips} clips in {time.time() - t:.0f} s", flush=True)
    if not need_x:
        return
    ext = demo_world("extended")
    t = time.time()
    recaption_cache(WORK / "cache", WORK / "cache_x", [ext.captions(i, 8) for i in range(num_clips)],
                    text, batch_size=256)
    print(f"extended captions in {time.time() - t:.0f} s", flush=True)


def run_config(name, **over):
    """The run's asset config with its paths under WORK, the init folder, the seed and `over`."""
    from vidmoe.training.config import load_train_config
    toml, cache = RUNS[name]
    cfg = load_train_config(DEMO / toml).to_dict()
    cfg.update(cache=str(WORK / cache), out_dir=str(WORK / name), init=INIT, device=DEVICE,
               batch_size=int(os.environ.get("BATCH", cfg["batch_size"])), stop_step=0,
               seed=int(os.environ.get("SEED", "0")), use_progress=False, max_minutes=0.0)
    cfg.update(over)
    return cfg


def train_one(name, seconds):
    """One run: time 40 steps, then train max_steps that fit `seconds` (stopping at 1.1x)."""
    from vidmoe.training.loop import TrainConfig, train
    from vidmoe.io.tensors import save_safetensors_atomic

    trainer = train(TrainConfig.from_dict(run_config(name, out_dir=str(WORK / f"probe_{name}"),
                                                     max_steps=20, warmup_steps=10)))
    t0 = time.time()
    for _ in range(40):
        trainer.train_step()
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    per_step = (time.time() - t0) / 40
    seconds -= time.time() - t0
    steps = max(200, int(seconds / per_step))
    print(f"{name}: {per_step * 1000:.1f} ms per step -> {steps} steps", flush=True)
    cfg = TrainConfig.from_dict(run_config(name, max_steps=steps,
                                           max_minutes=max(0.2, 1.1 * seconds / 60)))
    t = time.time()
    trainer = train(cfg)
    wall = time.time() - t
    expert = cfg.experts[0]
    state = trainer.ema.expert_state(expert, trainer.experts[expert])
    save_safetensors_atomic({k: v.to("cpu", torch.bfloat16).contiguous() for k, v in state.items()},
                            Path(os.environ["OUT"]) / f"{name}.safetensors")
    (WORK / name / "timing.json").write_text(json.dumps(
        {"steps": trainer.step, "wall_s": round(wall, 1), "s_per_step": round(wall / trainer.step, 4),
         "probe_s_per_step": round(per_step, 4), "batch_size": cfg.batch_size,
         "device": torch.cuda.get_device_name() if DEVICE != "cpu" else "cpu"}))
    print(f"{name}: {trainer.step} steps in {wall:.0f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--one":  # a child process: one run
        train_one(sys.argv[2], float(sys.argv[3]))
        sys.exit(0)
    out, num_clips, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    os.environ["OUT"] = str(out)
    WORK.mkdir(parents=True, exist_ok=True)
    build_caches(num_clips)
    left = seconds - (time.time() - START) - 45  # the runs' start, probes and export
    print(f"{left:.0f} s left for training", flush=True)
    procs = {n: subprocess.Popen([sys.executable, __file__, "--one", n, str(left)])
             for n in RUNS}
    codes = {n: p.wait() for n, p in procs.items()}
    print("exit codes", codes, flush=True)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for n in RUNS:
            for f in ("log.jsonl", "loss_per_expert.png", "loss_vs_sigma.png", "timing.json",
                      "train_config.json"):
                if (WORK / n / f).is_file():
                    tar.add(WORK / n / f, arcname=f"{n}/{f}")
