"""The evaluation harness: held-out phrasings and words, the first-frame change, flicker,
scoring against the analyser, per-shape readings, ablations, candidate experts, the CLI."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.eval_report import markdown_details, motion_misses, shape_readings
from vidmoe.evaluation import (
    HELD_OUT_TEMPLATES,
    EvalResult,
    border_changes,
    evaluate,
    first_frame_change,
    flicker,
    held_out_prompts,
    parse_ablation,
    parse_expert_files,
    parse_seeds,
    prompt_set,
    swapped,
    with_experts,
    word_prompt_set,
    write_report,
)
from vidmoe.io.atomic import save_safetensors_atomic
from vidmoe.io.video import to_uint8_frames
from vidmoe.loading import build_random_pipeline
from vidmoe.world.labels import (
    COLOURS,
    HELD_OUT_COLOUR_WORDS,
    HELD_OUT_MOTION_WORDS,
    HELD_OUT_SHAPE_WORDS,
    MOTIONS,
    SHAPES,
    ShapeLabel,
    caption_words,
    parse_prompt,
    words_of,
)
from vidmoe.world.shapes import ShapesWorld, demo_world, render


def test_prompt_set_is_balanced_parseable_and_held_out():
    items = prompt_set(32)
    assert len({i.prompt for i in items}) == 32
    assert {i.motion for i in items} == {"left", "right", "up", "down"}
    world = ShapesWorld(64, 64, 17, seed=0)
    captions = {world.sample(i).caption for i in range(300)}
    assert not captions & {i.prompt for i in items}
    # the demo's training captions (its world, 8 phrasings per clip, every vocabulary) hold none
    # of the held-out prompts, and its clips show every colour, shape and motion they ask for
    demo = [demo_world(v) for v in ("base", "extended", "rich")]
    held_out = prompt_set(128)
    captions = {c for w in demo for i in range(150) for c in w.captions(i, 8)}
    assert not captions & {i.prompt for i in held_out}
    from vidmoe.evaluation import HELD_OUT_MOTIONS

    phrases = {p for ps in HELD_OUT_MOTIONS.values() for p in ps}
    assert not [c for c in captions if any(p in c for p in phrases)]  # no held-out motion phrase
    template_words = {"watch", "here", "one", "across", "frame"}  # the held-out templates' own
    assert not set().union(*(words_of(c) for c in captions)) & template_words
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

    MOTION_PHRASES = motion_phrases("rich")  # a superset of the base and extended ones
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
            label = ShapeLabel(
                colour="green" if p.colour != "green" else "red",
                shape=p.shape,
                motion="up" if p.motion != "up" else "down",
            )
        frames = to_uint8_frames(render(label, seed))
        return SimpleNamespace(frames=frames, settings=SimpleNamespace(encoded_prompt=None))


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


@pytest.mark.parametrize("vocabulary", ["base", "extended", "rich"])
def test_held_out_words_parse_but_no_demo_caption_uses_them(vocabulary):
    """Every held-out colour, shape and motion word is read by parse_prompt as its attribute,
    and none is a word of the demo world's captions (8 phrasings of 300 clips, and every word
    a caption of this vocabulary can hold); a motion phrase's motion lies in those words alone."""
    world = demo_world(vocabulary)
    captions = {c for i in range(300) for c in world.captions(i, 8)}
    used = set().union(*(words_of(c) for c in captions))
    vocab = caption_words(vocabulary)
    assert used <= vocab  # caption_words covers every word the drawn captions use
    attrs = {"colour": HELD_OUT_COLOUR_WORDS, "shape": HELD_OUT_SHAPE_WORDS}
    for attr, table in attrs.items():
        assert set(table) == set(COLOURS if attr == "colour" else SHAPES)
        for label, words in table.items():
            for word in words:
                assert getattr(parse_prompt(f"the {word}"), attr) == label, word
                assert not words_of(word) & vocab, word
    assert set(HELD_OUT_MOTION_WORDS) == set(MOTIONS)
    for motion, phrases in HELD_OUT_MOTION_WORDS.items():
        for phrase in phrases:
            held_out = words_of(phrase) - vocab
            assert held_out and not held_out & used, phrase
            assert parse_prompt(f"a red circle {phrase}").motion == motion, phrase
            rest = " ".join(w for w in phrase.replace("-", " ").split() if w not in held_out)
            assert parse_prompt(f"a red circle {rest}").motion != motion, (phrase, rest)


def test_word_prompt_set_pairs_the_phrasings_and_uses_only_held_out_attribute_words():
    phrasings, words = prompt_set(32, seed=3), word_prompt_set(32, seed=3)
    pairs = [(i.colour, i.shape, i.motion) for i in phrasings]
    assert [(i.colour, i.shape, i.motion) for i in words] == pairs  # the same combinations
    assert {i.kind for i in phrasings} == {"phrasings"} and {i.kind for i in words} == {"words"}
    labels = set(COLOURS) | set(SHAPES) | {"left", "right", "up", "down"}
    for item in words:
        p = parse_prompt(item.prompt)
        assert (p.colour, p.shape, p.motion) == (item.colour, item.shape, item.motion)
        assert not words_of(item.prompt) & labels, item.prompt
        assert item.motion_phrase in item.prompt and item.shape_word in item.prompt
    assert len({i.prompt for i in words}) == 32
    both = held_out_prompts("both", 4, motions=("growing", "rotating"))
    assert [i.kind for i in both] == ["phrasings"] * 4 + ["words"] * 4
    with pytest.raises(ValueError, match="--prompt-set must be one of phrasings, words, fresh"):
        held_out_prompts("some", 4)
    with pytest.raises(ValueError, match="has 128 prompts .* got --prompts 129: use 1..128"):
        held_out_prompts("words", 129)
    with pytest.raises(ValueError, match="motions must be some of .*got \\['diagonal'\\]"):
        prompt_set(4, motions=("diagonal",))  # no held-out phrasing for it
    assert word_prompt_set(4, motions=("diagonal",))[0].motion == "diagonal"


def test_fresh_words_are_new_to_the_captions_and_the_held_out_words():
    """The fresh set names each direction's clips with words no caption of the shipped demo's
    vocabulary (extended; the rich one has 'aqua') and no held-out word uses, pairs them like
    the other sets, and comes with the others under 'all'."""
    vocabulary = "extended"
    from vidmoe.evaluation import FRESH_COLOUR_WORDS, FRESH_MOTION_WORDS, FRESH_SHAPE_WORDS

    vocab = caption_words(vocabulary)
    held = [HELD_OUT_COLOUR_WORDS, HELD_OUT_SHAPE_WORDS, HELD_OUT_MOTION_WORDS]
    held_words = {w for table in held for ws in table.values() for p in ws for w in words_of(p)}
    tables = {"colour": FRESH_COLOUR_WORDS, "shape": FRESH_SHAPE_WORDS}
    assert set(FRESH_COLOUR_WORDS) == set(COLOURS) and set(FRESH_SHAPE_WORDS) == set(SHAPES)
    for table in tables.values():
        for words in table.values():
            for word in words:
                new = words_of(word) - vocab  # "navy blue": 'navy' is new, 'blue' is not
                assert new - held_words, word  # ("shape" is in held-out names too)
    assert set(FRESH_MOTION_WORDS) == {"left", "right", "up", "down"}
    for phrases in FRESH_MOTION_WORDS.values():
        for phrase in phrases:
            assert words_of(phrase) - vocab - held_words, phrase
            assert not words_of(phrase) & {"left", "right", "up", "down"}, phrase
    fresh = word_prompt_set(32, seed=3, kind="fresh")
    assert [(i.colour, i.shape, i.motion) for i in fresh] == [
        (i.colour, i.shape, i.motion) for i in prompt_set(32, seed=3)
    ]
    assert {i.kind for i in fresh} == {"fresh"} and len({i.prompt for i in fresh}) == 32
    everything = held_out_prompts("all", 3)
    assert [i.kind for i in everything] == ["phrasings"] * 3 + ["words"] * 3 + ["fresh"] * 3


def test_first_frame_change_compares_the_border_from_frame_0_to_1_with_later_pairs():
    """A background that jumps 20 levels after frame 0 and then drifts 1 level per frame: the
    first change is 20, the later median 1; an object moving inside the frame changes nothing."""
    clip = np.zeros((9, 16, 16, 3), np.uint8)
    for t in range(9):
        clip[t] = 50 if t == 0 else 70 + t
        clip[t, 5:9, t : t + 4] = 255  # an object away from the top and bottom rows
    np.testing.assert_allclose(border_changes(clip), [21, 1, 1, 1, 1, 1, 1, 1])
    assert first_frame_change(clip) == (21.0, 1.0)
    steady = np.stack([np.full((8, 8, 3), 30, np.uint8)] * 5)
    steady[:, 3:5, :, 0] = np.arange(5)[:, None, None] * 40  # middle rows only
    assert first_frame_change(steady) == (0.0, 0.0)
    first, later = first_frame_change(clip[:2])
    assert first == 21.0 and np.isnan(later)


def test_summary_gives_median_and_p90_of_the_first_frame_change_per_prompt_set():
    rows = [
        dict(
            set=kind,
            colour=True,
            shape=k % 2 == 0,
            motion=True,
            all=k % 2 == 0,
            flicker=1.0,
            seconds=0.5,
            first_change=float(k),
            later_change=1.0 + k / 10,
        )
        for kind in ("phrasings", "words")
        for k in range(10)
    ]
    rows[-1]["later_change"] = float("nan")  # a clip too short for later pairs is left out
    result = EvalResult("x", rows)
    assert result.kinds() == ["phrasings", "words"]
    s = result.summary("words")
    assert s["clips"] == 10 and s["shape"] == 0.5 and s["all"] == 0.5
    assert s["first_change_median"] == 4.5 and s["first_change_p90"] == pytest.approx(8.1)
    assert s["later_change_median"] == pytest.approx(1.4)
    assert result.summary()["clips"] == 20 and result.summary()["first_change_median"] == 4.5


def test_faithful_renderer_scores_high_on_both_sets_and_reports_readings(tmp_path):
    items = held_out_prompts("both", 8)
    good = evaluate(_Renderer(), items, seeds=(0, 1), name="faithful")
    for kind in ("phrasings", "words"):
        s = good.summary(kind)
        assert s["clips"] == 16 and s["all"] >= 0.9, (kind, s)
        assert s["first_change_median"] < 1 and s["later_change_p90"] < 1  # rendered: no flash
    bad = evaluate(_Renderer(wrong=True), items, name="wrong")
    misses = motion_misses(bad.select("words"))
    assert sum(n for n, _ in misses.values()) == 8 and all(m == n for m, n in misses.values())
    assert set(misses) == {i.motion_phrase for i in items if i.kind == "words"}
    readings = shape_readings(good.rows)
    assert sum(sum(c.values()) for c in readings.values()) == 32
    assert all(c.get(shape, 0) >= 0.75 * sum(c.values()) for shape, c in readings.items())
    details = markdown_details([good])
    assert "### faithful, held-out words" in details and "Motion misses by phrase: " in details
    write_report([good, bad], tmp_path / "r", "cmd")
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["wrong"]["by_set"]) == {"phrasings", "words"}
    assert report["wrong"]["by_set"]["words"]["motion"] == 0
    assert report["faithful"]["shapes"]["words"] == shape_readings(good.select("words"))
    assert (tmp_path / "r.md").read_text().count("| faithful | words |") == 1


def test_seed_and_expert_options_parse_or_say_what_is_accepted():
    assert parse_seeds("0") == (0,) and parse_seeds("2,3") == (2, 3)
    assert parse_seeds("0-3") == (0, 1, 2, 3) and parse_seeds("0-1, 7") == (0, 1, 7)
    for bad, match in (
        ("a", "seeds and ranges like"),
        ("3-1", "from a seed >= 0 up"),
        ("1,0-2", "a seed twice"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
    assert parse_expert_files(["low_noise=a/b.safetensors"]) == {
        "low_noise": Path("a/b.safetensors")
    }
    files = parse_expert_files(["low_noise=a/b=c.safetensors"])
    assert str(files["low_noise"]) == "a/b=c.safetensors"
    with pytest.raises(ValueError, match="NAME=FILE"):
        parse_expert_files(["low_noise"])
    with pytest.raises(ValueError, match="twice"):
        parse_expert_files(["low_noise=a", "low_noise=b"])


def _latents(pipe):
    return pipe.generate("a red circle", num_steps=4, seed=1, output="latents").latents


def test_with_experts_reads_a_candidate_expert_and_leaves_the_loaded_one(tmp_path):
    pipe = build_random_pipeline("tiny-t2v")
    high, low = pipe.experts["high_noise"], pipe.experts["low_noise"]
    save_safetensors_atomic(high.state_dict(), tmp_path / "high.safetensors")
    save_safetensors_atomic(low.state_dict(), tmp_path / "low.safetensors")
    before = _latents(pipe)
    same = with_experts(pipe, {"low_noise": tmp_path / "low.safetensors"})
    torch.testing.assert_close(_latents(same), before, rtol=0, atol=0)
    cand = with_experts(pipe, {"low_noise": tmp_path / "high.safetensors"})
    assert cand.experts["high_noise"] is high and cand.experts["low_noise"] is not low
    for k, v in cand.experts["low_noise"].state_dict().items():
        assert torch.equal(v, high.state_dict()[k]), k
    assert not torch.equal(_latents(cand), before)
    torch.testing.assert_close(_latents(pipe), before, rtol=0, atol=0)  # the original unchanged
    assert cand.source["experts"] == {"low_noise": str(tmp_path / "high.safetensors")}
    assert with_experts(pipe, {}) is pipe
    with pytest.raises(ValueError, match="no expert 'mid_noise'; its experts are high_noise"):
        with_experts(pipe, {"mid_noise": tmp_path / "low.safetensors"})
    with pytest.raises(FileNotFoundError, match="no such file"):
        with_experts(pipe, {"low_noise": tmp_path / "none.safetensors"})


def test_cli_eval_with_sets_seeds_expert_and_sampling_options(tmp_path):
    """`vidmoe eval` on the tiny preset, 1 prompt per set at seed 5, one step, the low-noise
    expert given as a file, guidance, sampler and shift set: a report per set; bad options
    exit 2 with what is accepted."""
    expert = tmp_path / "low.safetensors"
    save_safetensors_atomic(
        build_random_pipeline("tiny-t2v").experts["low_noise"].state_dict(), expert
    )
    out = tmp_path / "report"
    args = [
        "eval",
        "tiny-t2v",
        "--prompts",
        "1",
        "--seeds",
        "5",
        "--steps",
        "1",
        "--prompt-set",
        "both",
        "--expert",
        f"low_noise={expert}",
        "-g",
        "high_noise=4,low_noise=3",
        "--sampler",
        "unipc",
        "--shift",
        "5",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "| release plan | phrasings |" in r.output and "| release plan | words |" in r.output
    report = json.loads(out.with_suffix(".json").read_text())["release plan"]
    assert {k: s["clips"] for k, s in report["by_set"].items()} == {"phrasings": 1, "words": 1}
    assert [row["seed"] for row in report["rows"]] == [5, 5]
    assert all(row["first_change"] >= 0 for row in report["rows"])
    for bad, message in (
        (["--seeds", "2-1"], "from a seed >= 0 up"),
        (["--prompt-set", "every"], "--prompt-set must be one of"),
        (["--expert", f"mid={expert}"], "no expert 'mid'"),
        (["--sampler", "heun", "--steps", "1"], "sampler"),
    ):
        r = CliRunner().invoke(app, ["eval", "tiny-t2v", "--prompts", "1", *bad])
        assert r.exit_code == 2 and message in r.output, (bad, r.output)
