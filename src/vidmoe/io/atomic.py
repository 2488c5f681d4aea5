"""Files written atomically: a reader sees the old file or the whole new one, never a part.

A file writer goes through `atomic_write`: the content goes to a new temporary file beside the
target (same folder, so the rename cannot cross filesystems; named `.NAME.HEX.tmp.SUFFIX`, so
an encoder that reads the suffix sees the right one), which is fsynced and renamed over the
target (`os.replace`), and the folder is fsynced so the rename survives a crash. The file gets
the mode any new file gets here (0o666 less the umask). (A folder, `io.writers.copy_tree_atomic`,
and a GGUF file, which its writer fills in several passes, are renamed into place the same way by
their own code.)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def temp_beside(path: Path) -> Path:
    """Create an empty, new file beside `path` with the user's normal permissions (umask)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def replace_atomic(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, and fsync the folder so the rename survives a crash."""
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync, then rename onto `path`; the temp file goes on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        write(tmp)
        replace_atomic(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a small text file (JSON configs, indexes) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (`atomic_write`), with the mode of any new file.

    Tensors that share storage or are views are copied first.
    """
    from safetensors.torch import save_file

    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata values must be str; got {bad}")
    plain = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        plain[name] = t

    def write(tmp: Path) -> None:
        save_file(plain, str(tmp), metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, new_file_mode())  # safetensors writes 0600: readable by its owner only

    return atomic_write(path, write)


def new_file_mode() -> int:
    """The mode `open()` gives a new file here: 0o666 less the process umask (read from
    /proc/self/status where there is one, so no other thread sees a changed umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
