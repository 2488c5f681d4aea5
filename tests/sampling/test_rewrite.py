"""Prompt rewriting with a model's lexicon (`vidmoe.sampling.rewrite`): the rules on a small
lexicon, a malformed file refused, and the pipeline encoding the rewritten prompt."""

import json

import pytest
import torch

from vidmoe.loading import DEMO_DIR, load_pipeline
from vidmoe.sampling.rewrite import LEXICON_FILE, Lexicon, find_lexicon

SMALL = {
    "known": [
        "a",
        "an",
        "red",
        "orange",
        "circle",
        "triangle",
        "moving",
        "left",
        "leftward",
        "rising",
        "the",
    ],
    "attributes": {
        "red": ["colour", "red"],
        "orange": ["colour", "orange"],
        "circle": ["shape", "circle"],
        "triangle": ["shape", "triangle"],
        "left": ["motion", "left"],
        "leftward": ["motion", "left"],
        "rising": ["motion", "up"],
    },
    "absorb": ["shape"],
    "words": {
        "crimson": ["colour", "red", "red"],
        "tangerine": ["colour", "orange", "orange"],
        "disc": ["shape", "circle", "circle"],
        "triangular": ["shape", "triangle", "triangle"],
        "snow white": ["colour", "white", "white"],
        "westward": ["motion", "left", "leftward"],
        "sky": ["colour", "blue", "blue"],
        "ascending": ["motion", "up", "rising"],
    },
}


@pytest.fixture
def lexicon():
    return Lexicon.from_dict(SMALL, source="small")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # unknown attribute words become caption words; caption words stay
        ("a crimson disc moving westward", "a red circle moving leftward"),
        ("a red circle moving left", "a red circle moving left"),
        # the article follows the new word, in the case it had
        ("A crimson disc", "A red circle"),
        ("a tangerine disc", "an orange circle"),
        # a plural noun by its plural; case and punctuation around words kept
        ("Two DISCS, ascending!", "Two circles, rising!"),
        # the longest phrase wins, hyphens join words like spaces
        ("a snow-white disc", "a white circle"),
        ("a snow white disc", "a white circle"),
        # a generic noun after a rewritten shape is absorbed
        ("a crimson triangular shape rising", "a red triangle rising"),
        # an attribute already named is not rewritten again ("sky" stays)
        ("a red circle rising into the sky", "a red circle rising into the sky"),
        ("a crimson disc ascending into the sky", "a red circle rising into the sky"),
        # words the lexicon does not know are left as they are
        ("a zorblat wibbling", "a zorblat wibbling"),
        ("", ""),
    ],
)
def test_rewrite_rules(lexicon, prompt, expected):
    assert lexicon.rewrite(prompt) == expected


def test_read_gives_the_first_value_of_each_attribute(lexicon):
    assert lexicon.read("a red circle rising, an orange triangle") == {
        "colour": "red",
        "shape": "circle",
        "motion": "up",
    }
    assert lexicon.read(lexicon.rewrite("a crimson disc moving westward")) == {
        "colour": "red",
        "shape": "circle",
        "motion": "left",
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"known": [], "attributes": {}', "not a readable lexicon JSON"),  # truncated
        ("[1, 2]", "must be a JSON object"),
        ('{"known": [], "attributes": {}}', "missing words"),
        ('{"known": "abc", "attributes": {}, "words": {}}', "'known' must be a list"),
        ('{"known": [], "attributes": {"red": "colour"}, "words": {}}', "'attributes' must map"),
        ('{"known": [], "attributes": {}, "words": {"x": ["colour", "red"]}}', "word 'x'"),
        (b"\xff\xfe\x00", "not a readable lexicon JSON"),
    ],
)
def test_a_malformed_lexicon_is_refused_with_its_path(tmp_path, content, message):
    path = tmp_path / LEXICON_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as info:
        Lexicon.load(path)
    assert str(path) in str(info.value)


def test_a_missing_lexicon_is_a_clear_error_and_a_folder_without_one_has_none(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lexicon at"):
        Lexicon.load(tmp_path / LEXICON_FILE)
    assert find_lexicon(tmp_path) is None and find_lexicon(None) is None


def test_find_lexicon_reads_a_changed_file_again(tmp_path):
    path = tmp_path / LEXICON_FILE
    path.write_text(json.dumps(SMALL))
    assert find_lexicon(tmp_path).rewrite("a crimson disc") == "a red circle"
    changed = dict(SMALL, words={"crimson": ["colour", "orange", "orange"]})
    path.write_text(json.dumps(changed) + "\n")  # another size: another version
    assert find_lexicon(tmp_path).rewrite("a crimson disc") == "an orange disc"


@pytest.fixture(scope="module")
def demo():
    return load_pipeline(None, device="cpu")


def test_the_demo_encodes_the_rewritten_prompt(demo):
    """Same seed: a prompt in words the captions never use gives the very latents of its
    rewrite; with rewriting off it does not (the encoder reads other words)."""
    assert demo.lexicon is not None and demo.source["lexicon"].endswith(LEXICON_FILE)
    prompt = "a crimson disc drifting toward the west"
    rs = demo.resolve(_settings(prompt))
    assert rs.encoded_prompt == "a red circle drifting toward the left"
    kw = dict(seed=5, num_steps=2, output="latents")
    a = demo.generate(prompt, **kw)
    b = demo.generate(rs.encoded_prompt, **kw)
    c = demo.generate(prompt, rewrite_prompt=False, **kw)
    assert a.settings.encoded_prompt == rs.encoded_prompt and a.settings.prompt == prompt
    assert b.settings.encoded_prompt is None  # already in caption words: nothing to rewrite
    assert c.settings.encoded_prompt is None and not c.settings.rewrite_prompt
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_rewrite_prompt_must_be_a_bool(demo):
    with pytest.raises(ValueError, match="rewrite_prompt must be true or false"):
        demo.resolve(_settings("a red circle", rewrite_prompt="yes"))


def test_a_preset_has_no_lexicon_and_encodes_the_prompt_as_given():
    pipe = load_pipeline("tiny-t2v", device="cpu")
    assert pipe.lexicon is None and pipe.source["lexicon"] is None
    assert pipe.resolve(_settings("a crimson disc")).encoded_prompt is None


def test_the_demo_folder_ships_its_lexicon():
    assert find_lexicon(DEMO_DIR) is not None


def _settings(prompt, **kw):
    from vidmoe.sampling.settings import GenerateSettings

    return GenerateSettings(prompt=prompt, **kw)
