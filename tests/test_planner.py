"""The memory planner: budgets parse strictly, policies are ordered and refused with what would
fit, the CLI prints the plan's memory, the server refuses a job that cannot fit, and the
prediction is within 15% of a fresh process's measured peak RSS on the CPU."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import pytest
from typer.testing import CliRunner

from vidmoe.cli import app
from vidmoe.loading import model_config_for
from vidmoe.models.moe import RESIDENCY
from vidmoe.planner import (
    CPU_IMPORTS,
    MemoryBudget,
    MemoryRequest,
    choose_policy,
    parse_budget,
    predict,
)
from vidmoe.planner_measure import measure_baseline_rss, measure_peak_rss
from vidmoe.presets import get_preset

A14B = get_preset("t2v-A14B")
GPU_480P = MemoryRequest(width=832, height=480, num_frames=81, dtype="bf16", device="cuda")


def test_parse_budget_units_and_errors():
    b = parse_budget("host=24GB,device=512MiB")
    assert (b.host_bytes, b.device_bytes) == (24 * 10**9, 512 * 2**20)
    assert parse_budget("device=1.5GB") == MemoryBudget(host_bytes=None, device_bytes=1_500_000_000)
    for bad in ("", "host=24XB", "gpu=1GB", "host=1GB,host=2GB", "host"):
        with pytest.raises(ValueError, match="memory-budget"):
            parse_budget(bad)


def test_weights_counted_exactly_and_fp8_shrinks_them():
    bf16, fp8 = (
        predict(A14B, GPU_480P),
        predict(A14B, dataclasses.replace(GPU_480P, quantize="fp8")),
    )
    # two experts of 14.3B parameters in bf16 (the issue: about 2 x 28.6 GB)
    assert bf16.breakdown["experts_device"] == pytest.approx(2 * 28.6e9, rel=0.01)
    assert fp8.breakdown["experts_device"] < 0.55 * bf16.breakdown["experts_device"]
    assert bf16.breakdown["text_encoder"] == pytest.approx(11.4e9, rel=0.01)  # umT5-XXL, bf16


def test_policies_trade_device_for_host():
    plans = {
        r: predict(A14B, dataclasses.replace(GPU_480P, residency=r))
        for r in ("resident", "swap", "blocks", "disk")
    }
    dev = {r: p.device_peak_bytes for r, p in plans.items()}
    host = {r: p.host_peak_bytes for r, p in plans.items()}
    assert dev["resident"] > dev["swap"] == dev["disk"] > dev["blocks"]
    assert host["swap"] > host["disk"]  # disk holds about one expert, not two
    assert host["swap"] - host["disk"] == pytest.approx(28.6e9, rel=0.01)


def test_choose_policy_fastest_that_fits_or_refuses():
    fits = choose_policy(A14B, GPU_480P, MemoryBudget(device_bytes=56 * 10**9))
    assert fits.request.residency == "swap" and fits.device_peak_bytes <= 56e9
    small = choose_policy(A14B, GPU_480P, MemoryBudget(device_bytes=24 * 10**9))
    assert small.request.residency == "blocks"
    with pytest.raises(ValueError, match="no policy fits.*allow fp8"):
        choose_policy(A14B, GPU_480P, MemoryBudget(host_bytes=30 * 10**9, device_bytes=36 * 10**9))
    fp8 = choose_policy(
        A14B, GPU_480P, MemoryBudget(host_bytes=30 * 10**9, device_bytes=36 * 10**9), allow_fp8=True
    )
    assert fp8.request.quantize == "fp8" and fp8.host_peak_bytes <= 30e9


def test_cli_plan_json_and_budget_refusal():
    runner = CliRunner()
    out = runner.invoke(app, ["plan", "tiny-t2v", "--json", "--device", "cpu", "-W", "128"])
    assert out.exit_code == 0, out.output
    memory = json.loads(out.output)["memory"]
    assert memory["host_peak_bytes"] == memory["device_peak_bytes"] > 0
    assert memory["residency"] == "resident"
    bigger = runner.invoke(app, ["plan", "tiny-t2v", "--json", "--device", "cpu", "-W", "256"])
    assert json.loads(bigger.output)["memory"]["host_peak_bytes"] > memory["host_peak_bytes"]
    refused = runner.invoke(app, ["plan", "tiny-t2v", "--memory-budget", "host=100MB"])
    assert refused.exit_code == 2 and "no policy fits" in refused.output


def test_server_refuses_a_job_that_cannot_fit(tmp_path):
    pytest.importorskip("fastapi")
    from vidmoe.serve.app import create_app
    from vidmoe.serve.routes import check_request
    from vidmoe.serve.state import ServeConfig

    cfg = ServeConfig(
        model="tiny-t2v",
        outputs=tmp_path,
        device="cpu",
        memory_budget=MemoryBudget(host_bytes=800 * 10**6),
    )
    state = create_app(cfg, load=lambda: None).state.serve
    check_request(state, {"prompt": "x", "width": 64, "height": 64}, None)  # fits
    with pytest.raises(ValueError, match="this job needs about host"):
        check_request(state, {"prompt": "x", "width": 512, "height": 512}, None)


CASES = [  # (model, width, height, frames)
    (None, 64, 64, 17),  # the demo
    ("tiny-t2v", 64, 64, 9),
    # bench_planner.py also measures the demo at 128x128x33 and tiny-t2v at 256x256x33, where
    # the VAE decode dominates (-1% and +5% under `resident`; docs/planner.md, "Accuracy"):
    # too slow for the suite.
]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is read from /proc")
@pytest.mark.parametrize("residency", ["resident", "disk"])
@pytest.mark.parametrize("model,width,height,frames", CASES)
def test_prediction_within_15_percent_of_measured_peak(model, width, height, frames, residency):
    if residency not in RESIDENCY:
        pytest.skip(
            f"residency {residency!r} is not implemented yet (Placement accepts "
            f"{', '.join(RESIDENCY)}): the check runs once it is"
        )
    if residency == "disk" and model is not None:
        pytest.skip("residency 'disk' re-reads experts from their files: a preset has none")
    request = MemoryRequest(width=width, height=height, num_frames=frames, residency=residency)
    predicted = predict(model_config_for(model), request).host_peak_bytes
    predicted += _imports_here() - CPU_IMPORTS  # this installation's shared-library pages
    measured = measure_peak_rss(model, request)
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


@functools.cache
def _imports_here() -> int:
    return measure_baseline_rss()
