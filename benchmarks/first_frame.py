"""The demo model's first-frame flash (issue 23), measured for the shipped VAE and candidates.

(a) VAE round trip of shapes-world clips: mean error per frame, by background colour;
(b) clips generated with the shipped pipeline: the border's (top and bottom rows') colour change
    from frame 0 to 1 against later pairs, and adherence as the analyser reads it;
(c) where the flash comes from: encoded latents of real clips decoded (the VAE alone) against
    generated latents decoded, and per-latent-frame statistics of both (the experts' frame 0).
The experts are the same for every VAE, so each clip is generated once and decoded by each VAE:
a paired comparison. The shipped VAE is always in, and where it has a first-frame head, the
same VAE without it ("no head": v14's). Writes markdown tables to stdout (and `--json` the numbers).

    python benchmarks/first_frame.py --vae runs/demo23/vae_first_frame/vae.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vidmoe.evaluation import border_changes

BACKGROUNDS = ("black", "dark_blue", "grey", "white")
PAIRS = 6  # the border change reported pair by pair for frames 0->1 .. 5->6


def frame_errors(vae, video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T,) mean |decode(encode(video)) - video| in levels."""
    with torch.no_grad():
        recon = vae.decode(vae.encode(video))
    return ((recon - video).abs().mean(dim=(0, 1, 3, 4)) * 127.5).numpy()


def roundtrip(vaes: dict, num_clips: int) -> dict:
    """(a) per VAE and background: the (T,) mean round-trip error over `num_clips` clips."""
    from vidmoe.world.shapes import ShapesWorld

    out = {name: {} for name in vaes}
    for bg in BACKGROUNDS:
        world = ShapesWorld(
            64,
            64,
            17,
            backgrounds=(bg,),
            motions=("left", "right", "up", "down"),
            sizes=("large",),
            seed=2323,
        )
        clips = [world.sample(i).video[None] for i in range(num_clips)]  # (1, 3, T, H, W) each
        for name, vae in vaes.items():
            out[name][bg] = np.mean([frame_errors(vae, v) for v in clips], axis=0)  # (T,)
    return out


def generate_latents(pipe, num_prompts: int, seeds: list[int], cache: Path | None) -> dict:
    """(b) latents of the held-out prompts at each seed, with the prompts' attributes."""
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=True)
    from vidmoe.evaluation import prompt_set

    items = prompt_set(num_prompts)
    jobs = [(item, seed) for item in items for seed in seeds]
    latents = [
        pipe.generate(item.prompt, seed=seed, output="latents").latents for item, seed in jobs
    ]
    out = {
        "latents": torch.cat(latents),  # (N, Z, F, h, w)
        "items": [(i.prompt, i.colour, i.shape, i.motion, s) for i, s in jobs],
    }
    if cache is not None:
        torch.save(out, cache)
    return out


def decode_frames(vae, latents: torch.Tensor) -> list[np.ndarray]:
    from vidmoe.io.video import to_uint8_frames

    with torch.no_grad():
        return [to_uint8_frames(vae.decode(z[None])) for z in latents]  # (T, H, W, 3) each


RINGS = (0, 1, 3)  # rings of pixels (0: the outermost) whose colour change is reported by pair


def ring_colour(frames: np.ndarray, r: int) -> np.ndarray:
    """(T, H, W, 3) frames -> (T, 3): the mean colour of the ring of pixels `r` in from the
    border (rows r and -1-r, columns r and -1-r)."""
    f = np.asarray(frames, dtype=np.float64)  # no copy when the caller converted already
    return np.concatenate([f[:, r], f[:, -1 - r], f[:, :, r], f[:, :, -1 - r]], axis=1).mean(1)


def where_changes(frames: np.ndarray) -> dict:
    """(T, H, W, 3) uint8 -> per ring of RINGS (the pixels r in from the border, all four sides)
    and for the frame's median colour (its background, the object being small): the (T-1,)
    change of that colour between frames t and t+1, levels (mean over channels)."""
    f = np.asarray(frames, dtype=np.float64)  # converted once for every ring and the median
    out = {}
    for r in RINGS:
        out[f"ring {r}"] = np.abs(np.diff(ring_colour(f, r), axis=0)).mean(axis=1)
    median = np.median(f.reshape(f.shape[0], -1, 3), axis=1)  # (T, 3)
    out["median colour"] = np.abs(np.diff(median, axis=0)).mean(axis=1)
    return out


def ring_errors(frames: np.ndarray, original: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) decoded and original uint8 frames -> (T,): how far the outermost ring's
    mean colour is from the original's, levels (mean over channels). An error the same in every
    frame does not show as change; one that differs in frame 0 does."""
    return np.abs(ring_colour(frames, 0) - ring_colour(original, 0)).mean(axis=1)


def flash_summary(changes: np.ndarray) -> dict:
    """(N, T-1) border changes -> median and p90 of the first pair and of the later pairs'
    per-clip maximum, and how many clips' first change exceeds their largest later one."""
    first, later = changes[:, 0], changes[:, 1:].max(axis=1)
    return {
        "first_median": float(np.median(first)),
        "first_p90": float(np.percentile(first, 90)),
        "later_max_median": float(np.median(later)),
        "later_max_p90": float(np.percentile(later, 90)),
        "later_all_median": float(np.median(changes[:, 1:])),
        "later_all_p90": float(np.percentile(changes[:, 1:], 90)),
        "clips_first_over_later_max": int((first > later).sum()),
        "pairs_median": [float(x) for x in np.median(changes[:, :PAIRS], axis=0)],
        "clips": len(first),
    }


def adherence(frames: list[np.ndarray], items: list) -> dict:
    from vidmoe.world.analyser import analyse

    hits = np.zeros(4)
    for f, (_prompt, colour, shape, motion, _seed) in zip(frames, items):
        r = analyse(f)
        ok = [r.colour == colour, r.shape == shape, r.motion == motion]
        hits += ok + [all(ok)]
    return dict(zip(("colour", "shape", "direction", "all"), (hits / len(items)).tolist()))


def latent_frame_stats(z: torch.Tensor) -> dict:
    """(N, Z, F, h, w) normalised latents -> per latent frame: mean, std, and the per-channel
    means and stds (for comparing two sets channel by channel)."""
    return {
        "mean": z.mean(dim=(0, 1, 3, 4)).tolist(),
        "std": z.std(dim=(0, 1, 3, 4)).tolist(),
        "channel_mean": z.mean(dim=(0, 3, 4)).T.tolist(),  # (F, Z)
        "channel_std": z.std(dim=(0, 3, 4)).T.tolist(),
    }


def encoded_latents(vae, num_clips: int) -> torch.Tensor:
    """The demo world's first `num_clips` clips, (3, T, H, W) each, and their normalised
    latents, (N, Z, F, h, w)."""
    from vidmoe.world.shapes import demo_world

    world = demo_world()
    videos = [world.sample(i).video for i in range(num_clips)]  # (3, T, H, W) each
    with torch.no_grad():
        return videos, torch.cat([vae.encode(v[None]) for v in videos])


def plain_backgrounds(vae) -> dict:
    """(c) each background as a plain 17-frame clip: the distance between two backgrounds'
    latents (centre position) per latent frame, and the colour decoded in frames 0 and 5."""
    from vidmoe.world.shapes import BACKGROUND_RGB

    latents, colours = {}, {}
    for bg in BACKGROUNDS:
        rgb = torch.tensor(BACKGROUND_RGB[bg]).view(1, 3, 1, 1, 1)
        video = (rgb * 2 - 1).expand(1, 3, 17, 64, 64).contiguous()  # (1, 3, T, H, W)
        with torch.no_grad():
            z = vae.encode(video)  # (1, Z, F, h, w)
            out = (vae.decode(z)[0].mean(dim=(2, 3)) + 1) * 127.5  # (3, T)
        latents[bg] = z[0, :, :, 8, 8]  # (Z, F)
        colours[bg] = {
            "true": [round(255 * c) for c in BACKGROUND_RGB[bg]],
            "frame 0": out[:, 0].round().tolist(),
            "frame 5": out[:, 5].round().tolist(),
        }
    pairs = [("black", "dark_blue"), ("black", "grey"), ("grey", "white")]
    distance = {f"{a} - {b}": (latents[a] - latents[b]).norm(dim=0).tolist() for a, b in pairs}
    return {"distance": distance, "colours": colours}


def decoder_probe(vae, num_steps: int = 60) -> dict:
    """(c) can the decoder draw frame 0 at all? For clip 0 of each dark background, frame 0's
    error (levels) from the encoder's frame-0 latent, and from that latent after `num_steps`
    Adam steps that fit the decoded frame 0 to the clip's (the decoder's weights fixed)."""
    from vidmoe.world.shapes import ShapesWorld

    out = {}
    for bg in ("black", "dark_blue"):
        world = ShapesWorld(
            64,
            64,
            17,
            backgrounds=(bg,),
            motions=("left", "right", "up", "down"),
            sizes=("large",),
            seed=2323,
        )
        first = world.sample(0).video[None, :, :1]  # (1, 3, 1, H, W)
        with torch.no_grad():
            z0 = vae.encode(first)  # (1, Z, 1, h, w)
            before = float((vae.decode(z0) - first).abs().mean()) * 127.5
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(num_steps):
            loss = (vae.decode(z, clamp=False) - first).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = float((vae.decode(z) - first).abs().mean()) * 127.5
        out[bg] = {
            "encoder_latent": before,
            "fitted_latent": after,
            "latent_shift": float((z.detach() - z0).abs().mean()),
        }
    return out


def load_vae(base, path: str):
    """A VAE like `base` (its latent statistics) with the weights of `path`: a vae.safetensors
    or a train-vae checkpoint (.pt, read without unpickling code); a first-frame head in the
    weights is built at their width and frame count, and its edge band as the `vae_config.json`
    (train-vae's) or `vidmoe.json` (a model folder's) beside the file says."""
    import dataclasses

    from vidmoe.io.checkpoints import load_into
    from vidmoe.models.vae import FIRST_FRAME_HEAD, WanVAE
    from vidmoe.training.cache import vae_folder_config
    from vidmoe.training.checkpoint import load_checkpoint

    if path.endswith(".pt"):
        state = load_checkpoint(path)
        print(path, "step", state["step"])
        weights = state["vae"]
    else:
        from safetensors.torch import load_file

        weights = load_file(path)
    head = weights.get(f"{FIRST_FRAME_HEAD}latent.0.weight")
    width = 0 if head is None else head.shape[0]
    out = weights.get(f"{FIRST_FRAME_HEAD}pixel.2.weight")  # (3 x frames, width, 3, 3)
    frames = 1 if out is None else out.shape[0] // 3
    written = vae_folder_config(Path(path).parent)  # the edge band is not in the weights
    edge = 0 if written is None else written.first_frame_head_edge
    config = dataclasses.replace(
        base.config,
        first_frame_head=width,
        first_frame_head_frames=frames,
        first_frame_head_edge=edge,
    )
    vae = WanVAE(config)
    load_into(vae, weights)
    return vae.eval()


def headless(vae):
    """A copy of `vae` without its first-frame head (the demo's VAE as v14 shipped it)."""
    import dataclasses

    from vidmoe.models.vae import WanVAE

    bare = WanVAE(dataclasses.replace(vae.config, first_frame_head=0))
    bare.load_state_dict(vae.state_dict(), strict=False)
    return bare.eval()


def table(caption: str, columns: list[str]) -> list[str]:
    """A markdown table's opening lines: a blank line, `caption`, a blank line, the header."""
    return ["", caption, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def report(results: dict) -> str:
    lines = [
        "## (a) VAE round trip: mean error per frame (levels of 255)",
        "",
        "| VAE | background | frame 0 | frames 1-16 (mean) | worst of 1-16 | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_bg in results["roundtrip"].items():
        for bg, e in by_bg.items():
            e = np.asarray(e)
            lines.append(
                f"| {name} | {bg} | {e[0]:.1f} | {e[1:].mean():.1f} | {e[1:].max():.1f} "
                f"| {e[0] / e[1:].mean():.2f} |"
            )
    lines += [
        "",
        "## (b) border change between frames (levels): generated and real clips",
        "",
        "| VAE | latents | frame 0->1 median | p90 | later pairs' max median | p90 "
        "| all later pairs median | p90 | clips first > later max |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, source), s in results["flash"].items():
        lines.append(
            f"| {name} | {source} | {s['first_median']:.1f} | {s['first_p90']:.1f} "
            f"| {s['later_max_median']:.1f} | {s['later_max_p90']:.1f} "
            f"| {s['later_all_median']:.1f} | {s['later_all_p90']:.1f} "
            f"| {s['clips_first_over_later_max']}/{s['clips']} |"
        )
    lines += table(
        "Border change by pair of frames (median over the clips; frames 1-4 are latent frame 1's)",
        ["VAE", "latents", *(f"{t}->{t + 1}" for t in range(PAIRS))],
    )
    for (name, source), s in results["flash"].items():
        lines.append(
            f"| {name} | {source} | " + " | ".join(f"{x:.1f}" for x in s["pairs_median"]) + " |"
        )
    lines += table(
        "## Adherence of the generated clips (analyser)",
        ["VAE", "colour", "shape", "direction", "all three"],
    )
    for name, a in results["adherence"].items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * a[k]:.1f}%" for k in a) + " |")
    lines += table(
        "Where in the frame (generated clips; median over the clips by pair of frames): rings of "
        "pixels r in from the border, all four sides, and the frame's median colour",
        ["VAE", "where", *(f"{t}->{t + 1}" for t in range(PAIRS)), "0->1 p90"],
    )
    for name, by_where in results["where"].items():
        for where, changes in by_where.items():
            c = np.asarray(changes)  # (N, T-1)
            cells = " | ".join(f"{x:.1f}" for x in np.median(c[:, :PAIRS], axis=0))
            lines.append(f"| {name} | {where} | {cells} | {np.percentile(c[:, 0], 90):.1f} |")
    lines += table(
        "The outermost ring's mean colour against the original's, real clips encoded and decoded "
        "(median over the clips, levels)",
        ["VAE", *(f"frame {t}" for t in range(8))],
    )
    for name, err in results["ring_error"].items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.1f}" for e in err[:8]) + " |")
    lines += table(
        "## (c) latent statistics per latent frame (normalised latents)",
        ["latents", *(f"frame {f} mean / std" for f in range(5))],
    )
    for source, s in results["latents"].items():
        cells = " | ".join(f"{m:+.2f} / {sd:.2f}" for m, sd in zip(s["mean"], s["std"]))
        lines.append(f"| {source} | {cells} |")
    gen, enc = (np.asarray(results["latents"][k]["channel_mean"]) for k in ("generated", "encoded"))
    gap = np.abs(gen - enc).mean(axis=1)  # (F,)
    lines.append(
        "| per-channel mean, generated - encoded, mean abs | "
        + " | ".join(f"{g:.2f}" for g in gap)
        + " |"
    )
    if not results["backgrounds"]:  # --quick
        return "\n".join(lines)
    sep = results["backgrounds"]["shipped"]  # the encoder is the same in every VAE compared here
    lines += [
        "",
        "Plain backgrounds: distance between two backgrounds' latents (normalised, one "
        "position), by latent frame",
        "",
        "| pair | " + " | ".join(f"frame {f}" for f in range(5)) + " |",
        "| --- |" + " --- |" * 5,
    ]
    for pair, d in sep["distance"].items():
        lines.append(f"| {pair} | " + " | ".join(f"{x:.2f}" for x in d) + " |")
    lines += [
        "",
        "| VAE | background | true RGB | decoded frame 0 | decoded frame 5 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, by_vae in results["backgrounds"].items():
        for bg, c in by_vae["colours"].items():
            lines.append(f"| {name} | {bg} | {c['true']} | {c['frame 0']} | {c['frame 5']} |")
    lines += [
        "",
        "Decoder probe (shipped VAE): frame 0's error from the encoder's latent, and from a "
        "latent fitted to it (60 Adam steps)",
        "",
        "| background | encoder's latent | fitted latent | mean latent shift |",
        "| --- | --- | --- | --- |",
    ]
    for bg, r in results["probe"].items():
        lines.append(
            f"| {bg} | {r['encoder_latent']:.1f} | {r['fitted_latent']:.1f} "
            f"| {r['latent_shift']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vae",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="a candidate vae.safetensors (repeatable); the shipped one is always in",
    )
    parser.add_argument("--clips", type=int, default=12, help="round-trip clips per background")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts generated")
    parser.add_argument("--seeds", default="0,1", help="seeds per prompt")
    parser.add_argument("--latents", type=Path, help="cache of the generated latents (.pt)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the round trip and the flash only (no adherence, backgrounds or decoder probe)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vidmoe.loading import load_pipeline

    pipe = load_pipeline(None, device="cpu")
    vaes = {"shipped": pipe.vae.eval()}
    if pipe.vae.config.first_frame_head:  # v14's VAE: the shipped one without its head
        vaes["no head"] = headless(pipe.vae)
    for spec in args.vae:
        name, _, path = spec.rpartition("=")
        vaes[name or Path(path).parent.name] = load_vae(pipe.vae, path)
    seeds = [int(s) for s in args.seeds.split(",")]
    gen = generate_latents(pipe, args.prompts, seeds, args.latents)
    originals, real = encoded_latents(pipe.vae, len(gen["latents"]))
    results: dict = {
        "roundtrip": roundtrip(vaes, args.clips),
        "flash": {},
        "adherence": {},
        "where": {},
        "ring_error": {},
        "latents": {
            "generated": latent_frame_stats(gen["latents"]),
            "encoded": latent_frame_stats(real),
        },
        "backgrounds": {} if args.quick else {n: plain_backgrounds(v) for n, v in vaes.items()},
        "probe": {} if args.quick else decoder_probe(pipe.vae),
    }
    from vidmoe.io.video import to_uint8_frames

    results["flash"][("none", "original real")] = flash_summary(
        np.stack([border_changes(to_uint8_frames(v)) for v in originals])
    )
    for name, vae in vaes.items():
        for source, z in (("generated", gen["latents"]), ("encoded real", real)):
            frames = decode_frames(vae, z)
            changes = np.stack([border_changes(f) for f in frames])  # (N, T-1)
            results["flash"][(name, source)] = flash_summary(changes)
            if source == "encoded real":
                errors = [ring_errors(f, to_uint8_frames(v)) for f, v in zip(frames, originals)]
                results["ring_error"][name] = np.median(np.stack(errors), axis=0).tolist()
            if source == "generated":
                by_clip = [where_changes(f) for f in frames]
                results["where"][name] = {
                    k: np.stack([c[k] for c in by_clip]).tolist() for k in by_clip[0]
                }  # (N, T-1) each
            if source == "generated" and not args.quick:
                results["adherence"][name] = adherence(frames, gen["items"])
    print(report(results))
    if args.json is not None:
        flat = dict(
            results,
            flash={f"{n} / {s}": v for (n, s), v in results["flash"].items()},
            roundtrip={
                n: {bg: np.asarray(e).tolist() for bg, e in d.items()}
                for n, d in results["roundtrip"].items()
            },
        )
        args.json.write_text(json.dumps(flat, indent=1))
    return results


if __name__ == "__main__":
    main()
