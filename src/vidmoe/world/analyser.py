"""Read a shapes-world clip back: which colour, which shape, which motion.

`analyse` segments the largest foreground object against the border's colour in every frame,
then reads colour (nearest palette entry), shape (rotation-invariant mask geometry) and motion
(centroid path, area trend, orientation from complex moments). `adherence` scores a reading
against a label or a prompt; the two together are the measurable evaluation of generated video.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from einops import rearrange

from vidmoe.world.labels import PromptLabel, ShapeLabel, parse_prompt
from vidmoe.world.shapes import BACKGROUND_RGB, PALETTE

MAX_SIDE = 96  # larger videos are area-downsampled to this; the geometry needs no more
MIN_SIDE = 48  # smaller ones are upsampled to at least this, so tiny shapes keep their outline
MIN_AREA_FRACTION = 0.002  # components smaller than this (and 6 px) are noise
TRAVEL_THRESHOLD = 0.12  # centroid travel, as a fraction of the frame, that counts as moving
SCALE_THRESHOLD = 1.25  # linear size change (or its inverse) that counts as growing/shrinking
ROTATION_THRESHOLD = 30.0  # degrees of turn that count as rotating
SYMMETRY = {3: "triangle", 4: "square", 5: "star"}  # n-fold symmetry of each polygon
TYPICAL_SYMMETRY = {3: 0.6, 4: 0.35, 5: 0.6}  # sym{n} of the clean shapes (see _geometry)
CIRCLE_BELOW = 0.33  # no harmonic above a third of its typical value: a circle
# 8 compass sectors of the displacement angle (0 = right, counter-clockwise, y up); only the
# up-right diagonal is a world motion, the other three are named so they never match a label.
_SECTORS = ("right", "diagonal", "up", "up_left", "left", "down_left", "down", "down_right")


@dataclass(frozen=True)
class Reading:
    """What the analyser saw in one clip; colour and shape are None when no object was found."""

    colour: str | None
    shape: str | None
    motion: str  # a MOTIONS word, "up_left"/"down_left"/"down_right", "static" or "unknown"
    confidence: dict[str, float] = field(default_factory=dict)  # per attribute, in [0, 1]
    background: str | None = None
    displacement: tuple[float, float] = (0.0, 0.0)  # (dx / W, dy / H), y down
    scale_change: float = 1.0  # linear size, last frame over first (from a log-area fit)
    rotation_deg: float = 0.0  # signed turn over the clip
    features: dict[str, float] = field(default_factory=dict)  # shape geometry, medians over frames
    found: bool = True


def _to_frames(video) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] or (T, H, W, 3) uint8 -> (T, H, W, 3) float32 in [0, 1]."""
    if isinstance(video, torch.Tensor):
        video = (
            video.detach().cpu().float().numpy()
            if video.dtype != torch.uint8
            else video.cpu().numpy()
        )
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(
            f"video must be (3, T, H, W) float or (T, H, W, 3) uint8; got shape {video.shape}"
        )
    if video.dtype == np.uint8:
        if video.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3); got {video.shape}")
        return video.astype(np.float32) / 255.0
    if video.shape[0] != 3:
        raise ValueError(f"a float video must be (3, T, H, W) in [-1, 1]; got {video.shape}")
    return np.clip(
        (rearrange(video.astype(np.float32), "c t h w -> t h w c") + 1.0) / 2.0, 0.0, 1.0
    )


def _resample(frames: np.ndarray) -> np.ndarray:
    """Average-pool so the longer side is at most MAX_SIDE; upsample small clips to MIN_SIDE."""
    if min(frames.shape[1:3]) < MIN_SIDE:  # bilinear upsampling gives a sub-pixel mask edge
        scale = int(np.ceil(MIN_SIDE / min(frames.shape[1:3])))
        x = torch.from_numpy(np.ascontiguousarray(rearrange(frames, "t h w c -> t c h w")))
        x = torch.nn.functional.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False
        )
        return rearrange(x.numpy(), "t c h w -> t h w c")
    factor = int(np.ceil(max(frames.shape[1:3]) / MAX_SIDE))
    if factor <= 1:
        return frames
    t, h, w, c = frames.shape
    frames = frames[:, : h - h % factor, : w - w % factor]
    return frames.reshape(t, h // factor, factor, w // factor, factor, c).mean((2, 4))


def _box_blur(x: np.ndarray) -> np.ndarray:
    """3x3 mean over the H, W axes (1, 2) with edge padding."""
    h, w = x.shape[1:3]
    p = np.pad(x, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3), mode="edge")
    return sum(p[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _largest_components(mask: np.ndarray) -> np.ndarray:
    """Keep each frame's largest 4-connected component of a (T, H, W) bool mask."""
    keep = np.zeros_like(mask)
    rows, cols = np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    if len(rows) == 0:
        return keep
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sub = mask[box]  # only the box that holds any foreground is labelled
    labels = np.where(sub, np.arange(1, sub.size + 1, dtype=np.int32).reshape(sub.shape), 0)
    while True:  # propagate the largest id through each component until nothing changes
        grown = labels.copy()
        np.maximum(grown[:, 1:], labels[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], labels[:, 1:], out=grown[:, :-1])
        np.maximum(grown[:, :, 1:], labels[:, :, :-1], out=grown[:, :, 1:])
        np.maximum(grown[:, :, :-1], labels[:, :, 1:], out=grown[:, :, :-1])
        grown *= sub
        if np.array_equal(grown, labels):
            break
        labels = grown
    for i in range(len(labels)):
        ids, counts = np.unique(labels[i][labels[i] > 0], return_counts=True)
        if len(ids):
            keep[box][i] = labels[i] == ids[np.argmax(counts)]
    return keep


def _geometry(mask: np.ndarray) -> dict[str, float]:
    """Centroid, area and rotation-invariant shape features of one (H, W) mask.

    sym{n} = |sum z^n| / sum |z|^n over pixels z (relative to the centroid) is the strength of
    the shape's n-fold symmetry, independent of rotation and scale: about 0.6 for a triangle
    (n=3), 0.35 for a square (n=4), 0.6 for a five-pointed star (n=5), near 0 for a disc; the
    moment's phase / n is the orientation.
    """
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    z = (xs + 0.5 - cx) + 1j * (ys + 0.5 - cy)
    r = np.abs(z)
    r_max = r.max() + 0.5  # to the far edge of the farthest pixel
    out = {"area": area, "cx": cx, "cy": cy, "fill_circle": area / (np.pi * r_max**2)}
    for n in SYMMETRY:
        moment = (z**n).sum()
        out[f"sym{n}"] = float(abs(moment) / max((r**n).sum(), 1e-9))
        out[f"phase{n}"] = float(np.angle(moment))
    return out


def _classify_shape(f: dict[str, float]) -> tuple[str, float]:
    """The shape whose symmetry harmonic stands out (none: a circle), with a margin confidence."""
    scores = {shape: f[f"sym{n}"] / TYPICAL_SYMMETRY[n] for n, shape in SYMMETRY.items()}
    ranked = sorted(scores, key=scores.get, reverse=True)
    best, second = scores[ranked[0]], scores[ranked[1]]
    if best < CIRCLE_BELOW:
        return "circle", float(min(1.0, (CIRCLE_BELOW - best) / CIRCLE_BELOW))
    return ranked[0], float(min(1.0, (best - max(second, CIRCLE_BELOW)) / CIRCLE_BELOW))


def _nearest(rgb: np.ndarray, table: dict[str, tuple]) -> tuple[str, float]:
    names = list(table)
    dist = np.linalg.norm(np.asarray([table[n] for n in names]) - rgb, axis=1)
    order = np.argsort(dist)
    return names[order[0]], float(1.0 - dist[order[0]] / max(dist[order[1]], 1e-6))


def _fit_end_change(values: np.ndarray, times: np.ndarray, span: float) -> float:
    """Least-squares slope of values over times, times the clip's span: a robust end-to-end change."""
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(times, values, 1)[0] * span)


def _motion(
    per_frame: list[dict], times: np.ndarray, span: float, size: tuple[int, int], order: int | None
):
    """Motion word, confidence, displacement, scale change and rotation from per-frame geometry."""
    height, width = size
    cx = np.array([f["cx"] for f in per_frame]) / width
    cy = np.array([f["cy"] for f in per_frame]) / height
    dx, dy = _fit_end_change(cx, times, span), _fit_end_change(cy, times, span)
    scale = float(np.exp(_fit_end_change(np.log([f["area"] for f in per_frame]), times, span) / 2))
    rotation = 0.0
    if order is not None:  # unwrap: the turn per frame stays below half the symmetry period
        phase = np.unwrap([f[f"phase{order}"] for f in per_frame])
        rotation = float(np.degrees(_fit_end_change(phase, times, span) / order))
    travel = float(np.hypot(dx, dy))
    if travel > TRAVEL_THRESHOLD:
        sector = int(np.round(np.degrees(np.arctan2(-dy, dx)) / 45.0)) % 8
        motion, confidence = _SECTORS[sector], min(1.0, travel / (2 * TRAVEL_THRESHOLD))
    elif max(scale, 1 / scale) > SCALE_THRESHOLD:
        motion = "growing" if scale > 1 else "shrinking"
        confidence = min(1.0, np.log(max(scale, 1 / scale)) / (2 * np.log(SCALE_THRESHOLD)))
    elif abs(rotation) > ROTATION_THRESHOLD:
        motion, confidence = "rotating", min(1.0, abs(rotation) / (2 * ROTATION_THRESHOLD))
    else:
        motion = "static"
        confidence = 1.0 - max(travel / TRAVEL_THRESHOLD, abs(rotation) / ROTATION_THRESHOLD)
    return motion, float(max(confidence, 0.0)), (dx, dy), scale, rotation


def analyse(video) -> Reading:
    """Read colour, shape and motion of the main object of a clip.

    Args:
        video: (3, T, H, W) float tensor/array in [-1, 1], or (T, H, W, 3) uint8 frames.
    Returns:
        A Reading; with several objects it describes the largest one in each frame.
    """
    frames = _resample(_to_frames(video))  # (T, H, W, 3)
    num_frames, height, width, _ = frames.shape
    smooth = _box_blur(frames)  # (T, H, W, 3): noise down 3x, edges kept at the half-way level
    border = max(1, min(height, width) // 32)
    edge = np.concatenate(
        [
            smooth[:, :border].reshape(num_frames, -1, 3),
            smooth[:, -border:].reshape(num_frames, -1, 3),
            smooth[:, :, :border].reshape(num_frames, -1, 3),
            smooth[:, :, -border:].reshape(num_frames, -1, 3),
        ],
        axis=1,
    )
    background = np.median(edge, axis=1)  # (T, 3)
    dist = np.linalg.norm(smooth - background[:, None, None, :], axis=-1)  # (T, H, W)
    contrast = float(np.quantile(dist, 0.995))
    threshold = max(0.12, 0.5 * contrast)  # half-way between background and object colour
    mask = _largest_components(dist > threshold)
    min_area = max(6.0, MIN_AREA_FRACTION * height * width)
    valid = [i for i in range(num_frames) if mask[i].sum() >= min_area]
    bg_name, _ = _nearest(np.median(background, 0), BACKGROUND_RGB)
    if len(valid) < 2:
        zero = {"colour": 0.0, "shape": 0.0, "motion": 0.0}
        return Reading(None, None, "unknown", zero, background=bg_name, found=False)
    per_frame = [_geometry(mask[i]) for i in valid]
    times = np.asarray(valid, dtype=np.float64)
    span = float(num_frames - 1)
    # colour: the median of strongly-foreground pixels, away from the anti-aliased rim
    core = mask & (dist > max(threshold, 0.75 * contrast))
    pixels = smooth[core] if core.sum() >= 4 else smooth[mask]
    colour, colour_conf = _nearest(np.median(pixels, axis=0), PALETTE)
    # shape: median features over frames at least half as large as the largest (tiny frames lie)
    areas = np.array([f["area"] for f in per_frame])
    big = [f for f, a in zip(per_frame, areas, strict=True) if a >= 0.5 * areas.max()]
    keys = ("fill_circle", "sym3", "sym4", "sym5")
    features = {k: float(np.median([f[k] for f in big])) for k in keys}
    shape, shape_conf = _classify_shape(features)
    order = {v: k for k, v in SYMMETRY.items()}.get(shape)  # a circle's turn cannot be seen
    motion, motion_conf, disp, scale, rotation = _motion(
        per_frame, times, span, (height, width), order
    )
    return Reading(
        colour=colour,
        shape=shape,
        motion=motion,
        confidence={"colour": colour_conf, "shape": shape_conf, "motion": motion_conf},
        background=bg_name,
        displacement=disp,
        scale_change=scale,
        rotation_deg=rotation,
        features=features,
    )


def adherence(reading: Reading, target: ShapeLabel | PromptLabel | str) -> dict[str, bool]:
    """Whether the reading matches each attribute the target names (colour, shape, motion).

    A prompt string is parsed with `parse_prompt`; attributes it leaves out are not scored.
    Returns {attribute: bool, ..., "all": every scored attribute matched}.
    """
    if isinstance(target, str):
        target = parse_prompt(target)
    if not isinstance(target, ShapeLabel | PromptLabel):
        raise ValueError(
            f"target must be a ShapeLabel, PromptLabel or prompt string; got {type(target).__name__}"
        )
    out = {}
    for attr in ("colour", "shape", "motion"):
        wanted = getattr(target, attr)
        if wanted is not None:
            out[attr] = getattr(reading, attr) == wanted
    out["all"] = all(out.values())
    return out
