"""The evaluation harness: held-out prompts, flicker, scoring against the analyser, ablations."""

import numpy as np
import pytest

from vidmoe.evaluation import (
    HELD_OUT_TEMPLATES,
    evaluate,
    flicker,
    parse_ablation,
    prompt_set,
    swapped,
    write_report,
)
from vidmoe.io.video import to_uint8_frames
from vidmoe.loading import build_random_pipeline
from vidmoe.world.labels import ShapeLabel, parse_prompt
from vidmoe.world.shapes import ShapesWorld, demo_world, render


def test_prompt_set_is_balanced_parseable_and_held_out():
    items = prompt_set(32)
    assert len({i.prompt for i in items}) == 32
    assert {i.motion for i in items} == {"left", "right", "up", "down"}
    world = ShapesWorld(64, 64, 17, seed=0)
    captions = {world.sample(i).caption for i in range(300)}
    assert not captions & {i.prompt for i in items}
    # the demo's training captions (its world, 8 phrasings per clip, both vocabularies) hold none
    # of the held-out prompts, and its clips show every colour, shape and motion they ask for
    demo = [demo_world(v) for v in ("base", "extended")]
    held_out = prompt_set(128)
    captions = {c for w in demo for i in range(150) for c in w.captions(i, 8)}
    assert not captions & {i.prompt for i in held_out}
    labels = [demo[0].sample(i).label for i in range(150)]
    for attr in ("colour", "shape", "motion"):
        asked = {getattr(i, attr) for i in held_out}
        assert asked == {getattr(lab, attr) for lab in labels}, attr
    assert {lab.size for lab in labels} == {"large"}
    for item in items:
        p = parse_prompt(item.prompt)
        assert (p.colour, p.shape, p.motion) == (item.colour, item.shape, item.motion)
    assert prompt_set(8, seed=1) != prompt_set(8, seed=2)
    assert len(HELD_OUT_TEMPLATES) >= 3


def test_held_out_motion_phrases_are_not_training_phrases_and_parse():
    from vidmoe.evaluation import HELD_OUT_MOTIONS
    from vidmoe.world.labels import motion_phrases

    MOTION_PHRASES = motion_phrases("extended")  # a superset of the base vocabulary
    for motion, held_out in HELD_OUT_MOTIONS.items():
        for phrase in held_out:
            assert parse_prompt(f"a red circle {phrase}").motion == motion, phrase
            for training in MOTION_PHRASES[motion]:
                assert phrase not in training and training not in phrase, (phrase, training)
        for training in MOTION_PHRASES[motion]:
            assert parse_prompt(f"a red circle {training}").motion == motion, training


def test_flicker_is_zero_for_still_and_linear_change_and_high_for_noise():
    still = np.full((9, 8, 8, 3), 100, np.uint8)
    ramp = np.stack([np.full((8, 8, 3), 10 * t, np.uint8) for t in range(9)])
    noisy = np.random.default_rng(0).integers(0, 255, (9, 8, 8, 3)).astype(np.uint8)
    assert flicker(still) == 0 and flicker(ramp) == 0 and flicker(noisy) > 50


class _Renderer:
    """Draws what a prompt asks for (or a fixed wrong label): a known answer for the harness."""

    def __init__(self, wrong: bool = False):
        self.wrong = wrong

    def generate(self, prompt, seed=0, **_):
        p = parse_prompt(prompt)
        label = ShapeLabel(colour=p.colour, shape=p.shape, motion=p.motion)
        if self.wrong:
            label = ShapeLabel(colour="green" if p.colour != "green" else "red", shape=p.shape,
                               motion="up" if p.motion != "up" else "down")  # fmt: skip
        return type("R", (), {"frames": to_uint8_frames(render(label, seed))})()


def test_harness_scores_a_faithful_renderer_high_and_a_wrong_one_low(tmp_path):
    items = prompt_set(12)
    good = evaluate(_Renderer(), items, name="faithful").summary()
    bad = evaluate(_Renderer(wrong=True), items, name="wrong").summary()
    assert good["all"] >= 0.9 and bad["colour"] == 0 and bad["motion"] == 0 and bad["all"] == 0
    write_report([evaluate(_Renderer(), items[:2], name="a")], tmp_path / "report", "cmd")
    assert (tmp_path / "report.md").read_text().count("|") > 10 and (
        tmp_path / "report.png"
    ).exists()


def test_swapped_pipeline_exchanges_the_experts():
    pipe = build_random_pipeline("tiny-t2v")
    swap = swapped(pipe)
    assert swap.experts["high_noise"] is pipe.experts["low_noise"]
    assert swap.experts["low_noise"] is pipe.experts["high_noise"]
    a = pipe.generate("x", num_steps=2, output="latents").latents
    b = swap.generate("x", num_steps=2, output="latents").latents
    assert not np.allclose(a.numpy(), b.numpy())


def test_ablation_specs():
    assert parse_ablation("swap")[0][2] is True
    assert [v[1] for v in parse_ablation("boundary:0.5,snr")] == [
        {"boundary": 0.5},
        {"boundary": "snr"},
    ]
    assert parse_ablation("band:0.05")[0][1] == {"band": 0.05}
    with pytest.raises(ValueError, match="ablation must be"):
        parse_ablation("dropout")
