#!/usr/bin/env bash
# The shipped demo model from nothing, in order (recipes/demo/README.md gives each step's time and
# what it gives). Run from the repository root: bash recipes/demo/run.sh
# Everything goes under runs/demo/. A training or VAE step that is stopped resumes when its
# command runs again, a cache that is already built is kept, so the script can be run again.
set -euo pipefail

# 1. The VAE, in seven stages (stages 3-5 train the decoder only: the latent space stays; stages
# 6 and 7 train a first-frame head only: encoder and decoder stay; stage 7's replaced stage 6's)
vidmoe train-vae recipes/demo/vae_1_crops.toml
vidmoe train-vae recipes/demo/vae_2_clips.toml
vidmoe train-vae recipes/demo/vae_3_decoder.toml
vidmoe train-vae recipes/demo/vae_4_decoder.toml
vidmoe train-vae recipes/demo/vae_5_outlines.toml
vidmoe train-vae recipes/demo/vae_6_first_frame_head.toml
vidmoe train-vae recipes/demo/vae_7_first_chunk_head.toml

# 2. Latent caches of the demo's shapes world (stage 2's encoder = the shipped VAE's encoder)
[ -f runs/demo/cache_4000/index.json ] || vidmoe cache runs/demo/cache_4000 --clips 4000 --vae runs/demo/vae_2_clips
[ -f runs/demo/cache_4000x8/index.json ] || vidmoe cache runs/demo/cache_4000x8 --clips 4000 --captions 8 --vae runs/demo/vae_2_clips
[ -f runs/demo/cache_4000x8_extended/index.json ] || vidmoe cache runs/demo/cache_4000x8_extended --clips 4000 --captions 8 --vocabulary extended --vae runs/demo/vae_2_clips
[ -f runs/demo/cache_12000x8/index.json ] || vidmoe cache runs/demo/cache_12000x8 --clips 12000 --captions 8 --vae runs/demo/vae_2_clips
[ -f runs/demo/cache_12000x8_extended/index.json ] || vidmoe cache runs/demo/cache_12000x8_extended --clips 12000 --captions 8 --vocabulary extended --vae runs/demo/vae_2_clips

# 3. The experts from fresh weights, one run each (the two may run side by side, one thread each)
vidmoe train recipes/demo/high_noise_01_constant.toml
vidmoe train recipes/demo/high_noise_02_decay.toml
vidmoe train recipes/demo/high_noise_03_captions.toml
vidmoe train recipes/demo/low_noise_01_constant.toml
vidmoe train recipes/demo/low_noise_02_decay.toml
vidmoe train recipes/demo/low_noise_03_captions.toml
vidmoe train recipes/demo/low_noise_04_restart.toml
vidmoe train recipes/demo/low_noise_05_restart.toml
vidmoe train recipes/demo/low_noise_06_restart.toml
vidmoe train recipes/demo/low_noise_07_restart.toml
vidmoe train recipes/demo/low_noise_08_restart.toml
vidmoe train recipes/demo/low_noise_09_restart.toml
vidmoe train recipes/demo/low_noise_10_restart.toml
vidmoe export runs/demo/v11 runs/demo/high_noise runs/demo/low_noise --config recipes/demo/model.json --vae runs/demo/vae_5_outlines

# 4. Fine-tuning, each phase from the export of the one before (a GPU where there is one)
vidmoe train recipes/demo/high_noise_04_gpu.toml
vidmoe train recipes/demo/low_noise_11_gpu.toml
vidmoe export runs/demo/v12a runs/demo/high_noise_gpu runs/demo/low_noise_gpu --config recipes/demo/model.json --vae runs/demo/vae_5_outlines
vidmoe train recipes/demo/high_noise_05_gpu.toml
vidmoe train recipes/demo/low_noise_12_gpu.toml
vidmoe export runs/demo/v12 runs/demo/high_noise_gpu2 runs/demo/low_noise_gpu2 --config recipes/demo/model.json --vae runs/demo/vae_5_outlines
vidmoe train recipes/demo/high_noise_06_cpu.toml
vidmoe train recipes/demo/low_noise_13_cpu.toml
vidmoe export runs/demo/v13 runs/demo/high_noise_cpu runs/demo/low_noise_cpu --config recipes/demo/model.json --vae runs/demo/vae_5_outlines
vidmoe train recipes/demo/low_noise_14_cpu.toml
vidmoe export runs/demo/v14 runs/demo/high_noise_cpu runs/demo/low_noise_cpu2 --config recipes/demo/model.json --vae runs/demo/vae_5_outlines
# v17: v14's experts, the VAE with its first-frame head (issue 23's flash)
vidmoe export runs/demo/v17 runs/demo/high_noise_cpu runs/demo/low_noise_cpu2 --config recipes/demo/model.json --vae runs/demo/vae_6_first_frame_head
# the shipped model (v20): v14's experts, the VAE whose head redraws frames 0-4 (stage 7)
vidmoe export runs/demo/model runs/demo/high_noise_cpu runs/demo/low_noise_cpu2 --config recipes/demo/model.json --vae runs/demo/vae_7_first_chunk_head

# 5. The result: generate with it, and score it on the 128 held-out prompts
vidmoe generate "a red circle moving to the right" --model runs/demo/model -o outputs/recipe_red_circle.mp4
vidmoe eval runs/demo/model --prompts 128 --seeds 0-3 -o runs/demo/eval

# 6. Issue 23 (a candidate, not the shipped model): a cache with the rich caption vocabulary
# (the v14 VAE), both experts fine-tuned from v14 on it, scored on held-out phrasings and words
[ -f runs/demo/cache_2000x8_rich/index.json ] || vidmoe cache runs/demo/cache_2000x8_rich --clips 2000 --captions 8 --vocabulary rich --vae runs/demo/vae_5_outlines
vidmoe train recipes/demo/high_noise_07_rich.toml
vidmoe train recipes/demo/low_noise_15_rich.toml
vidmoe export runs/demo/v15 runs/demo/high_noise_rich runs/demo/low_noise_rich --config recipes/demo/model.json --vae runs/demo/vae_5_outlines
vidmoe eval runs/demo/v15 --prompts 128 --seeds 0-3 --prompt-set both -o runs/demo/eval_v15
