"""Memory per rank: each parallel mode changes the single-process prediction where it should,
`vidmoe plan` prints it, and a 2-rank sharded CPU run's peak RSS matches it."""

import dataclasses
import json
import sys

import pytest
from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.parallel.memory import per_rank_memory
from vidmoe.parallel.world import Layout
from vidmoe.planner import CPU_IMPORTS, MemoryRequest, expert_bytes, predict
from vidmoe.planner_measure import measure_baseline_rss
from vidmoe.presets import get_preset

A14B = get_preset("t2v-A14B")
REQUEST = MemoryRequest(width=832, height=480, num_frames=81, dtype="bf16", device="cuda")


def _rank(layout, **kw):
    return per_rank_memory(A14B, REQUEST, layout, **kw)


def test_one_rank_is_the_single_process_prediction():
    one, single = _rank(Layout()), predict(A14B, REQUEST)
    assert one.device_peak_bytes == single.device_peak_bytes
    assert one.host_peak_bytes == single.host_peak_bytes


def test_ulysses_splits_activations_and_keeps_weights_whole():
    one, u8 = _rank(Layout()).breakdown, _rank(Layout(ulysses=8)).breakdown
    assert u8["experts_device"] == one["experts_device"]
    # the per-token part / 8 (plus all-to-all buffers); latents and text context stay whole
    assert one["forward_activations"] / 8 < u8["forward_activations"]
    assert u8["forward_activations"] < one["forward_activations"] / 5


def test_cfg_parallel_halves_the_batch():
    cfg = _rank(Layout(cfg=2)).breakdown["forward_activations"]
    batch1 = per_rank_memory(A14B, dataclasses.replace(REQUEST, batch=1), Layout())
    assert cfg == batch1.breakdown["forward_activations"]


def test_sharded_experts_hold_a_share_plus_the_gathered_blocks():
    experts = expert_bytes(A14B, "bf16", None)
    both = sum(e["total"] for e in experts.values())
    m = _rank(Layout(ulysses=8), shard_experts=True, shard_text_encoder=True)
    assert m.breakdown["experts_device"] == pytest.approx(both / 8, abs=1)
    block = experts["high_noise"]["block"]
    assert 3 * block < m.breakdown["experts_gathered"] < 4 * block + 2e9  # root + 3 blocks
    assert m.breakdown["text_encoder"] < _rank(Layout()).breakdown["text_encoder"] / 7
    assert m.device_peak_bytes < _rank(Layout(ulysses=8)).device_peak_bytes - 40e9


def test_expert_groups_hold_one_expert_per_rank():
    experts = expert_bytes(A14B, "bf16", None)
    m = _rank(Layout(expert_groups=2))
    assert m.breakdown["experts_device"] == experts["high_noise"]["total"]
    shard = _rank(Layout(expert_groups=2, ulysses=4), shard_experts=True)
    assert shard.breakdown["experts_device"] == pytest.approx(
        experts["high_noise"]["total"] / 4, abs=1
    )


@pytest.mark.parametrize(
    "layout, kw, message",
    [
        (Layout(ulysses=2), dict(shard_text_encoder=True), "set shard_experts"),
        (Layout(), dict(shard_experts=True), "add --ulysses N or --cfg-parallel"),
        (Layout(expert_groups=3), {}, "at most 2 groups"),
    ],
)
def test_modes_that_cannot_be_predicted_are_refused(layout, kw, message):
    with pytest.raises(ValueError, match=message):
        _rank(layout, **kw)
    with pytest.raises(ValueError, match="replace residency"):
        per_rank_memory(
            A14B, dataclasses.replace(REQUEST, residency="swap"), Layout(cfg=2), shard_experts=True
        )


def test_plan_prints_per_rank_memory_as_json():
    args = ["plan", "t2v-A14B", "-W", "832", "-H", "480", "-f", "81", "--device", "cpu"]
    r = CliRunner().invoke(
        app, [*args, "--dtype", "bfloat16", "--ulysses", "4", "--cfg-parallel", "--json"]
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["per_rank"]
    assert (got["world_size"], got["ulysses"], got["cfg"], got["shard_experts"]) == (8, 4, 2, False)
    single = json.loads(r.output)["memory"]["breakdown"]
    assert got["breakdown"]["forward_activations"] < single["forward_activations"] / 4
    r = CliRunner().invoke(app, [*args, "--shard-experts", "--ulysses", "2"])
    assert r.exit_code == 0 and "experts sharded over 2" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--shard-experts"])
    assert r.exit_code == 2 and "add --ulysses N or --cfg-parallel" in r.output, r.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is read from /proc")
def test_two_rank_sharded_peak_rss_matches_the_prediction(tmp_path):
    """A 2 x 36M-parameter float32 model, written as a checkpoint folder, sharded over 2 CPU
    ranks: each rank's measured peak within 15% of the predicted one."""
    from vidmoe.io.writers import write_vidmoe_layout
    from vidmoe.loading import build_random_pipeline
    from vidmoe.parallel.memory import measure_rank_peak_rss

    tiny = get_preset("tiny-t2v")
    config = dataclasses.replace(
        tiny,
        name="shard-test",
        transformer=dataclasses.replace(
            tiny.transformer, dim=512, ffn_dim=2048, num_heads=8, num_layers=8
        ),
    )
    pipe = build_random_pipeline(config)
    experts = {n: dict(e.state_dict()) for n, e in pipe.experts.items()}
    root = write_vidmoe_layout(
        tmp_path / "m", config=config, experts=experts, vae=dict(pipe.vae.state_dict())
    )
    del pipe, experts
    request = MemoryRequest(width=64, height=64, num_frames=9)
    predicted = per_rank_memory(
        config, request, Layout(), shard_experts=True, shard_ranks=2
    ).host_peak_bytes
    predicted += measure_baseline_rss() - CPU_IMPORTS  # this installation's shared libraries
    for measured in measure_rank_peak_rss(str(root), request, nproc=2):
        assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)
