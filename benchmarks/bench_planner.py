"""Predicted against measured peak host RSS (VmHWM of a fresh process, CPU, 2 steps) for the
demo and a tiny model per residency policy the runtime accepts, and the planner's predictions for
t2v-A14B 480P x 81 frames per policy (predictions only). Prints markdown tables for
docs/performance.md and docs/planner.md.

    PYTHONPATH=src python benchmarks/bench_planner.py
"""

from __future__ import annotations

import dataclasses

from vidmoe.loading import model_config_for
from vidmoe.models.moe import RESIDENCY
from vidmoe.planner import POLICIES, MemoryRequest, predict
from vidmoe.planner_measure import measure_peak_rss
from vidmoe.presets import get_preset

CASES = [  # (model, width, height, frames)
    (None, 64, 64, 17),
    (None, 128, 128, 33),
    ("tiny-t2v", 64, 64, 9),
    ("tiny-t2v", 256, 256, 33),
]


def measured_table() -> str:
    rows = [
        "| model | size | residency | predicted MiB | measured MiB | error |",
        "|---|---|---|---|---|---|",
    ]
    for model, w, h, f in CASES:
        for residency in (p for p in POLICIES if p in RESIDENCY):
            if residency == "disk" and model is not None:
                continue  # 'disk' re-reads experts from their files: a preset has none
            request = MemoryRequest(width=w, height=h, num_frames=f, residency=residency)
            predicted = predict(model_config_for(model), request).host_peak_bytes
            measured = measure_peak_rss(model, request)
            rows.append(
                f"| {model or 'demo'} | {w}x{h}x{f} | {residency} | {predicted / 2**20:.0f} | "
                f"{measured / 2**20:.0f} | {100 * (predicted - measured) / measured:+.1f}% |"
            )
            print(rows[-1], flush=True)
    return "\n".join(rows)


def a14b_table() -> str:
    config = get_preset("t2v-A14B")
    base = MemoryRequest(width=832, height=480, num_frames=81, dtype="bf16", device="cuda")
    rows = ["| residency | weights | host peak GB | device peak GB |", "|---|---|---|---|"]
    for residency in POLICIES:
        for quantize in (None, "fp8"):
            p = predict(config, dataclasses.replace(base, residency=residency, quantize=quantize))
            rows.append(
                f"| {residency} | {quantize or 'bf16'} | {p.host_peak_bytes / 1e9:.1f} | "
                f"{p.device_peak_bytes / 1e9:.1f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(a14b_table())
    print()
    print(measured_table())
