"""Per-step cost of LoRA adapters: one expert call on a cond+uncond batch with no adapter, with a
rank-R adapter on every block linear run unfused (beside the frozen weights), and fused.

    python benchmarks/bench_lora.py                       # CPU, mid-size expert, prints a table
    python benchmarks/bench_lora.py --write docs/performance.md

`--write` replaces (or appends) the "LoRA adapters" section of that Markdown file.
"""

from __future__ import annotations

import argparse
import copy
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from vidmoe.config import TransformerConfig
from vidmoe.models import lora
from vidmoe.models.transformer import WanTransformer

SECTION = "## LoRA adapters"


def random_adapter(
    model: WanTransformer, rank: int, seed: int = 0
) -> dict[str, lora.AdapterWeights]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if name.startswith("blocks.") and isinstance(m, torch.nn.Linear):
            out[name] = lora.AdapterWeights(
                down=torch.randn(rank, m.in_features, generator=g) * 0.01,
                up=torch.randn(m.out_features, rank, generator=g) * 0.01,
                scale=1.0,
            )
    return out


def time_rounds(models: dict[str, torch.nn.Module], inputs, repeats: int) -> dict[str, list[float]]:
    """Interleaved rounds (each model once per round), so that load from other processes
    spreads evenly over the configurations."""
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(*inputs)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(*inputs)
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent height = width")
    p.add_argument("--frames", type=int, default=2, help="latent frames")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--write", type=Path, default=None, help="Markdown file to put the table in")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TransformerConfig(
        dim=args.dim,
        ffn_dim=4 * args.dim,
        num_heads=args.heads,
        num_layers=args.layers,
        text_dim=args.dim,
        text_len=64,
    )
    model = WanTransformer(cfg).eval().requires_grad_(False)
    x = torch.randn(2, cfg.in_dim, args.frames, args.latent, args.latent)  # cond + uncond batch
    inputs = (x, torch.full((2,), 0.7), torch.randn(2, cfg.text_len, cfg.text_dim))
    tokens = args.frames * (args.latent // 2) ** 2
    weights = random_adapter(model, args.rank)
    extra = sum(w.down.numel() + w.up.numel() for w in weights.values())

    unfused, fused = copy.deepcopy(model), copy.deepcopy(model)
    lora.add_adapter(unfused, "bench", weights)
    lora.add_adapter(fused, "bench", weights)
    t0 = time.perf_counter()
    lora.fuse(fused)
    fuse_s = time.perf_counter() - t0
    names = ("no adapter", f"rank-{args.rank} LoRA, unfused", f"rank-{args.rank} LoRA, fused")
    times = time_rounds(dict(zip(names, (model, unfused, fused))), inputs, args.repeats)
    rows = [(n, statistics.median(t), min(t)) for n, t in times.items()]
    t0 = time.perf_counter()
    lora.unfuse(fused)
    unfuse_s = time.perf_counter() - t0
    base = rows[0][1]
    cmd = "python benchmarks/bench_lora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Per-step time of one expert call (cond + uncond batch of 2), CPU float32, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Expert: dim "
        f"{cfg.dim}, {cfg.num_layers} layers, ffn {cfg.ffn_dim}, {tokens} video tokens "
        f"({args.frames}x{args.latent}x{args.latent} latent), {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M "
        f"parameters; the adapter covers every block linear ({len(weights)} modules, "
        f"{extra / 1e6:.2f}M parameters). Median (min) of {args.repeats} interleaved rounds after a warm-up.",
        "",
        "| configuration | per step (s) | min (s) | median vs. no adapter |",
        "| --- | --- | --- | --- |",
        *[f"| {n} | {med:.3f} | {mn:.3f} | {med / base:.2f}x |" for n, med, mn in rows],
        "",
        "Fused adapters cost nothing per step (the weights are merged); unfused ones add two "
        "rank-R matmuls per adapted linear, and keep their strength adjustable per step. On a "
        "shared CPU the min column is the steadier one.",
        "",
        f"Fusing took {fuse_s:.2f} s and unfusing (a bit-exact copy back) {unfuse_s:.2f} s. Measured with:",
        "",
        "```",
        cmd.strip(),
        "```",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        write_section(args.write, text)
    return text


def write_section(path: Path, text: str) -> None:
    """Replace the LoRA section of `path` (up to the next `## ` heading), or append it."""
    old = path.read_text() if path.exists() else "# Performance\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pattern.sub(lambda _: text, old)
        if pattern.search(old)
        else old.rstrip("\n") + "\n\n" + text
    )
    path.write_text(new)


if __name__ == "__main__":
    main()
