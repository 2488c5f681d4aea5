"""What the `vidmoe` command line accepts: option values parsed into library values, and
checks of the environment (device, image, serve arguments) made before any work.

Each function raises ValueError (or typer.BadParameter, a usage error) naming the flag, the
value and what is accepted; `vidmoe.cli` turns either into one line and exit status 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer


def parse_per_expert(values: list[str] | None, kind=float, what: str = "guidance") -> dict:
    """'high_noise=4,low_noise=3' or repeated 'name=value' -> {name: value}."""
    out = {}
    for item in values or []:
        for part in item.split(","):
            if "=" not in part:
                raise typer.BadParameter(
                    f"{what} must be NAME=VALUE (e.g. high_noise=4.0); got {part!r}"
                )
            name, value = part.split("=", 1)
            try:
                out[name.strip()] = kind(value)
            except ValueError:
                raise typer.BadParameter(
                    f"{what} for {name!r} must be a number; got {value!r}"
                ) from None
    return out


def parse_steps(steps: str | None) -> tuple[int | None, dict[str, int]]:
    """'8' -> (8, {}); 'high_noise=2,low_noise=6' -> (None, {...}); None -> (None, {})."""
    if steps is None:
        return None, {}
    if "=" in steps:
        return None, parse_per_expert([steps], int, "steps")
    try:
        return int(steps), {}
    except ValueError:
        raise typer.BadParameter(f"steps must be an integer or NAME=N,...; got {steps!r}") from None


def _number_list(text: str, *, flag: str, high: float) -> tuple[float, ...]:
    """'1,0.5' -> (1.0, 0.5), each value finite and in [0, high]; errors name `flag`."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(
                f"{flag} takes comma-separated numbers; got {part.strip()!r} in {text!r}"
            ) from None
        if not (math.isfinite(value) and 0.0 <= value <= high):
            raise ValueError(
                f"{flag} values must lie in [0, {high:g}]; got {part.strip()} in {text!r}"
            )
        values.append(value)
    return tuple(values)


def parse_schedule(*, sigmas: str | None, timesteps: str | None) -> tuple[float, ...] | None:
    """--sigmas (in [0, 1]) or --timesteps (in [0, 1000], divided by 1000) -> sigmas, or None."""
    if sigmas is not None and timesteps is not None:
        raise ValueError("give --sigmas or --timesteps, not both (timestep = 1000 x sigma)")
    if sigmas is not None:
        return _number_list(sigmas, flag="--sigmas", high=1.0)
    if timesteps is None:
        return None
    values = _number_list(timesteps, flag="--timesteps", high=1000.0)
    if max(values) <= 1.0:
        raise ValueError(
            f"--timesteps values are in [0, 1000] (timestep = 1000 x sigma); got {timesteps!r}, "
            f"all <= 1: for sigmas use --sigmas {timesteps}"
        )
    return tuple(v / 1000 for v in values)


def parse_step_cache(value: str | None) -> dict[str, float] | float | None:
    """'0.1' (every expert) or 'high_noise=0.05,low_noise=0.1' -> a threshold or {name: value}."""
    if value is None:
        return None
    if "=" in value:
        return parse_per_expert([value], float, "--step-cache")
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(
            f"--step-cache must be a number or NAME=VALUE,...; got {value!r}"
        ) from None


def parse_lora_spec(item: str) -> tuple[str | None, str, float]:
    """'high_noise=FILE:0.8', 'FILE:0.5' or 'FILE' -> (expert or None, file, strength)."""
    expert, rest = None, item
    head, sep, tail = item.partition("=")
    if sep and head.isidentifier():
        expert, rest = head, tail
    path, strength = rest, 1.0
    if ":" in rest and not Path(rest).exists():
        path, value = rest.rsplit(":", 1)
        try:
            strength = float(value)
        except ValueError:
            raise typer.BadParameter(
                f"LoRA strength must be a number; got {value!r} in {item!r}"
            ) from None
    return expert, path, strength


def check_device(device: str) -> None:
    """Refuse, before any work, a device this machine does not have (ValueError)."""
    from vidmoe.devices import resolve_device

    try:
        resolve_device(device)
    except ValueError as e:
        raise ValueError(f"--device {device}: {e}") from None


def check_image(path: Path) -> None:
    """Refuse, before any work, an image that is missing, unreadable or a decompression bomb."""
    from PIL import Image

    if not path.is_file():
        raise ValueError(f"--image {path}: no such file")
    try:
        with Image.open(path):
            pass  # opening reads the header (format, size) and refuses decompression bombs
    except Image.DecompressionBombError as e:
        raise ValueError(f"--image {path} is too large to open safely: {e}") from None
    except OSError as e:
        raise ValueError(f"--image {path} is not an image Pillow can read: {e}") from None


def check_serve_args(*, port: int, outputs: Path, max_queue: int, device: str) -> None:
    """Refuse bad `vidmoe serve` arguments before anything is created (ValueError)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must lie in 1..65535; got {port}")
    if max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1; got {max_queue}")
    if outputs.exists() and not outputs.is_dir():
        raise ValueError(
            f"--outputs {outputs} is a file; it must be a folder (it holds the job database)"
        )
    check_device(device)


def parse_area(text: str) -> int:
    """`--area`: pixels per frame, as W*H (the release's `--size`, e.g. 832*480) or one number."""
    parts = text.replace("x", "*").split("*")
    if not 1 <= len(parts) <= 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--area must be W*H (e.g. 832*480) or a pixel count; got {text!r}")
    area = 1
    for p in parts:
        area *= int(p)
    return area
