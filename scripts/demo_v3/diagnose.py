"""What limits a shapes-world model: three measurements behind docs/training.md's "What limits
the demo" table.

usage: [SECTIONS=1,2,3] [STARTS=0.5,0.7,...] python scripts/demo_v3/diagnose.py MODEL_DIR VAL_CACHE [N] [NPROMPTS]

1. Caption use: each expert's velocity MSE at fixed sigmas on N held-out clips with the true
   caption, the empty caption, and the caption with its shape word (or its motion words)
   swapped. A model that ignores the shape word scores the same with it swapped.
2. Partial denoising: the held-out clips noised to a starting sigma, then sampled to 0 with the
   true caption (no guidance); the analyser's reading against its reading of the clean clip.
   Shows from which noise level on each attribute is still recovered; then, per shape of the
   clean clip, the share whose shape is read back.
3. Per-word adherence on the held-out prompt set: motion by held-out motion phrase, shape by
   shape word (what the analyser reads when it misses).

VAL_CACHE: a latent cache (build_cache.py) of clips the model never trained on, encoded by the
model's own VAE encoder. Runs on one thread (a few minutes at N=24).
"""

import collections
import os
import sys

import numpy as np
import torch

from vidmoe.evaluation import HELD_OUT_MOTIONS, evaluate, prompt_set
from vidmoe.loading import load_pipeline
from vidmoe.models.moe import Router
from vidmoe.models.text_encoder import pad_text_embeddings
from vidmoe.sampling.schedules import make_sigmas
from vidmoe.training.data import LatentCache
from vidmoe.world.analyser import analyse
from vidmoe.world.labels import parse_prompt

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
sections = {int(x) for x in os.environ.get("SECTIONS", "1,2,3").split(",")}
model_dir, cache_dir = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 24
pipe = load_pipeline(model_dir, device="cpu", dtype="float32")
router = Router(pipe.config.moe)
cache = LatentCache(cache_dir)
x0, text = cache.batch(torch.arange(n))  # (N, Z, F, H, W), (N, S, D)
captions = cache.captions[:n]

SHAPE_SWAP = {"circle": "square", "square": "triangle", "triangle": "star", "star": "circle"}
MOTION_SWAP = dict(
    [("left", "right"), ("right", "left"), ("leftward", "rightward"), ("rightward", "leftward"),
     ("up", "down"), ("down", "up"), ("upward", "downward"), ("downward", "upward"),
     ("rising", "falling"), ("falling", "rising"), ("rises", "falls"), ("falls", "rises"),
     ("climbing", "sinking"), ("sinking", "climbing"), ("climbs", "drops"), ("dropping", "climbing")]
)  # fmt: skip


def embed(texts: list[str]) -> torch.Tensor:
    return pad_text_embeddings(pipe.encode_prompt(texts), text.shape[1])[0]


def swapped(table: dict[str, str]) -> torch.Tensor:
    return embed([" ".join(table.get(w, w) for w in c.split()) for c in captions])


def velocity(name: str, x: torch.Tensor, sigma: float, ctx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.experts[name](x, torch.full((len(x),), sigma), ctx)


if 1 in sections:
    print("## 1. caption use: velocity MSE (lower is better)")
    variants = {"true": text, "empty": cache.empty_text.expand_as(text),
                "shape swapped": swapped(SHAPE_SWAP), "motion swapped": swapped(MOTION_SWAP)}  # fmt: skip
    print("| sigma | expert | " + " | ".join(variants) + " |")
    g = torch.Generator().manual_seed(0)
    for sigma in (0.5, 0.7, 0.85, 0.9, 0.97):
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - sigma) * x0 + sigma * noise
        name = router.owner(sigma)
        row = [
            ((velocity(name, xs, sigma, ctx) - (noise - x0)) ** 2).mean().item()
            for ctx in variants.values()
        ]
        print(f"| {sigma} | {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |", flush=True)

if 2 in sections:
    print("\n## 2. partial denoising from a noised held-out clip (share read as the clean clip)")
    sch = pipe.config.scheduler
    grid = make_sigmas(sch.num_steps, sch.shift, solver=sch.sampler).tolist()
    references = [analyse(pipe.vae.decode(x0[i : i + 1])[0]) for i in range(n)]
    vae_reads = collections.defaultdict(collections.Counter)  # caption's shape -> read as
    for cap, ref in zip(captions, references):
        vae_reads[parse_prompt(cap if isinstance(cap, str) else cap[0]).shape][ref.shape] += 1
    print(
        "VAE reconstructions (the clean clips), caption's shape -> read as:",
        {k: dict(v) for k, v in vae_reads.items()},
    )
    print("| start sigma | colour | shape | motion | all |")
    starts = [float(x) for x in os.environ.get("STARTS", "0.5,0.7,0.85,0.95,1.0").split(",")]
    by_shape = {}  # start sigma -> clean shape -> [read back right, clips]
    for start in starts:
        sig = [start] + [s for s in grid if s < start]
        ok = np.zeros(4)
        by_shape[start] = collections.defaultdict(lambda: [0, 0])
        for i in range(n):
            noise = torch.randn(x0[i : i + 1].shape, generator=torch.Generator().manual_seed(i))
            x = (1 - start) * x0[i : i + 1] + start * noise
            for s, s_next in zip(sig[:-1], sig[1:]):
                x = x + (s_next - s) * velocity(router.owner(s), x, s, text[i : i + 1])
            r, ref = analyse(pipe.vae.decode(x)[0]), references[i]
            hits = [r.colour == ref.colour, r.shape == ref.shape, r.motion == ref.motion]
            ok += np.array(hits + [all(hits)])
            by_shape[start][ref.shape][0] += hits[1]
            by_shape[start][ref.shape][1] += 1
        print(f"| {start} | " + " | ".join(f"{v:.0%}" for v in ok / n) + " |", flush=True)
    names = sorted({k for d in by_shape.values() for k in d}, key=str)
    print("\n| start sigma | " + " | ".join(f"{k} (shape read back)" for k in names) + " |")
    for start, d in by_shape.items():
        print(f"| {start} | " + " | ".join(f"{d[k][0]}/{d[k][1]}" for k in names) + " |")

if 3 in sections:
    print("\n## 3. adherence by word on the held-out prompt set (model guidance and steps)")
    items = prompt_set(int(sys.argv[4]) if len(sys.argv) > 4 else 64)
    res = evaluate(pipe, items, seeds=(0,), name="diagnose")
    motion = collections.defaultdict(lambda: [0, 0])
    shape = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    phrases = [p for ps in HELD_OUT_MOTIONS.values() for p in ps]
    for item, row in zip(items, res.rows):
        phrase = next(p for p in phrases if p in item.prompt)
        motion[phrase][0] += row["motion"]
        motion[phrase][1] += 1
        shape[item.shape][0] += row["shape"]
        shape[item.shape][1] += 1
        shape[item.shape][2][row["read"][1]] += 1
    print("| motion phrase | right |")
    for phrase, (hit, total) in sorted(motion.items()):
        print(f"| {phrase} | {hit}/{total} |")
    print("| shape word | right | read as |")
    for word, (hit, total, read) in sorted(shape.items()):
        print(f"| {word} | {hit}/{total} | {dict(read.most_common())} |")
    print("summary", {k: round(v, 3) for k, v in res.summary().items()})
