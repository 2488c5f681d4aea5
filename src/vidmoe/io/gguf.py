"""GGUF expert files (as ComfyUI-GGUF / city96 ship Wan experts): read lazily, dequantised at load.

A `GGUFSource` is a `TensorSource` over a `.gguf` file: each tensor is dequantised to float32
with `gguf.quants.dequantize` when it is read (Q8_0, Q5_K, Q4_K and every other type the `gguf`
package knows), one at a time, so an expert is never held quantised and dequantised at once.
Tensors of more than four dimensions (the patch embedding) are stored flattened by the converters,
with the true shape in the metadata key `comfy.gguf.orig_shape.<name>`; it is restored here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from vidmoe.io.tensors import TensorSource

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16}


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading .gguf experts needs the package 'gguf': pip install 'vidmoe[gguf]'"
        ) from e
    return gguf


class GGUFSource(TensorSource):
    """The tensors of one `.gguf` file (names as stored), dequantised to float32 when read."""

    def __init__(self, path: str | Path) -> None:
        gguf = _import_gguf()
        self.path = Path(path)
        try:
            reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError) as e:
            raise ValueError(f"cannot read {self.path} as GGUF ({e}); re-download it") from None
        self._quants = gguf.quants
        self._tensors = {t.name: t for t in reader.tensors}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, t in self._tensors.items():
            field = reader.fields.get(ORIG_SHAPE_KEY + name)
            stored = tuple(
                int(n) for n in reversed(t.shape.tolist())
            )  # GGUF lists ne, fastest first
            self._shapes[name] = tuple(int(n) for n in field.contents()) if field else stored
        self.types = {name: t.tensor_type.name for name, t in self._tensors.items()}
        """Tensor name -> GGML type name ('Q8_0', 'Q4_K', 'F32', ...)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        kind = t.tensor_type.name
        if kind in _FLOAT_TYPES:
            values = torch.from_numpy(t.data.copy())
        else:
            try:
                values = torch.from_numpy(self._quants.dequantize(t.data, t.tensor_type))
            except NotImplementedError as e:
                raise ValueError(
                    f"{self.path}: tensor {name!r} is {kind}, which the installed gguf package "
                    f"cannot dequantise ({e}); upgrade gguf"
                ) from None
        shape = self._shapes[name]
        if values.numel() != torch.Size(shape).numel():
            raise ValueError(
                f"{self.path}: tensor {name!r} holds {values.numel()} values but its shape is "
                f"{list(shape)}; the file is damaged"
            )
        return values.reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return _FLOAT_TYPES.get(self.types[name], torch.float32)
