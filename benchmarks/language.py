"""Issue 23's language measurements that need no video (docs/prompts.md, "Why a lexicon").

1. What the demo's text encoder knows of the words its captions never use: for each held-out
   and fresh colour and shape word, the caption label whose MiniLM embedding is nearest
   (mean-pooled sentence embeddings of "a {word}"), and for each motion phrase the nearest of
   the four directions' caption phrases. A model trained on the captions can follow a new
   word only as far as its encoder puts it near the right caption word.
2. What the lexicon rewrite says: over the evaluation's prompt sets (`--seeds`), the fraction
   of prompts whose rewrite names the asked colour, shape and motion in caption words
   (`Lexicon.read`), against the prompt as given.

    PYTHONPATH=src python benchmarks/language.py --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def encoder_probe() -> dict[str, tuple[int, int]]:
    """Per attribute: (words whose nearest caption label is right, words)."""
    from vidmoe.evaluation import FRESH_COLOUR_WORDS, FRESH_MOTION_WORDS, FRESH_SHAPE_WORDS
    from vidmoe.models.text_encoder import MiniLMTextEncoder
    from vidmoe.world.labels import (
        HELD_OUT_COLOUR_WORDS,
        HELD_OUT_MOTION_WORDS,
        HELD_OUT_SHAPE_WORDS,
        MOTION_PHRASES,
    )

    encoder = MiniLMTextEncoder()

    def embed(texts: list[str]) -> torch.Tensor:
        rows = [e.mean(0) for e in encoder.encode(texts)]  # mean over tokens
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    out = {}
    tables = {
        "colour": (HELD_OUT_COLOUR_WORDS, FRESH_COLOUR_WORDS),
        "shape": (HELD_OUT_SHAPE_WORDS, FRESH_SHAPE_WORDS),
        "motion": (HELD_OUT_MOTION_WORDS, FRESH_MOTION_WORDS),
    }
    for attribute, (held, fresh) in tables.items():
        for name, table in (("held-out", held), ("fresh", fresh)):
            if attribute == "motion":
                table = {k: v for k, v in table.items() if k in ("left", "right", "up", "down")}
                labels = [(k, p) for k in table for p in MOTION_PHRASES[k]]
                texts = [f"a red circle {p}" for _, p in labels]
                ask = [(k, f"a red circle {w}") for k, ws in table.items() for w in ws]
            else:
                labels = [(k, k) for k in table]
                texts = [f"a {k}" for k in table]
                ask = [(k, f"a {w}") for k, ws in table.items() for w in ws]
            reference = embed(texts)
            scores = embed([t for _, t in ask]) @ reference.T
            nearest = [labels[int(i)][0] for i in scores.argmax(1)]
            right = sum(n == k for n, (k, _) in zip(nearest, ask))
            out[f"{attribute}, {name}"] = (right, len(ask))
    return out


def rewrite_reading(seeds: list[int]) -> dict[str, tuple[float, float]]:
    """Per prompt set: (all three named right after the rewrite, as given), in caption words."""
    from vidmoe.evaluation import held_out_prompts
    from vidmoe.loading import DEMO_DIR
    from vidmoe.sampling.rewrite import LEXICON_FILE, Lexicon

    lexicon = Lexicon.load(DEMO_DIR / LEXICON_FILE)
    rows: dict[str, list[tuple[bool, ...]]] = {}
    for seed in seeds:
        for item in held_out_prompts("all", 128, seed=seed):
            asked = {"colour": item.colour, "shape": item.shape, "motion": item.motion}
            after = lexicon.read(lexicon.rewrite(item.prompt))
            before = lexicon.read(item.prompt)
            rows.setdefault(item.kind, []).append(
                tuple(after.get(a) == v for a, v in asked.items())
                + (all(before.get(a) == v for a, v in asked.items()),)
            )
    out = {}
    for kind, values in rows.items():
        v = np.array(values, dtype=bool)
        out[kind] = (*v[:, :3].mean(0), v[:, :3].all(1).mean(), v[:, 3].mean(), len(v))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| words | nearest caption label right (MiniLM) |")
    print("| --- | --- |")
    for key, (right, n) in encoder_probe().items():
        print(f"| {key} | {right}/{n} ({100 * right / n:.0f}%) |")
    print()
    print(f"Rewrite, read in caption words (seeds {args.seeds}, 128 prompts each):")
    print()
    print("| set | colour | shape | motion | all three | all three as given | prompts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, (c, s, m, a, before, n) in rewrite_reading(seeds).items():
        cells = " | ".join(f"{100 * x:.1f}%" for x in (c, s, m, a, before))
        print(f"| {kind} | {cells} | {n} |")


if __name__ == "__main__":
    main()
