"""The shapes world's vocabulary and language: the structured label of a clip, the captions
drawn for it, and `parse_prompt`, which reads the same attributes back out of free text.

Rendering lives in `shapes.py` and reading videos in `analyser.py`; both share these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white")
SHAPES = ("circle", "square", "triangle", "star")
# "diagonal" is always from lower left to upper right, so a caption names one direction.
MOTIONS = ("left", "right", "up", "down", "diagonal", "growing", "shrinking", "rotating")
BACKGROUNDS = ("grey", "black", "white", "dark_blue")
SIZES = ("small", "medium", "large")
TEXTURES = ("plain", "noise", "stripes")


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


@dataclass(frozen=True)
class ShapeLabel:
    """What one object in a clip is and does, plus the background it is drawn on."""

    colour: str
    shape: str
    motion: str
    background: str = "grey"
    size: str = "medium"
    texture: str = "plain"

    def __post_init__(self):
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, SHAPES)
        _check("motion", self.motion, MOTIONS)
        _check("background", self.background, BACKGROUNDS)
        _check("size", self.size, SIZES)
        _check("texture", self.texture, TEXTURES)


@dataclass(frozen=True)
class PromptLabel:
    """The attributes a prompt mentions; None where the text says nothing about one."""

    colour: str | None = None
    shape: str | None = None
    motion: str | None = None
    background: str | None = None
    size: str | None = None
    texture: str | None = None


# Several phrasings per motion; every one of them parses back to its motion.
MOTION_PHRASES = {
    "left": (
        "moving to the left",
        "drifts left",
        "slides to the left",
        "travelling leftward",
        "moves left",
        "sliding left",
        "drifting to the left",
        "shifting left",
        "travels to the left",
        "moving leftward",
    ),
    "right": (
        "moving to the right",
        "drifts right",
        "slides to the right",
        "travelling rightward",
        "moves right",
        "sliding right",
        "drifting to the right",
        "shifting right",
        "travels to the right",
        "moving rightward",
    ),
    "up": (
        "moving up",
        "rising",
        "drifts upward",
        "floating up",
        "moves upward",
        "climbing",
        "rises",
        "shifting up",
        "travels upward",
        "climbs upward",
    ),
    "down": (
        "moving down",
        "falling",
        "sinking",
        "drifts downward",
        "moves down",
        "dropping",
        "falls",
        "shifting down",
        "travels downward",
        "drops down",
    ),
    "diagonal": (
        "moving diagonally up and to the right",
        "drifts diagonally up-right",
        "moving up and to the right",
        "rising diagonally to the right",
    ),
    "growing": ("growing", "getting bigger", "expanding", "grows larger", "swelling"),
    "shrinking": ("shrinking", "getting smaller", "contracting", "shrinks", "dwindling"),
    "rotating": ("rotating", "spinning", "turning in place", "spins around", "twirling"),
}
# More phrasings of the four directions, for ShapesWorld(vocabulary="extended"), which draws
# from these and MOTION_PHRASES together: more words per direction, so a model learns what the
# motion words mean rather than a few of them (none is a held-out evaluation phrase).
EXTRA_MOTION_PHRASES = {
    "left": (
        "sailing left",
        "scooting to the left",
        "cruising leftward",
        "moving toward the left edge",
        "drifting to the left side",
        "passing to the left",
        "sweeping left",
        "wandering left",
        "rolling leftward",
        "coasting left",
    ),
    "right": (
        "sailing right",
        "scooting to the right",
        "cruising rightward",
        "moving toward the right edge",
        "drifting to the right side",
        "passing to the right",
        "sweeping right",
        "wandering right",
        "rolling rightward",
        "coasting right",
    ),
    "up": (
        "soaring",
        "soars upward",
        "lifting off",
        "floating higher",
        "moving toward the top",
        "bobbing upward",
        "flying up",
        "drifting skyward",
        "lifting upward",
        "rising to the top",
    ),
    "down": (
        "plunging",
        "plummeting",
        "diving down",
        "sinking lower",
        "moving toward the bottom",
        "tumbling down",
        "dropping lower",
        "settling downward",
        "plunges downward",
        "drifting to the bottom",
    ),
}
_VOCABULARY_TABLES = {
    "base": MOTION_PHRASES,
    "extended": {m: p + EXTRA_MOTION_PHRASES.get(m, ()) for m, p in MOTION_PHRASES.items()},
}
# "rich" (vidmoe.world.rich): the extended phrases and more, other colour and shape words,
# adjectives and word orders
VOCABULARIES = (*_VOCABULARY_TABLES, "rich")


def motion_phrases(vocabulary: str = "base") -> dict[str, tuple[str, ...]]:
    """The motion phrasings captions draw from: MOTION_PHRASES ("base"), those and
    EXTRA_MOTION_PHRASES ("extended"), or those and `vidmoe.world.rich.RICH_MOTION_PHRASES`
    ("rich")."""
    if vocabulary == "rich":
        from vidmoe.world.rich import rich_motion_table

        return rich_motion_table(_VOCABULARY_TABLES["extended"])
    if vocabulary not in _VOCABULARY_TABLES:
        raise ValueError(f"vocabulary must be one of {VOCABULARIES}; got {vocabulary!r}")
    return _VOCABULARY_TABLES[vocabulary]


_SIZE_WORDS = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
_TEXTURE_WORDS = {"plain": "plain", "noise": "noisy", "stripes": "striped"}
_BACKGROUND_WORDS = {"grey": "grey", "black": "black", "white": "white", "dark_blue": "dark blue"}

_TEMPLATES = (
    "{a} {colour} {shape} {motion}",
    "{a} {size} {colour} {shape} {motion} on {bg} background",
    "{a} {colour} {shape} {motion} on {bg} background",
    "{colour} {shape} {motion}, {bg_bare} background",
    "a video of {a} {size} {colour} {shape} {motion}",
    "the {colour} {shape} {motion} against {bg} backdrop",
    "{a} {colour} {shape} on {bg} background, {motion}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background_phrase(label: ShapeLabel) -> str:
    words = _BACKGROUND_WORDS[label.background]
    if label.texture != "plain":
        words = f"{_TEXTURE_WORDS[label.texture]} {words}"
    return words


def caption_for(
    label: ShapeLabel | tuple[ShapeLabel, ...],
    rng: np.random.Generator,
    vocabulary: str = "base",
    *,
    label_words: bool = False,
) -> str:
    """A caption for one label (or several objects on one background), phrasing drawn from `rng`.

    The colour and shape appear as their label words (with "rich", often other words, unless
    `label_words`: see `vidmoe.world.rich`); the motion as one of `motion_phrases(vocabulary)`.
    """
    table = motion_phrases(vocabulary)
    labels = (label,) if isinstance(label, ShapeLabel) else tuple(label)
    if not labels:
        raise ValueError("caption_for needs at least one label")
    bg = _background_phrase(labels[0])
    if len(labels) > 1:
        parts = [_object_phrase(lab, rng, table) for lab in labels]
        return f"{' and '.join(parts)} on {_article(bg)} {bg} background"
    lab = labels[0]
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    size_words = _SIZE_WORDS[lab.size]
    size = size_words[int(rng.integers(len(size_words)))]
    phrases = table[lab.motion]
    first = size if "{size}" in template else lab.colour
    text = template.format(
        a=_article(first),
        size=size,
        colour=lab.colour,
        shape=lab.shape,
        motion=phrases[int(rng.integers(len(phrases)))],
        bg=f"{_article(bg)} {bg}",
        bg_bare=bg,
    )
    if vocabulary == "rich":
        from vidmoe.world.rich import rich_caption

        # `rng` advanced as for the other vocabularies (the clip's render seed is drawn next),
        # the rich caption drawn from a child stream of its own
        return rich_caption(lab, rng.spawn(1)[0], table, _TEMPLATES, bg, label_words=label_words)
    return text


def _object_phrase(lab: ShapeLabel, rng: np.random.Generator, table: dict) -> str:
    phrases = table[lab.motion]
    return f"{_article(lab.colour)} {lab.colour} {lab.shape} {phrases[int(rng.integers(len(phrases)))]}"


_COLOUR_SYNONYMS = {
    "red": r"red|crimson|scarlet|ruby|cherry",
    "green": r"green|lime|emerald|jade|mint",
    "blue": r"blue|azure|cobalt|sapphire|cerulean",
    "yellow": r"yellow|golden|lemon|canary|sunny",
    "purple": r"purple|magenta|violet|lavender|plum",
    "cyan": r"cyan|aqua|aquamarine|turquoise|teal",
    "orange": r"orange|tangerine|amber|apricot",
    "white": r"white|ivory|snowy|pearl|milky",
}
_SHAPE_SYNONYMS = {
    "circle": r"circles?|disc|disk|ball|dot|round shape|orb|sphere|bubble|spot|coin",
    "square": r"squares?|box|block|rectangle|cube|tile|crate|brick|slab",
    "triangle": r"triangles?|triangular shape|wedge|pyramid|arrowhead|delta|trigon",
    "star": r"stars?|pentagram|five-pointed shape|starburst|sparkle|asterisk|starfish",
}
# The earliest mention wins (the first object's motion); where two patterns match at the same
# place the earlier one in this list wins, so compound phrases ("up and to the right", "rising
# diagonally", "growing smaller") beat the plain words inside them.
_MOTION_PATTERNS = (
    (
        "diagonal",
        r"((ris(e|es|ing)|mov(e|es|ing)|drift(s|ing)?) )?diagonal\w*|up(wards?)?(-| and )(to the )?right|upper right|north-?east",
    ),
    (
        "shrinking",
        r"shrink\w*|getting smaller|gets smaller|grow(s|ing)? smaller|contract\w*|dwindl\w*"
        r"|decreas\w* in size|becom\w* smaller|diminish\w*|deflat\w*",
    ),
    (
        "growing",
        r"grow\w*|expand\w*|getting (bigger|larger)|gets (bigger|larger)|enlarg\w*|swell\w*"
        r"|increas\w* in size|becom\w* (bigger|larger)|inflat\w*",
    ),
    ("rotating", r"rotat\w*|spin\w*|turning|turns|twirl\w*|revolv\w*|whirl\w*"),
    (
        "up",
        r"up|upwards?|ris(e|es|ing)|ascend\w*|climb\w*|soar\w*|lift\w*|higher|skyward|top"
        r"|north(wards?)?",
    ),
    (
        "down",
        r"down|downwards?|fall(s|ing)?|sink(s|ing)?|drop(s|ping)?|descend\w*|plung\w*|plummet\w*"
        r"|lower|bottom|south(wards?)?",
    ),
    ("right", r"right|rightwards?|east(wards?)?"),
    ("left", r"left|leftwards?|west(wards?)?"),
)
_BACKGROUND_RE = re.compile(
    r"(?:(plain|noisy|textured|striped|stripy)\s+)?(dark[- ]blue|navy|grey|black|white)\s+"
    r"(?:background|backdrop)"
)
_SIZE_RE = {
    "small": r"small|little|tiny",
    "medium": r"medium(-sized)?|mid-sized",
    "large": r"large|big|huge",
}


def _first(text: str, table: dict[str, str]) -> str | None:
    """The key whose pattern matches earliest in `text` (whole words), or None."""
    best, best_pos = None, len(text) + 1
    for key, pattern in table.items():
        m = re.search(rf"\b(?:{pattern})\b", text)
        if m and m.start() < best_pos:
            best, best_pos = key, m.start()
    return best


def parse_prompt(text: str) -> PromptLabel:
    """Read colour, shape, motion, background, size and texture words out of free text.

    Synonyms are understood ("rightward", "rising" = up, "sinking" = down, "expanding" = growing,
    "spinning" = rotating, "gray", "magenta" = purple, ...). With several objects the first one
    mentioned wins. Attributes the text does not mention are None.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_prompt needs a string; got {type(text).__name__}")
    text = " ".join(text.lower().replace("gray", "grey").split())
    background = texture = None
    m = _BACKGROUND_RE.search(text)
    if m:
        bg_word = m.group(2).replace("-", " ")
        background = {"dark blue": "dark_blue", "navy": "dark_blue"}.get(bg_word, bg_word)
        tex_word = m.group(1)
        texture = {"noisy": "noise", "textured": "noise", "striped": "stripes", "stripy": "stripes"}
        texture = texture.get(tex_word, "plain")  # a background named without a texture is plain
        text = (
            text[: m.start()] + " " + text[m.end() :]
        )  # so "blue" in the background is not the shape's
    found = []  # (start, priority, motion)
    for priority, (name, pattern) in enumerate(_MOTION_PATTERNS):
        m = re.search(rf"\b(?:{pattern})\b", text)
        if m:
            found.append((m.start(), priority, name))
    motion = min(found)[2] if found else None
    return PromptLabel(
        colour=_first(text, _COLOUR_SYNONYMS),
        shape=_first(text, _SHAPE_SYNONYMS),
        motion=motion,
        background=background,
        size=_first(text, _SIZE_RE),
        texture=texture,
    )


# Held-out words: `parse_prompt` reads each of these as its attribute, but no caption ever uses
# it (`caption_words`), so a model that follows them has learned what the words mean, not the
# captions. Colours and shapes are single words (or two-word names); each motion phrase carries
# its motion only in words outside the captions ("moving" is a caption word, "westward" is not).
HELD_OUT_COLOUR_WORDS = {
    "red": ("crimson", "scarlet"),
    "green": ("lime", "emerald"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "magenta"),
    "cyan": ("turquoise", "teal"),
    "orange": ("tangerine",),
    "white": ("ivory", "snowy"),
}
HELD_OUT_SHAPE_WORDS = {
    "circle": ("disc", "ball"),
    "square": ("box", "block"),
    "triangle": ("wedge", "triangular shape"),
    "star": ("pentagram", "five-pointed shape"),
}
HELD_OUT_MOTION_WORDS = {
    "left": ("moving westward", "drifting toward the west"),
    "right": ("moving eastward", "drifting toward the east"),
    "up": ("ascending", "moving northward"),
    "down": ("descending", "moving southward"),
    "diagonal": ("moving toward the north-east", "moving northeast"),
    "growing": ("enlarging", "inflating"),
    "shrinking": ("diminishing", "deflating"),
    "rotating": ("revolving", "whirling"),
}


def words_of(text: str) -> set[str]:
    """The lower-case words of `text` (hyphenated words split: "up-right" -> up, right)."""
    return set(re.findall(r"[a-z]+", text.lower()))


def caption_words(vocabulary: str = "base") -> set[str]:
    """Every word a caption of `vocabulary` can contain (templates, label words, size, texture,
    background and motion phrases): a superset of what any drawn caption uses."""
    parts = [
        *_TEMPLATES,
        *COLOURS,
        *SHAPES,
        "and on an a background",  # the multi-object caption's own words
        *_TEXTURE_WORDS.values(),
        *_BACKGROUND_WORDS.values(),
        *(w for ws in _SIZE_WORDS.values() for w in ws),
        *(p for ps in motion_phrases(vocabulary).values() for p in ps),
    ]
    if vocabulary == "rich":
        from vidmoe.world.rich import rich_caption_parts

        parts += rich_caption_parts()
    return set().union(*(words_of(re.sub(r"\{\w+\}", " ", p)) for p in parts))
