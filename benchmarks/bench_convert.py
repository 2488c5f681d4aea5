"""`vidmoe convert` on the shipped demo: file size per expert and the video's difference from the
original's, for each expert format `convert` writes (ComfyUI safetensors as they are and
fp8_scaled, GGUF in the experts' own float type and each GGUF type the gguf package can write).

Each converted model loads its experts from the written files (the demo folder gives the rest)
and runs the same prompts and seeds as the original, in one process. Run:
    python benchmarks/bench_convert.py --prompts 4 [--formats gguf:q8_0,comfyui:fp8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

FORMATS = [
    ("comfyui", None),
    ("comfyui", "fp8"),
    ("gguf", None),
    ("gguf", "q8_0"),
    ("gguf", "q5_1"),
    ("gguf", "q5_0"),
    ("gguf", "q4_1"),
    ("gguf", "q4_0"),
]
PROMPTS = [
    "a red circle moving to the right",
    "a blue star going up",
    "green triangle sliding left",
    "a yellow square moving down",
]


def main() -> None:
    from vidmoe.io.convert import convert
    from vidmoe.loading import DEMO_DIR, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument(
        "--formats", default="", help="layout:quantize,... (default: all), e.g. gguf:q4_0"
    )
    args = parser.parse_args()
    formats = FORMATS
    if args.formats:
        pairs = [f.split(":") for f in args.formats.split(",")]
        formats = [(layout, None if q in ("", "-") else q) for layout, q in pairs]
    prompts = PROMPTS[: args.prompts]
    kw = dict(device="cpu", dtype="float32")
    ref = load_pipeline(DEMO_DIR, **kw)
    want = [ref.generate(p, seed=i) for i, p in enumerate(prompts)]
    names = ref.config.moe.expert_names
    size = sum((DEMO_DIR / "experts" / f"{n}.safetensors").stat().st_size for n in names)
    print(f"demo experts as shipped: {size / 2**20:.2f} MiB", flush=True)
    print("| layout | --quantize | experts MiB | latents rel. L2 | mean abs frame diff (0-255) |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for layout, quantize in formats:
            dst = Path(tmp) / f"{layout}-{quantize}"
            out = convert(DEMO_DIR, dst, layout=layout, quantize=quantize)
            files = {n: Path(out.files[f"expert.{n}"]) for n in names}
            pipe = load_pipeline(DEMO_DIR, experts=files, **kw)
            rel, frames = [], []
            for i, (p, w) in enumerate(zip(prompts, want)):
                r = pipe.generate(p, seed=i)
                rel.append(float((r.latents - w.latents).norm() / w.latents.norm()))
                diff = np.abs(r.frames.astype(np.float64) - w.frames.astype(np.float64))
                frames.append(float(diff.mean()))
            mib = sum(f.stat().st_size for f in files.values()) / 2**20
            print(
                f"| {layout} | {quantize or '-'} | {mib:.2f} | {np.mean(rel):.4f} | "
                f"{np.mean(frames):.2f} |",
                flush=True,
            )
            del pipe


if __name__ == "__main__":
    main()
