"""GGUF expert files (as ComfyUI-GGUF / city96 ship Wan experts): read lazily, dequantised at
load, and written by `vidmoe convert --layout gguf` (`write_gguf_expert`).

A `GGUFSource` is a `TensorSource` over a `.gguf` file: each tensor is dequantised to float32
with `gguf.quants.dequantize` when it is read (Q8_0, Q5_K, Q4_K and every other type the `gguf`
package knows), one at a time, so an expert is never held quantised and dequantised at once.
Tensors of more than four dimensions (the patch embedding) are stored flattened by the converters,
with the true shape in the metadata key `comfy.gguf.orig_shape.<name>`; it is restored here.
The writer follows the same converters: release names, architecture 'wan', 1-D, small and
modulation tensors in F32, the rest in the asked type, one tensor in memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from vidmoe.io.atomic import replace_atomic
from vidmoe.io.tensors import DictSource, TensorSource

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16}
GGUF_QUANTIZE = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""`--quantize` values of `--layout gguf` the installed gguf package can write (K-quants such as
q4_k are added by `gguf_quant_type` when the package can quantise them)."""
SMALL_TENSOR = 1024  # parity: ComfyUI-GGUF's convert.py keeps tensors this small in F32
HIGH_PRECISION = (".modulation",)  # parity: ComfyUI-GGUF keeps Wan's modulation tensors in F32


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


def gguf_quant_type(name: str | None):
    """The `GGMLQuantizationType` of a `--quantize` name for GGUF (None: each tensor's own float
    type), refused clearly where the installed gguf package cannot write it."""
    if name is None:
        return None
    gguf = _import_gguf()
    qtype = gguf.GGMLQuantizationType.__members__.get(name.upper())
    writable = [*GGUF_QUANTIZE]
    is_k_quant = name.lower().endswith("_k")  # written when the gguf package learns how
    if qtype is None or (name.lower() not in GGUF_QUANTIZE and not is_k_quant):
        raise ValueError(
            f"--quantize {name!r} is not a GGUF type --layout gguf writes; it writes: "
            f"{', '.join(writable)}"
        )
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), np.float32), qtype)
    except NotImplementedError:
        from importlib.metadata import version

        raise ValueError(
            f"--quantize {name}: the gguf package ({version('gguf')}) reads {qtype.name} files but "
            f"cannot write them; choose one of {', '.join(writable)}, or quantise a bf16 GGUF "
            "with llama.cpp's llama-quantize (vidmoe reads the result)"
        ) from None
    return qtype


def _tensor_type(name: str, shape: tuple[int, ...], dtype: torch.dtype, qtype):
    """The GGML type one tensor is stored in."""
    gguf = _import_gguf()
    T = gguf.GGMLQuantizationType
    own = {torch.bfloat16: T.BF16, torch.float16: T.F16}.get(dtype, T.F32)
    numel = int(np.prod(shape))
    if len(shape) < 2 or numel <= SMALL_TENSOR or any(h in name for h in HIGH_PRECISION):
        return T.F32
    if qtype is None:
        return own
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:  # a row the type's blocks do not tile: F16, as the converters do
        return T.F16
    return qtype


def _stored(values: torch.Tensor, qtype) -> np.ndarray:
    """A float tensor as the array GGUF stores for `qtype` (F32/F16 floats, others bytes)."""
    gguf = _import_gguf()
    data = values.detach().to(torch.float32).cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    return gguf.quants.quantize(data, qtype)


def write_gguf_expert(
    tensors: Mapping[str, torch.Tensor], path: str | Path, *, quantize: str | None = None
) -> Path:
    """Write one expert (release-named float tensors, read lazily) as a ComfyUI-GGUF `.gguf`.

    Args:
        tensors: the expert's tensors under release names (a `TensorSource` is read one tensor
            at a time; the file is planned from shapes and dtypes alone).
        path: the `.gguf` file, written atomically.
        quantize: a name of `GGUF_QUANTIZE` (see `gguf_quant_type`); None keeps each tensor's
            own float type (bf16 -> BF16, f16 -> F16, else F32): lossless.
    Returns:
        `path`.
    """
    gguf = _import_gguf()
    qtype = gguf_quant_type(quantize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", None) if qtype else None
    if ftype is not None:
        writer.add_file_type(ftype)
    source = tensors if isinstance(tensors, TensorSource) else DictSource(tensors)
    plan = []
    for name in source:
        shape = tuple(source.shape(name))
        if len(shape) > 4:  # parity: GGUF holds at most 4 dims; ComfyUI-GGUF keeps the shape
            writer.add_array(ORIG_SHAPE_KEY + name, list(shape))
            shape = (shape[0], int(np.prod(shape[1:])))
        kind = _tensor_type(name, shape, source.dtype(name), qtype)
        plan.append((name, shape, kind))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) // block * size
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, kind in plan:
            writer.write_tensor_data(_stored(source[name].reshape(shape), kind))
        writer.close()
        replace_atomic(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path
