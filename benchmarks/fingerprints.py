"""Fingerprints of what vidmoe computes, to prove a refactor changes nothing.

Runs the public API on fixed seeds (the shipped demo, the tiny presets with every sampler,
boundary mode, transition band and step budget, and a short training run of tiny experts) and
prints one sha256 per case of the exact bytes it produced (frames, latents, plans, losses).
Run it before and after a change and diff the two outputs:

    python benchmarks/fingerprints.py > before.txt   # on the old commit
    python benchmarks/fingerprints.py > after.txt    # on the new one
    diff before.txt after.txt                        # no output: identical
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if torch.is_tensor(a):
            a = a.detach().cpu().contiguous().numpy()
        if isinstance(a, np.ndarray):
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(json.dumps(a, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def generation_cases():
    from vidmoe.loading import build_random_pipeline, load_pipeline

    demo = load_pipeline(None, device="cpu")
    for prompt, seed in (
        ("a red circle moving to the right", 1),
        ("a blue star going up", 7),
        ("green triangle sliding left", 3),
        ("", 0),
    ):
        r = demo.generate(prompt, seed=seed)
        yield f"demo {prompt!r} seed {seed}", digest(r.frames, r.latents, r.plan.to_dict())
    r = demo.generate(
        "a yellow square moving down",
        seed=2,
        num_steps=6,
        sampler="unipc",
        guidance={"high_noise": 4.0},
        band=0.05,
    )
    yield "demo unipc band", digest(r.frames, r.latents, r.plan.to_dict())
    t2v = build_random_pipeline("tiny-t2v")
    variants = {
        "euler": dict(sampler="euler"),
        "unipc": dict(sampler="unipc"),
        "dpm++": dict(sampler="dpm++"),
        "boundary 0.6": dict(boundary=0.6),
        "snr": dict(boundary="snr"),
        "steps:2": dict(boundary="steps:2"),
        "budgets": dict(steps_per_expert={"high_noise": 2, "low_noise": 3}),
        "band": dict(band=0.1),
        "guidance 1": dict(guidance=1.0),
        "sigmas": dict(sigmas=(1.0, 0.7, 0.4, 0.1)),
        "shift 3": dict(shift=3.0, num_steps=5),
    }
    for name, kw in variants.items():
        kw.setdefault("num_steps", 4)
        if "sigmas" in kw or "steps_per_expert" in kw:
            kw.pop("num_steps")
        r = t2v.generate("a cat", seed=5, **kw)
        yield f"tiny-t2v {name}", digest(r.frames, r.latents, r.plan.to_dict())
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "im.png"
        Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(
            img
        )
        for preset in ("tiny-i2v", "tiny-ti2v"):
            pipe = build_random_pipeline(preset)
            r = pipe.generate("a dog", seed=2, num_steps=3, image=str(img))
            yield preset, digest(r.frames, r.latents, r.plan.to_dict())


def training_case():
    sys.path.insert(0, str(REPO))
    from tests.training.conftest import HashTextEncoder, PoolVAE, fake_clips, tiny_run
    from vidmoe.training.data import build_latent_cache
    from vidmoe.training.loop import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        build_latent_cache(fake_clips(8), PoolVAE(), HashTextEncoder(), cache, text_len=8)
        trainer = train(TrainConfig.from_dict(tiny_run(cache, Path(tmp) / "run")))
        losses = [
            json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()
        ]
        losses = [
            {k: v for k, v in rec.items() if "sec" not in k and "time" not in k} for rec in losses
        ]
        state = {n: p for e in trainer.experts.values() for n, p in e.state_dict().items()}
        yield "training tiny 8 steps", digest(losses, *state.values())


def main() -> None:
    torch.set_num_threads(2)
    for name, fp in (*generation_cases(), *training_case()):
        print(f"{fp}  {name}", flush=True)


if __name__ == "__main__":
    main()
