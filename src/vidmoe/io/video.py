"""Video files: write frames to mp4 (H.264 through PyAV) atomically, read them back, save a
JSON beside them.

Frames are uint8 arrays (T, H, W, 3). A file is written under a temporary name in the same
folder and renamed, so a half-written video is never seen under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vidmoe.io.tensors import replace_atomic


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) or (1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video; got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W); got {tuple(video.shape)}")
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename onto `path`; the temp file goes on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        write(Path(tmp))
        replace_atomic(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (yuv420p; H and W must be even)."""
    import av

    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs an even width and height; got {width}x{height}")

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return atomic_write(path, write)


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file to (T, H, W, 3) uint8 frames and its frame rate."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames), fps


def write_json(data: dict, path: str | Path) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
