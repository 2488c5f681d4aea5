"""Memory per rank of sharded experts: predicted (vidmoe.parallel.memory) against measured peak
RSS (VmHWM of each rank of a fresh torchrun CPU run, 2 steps) for a random 8-layer,
1024-wide two-expert model written as a checkpoint folder, single process and 2 ranks sharded;
then the per-rank predictions for t2v-A14B 480P x 81 frames on CUDA in bf16, per parallel mode.
Prints markdown tables for docs/distributed.md.

    PYTHONPATH=src python benchmarks/bench_shard_memory.py [--folder DIR] [--skip-measure]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from vidmoe.parallel.memory import measure_rank_peak_rss, per_rank_memory
from vidmoe.parallel.world import Layout
from vidmoe.planner import MemoryRequest, predict
from vidmoe.planner_measure import measure_peak_rss
from vidmoe.presets import get_preset

MiB = 2**20


def bench_config():
    """tiny-t2v widened to 1024 and deepened to 8 layers: 2 x 118M float32 parameters."""
    tiny = get_preset("tiny-t2v")
    transformer = dataclasses.replace(
        tiny.transformer, dim=1024, ffn_dim=4096, num_heads=8, num_layers=8
    )
    return dataclasses.replace(tiny, name="shard-bench", transformer=transformer)


def write_folder(root: Path) -> Path:
    import torch

    from vidmoe.io.writers import write_vidmoe_layout
    from vidmoe.loading import build_random_pipeline

    if (root / "vidmoe.json").exists():
        return root
    pipe = build_random_pipeline(bench_config())
    with torch.no_grad():
        experts = {n: dict(e.state_dict()) for n, e in pipe.experts.items()}
    return write_vidmoe_layout(
        root, config=pipe.config, experts=experts, vae=dict(pipe.vae.state_dict())
    )


def measured_table(folder: Path) -> str:
    config = bench_config()
    request = MemoryRequest(width=64, height=64, num_frames=9)
    single = predict(config, request).host_peak_bytes
    rows = [
        "| run | predicted MiB per rank | measured MiB per rank | error |",
        "|---|---|---|---|",
    ]
    measured = measure_peak_rss(str(folder), request)
    rows.append(_row("1 process", single, [measured]))
    print(rows[-1], flush=True)
    for text in (False, True):
        pred = per_rank_memory(
            config,
            request,
            Layout(),
            shard_experts=True,
            shard_text_encoder=text,
            shard_ranks=2,
        ).host_peak_bytes
        got = measure_rank_peak_rss(str(folder), request, nproc=2, shard_text_encoder=text)
        what = "2 ranks, --shard-experts" + (" --shard-text-encoder" if text else "")
        rows.append(_row(what, pred, got))
        print(rows[-1], flush=True)
    return "\n".join(rows)


def _row(what: str, predicted: int, measured: list[int]) -> str:
    worst = max(measured)
    shown = " / ".join(f"{m / MiB:.0f}" for m in measured)
    return (
        f"| {what} | {predicted / MiB:.0f} | {shown} | {100 * (predicted - worst) / worst:+.1f}% |"
    )


MODES = [  # (label, layout, shard experts, shard text encoder)
    ("1 GPU", Layout(), False, False),
    ("--ulysses 8", Layout(ulysses=8), False, False),
    ("--cfg-parallel", Layout(cfg=2), False, False),
    ("--ulysses 4 --cfg-parallel", Layout(ulysses=4, cfg=2), False, False),
    ("--ulysses 8 --shard-experts", Layout(ulysses=8), True, False),
    ("--ulysses 8 --shard-experts --shard-text-encoder", Layout(ulysses=8), True, True),
    ("--expert-groups 2", Layout(expert_groups=2), False, False),
    (
        "--expert-groups 2 --ulysses 4 --shard-experts",
        Layout(expert_groups=2, ulysses=4),
        True,
        False,
    ),
]


def a14b_table() -> str:
    config = get_preset("t2v-A14B")
    request = MemoryRequest(width=832, height=480, num_frames=81, dtype="bf16", device="cuda")
    rows = [
        "| mode | ranks | device peak GB | experts on device GB | gathered GB | forward act. GB | decode act. GB | host peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, layout, shard, text in MODES:
        m = per_rank_memory(config, request, layout, shard_experts=shard, shard_text_encoder=text)
        b = m.breakdown
        rows.append(
            f"| `{label}` | {layout.size} | {m.device_peak_bytes / 1e9:.1f} | "
            f"{b['experts_device'] / 1e9:.1f} | {b['experts_gathered'] / 1e9:.1f} | "
            f"{b['forward_activations'] / 1e9:.2f} | {b['decode_activations'] / 1e9:.1f} | "
            f"{m.host_peak_bytes / 1e9:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--skip-measure", action="store_true")
    args = parser.parse_args()
    print(a14b_table(), flush=True)
    if args.skip_measure:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(args.folder or Path(tmp) / "shard-bench")
        print(measured_table(folder))


if __name__ == "__main__":
    main()
