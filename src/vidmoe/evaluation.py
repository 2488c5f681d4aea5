"""Evaluation of shapes-world models: prompt adherence read back by the analyser, temporal
flicker, speed, and inference-time ablations of the Mixture of Experts.

The prompt set uses phrasings that the shapes world's captions never use (held-out language),
so a score measures whether the model follows colour, shape and motion words, not whether it
memorised captions. Ablations that need no training run here: the wrong-expert swap, a boundary
sweep and transition bands; `vidmoe eval` writes their tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vidmoe.models.moe import Experts
from vidmoe.world.labels import COLOURS, SHAPES, parse_prompt

DIRECTIONS = ("left", "right", "up", "down")
# Held-out phrasings: none of these templates or motion phrases is used by the captions.
HELD_OUT_TEMPLATES = (
    "watch {a} {colour} {shape} {motion}",
    "one {colour} {shape}, {motion}",
    "here {a} {colour} {shape} is {motion}",
    "{colour} {shape} {motion} across the frame",
)
HELD_OUT_MOTIONS = {
    "left": ("heading left", "gliding leftwards"),
    "right": ("heading right", "gliding rightwards"),
    "up": ("going up", "ascending"),
    "down": ("going down", "descending"),
    "growing": ("increasing in size", "becoming larger"),
    "shrinking": ("decreasing in size", "becoming smaller"),
    "rotating": ("revolving", "whirling around"),
}


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt and the attributes it asks for."""

    prompt: str
    colour: str
    shape: str
    motion: str


def prompt_set(num_prompts: int = 32, *, motions=DIRECTIONS, seed: int = 0) -> list[PromptItem]:
    """A balanced, seeded set of held-out prompts (every one parses back to its attributes)."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(COLOURS, SHAPES, motions))
    rng.shuffle(combos)
    items = []
    for i, (colour, shape, motion) in enumerate(combos[:num_prompts]):
        template = HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)]
        phrase = HELD_OUT_MOTIONS[motion][int(rng.integers(len(HELD_OUT_MOTIONS[motion])))]
        a = "an" if colour[0] in "aeiou" else "a"
        text = template.format(a=a, colour=colour, shape=shape, motion=phrase)
        parsed = parse_prompt(text)
        assert (parsed.colour, parsed.shape, parsed.motion) == (colour, shape, motion), text
        items.append(PromptItem(text, colour, shape, motion))
    return items


def flicker(frames: np.ndarray) -> float:
    """Temporal flicker: mean |x[t+1] - 2 x[t] + x[t-1]| over pixels, in 0..255 units.

    Smooth motion has small second differences in time; frame-to-frame noise has large ones.
    """
    x = frames.astype(np.float32)
    if len(x) < 3:
        return 0.0
    return float(np.abs(x[2:] - 2 * x[1:-1] + x[:-2]).mean())


@dataclass
class EvalResult:
    """Per-prompt readings and the summary of one evaluated variant."""

    name: str
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        n = max(len(self.rows), 1)
        keys = ("colour", "shape", "motion", "all")
        out = {k: sum(r[k] for r in self.rows) / n for k in keys}
        out["flicker"] = float(np.mean([r["flicker"] for r in self.rows])) if self.rows else 0.0
        out["seconds"] = float(np.mean([r["seconds"] for r in self.rows])) if self.rows else 0.0
        out["clips"] = len(self.rows)
        return out


def evaluate(pipe, items: list[PromptItem], *, seeds=(0,), name: str = "model", progress: bool = False,
             **settings) -> EvalResult:  # fmt: skip
    """Generate every prompt at every seed, read each clip back with the analyser, score it."""
    from vidmoe.world.analyser import analyse

    result = EvalResult(name)
    jobs = [(item, seed) for item in items for seed in seeds]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"eval {name}", unit="clip")
    for item, seed in jobs:
        t0 = time.perf_counter()
        out = pipe.generate(item.prompt, seed=seed, **settings)
        seconds = time.perf_counter() - t0
        reading = analyse(out.frames)
        ok = dict(colour=reading.colour == item.colour, shape=reading.shape == item.shape,
                  motion=reading.motion == item.motion)  # fmt: skip
        ok["all"] = all(ok.values())
        result.rows.append(dict(prompt=item.prompt, seed=seed, read=[reading.colour, reading.shape, reading.motion],
                                flicker=flicker(out.frames), seconds=seconds, **ok))  # fmt: skip
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return result


def swapped(pipe):
    """The same pipeline with its two experts exchanged (the wrong-expert ablation)."""
    names = pipe.config.moe.expert_names
    if len(names) != 2:
        raise ValueError(f"the swap ablation needs two experts; the model has {list(names)}")
    view = dataclasses.replace(pipe.config)  # same config, experts exchanged below
    modules = {names[0]: pipe.experts[names[1]], names[1]: pipe.experts[names[0]]}
    experts = Experts(modules, view.moe, placement=pipe.experts.placement)
    out = type(pipe)(view, experts, pipe.vae, pipe.text_encoder)
    out.source = dict(pipe.source, ablation="experts swapped")
    return out


def parse_ablation(spec: str) -> list[tuple[str, dict, bool]]:
    """'swap', 'boundary:0.5,0.9', 'band:0.05,0.1' -> [(name, settings, swap_experts)]."""
    kind, _, values = spec.partition(":")
    if kind == "swap" and not values:
        return [("experts swapped", {}, True)]
    if kind in ("boundary", "band") and values:
        out = []
        for v in values.split(","):
            value = v if kind == "boundary" and not _is_number(v) else float(v)
            out.append((f"{kind} {v}", {kind: value}, False))
        return out
    raise ValueError(f"ablation must be swap, boundary:B1,B2,... or band:W1,W2,...; got {spec!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def markdown_table(results: list[EvalResult]) -> str:
    lines = ["| variant | colour | shape | motion | all three | flicker | s/clip | clips |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        s = r.summary()
        lines.append(f"| {r.name} | {s['colour']:.0%} | {s['shape']:.0%} | {s['motion']:.0%} | {s['all']:.0%} | "
                     f"{s['flicker']:.2f} | {s['seconds']:.2f} | {s['clips']} |")  # fmt: skip
    return "\n".join(lines)


def write_report(results: list[EvalResult], out: Path, command: str) -> None:
    """Markdown table + JSON rows + a PNG bar chart of adherence per variant."""
    from vidmoe.io.video import atomic_write, write_json

    out = Path(out)
    text = f"Command: `{command}`\n\n{markdown_table(results)}\n"
    atomic_write(out.with_suffix(".md"), lambda tmp: tmp.write_text(text))
    write_json(
        {r.name: {"summary": r.summary(), "rows": r.rows} for r in results},
        out.with_suffix(".json"),
    )
    from vidmoe.io.plots import pyplot

    try:
        plt = pyplot()
    except ImportError:  # the tables are written; the bar chart is optional
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(results)), 3.5))
    keys = ("colour", "shape", "motion", "all")
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(
            [j + i * width for j in range(len(results))],
            [r.summary()[k] for r in results],
            width,
            label=k,
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(results))], [r.name for r in results], rotation=20
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("adherence")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    atomic_write(out.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run_eval(model, *, num_prompts: int, seeds, ablations: list[str], motions, out: Path | None,
             command: str, progress: bool = True, **settings) -> list[EvalResult]:  # fmt: skip
    """Evaluate a model (and any ablations) on the held-out prompt set; optionally write a report."""
    from vidmoe.loading import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype="float32")
    items = prompt_set(num_prompts, motions=motions)
    variants = [("release plan", {}, False)] + [
        v for spec in ablations for v in parse_ablation(spec)
    ]
    results = []
    for name, extra, swap in variants:
        target = swapped(pipe) if swap else pipe
        results.append(
            evaluate(target, items, seeds=seeds, name=name, progress=progress, **settings, **extra)
        )
    if out is not None:
        write_report(results, out, command)
    return results


def dumps(results: list[EvalResult]) -> str:
    return json.dumps({r.name: r.summary() for r in results}, indent=2)
