"""Evaluation of shapes-world models: prompt adherence read back by the analyser, the first
frame's change, temporal flicker, speed, and inference-time ablations of the Mixture of Experts.

Three held-out prompt sets: phrasings (templates and motion phrases the captions never use, with
the captions' colour and shape words), words (colour, shape and motion words the captions never
use: `vidmoe.world.labels.HELD_OUT_*_WORDS`) and fresh (more such words, `FRESH_*_WORDS`, kept
apart from everything the demo's lexicon was built or checked on). A score measures whether the model follows
colour, shape and motion words, not whether it memorised captions. Ablations that need no
training run here: the wrong-expert swap, a boundary sweep and transition bands; `vidmoe eval`
writes their tables.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vidmoe.eval_report import dumps, markdown_table, write_report  # noqa: F401 (re-exported)
from vidmoe.models.moe import Experts
from vidmoe.world.labels import (
    COLOURS,
    HELD_OUT_COLOUR_WORDS,
    HELD_OUT_MOTION_WORDS,
    HELD_OUT_SHAPE_WORDS,
    SHAPES,
    parse_prompt,
)

DIRECTIONS = ("left", "right", "up", "down")
PROMPT_SETS = ("phrasings", "words", "fresh", "both", "all")
"""`--prompt-set`: one set, both (phrasings and words) or all three."""
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
# Fresh words (issue 23): a second set of words no caption uses, fixed before the demo's lexicon
# (`sampling.rewrite`, recipes/demo/build_lexicon.py) was built or tried on them, so they confirm
# on words nothing was chosen on; `parse_prompt` does not know them either.
FRESH_COLOUR_WORDS = {
    "red": ("vermilion", "carmine"),
    "green": ("verdant", "grass-green"),
    "blue": ("ultramarine", "navy blue"),
    "yellow": ("saffron", "mustard"),
    "purple": ("lilac", "mauve"),
    "cyan": ("aqua", "peacock blue"),
    "orange": ("pumpkin", "carrot"),
    "white": ("alabaster", "snow-white"),
}
FRESH_SHAPE_WORDS = {
    "circle": ("marble", "round shape"),
    "square": ("quadrilateral", "four-sided shape"),
    "triangle": ("three-sided shape", "trilateral"),
    "star": ("pentacle", "five-pointed figure"),
}
FRESH_MOTION_WORDS = {
    "left": ("westbound", "going west"),
    "right": ("eastbound", "going east"),
    "up": ("levitating", "heading heavenward"),
    "down": ("going downhill", "dipping"),
}
_WORD_TABLES = {
    "words": (HELD_OUT_COLOUR_WORDS, HELD_OUT_SHAPE_WORDS, HELD_OUT_MOTION_WORDS),
    "fresh": (FRESH_COLOUR_WORDS, FRESH_SHAPE_WORDS, FRESH_MOTION_WORDS),
}
# Held-out words go into two of the captions' own templates, so only the words are new.
WORD_TEMPLATES = ("{a} {colour} {shape} {motion}", "a video of {a} {colour} {shape} {motion}")


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt, the attributes it asks for, and the words that name them."""

    prompt: str
    colour: str
    shape: str
    motion: str
    kind: str = "phrasings"
    """Which held-out set: 'phrasings' or 'words'."""
    shape_word: str = ""
    """The word(s) naming the shape (its label word in the phrasings set)."""
    motion_phrase: str = ""
    """The phrase naming the motion."""


def _combos(num_prompts: int, motions, tables: dict, rng: np.random.Generator) -> list[tuple]:
    """The first `num_prompts` of every (colour, shape, motion), shuffled by `rng`."""
    unknown = [m for m in motions if m not in tables]
    if not motions or unknown:
        raise ValueError(f"motions must be some of {', '.join(tables)}; got {list(motions)}")
    combos = list(itertools.product(COLOURS, SHAPES, motions))
    if not 1 <= num_prompts <= len(combos):
        raise ValueError(
            f"the held-out prompt set has {len(combos)} prompts for motions {list(motions)}; "
            f"got --prompts {num_prompts}: use 1..{len(combos)}, or more motions"
        )
    rng.shuffle(combos)
    return combos[:num_prompts]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_set(num_prompts: int = 32, *, motions=DIRECTIONS, seed: int = 0) -> list[PromptItem]:
    """A balanced, seeded set of held-out phrasings (every one parses back to its attributes)."""
    rng = np.random.default_rng(seed)
    items = []
    combos = _combos(num_prompts, motions, HELD_OUT_MOTIONS, rng)
    for i, (colour, shape, motion) in enumerate(combos):
        template = HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)]
        phrase = HELD_OUT_MOTIONS[motion][int(rng.integers(len(HELD_OUT_MOTIONS[motion])))]
        text = template.format(a=_article(colour), colour=colour, shape=shape, motion=phrase)
        parsed = parse_prompt(text)
        assert (parsed.colour, parsed.shape, parsed.motion) == (colour, shape, motion), text
        items.append(PromptItem(text, colour, shape, motion, "phrasings", shape, phrase))
    return items


def word_prompt_set(
    num_prompts: int = 32, *, motions=DIRECTIONS, seed: int = 0, kind: str = "words"
) -> list[PromptItem]:
    """A balanced, seeded set of prompts in held-out words (`kind` 'words') or fresh words
    ('fresh'): the same (colour, shape, motion) combinations as `prompt_set` with the same seed,
    each named by words no caption uses."""
    rng = np.random.default_rng(seed)
    colours, shapes, moves = _WORD_TABLES[kind]
    items = []
    combos = _combos(num_prompts, motions, moves, rng)
    for i, (colour, shape, motion) in enumerate(combos):
        words = [
            table[key][int(rng.integers(len(table[key])))]
            for table, key in ((colours, colour), (shapes, shape), (moves, motion))
        ]
        text = WORD_TEMPLATES[i % len(WORD_TEMPLATES)].format(
            a=_article(words[0]), colour=words[0], shape=words[1], motion=words[2]
        )
        if kind == "words":  # parse_prompt reads the held-out words (not the fresh ones)
            parsed = parse_prompt(text)
            assert (parsed.colour, parsed.shape, parsed.motion) == (colour, shape, motion), text
        items.append(PromptItem(text, colour, shape, motion, kind, words[1], words[2]))
    return items


def held_out_prompts(
    which: str, num_prompts: int, *, motions=DIRECTIONS, seed: int = 0
) -> list[PromptItem]:
    """The prompt set(s) `vidmoe eval --prompt-set` names: phrasings, words, fresh, both
    (phrasings and words) or all (each of `num_prompts`)."""
    if which not in PROMPT_SETS:
        raise ValueError(f"--prompt-set must be one of {', '.join(PROMPT_SETS)}; got {which!r}")
    items = []
    if which in ("phrasings", "both", "all"):
        items += prompt_set(num_prompts, motions=motions, seed=seed)
    for kind in ("words", "fresh"):
        if which in (kind, "all") or (kind == "words" and which == "both"):
            items += word_prompt_set(num_prompts, motions=motions, seed=seed, kind=kind)
    return items


def border_changes(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T-1,): mean over channels of the change of the top and bottom
    rows' mean colour between frames t and t+1, in 0..255 levels (issue 23's flash measure;
    benchmarks/first_frame.py calls this)."""
    rows = np.asarray(frames)[:, [0, -1]].astype(np.float64).mean(axis=(1, 2))  # (T, 3)
    return np.abs(np.diff(rows, axis=0)).mean(axis=1)  # (T-1,)


def first_frame_change(frames: np.ndarray) -> tuple[float, float]:
    """(T, H, W, 3) uint8 -> (the border's change from frame 0 to 1, the median change between
    later consecutive frames), in levels; NaN where the clip is too short to have one."""
    changes = border_changes(frames)  # (T-1,)
    first = float(changes[0]) if len(changes) else float("nan")
    later = float(np.median(changes[1:])) if len(changes) > 1 else float("nan")
    return first, later


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
    """Per-clip readings of one evaluated variant, and their summaries."""

    name: str
    rows: list[dict] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """The prompt sets the rows come from, in order of appearance."""
        return list(dict.fromkeys(r.get("set", "phrasings") for r in self.rows))

    def select(self, kind: str | None = None) -> list[dict]:
        """The rows of one prompt set (None: every row)."""
        return [r for r in self.rows if kind is None or r.get("set", "phrasings") == kind]

    def summary(self, kind: str | None = None) -> dict:
        """Adherence per attribute (fractions), the first-frame change against later frames
        (median and 90th percentile over clips, in levels), flicker, seconds per clip, clips."""
        rows = self.select(kind)
        n = max(len(rows), 1)
        out = {k: sum(r[k] for r in rows) / n for k in ("colour", "shape", "motion", "all")}
        out["flicker"] = float(np.mean([r["flicker"] for r in rows])) if rows else 0.0
        out["seconds"] = float(np.mean([r["seconds"] for r in rows])) if rows else 0.0
        for key in ("first_change", "later_change"):
            values = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            values = values[np.isfinite(values)]
            for stat, q in (("median", 50), ("p90", 90)):
                out[f"{key}_{stat}"] = float(np.percentile(values, q)) if len(values) else None
        out["clips"] = len(rows)
        return out


def evaluate(
    pipe,
    items: list[PromptItem],
    *,
    seeds=(0,),
    name: str = "model",
    progress: bool = False,
    **settings,
) -> EvalResult:
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
        ok = dict(
            colour=reading.colour == item.colour,
            shape=reading.shape == item.shape,
            motion=reading.motion == item.motion,
        )
        ok["all"] = all(ok.values())
        first, later = first_frame_change(out.frames)
        result.rows.append(
            dict(
                prompt=item.prompt,
                encoded=out.settings.encoded_prompt,
                seed=seed,
                set=item.kind,
                asked=[item.colour, item.shape, item.motion],
                read=[reading.colour, reading.shape, reading.motion],
                shape_word=item.shape_word,
                motion_phrase=item.motion_phrase,
                first_change=first,
                later_change=later,
                flicker=flicker(out.frames),
                seconds=seconds,
                **ok,
            )
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return result


def _rebuilt(pipe, modules: Mapping, **source):
    """A pipeline sharing `pipe`'s config, VAE and text encoder, with these expert modules."""
    experts = Experts(modules, pipe.config.moe, placement=pipe.experts.placement)
    out = type(pipe)(pipe.config, experts, pipe.vae, pipe.text_encoder)
    out.source, out.lexicon = dict(pipe.source, **source), pipe.lexicon
    return out


def swapped(pipe):
    """The same pipeline with its two experts exchanged (the wrong-expert ablation)."""
    names = pipe.config.moe.expert_names
    if len(names) != 2:
        raise ValueError(f"the swap ablation needs two experts; the model has {list(names)}")
    modules = {names[0]: pipe.experts[names[1]], names[1]: pipe.experts[names[0]]}
    return _rebuilt(pipe, modules, ablation="experts swapped")


def with_experts(pipe, files: Mapping[str, str | Path]):
    """The pipeline with some experts' weights read from files (strictly), the others shared:
    a candidate expert evaluated with the model's other one. {} returns `pipe` itself."""
    from vidmoe.io.checkpoints import load_into
    from vidmoe.io.tensors import open_tensors

    if not files:
        return pipe
    modules = dict(pipe.experts.items())
    for name, path in files.items():
        if name not in modules:
            raise ValueError(
                f"--expert {name}={path}: the model has no expert {name!r}; its "
                f"experts are {', '.join(modules)}"
            )
        if not Path(path).exists():
            raise FileNotFoundError(f"--expert {name}={path}: no such file")
        modules[name] = copy.deepcopy(modules[name])  # the loaded pipeline's own stays as it was
        load_into(modules[name], open_tensors(path))
    return _rebuilt(pipe, modules, experts={n: str(p) for n, p in files.items()})


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


def parse_seeds(text: str) -> tuple[int, ...]:
    """'2,3' -> (2, 3); '0-3' -> (0, 1, 2, 3); '0-1,7' -> (0, 1, 7). Seeds are >= 0, unique."""
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(
                f"--seeds takes seeds and ranges like 0,1 or 0-3; got {text!r}"
            ) from None
        if first < 0 or last < first:
            raise ValueError(
                f"--seeds ranges go from a seed >= 0 up: got {part.strip()!r} in {text!r}"
            )
        seeds += range(first, last + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {text!r}")
    return tuple(seeds)


def parse_expert_files(specs: list[str]) -> dict[str, Path]:
    """['low_noise=FILE', ...] -> {'low_noise': Path('FILE')}; each name at most once."""
    files: dict[str, Path] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name.strip() or not path:
            raise ValueError(
                f"--expert takes NAME=FILE (e.g. low_noise=run/low_noise.safetensors); got {spec!r}"
            )
        if name.strip() in files:
            raise ValueError(f"--expert names {name.strip()!r} twice; give each expert one file")
        files[name.strip()] = Path(path)
    return files


def run_eval(
    model,
    *,
    num_prompts: int,
    seeds,
    ablations: list[str],
    motions,
    out: Path | None,
    command: str,
    progress: bool = True,
    prompts: str = "phrasings",
    experts: Mapping[str, str | Path] | None = None,
    **settings,
) -> list[EvalResult]:
    """Evaluate a model (some experts optionally read from `experts` files) and any ablations on
    the held-out prompt set(s) `prompts`; `settings` are GenerateSettings fields (num_steps,
    guidance, sampler, shift, ...); optionally write a report to `out` (.md, .json, .png)."""
    from vidmoe.loading import load_pipeline

    items = held_out_prompts(prompts, num_prompts, motions=motions)  # checked before loading
    variants = [("release plan", {}, False)] + [
        v for spec in ablations for v in parse_ablation(spec)
    ]
    pipe = with_experts(load_pipeline(model, device="cpu", dtype="float32"), experts or {})
    results = []
    for name, extra, swap in variants:
        target = swapped(pipe) if swap else pipe
        results.append(
            evaluate(target, items, seeds=seeds, name=name, progress=progress, **settings, **extra)
        )
    if out is not None:
        write_report(results, out, command)
    return results
