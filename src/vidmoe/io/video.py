"""Video files: write frames to mp4 (H.264 through PyAV) atomically, publish a video and its
JSON record as one unit, read videos back.

Frames are uint8 arrays (T, H, W, 3). A file is written under a temporary name in the same
folder, with the user's normal permissions (0666 less the umask), and renamed, so a half-written
file is never seen under its final name. The same frames always give the same mp4 bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vidmoe.io.atomic import atomic_write, temp_beside, write_text_atomic

# x264's macroblock-tree rate control reads memory it never wrote at many frame widths (64 or
# 112 pixels, not 128 or 256): the same frames then gave different bytes from run to run (decoded
# pixels up to 21/255 apart). Without it every size repeats exactly; x264's frame threads are
# deterministic by design, so threads stay automatic.
X264_OPTIONS = {"x264-params": "mbtree=0"}


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


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs an even width and height; got {width}x{height}")
    return frames


def _encode_mp4(frames: np.ndarray, file: Path, fps: int, crf: int) -> None:
    """Encode checked (T, H, W, 3) uint8 frames into `file` (H.264, yuv420p), deterministically."""
    import av

    _, height, width, _ = frames.shape
    with av.open(str(file), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), **X264_OPTIONS}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16, crf: int = 18) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (yuv420p; H and W must be even)."""
    frames = _check_frames(frames)
    return atomic_write(path, lambda tmp: _encode_mp4(frames, tmp, fps, crf))


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
    return write_text_atomic(text, path)


def record_path(video: str | Path) -> Path:
    """The JSON record beside a video: OUTPUT.mp4 -> OUTPUT.mp4.json."""
    video = Path(video)
    return video.with_name(video.name + ".json")


def check_video_path(path: str | Path) -> Path:
    """Check, before any work, that a video and its record can be published at `path`.

    Creates nothing but a temporary file, at once removed, in the nearest existing folder.
    Raises:
        ValueError: the name does not end in .mp4, the path or its record is a folder or not a
            regular file, or the folder cannot be created or written, with the reason.
    """
    path = Path(path)
    for target in (path, record_path(path)):
        if target.is_dir():
            raise ValueError(f"{target} is a folder: give a file name, e.g. {target / 'video.mp4'}")
        if target.exists() and not target.is_file():
            raise ValueError(f"{target} exists and is not a regular file: choose another name")
    if path.suffix.lower() != ".mp4":
        raise ValueError(
            f"videos are written as H.264 mp4, so the name must end in .mp4; got {str(path)!r}: "
            f"use {str(path.with_suffix('.mp4'))!r}"
        )
    folder = path.parent
    while not folder.exists():  # created only when the video is published
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        temp_beside(folder / path.name).unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write {path.name} in {folder}: {e.strerror or e}; choose a writable folder"
        ) from None
    return path


@contextlib.contextmanager
def _signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: installed outside Python, cannot be put back
            previous[signum] = signal.signal(signum, lambda n, _frame: received.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def _backup(target: Path) -> Path | None:
    """A hidden second name for `target`'s current contents (a hard link), or None if absent."""
    if not target.is_file():
        return None
    backup = temp_beside(target)
    backup.unlink()
    try:
        os.link(target, backup)
    except OSError:  # a file system without hard links
        shutil.copyfile(target, backup)
    return backup


def replace_together(moves: list[tuple[Path, Path]]) -> None:
    """Rename each (temp, target) in order, all or none: a failure puts the old files back.

    Ctrl-C and SIGTERM wait until the renames are done. Only a hard crash (SIGKILL, power loss)
    between two renames can leave a mix; callers that must detect it record a checksum.
    """
    done: list[tuple[Path, Path | None]] = []
    backups: list[Path] = []
    with _signals_deferred():
        try:
            for tmp, target in moves:
                backup = _backup(target)
                backups += [backup] if backup else []
                os.replace(tmp, target)
                done.append((target, backup))
        except BaseException:
            for target, backup in reversed(done):
                if backup is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(backup, target)
            raise
        finally:
            for backup in backups:
                backup.unlink(missing_ok=True)


def _fsync(file: Path) -> None:
    with file.open("rb+") as f:
        os.fsync(f.fileno())


def publish_video(
    frames: np.ndarray, record: dict, path: str | Path, *, fps: int, crf: int = 18
) -> tuple[Path, Path]:
    """Write OUTPUT (mp4) and OUTPUT.json as one unit: the old pair or the new pair, never a mix.

    Both are written to temporary files beside their targets first (a full disk or a permission
    error leaves the old pair untouched), then renamed together (`replace_together`): the JSON
    first, the mp4 last. The JSON's "video" entry holds the mp4's name, size and sha256, so even a
    hard crash between the two renames is detectable (`video_matches_record`).
    Returns:
        (video path, record path).
    """
    frames = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = record_path(path)
    temps: list[Path] = []
    try:
        temps.append(tmp_video := temp_beside(path))
        _encode_mp4(frames, tmp_video, fps, crf)
        data = tmp_video.read_bytes()
        video = {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        temps.append(tmp_json := temp_beside(json_path))
        tmp_json.write_text(json.dumps({**record, "video": video}, indent=2, default=str))
        for tmp in temps:
            _fsync(tmp)
        replace_together([(tmp_json, json_path), (tmp_video, path)])
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return path, json_path


def video_matches_record(path: str | Path) -> bool:
    """True if OUTPUT.json's recorded sha256 is that of OUTPUT (a pair from one run)."""
    path = Path(path)
    try:
        recorded = json.loads(record_path(path).read_text())["video"]["sha256"]
        return hashlib.sha256(path.read_bytes()).hexdigest() == recorded
    except (OSError, ValueError, KeyError, TypeError):
        return False
