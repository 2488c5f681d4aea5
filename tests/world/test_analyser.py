"""The analyser reads colour, shape and motion back from fresh clips (clean and noisy), refuses
mismatched labels, and follows the video when it is flipped or played backwards."""

import dataclasses

import numpy as np
import pytest
import torch

from vidmoe.world.analyser import Reading, adherence, analyse
from vidmoe.world.labels import COLOURS, MOTIONS, SHAPES, PromptLabel
from vidmoe.world.shapes import ShapeLabel, ShapesWorld, render

ATTRS = ("colour", "shape", "motion")
# seeds no other test (or the thresholds' calibration) used
CLEAN_WORLD = ShapesWorld(64, 64, 17, seed=424242, textures=("plain", "noise", "stripes"))
NOISY_WORLD = ShapesWorld(64, 64, 17, seed=515151, textures=("plain", "noise", "stripes"))


def _next(value, values):
    return values[(values.index(value) + 1) % len(values)]


def _mismatched(label: ShapeLabel) -> ShapeLabel:
    """The same clip's label with every scored attribute swapped for a different one."""
    return dataclasses.replace(
        label,
        colour=_next(label.colour, COLOURS),
        shape=_next(label.shape, SHAPES),
        motion=_next(label.motion, MOTIONS),
    )


def _rates(readings, labels) -> dict[str, float]:
    scores = [adherence(r, lab) for r, lab in zip(readings, labels, strict=True)]
    return {k: float(np.mean([s[k] for s in scores])) for k in (*ATTRS, "all")}


def test_reads_back_fresh_clean_clips():
    clips = [CLEAN_WORLD.sample(i) for i in range(120)]
    readings = [analyse(c.video) for c in clips]
    rates = _rates(readings, [c.label for c in clips])
    assert all(rate >= 0.95 for rate in rates.values()), rates
    # the same readings against wrong labels must fail, or the test above proves nothing
    wrong = _rates(readings, [_mismatched(c.label) for c in clips])
    assert all(rate <= 0.05 for rate in wrong.values()), wrong


def test_reads_back_noisy_clips():
    generator = torch.Generator().manual_seed(0)
    clips = [NOISY_WORLD.sample(i) for i in range(100)]
    readings = [
        analyse(c.video + 0.1 * torch.randn(c.video.shape, generator=generator)) for c in clips
    ]
    rates = _rates(readings, [c.label for c in clips])
    assert all(rate >= 0.85 for rate in rates.values()), rates


def test_uint8_frames_read_like_the_float_clip():
    clip = CLEAN_WORLD.sample(0)
    frames = ((clip.video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8)  # (T, H, W, 3)
    a, b = analyse(clip.video), analyse(frames.numpy())
    assert (a.colour, a.shape, a.motion) == (b.colour, b.shape, b.motion)
    assert analyse(frames).motion == a.motion  # a uint8 tensor works too


def test_reading_follows_flips_and_time_reversal():
    right = render(ShapeLabel("green", "triangle", "right", "black", "medium"), 1)
    assert analyse(right).motion == "right"
    assert analyse(right.flip(-1)).motion == "left"
    diagonal = render(ShapeLabel("cyan", "square", "diagonal", "grey", "medium"), 2)
    assert analyse(diagonal).motion == "diagonal"
    flipped = analyse(diagonal.flip(-1))  # up-left is no world motion, so it matches no label
    assert (
        flipped.motion == "up_left"
        and not adherence(flipped, "a cyan square moving diagonally")["motion"]
    )
    growing = render(ShapeLabel("orange", "star", "growing", "white", "small"), 3)
    assert analyse(growing).motion == "growing"
    assert analyse(growing.flip(1)).motion == "shrinking"
    rotating = render(ShapeLabel("purple", "star", "rotating", "dark_blue", "large"), 4)
    a, b = analyse(rotating), analyse(rotating.flip(1))
    assert a.motion == b.motion == "rotating" and np.sign(a.rotation_deg) == -np.sign(
        b.rotation_deg
    )


def test_static_and_empty_videos():
    still = render(ShapeLabel("red", "square", "rotating", "grey", "large"), 0)[:, :1].repeat(
        1, 9, 1, 1
    )
    reading = analyse(still)
    assert reading.found and reading.motion == "static" and reading.shape == "square"
    blank = torch.zeros(3, 9, 64, 64)
    empty = analyse(blank)
    assert not empty.found and empty.colour is None and empty.background == "grey"
    assert adherence(empty, "a red square moving left") == {
        "colour": False,
        "shape": False,
        "motion": False,
        "all": False,
    }


def test_adherence_scores_only_what_the_prompt_names():
    clip = CLEAN_WORLD.sample(1)
    reading = analyse(clip.video)
    assert adherence(reading, clip.caption)["all"]
    assert set(adherence(reading, f"something {clip.label.colour}")) == {"colour", "all"}
    assert adherence(reading, PromptLabel(shape=_next(clip.label.shape, SHAPES))) == {
        "shape": False,
        "all": False,
    }
    with pytest.raises(ValueError, match="target"):
        adherence(reading, 3)


def test_large_videos_are_read_too():
    label = ShapeLabel("yellow", "star", "down", "dark_blue", "medium", "stripes")
    reading = analyse(render(label, 5, width=256, height=192, num_frames=9))
    assert isinstance(reading, Reading) and (reading.colour, reading.shape, reading.motion) == (
        "yellow",
        "star",
        "down",
    )


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="3, T, H, W"):
        analyse(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="T, H, W, 3"):
        analyse(np.zeros((5, 3, 64, 64), dtype=np.uint8))
