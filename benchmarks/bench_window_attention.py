"""Windowed self-attention: chunked (vidmoe) against SDPA under a dense (L, L) window mask.

Same inputs, same process: time per call, the largest boolean mask each path builds, and the
largest difference between the two outputs. Run:
    python benchmarks/bench_window_attention.py --tokens 8192 --window 512 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from einops import rearrange

from vidmoe.models.layers import attention, window_mask


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / repeats, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512, help="left = right window in tokens")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shape = (1, args.tokens, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).bfloat16() for _ in range(3))
    window = (args.window, args.window)

    def dense():
        mask = window_mask((args.tokens, 1, 1), window)
        qh, kh, vh = (rearrange(t, "b l n d -> b n l d") for t in (q, k, v))
        return rearrange(
            F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), "b n l d -> b l n d"
        )

    t_dense, ref = timed(dense, args.repeats)
    t_chunk, out = timed(lambda: attention(q, k, v, window, chunk=args.chunk), args.repeats)
    keys = min(args.tokens, args.chunk + 2 * args.window)
    print(
        f"tokens {args.tokens}, window ({args.window}, {args.window}), {args.heads} heads x "
        f"{args.head_dim}, bf16, {args.threads} threads, chunk {args.chunk}"
    )
    print("| path | s per call | largest mask |")
    print("| --- | --- | --- |")
    print(f"| dense (L, L) mask + SDPA | {t_dense:.3f} | {args.tokens**2 / 2**20:.1f} MiB |")
    print(
        f"| chunked (vidmoe) | {t_chunk:.3f} ({t_chunk / t_dense:.2f}x) | "
        f"{min(args.chunk, args.tokens) * keys / 2**20:.1f} MiB |"
    )
    print(f"max |difference| {(out.float() - ref.float()).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
