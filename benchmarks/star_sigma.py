"""Where the demo loses its stars (issue 23, item 3): real star clips noised to a step's sigma and
denoised from there by the shipped pipeline, read back by the shapes analyser.

Each clip of the demo world whose object is a star (and, for comparison, each square) is
encoded, noised to sigma_k = the plan's sigma at step k (flow matching: (1 - s) z + s noise), and
sampled from step k to the end with its own caption; k = 0 is a plain generation (pure noise),
the last row (sigma 0) the VAE's round trip alone. The share of clips read back as the asked shape
at each start says which part of the model (the high-noise expert's steps, the low-noise
expert's, the VAE) loses it. Writes a markdown table to stdout.

    python benchmarks/star_sigma.py --clips 16
    python benchmarks/star_sigma.py --clips 32 --first 20000 --model runs/demo/candidate
"""

from __future__ import annotations

import argparse

import torch


def star_and_square_clips(world, count: int, first: int = 0) -> dict[str, list]:
    """The first `count` clips of `world` from index `first` whose object is a star, and as many
    squares."""
    found: dict[str, list] = {"star": [], "square": []}
    i = first
    while min(len(v) for v in found.values()) < count:
        clip = world.sample(i)
        if clip.label.shape in found and len(found[clip.label.shape]) < count:
            found[clip.label.shape].append(clip)
        i += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16, help="clips per shape")
    parser.add_argument("--starts", default="0,4,8,12,16,20,25", help="plan steps to start at")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped demo)")
    parser.add_argument(
        "--first",
        type=int,
        default=0,
        help="world index to look from (the recipe's caches hold 0-13999)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vidmoe.io.video import to_uint8_frames
    from vidmoe.loading import load_pipeline
    from vidmoe.sampling.plan import plan_for
    from vidmoe.sampling.settings import GenerateSettings
    from vidmoe.world.analyser import analyse
    from vidmoe.world.shapes import demo_world

    pipe = load_pipeline(args.model, device="cpu")
    clips = star_and_square_clips(demo_world(), args.clips, args.first)
    starts = [int(s) for s in args.starts.split(",")]
    hits = {shape: {k: 0 for k in starts} for shape in clips}
    sigmas: dict[int, float] = {}
    for shape, group in clips.items():
        for n, clip in enumerate(group):
            rs = pipe.resolve(GenerateSettings(prompt=clip.caption, seed=n))
            cond, uncond = pipe._embeddings(rs, None, None)
            c = pipe._conditioning(rs)
            plan = plan_for(rs, pipe.config)
            with torch.no_grad():
                z = pipe.vae.encode(clip.video[None])  # (1, Z, F, h, w), normalised
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(n))
            for k in starts:
                sigma = plan.steps[k].sigma if k < len(plan.steps) else 0.0
                sigmas[k] = sigma
                x = (1 - sigma) * z + sigma * noise
                if k < len(plan.steps):
                    x, _ = pipe._denoise(
                        x, plan, rs.sampler, cond, uncond, c, False, None, {},
                        steps=range(k, len(plan.steps)),
                    )  # fmt: skip
                with torch.no_grad():
                    frames = to_uint8_frames(pipe.vae.decode(x.to(pipe.vae.conv1.weight.dtype)))
                hits[shape][k] += analyse(frames).shape == shape
    model = args.model or "the shipped demo"
    print(f"{args.clips} clips per shape from world index {args.first}, {model}; read as asked:\n")
    print("| start step | sigma | experts from there | star | square |")
    print("| --- | --- | --- | --- | --- |")
    boundary = pipe.config.moe.boundaries[0]
    for k in starts:
        who = "both" if sigmas[k] >= boundary else "low noise" if sigmas[k] > 0 else "VAE only"
        row = " | ".join(f"{hits[s][k]}/{args.clips}" for s in ("star", "square"))
        print(f"| {k} | {sigmas[k]:.3f} | {who} | {row} |")


if __name__ == "__main__":
    main()
