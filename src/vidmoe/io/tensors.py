"""Tensor files, read lazily and written atomically.

A `TensorSource` is a read-only name -> tensor mapping that reads a tensor only when asked
(safetensors through `safe_open`'s memory map; `.pth` through `torch.load(mmap=True,
weights_only=True)`), so a checkpoint is never held twice in RAM. Writers are in
`vidmoe.io.atomic`.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only, lazy name -> tensor mapping; `shape`/`dtype` answer without reading data."""

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self[name].dtype

    def nbytes(self, name: str) -> int:
        return self.dtype(name).itemsize * int(torch.Size(self.shape(name)).numel())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (dim 0); file sources read only those (a sharded
        load reads each rank's rows)."""
        return self[name][start:stop]


class DictSource(TensorSource):
    """Tensors already in memory (a state dict), seen as a `TensorSource`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: readable JSON, and data that fits in the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file: only {size} bytes long")
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} "
                f"bytes but the file has {size}; re-download or re-save it"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header ({e})") from None
    data_end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + header_len + data_end > size:
        raise ValueError(
            f"{path} is truncated: its tensors need {8 + header_len + data_end} bytes but the file "
            f"has {size} (an interrupted download?); re-download or re-save it"
        )
    return header


class SafetensorsFile(TensorSource):
    """One `.safetensors` file, memory-mapped; tensors are read one at a time."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self._header = _read_safetensors_header(self.path)
        self.metadata: dict[str, str] = self._header.pop("__metadata__", None) or {}
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"cannot open {self.path} as safetensors: {e}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        if name not in self._header:
            raise KeyError(name)
        try:
            return self._file.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {self.path}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read with `readinto`, not through the memory map: the pages stay in the shared page
        cache and never count in this process's resident memory."""
        if name not in self._header:
            raise KeyError(name)
        shape, dtype = self.shape(name), self.dtype(name)
        if not shape:
            return self[name]
        stop = min(max(stop, start), shape[0])
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        if out.numel():
            row_bytes = out[0].numel() * dtype.itemsize
            with self.path.open("rb") as f:
                head = int.from_bytes(f.read(8), "little")
                f.seek(8 + head + self._header[name]["data_offsets"][0] + start * row_bytes)
                f.readinto(out.view(-1).view(torch.uint8).numpy())
        return out

    def dtype(self, name: str) -> torch.dtype:
        code = self._header[name]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return SAFETENSORS_DTYPES[code]


class ShardedSafetensors(TensorSource):
    """Safetensors shards named by a `*.safetensors.index.json` weight map."""

    def __init__(self, index_path: str | Path) -> None:
        self.path = Path(index_path)
        try:
            weight_map = json.loads(self.path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.path} is not a safetensors index (no weight_map): {e}"
            ) from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (self.path.parent / s).is_file()]
        if missing:
            raise ValueError(
                f"checkpoint index {self.path} names {len(missing)} shard file(s) missing from "
                f"{self.path.parent}: {missing[:10]}; download the missing shards"
            )
        self._shards = {s: SafetensorsFile(self.path.parent / s) for s in shard_names}
        self._where = {name: self._shards[shard] for name, shard in weight_map.items()}
        absent = [n for n, f in self._where.items() if n not in f._header]
        if absent:
            raise ValueError(f"{self.path} maps tensors its shards lack: {absent[:10]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name][name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].rows(name, start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].dtype(name)


class TorchFile(DictSource):
    """A `.pth` state dict, memory-mapped; only tensors are unpickled (`weights_only=True`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first_line = str(e).strip().splitlines()[-1]
            raise ValueError(
                f"{self.path} holds objects other than tensors, and vidmoe only unpickles "
                f"tensors (weights_only=True): {first_line}. Convert it to safetensors with code "
                "you trust"
            ) from None
        except RuntimeError as e:
            raise ValueError(
                f"cannot memory-map {self.path} as a torch zip checkpoint ({e}); re-save it with "
                "torch.save (the default zip format) or convert it to safetensors"
            ) from None
        if not isinstance(obj, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            raise ValueError(f"{self.path} is not a flat state dict of tensors")
        super().__init__(obj)


class RenamedSource(TensorSource):
    """A view of another source under new names (`rename(old) -> new`); nothing is read."""

    def __init__(self, source: TensorSource, rename: Callable[[str], str]) -> None:
        self.source = source
        self._old: dict[str, str] = {}
        for old in source:
            new = rename(old)
            if new in self._old:
                raise ValueError(f"tensors {self._old[new]!r} and {old!r} both map to {new!r}")
            self._old[new] = old

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source[self._old[name]]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.source.rows(self._old[name], start, stop)

    def __iter__(self) -> Iterator[str]:
        return iter(self._old)

    def __len__(self) -> int:
        return len(self._old)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self._old[name])

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self._old[name])


def open_tensors(path: str | Path) -> TensorSource:
    """Open a weights file lazily: `.safetensors`, `*.safetensors.index.json`, `.pth`, or a
    folder holding exactly one index or one `.safetensors` file."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            return ShardedSafetensors(indexes[0])
        if not indexes and len(singles) == 1:
            return SafetensorsFile(singles[0])
        found = [p.name for p in indexes + singles]
        raise ValueError(
            f"{path} needs exactly one *.safetensors.index.json or one *.safetensors file; "
            f"found {found or 'none'}"
        )
    if not path.exists():
        raise ValueError(f"weights file {path} does not exist")
    if path.name.endswith(".safetensors.index.json"):
        return ShardedSafetensors(path)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise ValueError(
        f"unknown weights file type {path.name!r}; accepted: .safetensors, "
        f".safetensors.index.json, {', '.join(TORCH_SUFFIXES)}"
    )


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor in fp8_scaled files
_SCALE, _INPUT_SCALE = ".scale_weight", ".scale_input"


class FP8Source(TensorSource):
    """A view of a source in the weight format a module stores, so fp8 files load strictly.

    Reads plain float files, plain `float8_e4m3fn` files (scale 1) and ComfyUI `fp8_scaled` files
    (a `scaled_fp8` marker, `X.scale_weight` beside each fp8 `X.weight`; `X.scale_input` is for
    fp8 activations and not needed by a weight-only load). For each weight the module stores in
    fp8 (`fp8_weights`, e.g. the layers `quantize_fp8_` converted) it gives the fp8 values and
    `X.scale_weight` per output channel, quantising float weights on the fly; every other weight
    is given dequantised (fp8 * scale, in float32), so a scale is never dropped. A scale without
    its weight, or a weight whose scale does not broadcast, is an error.
    """

    def __init__(self, source: TensorSource, fp8_weights: set[str] | frozenset[str] = frozenset()):
        self.source, self.fp8_weights = source, frozenset(fp8_weights)
        names = [n for n in source if n != SCALED_FP8_MARKER and not n.endswith(_INPUT_SCALE)]
        scales = {n[: -len(_SCALE)] + ".weight" for n in names if n.endswith(_SCALE)}
        orphans = sorted(w for w in scales if w not in source)
        if orphans:
            raise ValueError(f"scale_weight tensors without their weight: {orphans[:10]}")
        self._scaled = scales
        if SCALED_FP8_MARKER in source:  # a scaled file: every fp8 weight must carry its scale
            bare = sorted(
                n
                for n in names
                if n.endswith(".weight") and n not in scales and source.dtype(n) in FP8_DTYPES
            )
            if bare:
                raise ValueError(
                    f"this fp8_scaled file (it has the '{SCALED_FP8_MARKER}' marker) lacks the "
                    f"scale_weight of {len(bare)} fp8 weight(s), e.g. {bare[:5]}: the file is "
                    "damaged or was re-saved without its scales; re-download or re-convert it"
                )
        self.dropped = tuple(n for n in source if n not in names)
        self._names = [n for n in names if not n.endswith(_SCALE)]
        self._names += [w[: -len(".weight")] + _SCALE for w in self.fp8_weights if w in source]
        self._name_set = frozenset(self._names)
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def _scale_of(self, weight_name: str) -> torch.Tensor:
        """The file's scale of an fp8 weight as (O,) float32 (a scalar is broadcast; absent: 1)."""
        rows = self.source.shape(weight_name)[0]
        if weight_name not in self._scaled:
            return torch.ones(rows)
        scale = self.source[weight_name[: -len(".weight")] + _SCALE].float().flatten()  # (1|O,)
        if scale.numel() not in (1, rows):
            raise ValueError(
                f"{weight_name}: scale_weight has {scale.numel()} values; a per-tensor scale (1) "
                f"or one per output channel ({rows}) is accepted"
            )
        return scale.expand(rows).clone()

    def _stored(self, weight_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 values, (O,) scales) of a weight the module stores in fp8 (one cached at a time)."""
        if self._cache is None or self._cache[0] != weight_name:
            from vidmoe.models.fp8 import FP8_DTYPE, quantize_weight

            raw = self.source[weight_name]
            if raw.dtype == FP8_DTYPE:
                pair = (raw, self._scale_of(weight_name))
            else:
                pair = quantize_weight(self._float(weight_name, raw))
            self._cache = (weight_name, pair)
        return self._cache[1]

    def _float(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype in FP8_DTYPES:
            scale = self._scale_of(name).reshape(-1, *([1] * (raw.ndim - 1)))  # (O, 1, ...)
            return raw.float() * scale
        if name in self._scaled:
            raise ValueError(f"{name} has a scale_weight but is stored as {raw.dtype}, not fp8")
        return raw

    def __getitem__(self, name: str) -> torch.Tensor:
        if name.endswith(_SCALE):
            weight = name[: -len(_SCALE)] + ".weight"
            if weight not in self.fp8_weights:
                raise KeyError(name)
            return self._stored(weight)[1]
        if name in self.fp8_weights:
            return self._stored(name)[0]
        return self._float(name, self.source[name])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        plain = not name.endswith(_SCALE) and name not in self.fp8_weights
        if plain and name not in self._scaled and self.source.dtype(name) not in FP8_DTYPES:
            return self.source.rows(name, start, stop)  # a float tensor: read those rows only
        return self[name][start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        if name.endswith(_SCALE):
            return (self.source.shape(name[: -len(_SCALE)] + ".weight")[0],)
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name.endswith(_SCALE):
            return torch.float32
        if name in self.fp8_weights:
            return torch.float8_e4m3fn
        raw = self.source.dtype(name)
        return torch.float32 if raw in FP8_DTYPES else raw
