"""The "rich" caption vocabulary (issue 23): captions as people write prompts.

Beside the extended vocabulary's templates and motion phrases, a rich caption may name its
colour and shape with other words ("ruby", "orb", "pyramid"), add an adjective, drop the article,
list the attributes ("square, blue, moving down") or put them in other orders. The held-out
words of `vidmoe.world.labels` (HELD_OUT_*_WORDS) and the held-out phrasings of
`vidmoe.evaluation` stay out of every rich caption (tests/test_evaluation.py checks it), so the
evaluation's `words` and `phrasings` sets still measure words and phrasings training never saw.
Every rich caption parses back to its label (`parse_prompt`).
"""

from __future__ import annotations

import re

import numpy as np

# Other words for each colour (the held-out ones, e.g. crimson and scarlet, are not here).
RICH_COLOUR_WORDS = {
    "red": ("ruby", "cherry"),
    "green": ("jade", "mint"),
    "blue": ("sapphire", "cerulean"),
    "yellow": ("canary", "sunny"),
    "purple": ("lavender", "plum"),
    "cyan": ("aqua", "aquamarine"),
    "orange": ("amber", "apricot"),
    "white": ("pearl", "milky"),
}
# Other nouns for each shape (the held-out ones, e.g. disc, ball, box, block, wedge and
# pentagram, are not here, nor is the word "shape", which two held-out names use).
RICH_SHAPE_WORDS = {
    "circle": ("dot", "orb", "sphere", "bubble", "spot", "coin"),
    "square": ("cube", "tile", "crate", "brick", "slab"),
    "triangle": ("pyramid", "arrowhead", "delta", "trigon"),
    "star": ("starburst", "sparkle", "asterisk", "starfish"),
}
# More motion phrases for the four directions, beside the extended vocabulary's; none holds a
# held-out word ("westward", "ascending", ...) or a held-out phrasing ("heading left", ...).
RICH_MOTION_PHRASES = {
    "left": (
        "rolls left",
        "rolling to the left",
        "zooms left",
        "races leftward",
        "flies left",
        "floats left",
        "darting left",
        "runs to the left",
        "slipping left",
        "making its way left",
    ),
    "right": (
        "rolls right",
        "rolling to the right",
        "zooms right",
        "races rightward",
        "flies right",
        "floats right",
        "darting right",
        "runs to the right",
        "slipping right",
        "making its way right",
    ),
    "up": (
        "drifting up",
        "floats upward",
        "flies upward",
        "zooms up",
        "shoots up",
        "bubbling up",
        "rockets upward",
        "rolling up",
        "moving upwards",
        "rises up",
    ),
    "down": (
        "drifting down",
        "falling down",
        "tumbling down",
        "sliding down",
        "zooms down",
        "shoots down",
        "slipping down",
        "sinks down",
        "rolling down",
        "moving downwards",
    ),
}
# Adjectives that are true of any object of the world (its size has words of its own).
RICH_ADJECTIVES = ("bright", "solid", "flat", "single", "lone", "simple", "bold", "shiny", "vivid")
RICH_SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}
# Word orders and forms people write prompts in; {a} becomes "a" or "an" for the next word.
RICH_TEMPLATES = (
    "{colour} {shape} {motion}",
    "{shape}, {colour}, {motion}",
    "{a} {adj} {colour} {shape} {motion}",
    "{adj} {colour} {shape} {motion}",
    "{colour} {shape}, {motion}",
    "{a} {shape} in {colour} {motion}",
    "{a} {colour} {shape}: {motion}",
    "{shape} {motion}, {colour}",
    "{shape} ({colour}) {motion}",
    "{a} {colour}-coloured {shape} {motion}",
    "the {adj} {colour} {shape} {motion}",
    "clip of {a} {colour} {shape} {motion}",
    "an animation of {a} {adj} {colour} {shape} {motion}",
    "{colour} {shape} {motion} on screen",
    "{a} {colour} {shape} {motion} over {bg} background",
    "{adj} {colour} {shape} on {bg_bare} background, {motion}",
)
# How often a rich caption uses the label's own word (else one of the rich words) and one of
# the rich templates (else one of the captions' base templates).
LABEL_COLOUR_SHARE = 0.6
LABEL_SHAPE_SHARE = 0.5
RICH_TEMPLATE_SHARE = 0.7


def rich_motion_table(extended: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The rich vocabulary's motion phrases: `extended`'s and RICH_MOTION_PHRASES together."""
    return {m: p + RICH_MOTION_PHRASES.get(m, ()) for m, p in extended.items()}


def _pick(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


def rich_caption(
    lab,
    rng: np.random.Generator,
    table: dict,
    base_templates: tuple[str, ...],
    bg: str,
    *,
    label_words: bool = False,
) -> str:
    """One rich caption of the label `lab` (a ShapeLabel) on the background phrase `bg`,
    with motion phrases from `table`; everything drawn from `rng`. `label_words` keeps the
    label's own colour and shape words (a clip's first caption does: training's `oversample`
    finds a clip's shape by them)."""
    from vidmoe.world.labels import _SIZE_WORDS, _article

    colour = lab.colour if label_words or rng.random() < LABEL_COLOUR_SHARE else None
    colour = colour or _pick(rng, RICH_COLOUR_WORDS[lab.colour])
    shape = lab.shape if label_words or rng.random() < LABEL_SHAPE_SHARE else None
    shape = shape or _pick(rng, RICH_SHAPE_WORDS[lab.shape])
    rich = rng.random() < RICH_TEMPLATE_SHARE
    template = _pick(rng, RICH_TEMPLATES if rich else base_templates)
    words = (*RICH_ADJECTIVES, *RICH_SIZE_WORDS[lab.size])
    text = template.format(
        a="{a}",
        adj=_pick(rng, words),
        size=_pick(rng, _SIZE_WORDS[lab.size]),
        colour=colour,
        shape=shape,
        motion=_pick(rng, table[lab.motion]),
        bg="{a} " + bg,
        bg_bare=bg,
    )
    return re.sub(r"\{a\} (\w+)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def rich_caption_parts() -> list[str]:
    """Every text a rich caption's words come from (for `caption_words`), less the motion
    phrases and the base templates' words, which `caption_words` adds."""
    return [
        *RICH_TEMPLATES,
        "coloured",
        *RICH_ADJECTIVES,
        *(w for ws in RICH_SIZE_WORDS.values() for w in ws),
        *(w for ws in RICH_COLOUR_WORDS.values() for w in ws),
        *(w for ws in RICH_SHAPE_WORDS.values() for w in ws),
    ]
