"""The shapes world: seeded determinism, captions that name the label, prompt parsing, visible
motion that stays in frame, the Dataset wrapper and the mp4 dataset folder."""

import itertools
import json
import time

import numpy as np
import pytest
import torch

from vidmoe.world.labels import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_MOTION_PHRASES,
    MOTION_PHRASES,
    MOTIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    motion_phrases,
)
from vidmoe.world.shapes import (
    BACKGROUND_RGB,
    ShapeLabel,
    ShapesDataset,
    ShapesWorld,
    caption_for,
    parse_prompt,
    render,
    write_dataset,
)

ALL_TEXTURES = ("plain", "noise", "stripes")


def test_same_seed_gives_byte_identical_clips():
    a = ShapesWorld(64, 64, 17, seed=7, textures=ALL_TEXTURES)
    b = ShapesWorld(64, 64, 17, seed=7, textures=ALL_TEXTURES)
    for index in (0, 1, 123):
        ca, cb = a.sample(index), b.sample(index)
        assert ca.video.numpy().tobytes() == cb.video.numpy().tobytes()
        assert (ca.caption, ca.label) == (cb.caption, cb.label)
    other = ShapesWorld(64, 64, 17, seed=8, textures=ALL_TEXTURES).sample(0)
    assert not torch.equal(other.video, a.sample(0).video)
    label = ShapeLabel("red", "star", "rotating", "grey", "large", "stripes")
    assert render(label, 3).numpy().tobytes() == render(label, 3).numpy().tobytes()
    assert not torch.equal(render(label, 3), render(label, 4))


@pytest.mark.parametrize("size", [(64, 64, 17), (48, 32, 9), (96, 64, 5)])
def test_clip_format(size):
    width, height, frames = size
    clip = ShapesWorld(width, height, frames, seed=0).sample(3)
    assert clip.video.shape == (3, frames, height, width)
    assert clip.video.dtype == torch.float32
    assert clip.video.min() >= -1.0 and clip.video.max() <= 1.0
    assert clip.objects[0] == clip.label


def test_render_is_fast():
    world = ShapesWorld(64, 64, 17, seed=0, textures=ALL_TEXTURES)
    world.sample(0)
    times = []
    for index in range(10):
        start = time.perf_counter()
        world.sample(index)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.05


def test_captions_name_the_label():
    world = ShapesWorld(64, 64, 17, seed=1, textures=ALL_TEXTURES)
    for index in range(200):
        clip = world.sample(index)
        words = clip.caption.split()
        assert clip.label.colour in words and clip.label.shape in words, clip.caption
        assert any(p in clip.caption for p in MOTION_PHRASES[clip.label.motion]), clip.caption


def test_extended_vocabulary_changes_only_the_captions():
    base = ShapesWorld(32, 32, 5, seed=3)
    extended = ShapesWorld(32, 32, 5, seed=3, vocabulary="extended")
    phrases = motion_phrases("extended")
    assert all(set(MOTION_PHRASES[m]) < set(phrases[m]) for m in ("left", "right", "up", "down"))
    used = set()
    for index in range(120):
        a, b = base.sample(index), extended.sample(index)
        assert a.label == b.label
        if index < 3:  # rendering is the slow part; the video follows the label and its seed
            assert torch.equal(a.video, b.video)
        captions = extended.captions(index, 4)
        assert captions[0] == b.caption
        for caption in captions:
            p = parse_prompt(caption)
            assert (p.colour, p.shape, p.motion) == (b.label.colour, b.label.shape, b.label.motion)
            used |= {ph for ph in EXTRA_MOTION_PHRASES.get(b.label.motion, ()) if ph in caption}
    assert len(used) > 10  # the new phrasings are drawn
    with pytest.raises(ValueError, match="vocabulary must be one of.*rich"):
        ShapesWorld(32, 32, 5, vocabulary="large")


def test_sampled_labels_are_drawable():
    world = ShapesWorld(64, 64, 17, seed=2)
    labels = [world.sample(i).label for i in range(300)]
    assert not any(lab.shape == "circle" and lab.motion == "rotating" for lab in labels)
    assert not any(lab.colour == lab.background for lab in labels)
    assert {lab.motion for lab in labels} == set(MOTIONS)
    assert {lab.colour for lab in labels} == set(COLOURS)


def test_parse_prompt_recovers_every_caption():
    rng = np.random.default_rng(0)
    combos = itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS, SIZES, TEXTURES)
    for colour, shape, motion, background, size, texture in combos:
        label = ShapeLabel(colour, shape, motion, background, size, texture)
        parsed = parse_prompt(caption_for(label, rng))
        assert (parsed.colour, parsed.shape, parsed.motion) == (colour, shape, motion)
        assert parsed.background in (None, background) and parsed.size in (None, size)
        if parsed.background is not None:
            assert parsed.texture == texture


def test_caption_variants_start_with_the_sampled_caption_and_name_the_label():
    world = ShapesWorld(32, 32, 5, seed=3, textures=ALL_TEXTURES)
    for index in (0, 1, 57):
        clip, variants = world.sample(index), world.captions(index, 6)
        assert variants[0] == clip.caption and len(set(variants)) >= 3
        assert world.captions(index, 3) == variants[:3]  # a variant does not depend on the count
        for text in variants:
            parsed = parse_prompt(text)
            assert (parsed.colour, parsed.shape, parsed.motion) == (
                clip.label.colour,
                clip.label.shape,
                clip.label.motion,
            )
    with pytest.raises(ValueError, match="count must be >= 1"):
        world.captions(0, 0)


def test_parse_prompt_multi_object_caption_reads_the_first_object():
    world = ShapesWorld(64, 64, 17, num_objects=2, seed=3)
    for index in range(100):
        clip = world.sample(index)
        parsed = parse_prompt(clip.caption)
        lab = clip.label
        assert (parsed.colour, parsed.shape, parsed.motion) == (lab.colour, lab.shape, lab.motion)
        assert parsed.background == lab.background


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red circle moving to the right", ("red", "circle", "right")),
        ("A Crimson ball travelling rightward", ("red", "circle", "right")),
        ("the blue square drifts left on a dark blue background", ("blue", "square", "left")),
        ("a green star rising", ("green", "star", "up")),
        ("an orange triangle falling", ("orange", "triangle", "down")),
        ("a white disc sinking slowly", ("white", "circle", "down")),
        ("a magenta star getting bigger", ("purple", "star", "growing")),
        ("an expanding cyan box", ("cyan", "square", "growing")),
        ("a yellow triangle getting smaller", ("yellow", "triangle", "shrinking")),
        ("a spinning turquoise star", ("cyan", "star", "rotating")),
        ("a red square moving up and to the right", ("red", "square", "diagonal")),
        ("a purple circle on a gray background", ("purple", "circle", None)),
        ("something unrelated", (None, None, None)),
    ],
)
def test_parse_prompt_synonyms(text, expected):
    parsed = parse_prompt(text)
    assert (parsed.colour, parsed.shape, parsed.motion) == expected


def _object_mask(label: ShapeLabel, seed: int, size=64, frames=17) -> np.ndarray:
    video = render(label, seed, width=size, height=size, num_frames=frames)
    frames_rgb = (video.permute(1, 2, 3, 0).numpy() + 1) / 2  # (T, H, W, 3)
    bg = np.asarray(BACKGROUND_RGB[label.background])
    return np.abs(frames_rgb - bg).max(-1) > 0.05  # (T, H, W)


@pytest.mark.parametrize("motion", ["left", "right", "up", "down", "diagonal"])
def test_translation_is_visible_and_stays_in_frame(motion):
    for seed, shape, size in itertools.product(range(3), SHAPES, SIZES):
        mask = _object_mask(ShapeLabel("red", shape, motion, "grey", size), seed)
        ys, xs = np.mgrid[0:64, 0:64]
        cx = (mask * xs).sum((1, 2)) / mask.sum((1, 2))
        cy = (mask * ys).sum((1, 2)) / mask.sum((1, 2))
        travel = np.hypot(cx[-1] - cx[0], cy[-1] - cy[0]) / 64
        assert 0.28 <= travel <= 0.55, (shape, size, travel)
        border = (
            mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any()
        )
        assert not border, "the shape left the frame"


def test_growing_shrinking_rotating_change_the_mask():
    areas = {
        m: _object_mask(ShapeLabel("blue", "square", m, "black", "large"), 0).sum((1, 2))
        for m in ("growing", "shrinking", "rotating")
    }
    assert areas["growing"][-1] > 3 * areas["growing"][0]
    assert areas["shrinking"][0] > 3 * areas["shrinking"][-1]
    rot = _object_mask(ShapeLabel("blue", "square", "rotating", "black", "large"), 0)
    iou = [(rot[0] & m).sum() / (rot[0] | m).sum() for m in rot]
    assert min(iou) < 0.85  # a square turning in place visibly changes its silhouette


def test_dataset_wrapper_collates():
    dataset = ShapesDataset(ShapesWorld(32, 32, 5, seed=0), length=4)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    assert len(batch["caption"]) == 2 and isinstance(batch["caption"][0], str)
    assert torch.equal(batch["video"][1], dataset.world.sample(1).video)
    with pytest.raises(IndexError):
        dataset[4]


def test_write_dataset_round_trips_through_mp4(tmp_path):
    import av

    from vidmoe.world.analyser import analyse

    metadata = write_dataset(tmp_path, 3, width=64, height=64, num_frames=17, seed=11)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) >= {"file", "caption"} for r in rows)
    for row in rows:
        with av.open(str(tmp_path / row["file"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert frames.shape == (17, 64, 64, 3)
        reading = analyse(frames)
        label = row["label"]
        assert (reading.colour, reading.shape, reading.motion) == (
            label["colour"],
            label["shape"],
            label["motion"],
        )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="colour"):
        ShapeLabel("pink", "circle", "left")
    with pytest.raises(ValueError, match="num_frames"):
        ShapesWorld(64, 64, 1)
    with pytest.raises(ValueError, match="backgrounds"):
        ShapesWorld(64, 64, 5, backgrounds=("beige",))
    with pytest.raises(ValueError, match="ShapeLabel"):
        render({"colour": "red"}, 0)


def test_rich_vocabulary_names_the_label_in_other_words_and_orders():
    """Rich captions (issue 23) keep the labels and videos, parse back to their label, and
    draw the rich colour words, shape nouns, motion phrases and templates."""
    from vidmoe.world.labels import words_of
    from vidmoe.world.rich import RICH_COLOUR_WORDS, RICH_MOTION_PHRASES, RICH_SHAPE_WORDS

    base = ShapesWorld(32, 32, 5, seed=3)
    rich = ShapesWorld(32, 32, 5, seed=3, vocabulary="rich")
    extended, richer = motion_phrases("extended"), motion_phrases("rich")
    assert all(set(extended[m]) <= set(richer[m]) for m in MOTION_PHRASES)
    assert all(set(extended[m]) < set(richer[m]) for m in ("left", "right", "up", "down"))
    used: set[str] = set()
    label_words = 0
    for index in range(150):
        label = base.sample(index).label
        captions = rich.captions(index, 4)
        first = words_of(captions[0])
        assert {label.colour, label.shape} <= first  # training's oversample reads these
        if index < 3:
            assert rich.sample(index).label == label
            assert torch.equal(rich.sample(index).video, base.sample(index).video)
        for caption in captions:
            p = parse_prompt(caption)
            assert (p.colour, p.shape, p.motion) == (label.colour, label.shape, label.motion)
            assert p.size in (None, label.size), caption
            words = words_of(caption)
            label_words += label.shape in words
            tables = (RICH_COLOUR_WORDS[label.colour], RICH_SHAPE_WORDS[label.shape])
            used |= {w for t in tables for w in t if w in words}
            used |= {ph for ph in RICH_MOTION_PHRASES.get(label.motion, ()) if ph in caption}
    assert len(used) > 40  # the new words and phrases are drawn
    assert 250 < label_words < 500  # the label's own noun in the first and some others (of 600)
    assert any(
        not c.startswith(("a ", "an ", "the ")) for i in range(20) for c in rich.captions(i, 4)
    )
