"""Peak host RAM per residency policy, for a two-expert model of about 200M parameters per expert.

Writes a random model (the tiny-t2v architecture widened to ~200M parameters per expert, bf16,
vidmoe layout) to a temporary folder, then runs each policy in a fresh subprocess (load +
generate) and reads that process's peak resident set (VmHWM). The frames of every policy are
hashed: the same hash is the same video.

    PYTHONPATH=src python benchmarks/bench_residency.py [--steps 3] [--policies resident,disk]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SIZE = dict(width=64, height=64, num_frames=5)


def bench_config():
    """tiny-t2v with 12 blocks of width 1024 (ffn 4096): about 201M parameters per expert."""
    from vidmoe.presets import get_preset

    tiny = get_preset("tiny-t2v")
    wide = dataclasses.replace(tiny.transformer, dim=1024, ffn_dim=4096, num_heads=8, num_layers=12)
    return dataclasses.replace(tiny, name="bench-200m", transformer=wide)


def write_model(root: Path) -> int:
    """The benchmark model in vidmoe's layout, one expert at a time; returns bytes per expert."""
    from vidmoe.io.atomic import save_safetensors_atomic, write_text_atomic
    from vidmoe.models.transformer import WanTransformer
    from vidmoe.models.vae import WanVAE

    config = bench_config()
    torch.manual_seed(0)
    meta = {"format": "vidmoe", "config": config.name}
    nbytes = 0
    for name in config.moe.expert_names:
        expert = WanTransformer(config.transformer_for(name)).to(torch.bfloat16)
        tensors = {k: v.contiguous() for k, v in expert.state_dict().items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_safetensors_atomic(tensors, root / "experts" / f"{name}.safetensors", meta)
        del expert, tensors
    vae = WanVAE(config.vae).state_dict()
    save_safetensors_atomic(vae, root / "vae.safetensors", meta)
    write_text_atomic(config.to_json(), root / "vidmoe.json")
    return nbytes


def run_one(model: str, residency: str, steps: int) -> dict:
    """Load and generate in this process; its peak RSS, frames hash and seconds."""
    import time

    from vidmoe.loading import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(model, device="cpu", dtype="bfloat16", residency=residency)
    out = pipe.generate("a red circle", num_steps=steps, seed=0, **SIZE)
    seconds = time.perf_counter() - t0
    hwm = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    digest = hashlib.sha256(out.frames.tobytes()).hexdigest()[:16]
    switch = [r["experts"] for r in out.trace]
    return dict(
        residency=residency, peak_rss=hwm, frames_sha=digest, seconds=seconds, experts=switch
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--policies", default="resident,swap,blocks,disk")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "RESIDENCY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(2)
        print(json.dumps(run_one(*args.child, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        per_expert = write_model(Path(tmp))
        rows = []
        for policy in args.policies.split(","):
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", tmp, policy]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    params = sum(p.numel() for p in _meta_expert().parameters())
    base = next((r["peak_rss"] for r in rows if r["residency"] == "resident"), None)
    print(
        f"model: 2 experts x {params / 1e6:.0f}M parameters, bf16, {per_expert / 2**20:.0f} MiB "
        f"per expert; {args.steps} steps at {SIZE['width']}x{SIZE['height']}, "
        f"{SIZE['num_frames']} frames, CPU"
    )
    print("| residency | peak host RSS (MiB) | vs resident (experts) | frames sha256 | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        delta = "" if base is None else f"{(r['peak_rss'] - base) / per_expert:+.2f}"
        print(
            f"| {r['residency']} | {r['peak_rss'] / 2**20:.0f} | {delta} | {r['frames_sha']} "
            f"| {r['seconds']:.1f} |"
        )
    same = len({r["frames_sha"] for r in rows}) == 1
    print(f"same video for every policy: {'yes' if same else 'NO'}")


def _meta_expert():
    from vidmoe.models.transformer import WanTransformer

    with torch.device("meta"):
        return WanTransformer(bench_config().transformer)


if __name__ == "__main__":
    main()
