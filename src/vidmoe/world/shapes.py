"""The procedural "shapes" video world: coloured shapes moving in named ways over plain or
textured backgrounds, rendered with analytic anti-aliasing, each clip with a caption and a label.

Everything is a pure function of a seed (numpy Generator), so a seed names a clip exactly. The
folder written by `write_dataset` (mp4 files + metadata.jsonl) is the training's dataset format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from vidmoe.world.labels import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    PromptLabel,
    ShapeLabel,
    caption_for,
    motion_phrases,
    parse_prompt,
)

__all__ = [
    "BACKGROUND_RGB",
    "PALETTE",
    "Clip",
    "PromptLabel",
    "ShapeLabel",
    "ShapesDataset",
    "ShapesWorld",
    "caption_for",
    "parse_prompt",
    "render",
    "write_dataset",
]

# Colours in [0, 1]; every pair (and every colour against every background but its own) is
# at least 0.4 apart in RGB, so a nearest-palette read-back is unambiguous.
PALETTE = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (1.00, 0.92, 0.10),
    "purple": (0.70, 0.20, 0.90),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.50, 0.00),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUND_RGB = {
    "grey": (0.50, 0.50, 0.50),
    "black": (0.04, 0.04, 0.04),
    "white": (0.96, 0.96, 0.96),
    "dark_blue": (0.06, 0.09, 0.32),
}
# Radius of a "medium" circle etc. as a fraction of min(H, W); other shapes are scaled so their
# areas are close to the circle's. EXTENT is each shape's circumradius in those units.
SIZE_FRACTION = {"small": 0.09, "medium": 0.12, "large": 0.15}
EXTENT = {"circle": 1.0, "square": 0.85 * 2**0.5, "triangle": 1.25, "star": 1.3}
STAR_INNER = 0.48  # inner / outer radius of the five-pointed star
TEXTURE_AMPLITUDE = 0.03
MAX_ROTATION_PER_FRAME = np.deg2rad(25.0)  # below half the star's 72-degree symmetry period


def _polygon(shape: str) -> np.ndarray:
    """Unit vertices (N, 2) in image axes (y down), counter-clockwise on screen."""
    if shape == "square":
        return 0.85 * np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=np.float32)
    if shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3  # apex up
        return 1.25 * np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = 1.3 * np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        return (radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], -1)).astype(np.float32)
    raise ValueError(f"no polygon for shape {shape!r}")


def _sdf(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to the unit shape at local coordinates (any shape)."""
    if shape == "circle":
        return np.sqrt(px * px + py * py) - 1.0
    verts = _polygon(shape)
    dist2 = (px - verts[0, 0]) ** 2 + (py - verts[0, 1]) ** 2
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(verts)):
        (ax, ay), (bx, by) = verts[i], verts[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dx, dy = wx - ex * t, wy - ey * t
        np.minimum(dist2, dx * dx + dy * dy, out=dist2)
        # even-odd crossing test of a ray towards +x
        crosses = (py >= ay) != (py >= by)
        inside ^= crosses & ((ex * wy > ey * wx) == (by > ay))
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(dist2)


@dataclass(frozen=True)
class _Track:
    """Per-frame centre (T, 2) in pixels, scale (T,) in pixels per unit, and angle (T,)."""

    centre: np.ndarray
    scale: np.ndarray
    angle: np.ndarray


def _track(label: ShapeLabel, width: int, height: int, num_frames: int, rng) -> _Track:
    """Draw a path for `label` that shows its motion clearly and keeps the shape in frame."""
    t = np.linspace(0.0, 1.0, num_frames)
    radius = SIZE_FRACTION[label.size] * min(width, height)
    scale = np.full(num_frames, radius)
    if label.motion in ("growing", "shrinking"):
        small, big = rng.uniform(0.55, 0.7), rng.uniform(1.3, 1.5)
        ends = (small, big) if label.motion == "growing" else (big, small)
        scale = radius * (ends[0] + (ends[1] - ends[0]) * t)
    margin = EXTENT[label.shape] * scale.max() + 1.0
    room = np.array([width, height]) - 2 * margin  # how far the centre may travel per axis
    if np.any(room < 0):
        raise ValueError(
            f"a {label.size} {label.shape} does not fit in {width}x{height}; use a larger frame"
        )
    direction = {
        "left": (-1, 0),
        "right": (1, 0),
        "up": (0, -1),
        "down": (0, 1),
        "diagonal": (1, -1),
    }.get(label.motion, (0, 0))
    direction = np.array(direction, dtype=np.float64)
    # 30-45% of the frame per moving axis (a bit less per axis on the diagonal), within the room
    fraction = rng.uniform(0.25, 0.35) if label.motion == "diagonal" else rng.uniform(0.3, 0.45)
    travel = np.minimum(fraction * np.array([width, height]), room) * direction
    low = margin + np.maximum(-travel, 0)
    high = margin + room - np.maximum(travel, 0)
    start = rng.uniform(low, high)
    centre = start[None, :] + t[:, None] * travel[None, :]
    if label.motion == "rotating":
        total = rng.uniform(0.5, 0.8) * np.pi
        total = min(total, MAX_ROTATION_PER_FRAME * max(num_frames - 1, 1))
        angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1.0, 1.0]) * total * t
    else:
        angle = np.full(num_frames, rng.uniform(-0.15, 0.15))
    return _Track(centre=centre, scale=scale, angle=angle)


def _background(label: ShapeLabel, width: int, height: int, rng) -> np.ndarray:
    """A static (H, W, 3) background in [0, 1]: a flat colour plus an optional faint texture."""
    base = np.asarray(BACKGROUND_RGB[label.background], dtype=np.float32)
    if label.texture == "plain":
        tex = np.zeros((height, width), dtype=np.float32)
    elif label.texture == "stripes":
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phi, period = rng.uniform(0, np.pi), rng.uniform(6.0, 12.0)
        tex = np.sin(2 * np.pi * (x * np.cos(phi) + y * np.sin(phi)) / period)
    else:
        tex = rng.standard_normal((height + 2, width + 2)).astype(np.float32)
        tex = sum(tex[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 3.0
    tex = TEXTURE_AMPLITUDE * tex.astype(np.float32)
    return np.clip(base[None, None, :] + tex[:, :, None], 0.0, 1.0)


def render_frames(
    labels: Sequence[ShapeLabel], width: int, height: int, num_frames: int, seed
) -> np.ndarray:
    """Render objects (painted in order) over the first label's background.

    Returns:
        (T, H, W, 3) float32 frames in [0, 1].
    """
    rng = np.random.default_rng(seed)
    background = _background(labels[0], width, height, rng)
    frames = np.repeat(background[None], num_frames, axis=0)  # (T, H, W, 3)
    for label in labels:
        track = _track(label, width, height, num_frames, rng)
        # only the box the shape sweeps over the whole clip is shaded (about 3x less work)
        reach = EXTENT[label.shape] * track.scale[:, None] + 1.0
        x0, y0 = np.maximum(np.floor((track.centre - reach).min(0)), 0).astype(int)
        x1, y1 = np.ceil((track.centre + reach).max(0)).astype(int) + 1
        x1, y1 = min(x1, width), min(y1, height)
        ys = (np.arange(y0, y1, dtype=np.float32) + 0.5)[None, :, None]  # pixel centres
        xs = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, None, :]
        cx, cy = (track.centre[:, i, None, None].astype(np.float32) for i in (0, 1))
        s = track.scale[:, None, None].astype(np.float32)
        cos, sin = (f(track.angle)[:, None, None].astype(np.float32) for f in (np.cos, np.sin))
        dx, dy = xs - cx, ys - cy  # (T, h, w) after broadcasting
        local_x, local_y = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s
        sdf = _sdf(label.shape, local_x, local_y) * s  # in pixels
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # box-filtered edge: analytic anti-aliasing
        colour = np.asarray(PALETTE[label.colour], dtype=np.float32)
        crop = frames[:, y0:y1, x0:x1]
        frames[:, y0:y1, x0:x1] = crop * (1.0 - alpha) + colour * alpha
    return frames


def render(
    label: ShapeLabel | Sequence[ShapeLabel],
    seed,
    *,
    width: int = 64,
    height: int = 64,
    num_frames: int = 17,
) -> torch.Tensor:
    """Render a clip of `label` (or several objects) whose free choices come from `seed`.

    Returns:
        video (3, T, H, W) float32 in [-1, 1].
    """
    labels = (label,) if isinstance(label, ShapeLabel) else tuple(label)
    if not labels or not all(isinstance(lab, ShapeLabel) for lab in labels):
        raise ValueError(f"render needs a ShapeLabel or a sequence of them; got {label!r}")
    frames = render_frames(labels, width, height, num_frames, seed)
    # numpy, not torch, for the elementwise work: torch's thread pool costs more than the render
    video = np.ascontiguousarray(rearrange(frames * 2.0 - 1.0, "t h w c -> c t h w"))
    return torch.from_numpy(video)


@dataclass(frozen=True)
class Clip:
    """A rendered clip, its caption, its main object's label, and every object's label."""

    video: torch.Tensor  # (3, T, H, W) float32 in [-1, 1]
    caption: str
    label: ShapeLabel
    objects: tuple[ShapeLabel, ...] = field(default=())


class ShapesWorld:
    """An endless, seeded family of shapes clips: `sample(i)` is the same clip for the same seed.

    `vocabulary` picks the captions' vocabulary ("base", "extended" or "rich", see
    `vidmoe.world.labels.motion_phrases`); the labels and videos do not depend on it.
    """

    def __init__(
        self,
        width: int,
        height: int,
        num_frames: int,
        *,
        num_objects: int = 1,
        backgrounds: Sequence[str] = BACKGROUNDS,
        textures: Sequence[str] = ("plain",),
        colours: Sequence[str] = COLOURS,
        shapes: Sequence[str] = SHAPES,
        motions: Sequence[str] = MOTIONS,
        sizes: Sequence[str] = SIZES,
        seed: int = 0,
        vocabulary: str = "base",
    ):
        if width < 16 or height < 16:
            raise ValueError(f"width and height must be >= 16; got {width}x{height}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 so motion is visible; got {num_frames}")
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1; got {num_objects}")
        for name, values, allowed in (
            ("backgrounds", backgrounds, BACKGROUNDS),
            ("textures", textures, TEXTURES),
            ("colours", colours, COLOURS),
            ("shapes", shapes, SHAPES),
            ("motions", motions, MOTIONS),
            ("sizes", sizes, SIZES),
        ):
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(
                    f"{name} must be a non-empty subset of {allowed}; got {tuple(values)}"
                )
        self.width, self.height, self.num_frames = width, height, num_frames
        motion_phrases(vocabulary)  # an unknown vocabulary is an error
        self.num_objects, self.seed, self.vocabulary = num_objects, seed, vocabulary
        self.backgrounds, self.textures = tuple(backgrounds), tuple(textures)
        self.colours, self.shapes, self.motions, self.sizes = (
            tuple(colours),
            tuple(shapes),
            tuple(motions),
            tuple(sizes),
        )

    def draw_labels(self, rng: np.random.Generator) -> tuple[ShapeLabel, ...]:
        """Draw the objects of one clip; none has its background's colour, no circle rotates."""
        background = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        texture = self.textures[int(rng.integers(len(self.textures)))]
        labels = []
        for _ in range(self.num_objects):
            colours = [c for c in self.colours if c != background] or list(self.colours)
            shape = self.shapes[int(rng.integers(len(self.shapes)))]
            # a rotating circle looks static, so its label would lie
            motions = [m for m in self.motions if not (shape == "circle" and m == "rotating")]
            motions = motions or list(self.motions)
            labels.append(
                ShapeLabel(
                    colour=colours[int(rng.integers(len(colours)))],
                    shape=shape,
                    motion=motions[int(rng.integers(len(motions)))],
                    background=background,
                    size=self.sizes[int(rng.integers(len(self.sizes)))],
                    texture=texture,
                )
            )
        return tuple(labels)

    def sample(self, index: int) -> Clip:
        """Clip number `index` of this world (a pure function of seed and index)."""
        rng = np.random.default_rng([self.seed, index])
        labels = self.draw_labels(rng)
        label = labels if len(labels) > 1 else labels[0]
        caption = caption_for(label, rng, self.vocabulary, label_words=True)
        video = self.render(labels, int(rng.integers(2**63)))
        return Clip(video=video, caption=caption, label=labels[0], objects=labels)

    def captions(self, index: int, count: int) -> list[str]:
        """`count` phrasings of clip `index` (not rendered): the first is `sample(index).caption`
        (which names the label's colour and shape words in every vocabulary), the others are
        drawn from streams of their own, so they do not depend on `count`."""
        if count < 1:
            raise ValueError(f"count must be >= 1; got {count}")
        rng = np.random.default_rng([self.seed, index])
        labels = self.draw_labels(rng)
        label = labels if len(labels) > 1 else labels[0]
        out = [caption_for(label, rng, self.vocabulary, label_words=True)]
        for variant in range(1, count):
            variant_rng = np.random.default_rng([self.seed, index, variant])
            out.append(caption_for(label, variant_rng, self.vocabulary))
        return out

    def render(self, label: ShapeLabel | Sequence[ShapeLabel], seed) -> torch.Tensor:
        """Render `label` at this world's size: (3, T, H, W) float32 in [-1, 1]."""
        return render(label, seed, width=self.width, height=self.height, num_frames=self.num_frames)

    def caption_for(
        self, label: ShapeLabel | Sequence[ShapeLabel], rng: np.random.Generator
    ) -> str:
        """A caption for `label`; see `vidmoe.world.labels.caption_for`."""
        labels = label if isinstance(label, ShapeLabel) else tuple(label)
        return caption_for(labels, rng, self.vocabulary)


def demo_world(vocabulary: str = "base") -> ShapesWorld:
    """The world the demo model (src/vidmoe/assets/demo) was trained on: 64x64, 17 frames, one
    large object moving left, right, up or down, seed 1. Clip i of it is the i-th clip of every
    demo training cache; `vocabulary` picks the captions' motion phrasings."""
    return ShapesWorld(
        64,
        64,
        17,
        motions=("left", "right", "up", "down"),
        sizes=("large",),
        seed=1,
        vocabulary=vocabulary,
    )


class ShapesDataset(torch.utils.data.Dataset):
    """The first `length` clips of a ShapesWorld as a map-style Dataset of dicts."""

    def __init__(self, world: ShapesWorld, length: int):
        if length < 1:
            raise ValueError(f"length must be >= 1; got {length}")
        self.world, self.length = world, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        clip = self.world.sample(index)
        return {"video": clip.video, "caption": clip.caption, "label": asdict(clip.label)}


def write_dataset(
    folder: str | Path,
    n: int,
    *,
    world: ShapesWorld | None = None,
    width: int = 64,
    height: int = 64,
    num_frames: int = 17,
    seed: int = 0,
    fps: int = 16,
    crf: int = 12,
) -> Path:
    """Write clips 0..n-1 of `world` (or a default world) as mp4 files plus metadata.jsonl.

    Each metadata line is {"file": "000000.mp4", "caption": ..., "label": {...}}; "file" is
    relative to `folder`. Returns the metadata path.
    """
    from vidmoe.io.video import to_uint8_frames, write_mp4

    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    world = world or ShapesWorld(width, height, num_frames, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        clip = world.sample(index)
        name = f"{index:06d}.mp4"
        write_mp4(to_uint8_frames(clip.video), folder / name, fps=fps, crf=crf)
        lines.append(
            json.dumps({"file": name, "caption": clip.caption, "label": asdict(clip.label)})
        )
    metadata = folder / "metadata.jsonl"
    metadata.write_text("\n".join(lines) + "\n")
    return metadata
