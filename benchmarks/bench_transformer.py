"""Per-step time of one vidmoe expert against diffusers' WanTransformer3DModel with the same
weights, in the same process (the ratio is the number to read; absolute seconds are the machine's).

    python benchmarks/bench_transformer.py --dim 512 --layers 8 --frames 5 --size 32 --write docs/performance.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vidmoe.config import TransformerConfig
from vidmoe.io.keymaps import transformer_config_to_diffusers, transformer_to_diffusers
from vidmoe.models.transformer import WanTransformer


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=32, help="latent height = width")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import WanTransformer3DModel

    dtype = getattr(torch, args.dtype)
    cfg = TransformerConfig(dim=args.dim, ffn_dim=4 * args.dim, num_heads=args.dim // 64, num_layers=args.layers,
                            text_len=512, text_dim=4096)  # fmt: skip
    torch.manual_seed(0)
    ours = WanTransformer(cfg)
    torch.nn.init.normal_(ours.head.head.weight, std=0.02)  # the release init zeroes it
    ours = ours.to(dtype).eval()
    theirs = WanTransformer3DModel(**transformer_config_to_diffusers(cfg)).to(dtype).eval()
    theirs.load_state_dict({transformer_to_diffusers(k): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 16, args.frames, args.size, args.size, dtype=dtype)
    ctx = torch.randn(2, 512, 4096, dtype=dtype)
    sigma = torch.tensor([0.7, 0.7])
    tokens = args.frames * args.size * args.size // 4
    with torch.no_grad():
        ref = theirs(x, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        got = ours(x, sigma, ctx)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        rows = []
        t_ours = _time(lambda: ours(x, sigma, ctx), args.repeats)
        t_theirs = _time(lambda: theirs(x, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False),
                         args.repeats)  # fmt: skip
    m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    rows.append(f"| vidmoe `WanTransformer` | {m_ours:.3f} | {m_ours / m_theirs:.2f}x |")
    rows.append(f"| diffusers `WanTransformer3DModel` | {m_theirs:.3f} | 1.00x |")
    n = sum(p.numel() for p in ours.parameters())
    head = (f"Cond+uncond batch of 2, {tokens} video tokens, 512 text tokens; expert dim {args.dim}, {args.layers} "
            f"layers, {n / 1e6:.1f}M parameters; {args.dtype} on CPU, {args.threads} threads, {platform.machine()}, "
            f"torch {torch.__version__}. Median of {args.repeats}. Outputs agree to {err:.1e} relative.")  # fmt: skip
    table = "\n".join(
        ["| implementation | s / step | vs diffusers |", "| --- | --- | --- |", *rows]
    )
    cmd = "python benchmarks/bench_transformer.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "write" and v is not None
    )
    text = f"\n## Expert transformer vs diffusers\n\n{head}\n\n{table}\n\n```\n{cmd}\n```\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
