"""One validation of settings: types before conversion, finite numbers, 0 as a value, bounded
work, typed boundaries (every bad input a ValueError that names the field)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from vidmoe.config import ModelConfig
from vidmoe.presets import get_preset
from vidmoe.sampling.boundary import (
    SNR,
    Budgets,
    Calibrated,
    Release,
    Sigma,
    Steps,
    parse_boundary,
    read_loss_tables,
    write_loss_tables,
)
from vidmoe.sampling.plan import plan_for
from vidmoe.sampling.settings import GenerateSettings, Limits, resolve_settings

TINY = get_preset("tiny-t2v")
DENSE = get_preset("tiny-ti2v")

BAD = [
    # types are checked before any conversion
    (dict(width="64"), r"width must be an integer; got '64' \(a string\)"),
    (dict(height=64.0), r"height must be an integer; got 64.0 \(a float\)"),
    (dict(num_frames=True), r"num_frames must be an integer; got True \(a boolean\)"),
    (dict(num_steps="4"), r"num_steps must be an integer; got '4' \(a string\)"),
    (dict(seed=1.5), r"seed must be an integer; got 1.5"),
    (dict(seed=True), r"seed must be an integer; got True \(a boolean\)"),
    (dict(shift=[1]), r"shift must be a number; got \[1\] \(a list\)"),
    (dict(shift="abc"), r"shift must be a number; got 'abc' \(a string\)"),
    (dict(band="0.1"), r"band must be a number; got '0.1'"),
    (dict(boundary=[0.5]), r"boundary must be one of .*; got \[0.5\] \(a list\)"),
    (dict(boundary={}), r"boundary must be one of .*; got \{\} \(a dict\)"),
    (dict(boundary=True), r"boundary must be one of .*; got True \(a boolean\)"),
    (
        dict(steps_per_expert={"high_noise": [1], "low_noise": 2}),
        r"steps_per_expert\['high_noise'\] must be an integer; got \[1\] \(a list\)",
    ),
    (dict(steps_per_expert=[1, 2]), r"steps_per_expert must be a dict"),
    (dict(sigmas="1,0.5"), r"sigmas must be a list of numbers; got '1,0.5' \(a string\)"),
    (dict(sigmas=[1.0, "0.5"]), r"sigmas\[1\] must be a number; got '0.5'"),
    (dict(negative_prompt=3), r"negative_prompt must be a string; got 3 \(a int\)"),
    (dict(prompt=None), r"prompt must be a string; got None"),
    (dict(sampler=1), r"unknown sampler 1"),
    (dict(image=5), r"image must be a string; got 5"),
    # finite numbers only
    (
        dict(guidance={"high_noise": math.nan}),
        r"guidance for high_noise must be a number >= 0; got nan",
    ),
    (
        dict(guidance={"high_noise": math.inf}),
        r"guidance for high_noise must be a finite number; got inf",
    ),
    (dict(guidance=math.nan), r"guidance for high_noise must be a number >= 0; got nan"),
    (dict(shift=math.nan), r"shift must be a finite number; got nan"),
    (dict(shift=-math.inf), r"shift must be a finite number; got -inf"),
    (dict(band=math.nan), r"band must be a finite number; got nan"),
    (dict(boundary=math.nan), r"boundary must lie in \(0, 1\).*got nan"),
    (dict(boundary="inf"), r"boundary must lie in \(0, 1\).*got inf"),
    (dict(sigmas=(1.0, math.nan)), r"sigmas\[1\] must be a finite number; got nan"),
    # 0 is a value, not "default"
    (dict(width=0), r"width must be a positive multiple of 16 .*got 0: use 16"),
    (dict(height=-16), r"height must be a positive multiple of 16 .*got -16"),
    (dict(num_frames=0), r"num_frames must be 4k\+1 .*got 0"),
    (dict(num_steps=0), r"num_steps must be an integer >= 1; got 0"),
    (dict(seed=-1), r"seed must be an integer >= 0; got -1"),
    (
        dict(seed=2**63),
        r"seed must be at most 9223372036854775807 \(2\*\*63 - 1\); got 9223372036854775808",
    ),
    # bounded work: each refusal names the value, the limit and why
    (dict(num_steps=1001), r"num_steps must be at most 1000 \(Limits.max_steps\); got 1001"),
    (
        dict(num_frames=100001),
        r"num_frames must be at most 161 \(Limits.max_num_frames.*\); got 100001",
    ),
    (
        dict(width=100000),
        r"size 100000x64 is 6400000 pixels per frame, over the limit of 921600 \(Limits.max_pixels",
    ),
    (
        dict(steps_per_expert={"high_noise": 600, "low_noise": 600}),
        r"the sum of steps_per_expert must be at most 1000 \(Limits.max_steps\); got 1200",
    ),
    (
        dict(sigmas=tuple(1 - i / 2000 for i in range(1500))),
        r"the number of sigmas must be at most 1000",
    ),
    # the boundary, parsed once into a typed value
    (dict(boundary="steps:0"), r"boundary 'steps:0': N must be an integer >= 1 .*got 0"),
    (dict(boundary="steps:"), r"boundary 'steps:': N must be an integer >= 1"),
    (
        dict(boundary="steps:5", num_steps=4),
        r"boundary 'steps:5': N must be in \[1, 4\] \(the run's steps\); got 5",
    ),
    (
        dict(boundary="calibrated"),
        r"boundary 'calibrated' needs the loss tables it reads: give calibrated:PATH",
    ),
    (
        dict(boundary="calibrated:/no/such/file.json"),
        r"loss-table file '/no/such/file.json' cannot be read",
    ),
    (dict(boundary=0.7, band=0.4), r"band 0.4 around boundaries \[0.7\] reaches past sigma 0 or 1"),
    (
        dict(boundary="snr", steps_per_expert={"high_noise": 1, "low_noise": 1}),
        r"give a boundary or steps_per_expert, not both",
    ),
    # step budgets name every expert, each at least 1
    (
        dict(steps_per_expert={"high_noise": 2}),
        r"steps_per_expert needs a step count for every expert",
    ),
    (
        dict(steps_per_expert={"high_noise": 0, "low_noise": 3}),
        r"steps_per_expert\['high_noise'\] must be an integer >= 1; got 0",
    ),
    (dict(steps_per_expert={"mid": 1}), r"unknown expert 'mid' in steps per expert"),
    (
        dict(steps_per_expert={"high_noise": 1, "low_noise": 1}, sigmas=(1.0, 0.5)),
        r"steps_per_expert or sigmas, not both",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_settings_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(**{"prompt": "x", **kwargs}), TINY)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(boundary=0.5), r"boundary 0.5 places one boundary; tiny-ti2v has 1 experts"),
        (dict(boundary="snr"), r"boundary 'snr' places one boundary"),
        (dict(boundary="steps:1"), r"boundary 'steps:1' places one boundary"),
    ],
)
def test_one_boundary_forms_need_two_experts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        settings = GenerateSettings(prompt="x", image="x.png", **kwargs)
        resolve_settings(settings, DENSE, image_size=(64, 64))  # ti2v sizes from the image


def test_limits_scale_with_the_model_and_can_be_overridden():
    big = get_preset("t2v-A14B")
    assert Limits.for_model(TINY) == Limits(max_num_frames=161, max_pixels=1280 * 720)
    assert Limits.for_model(big) == Limits(max_num_frames=321, max_pixels=4 * 1280 * 720)
    wide = Limits.for_model(TINY, max_pixels=4096 * 64, max_steps=2000)
    rs = resolve_settings(GenerateSettings(width=4096, num_steps=2000), TINY, wide)
    assert (rs.width, rs.num_steps) == (4096, 2000)
    rs = resolve_settings(GenerateSettings(num_frames=161, num_steps=1000), TINY)
    assert (rs.num_frames, rs.num_steps) == (161, 1000)  # the limits themselves are accepted


def test_defaults_fill_only_what_was_left_out():
    rs = resolve_settings(GenerateSettings(), TINY)
    assert (rs.width, rs.height, rs.num_frames, rs.num_steps) == (64, 64, 9, 4)
    assert rs.boundary == Release() and rs.seed == 0 and rs.shift == 12.0
    assert resolve_settings(GenerateSettings(seed=2**63 - 1), TINY).seed == 2**63 - 1


@pytest.mark.parametrize(
    ("value", "typed"),
    [
        (None, Release()),
        ("release", Release()),
        ("snr", SNR()),
        ("steps:3", Steps(3)),
        (0.6, Sigma(0.6)),
        ("0.6", Sigma(0.6)),
        (1, None),
        (Steps(2), Steps(2)),
    ],
)
def test_boundary_forms_parse_to_typed_values(value, typed):
    if typed is None:
        with pytest.raises(ValueError, match=r"boundary must lie in \(0, 1\).*got 1.0"):
            parse_boundary(value)
    else:
        assert parse_boundary(value) == typed


def test_resolved_boundary_is_typed_and_written_as_given():
    rs = resolve_settings(GenerateSettings(boundary="steps:2"), TINY)
    assert rs.boundary == Steps(2) and rs.to_dict()["boundary"] == "steps:2"
    rs = resolve_settings(GenerateSettings(boundary=0.6), TINY)
    assert rs.boundary == Sigma(0.6) and rs.to_dict()["boundary"] == 0.6
    rs = resolve_settings(
        GenerateSettings(steps_per_expert={"high_noise": 1, "low_noise": 2}), TINY
    )
    assert rs.boundary == Budgets({"high_noise": 1, "low_noise": 2}) and rs.num_steps == 3
    assert json.loads(json.dumps(rs.to_dict()))["steps_per_expert"] == {
        "high_noise": 1,
        "low_noise": 2,
    }


def test_calibrated_boundary_from_a_loss_table_file(tmp_path):
    xs = [i / 10 for i in range(11)]
    tables = {
        "high_noise": (xs, [1.0 - x for x in xs]),
        "low_noise": (xs, [0.4 + 0.0 * x for x in xs]),
    }
    path = write_loss_tables(tables, tmp_path / "losses.json")
    assert read_loss_tables(path) == {n: (list(a), list(b)) for n, (a, b) in tables.items()}
    rs = resolve_settings(GenerateSettings(boundary=f"calibrated:{path}", num_steps=20), TINY)
    assert isinstance(rs.boundary, Calibrated) and rs.to_dict()["boundary"] == f"calibrated:{path}"
    plan = plan_for(rs, TINY)  # the crossover of 1 - sigma and 0.4 is sigma 0.6
    assert all(("high_noise" in s.experts) == (s.sigma >= 0.6 - 1e-9) for s in plan.steps)
    with pytest.raises(ValueError, match="reads a file, which this server does not allow"):
        resolve_settings(
            GenerateSettings(boundary=f"calibrated:{path}"), TINY, Limits(read_files=False)
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not JSON"),
        ("[1]", "must hold"),
        ('{"high_noise": {"sigmas": [0, 1]}}', "exactly the keys"),
        (
            '{"high_noise": {"sigmas": [0, 1], "losses": [1, NaN]}}',
            "losses must be a list of finite numbers",
        ),
        ('{"high_noise": {"sigmas": [0, 2], "losses": [1, 1]}}', r"sigmas must lie in \[0, 1\]"),
        ('{"high_noise": {"sigmas": [0], "losses": [1]}}', "at least 2 points"),
        (
            '{"high_noise": {"sigmas": [0, 1], "losses": [1, 0]}}',
            "calibrated mode needs a loss table for every expert",
        ),
    ],
)
def test_bad_loss_table_files_are_refused_at_validation(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        resolve_settings(GenerateSettings(boundary=f"calibrated:{path}"), TINY)


def test_an_absurd_model_file_is_a_clear_error():
    d = json.loads(TINY.to_json())
    d["transformer"]["dim"] = 10**9
    with pytest.raises(
        ValueError,
        match=r"TransformerConfig.dim must be an integer in \[1, 65536\].*got 1000000000",
    ):
        ModelConfig.from_json(json.dumps(d))
    with pytest.raises(
        ValueError, match=r"num_layers must be an integer in \[1, 1024\]; got '4'|num_layers.*'4'"
    ):
        dataclasses.replace(TINY.transformer, num_layers="4")
