"""GGUF helpers for the golden script: copy metadata between files, write an F32 copy of a model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGMLQuantizationType

# Pseudo-fields the reader exposes that are not key/value pairs of the file.
_HEADER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def field_value(field) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """A reader field as (python value, type, array element type)."""
    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else None
        return list(field.contents()), vtype, sub
    return field.contents(), vtype, None


def copy_metadata(reader: GGUFReader, writer: GGUFWriter,
                  overrides: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
                  skip: Callable[[str], bool] = lambda k: False) -> None:
    """Copies every key/value of `reader` into `writer` in file order, replacing those in `overrides`
    (added at the end when absent) and dropping those for which `skip` is true."""
    overrides = dict(overrides or {})
    for name, field in reader.fields.items():
        if name in _HEADER_FIELDS or name == "general.architecture" or skip(name):
            continue
        val, vtype, sub = overrides.pop(name) if name in overrides else field_value(field)
        writer.add_key_value(name, val, vtype, sub_type=sub)
    for name, (val, vtype, sub) in overrides.items():
        writer.add_key_value(name, val, vtype, sub_type=sub)


def arch_of(reader: GGUFReader) -> str:
    return reader.fields["general.architecture"].contents()


def dequantized(t) -> np.ndarray:
    """A reader tensor as f32, shaped like ggml's ne reversed (row-major)."""
    shape = tuple(int(x) for x in reversed(t.shape))
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(t.data, qtype).astype(np.float32).reshape(shape)


def write_f32_copy(src: Path, dst: Path) -> None:
    """The exact tier's model: every tensor of `src` dequantized to F32, all metadata kept
    (general.file_type set to ALL_F32). Written to a temporary name (unique to this process, so two
    writers of the same copy never share one), then renamed."""
    reader = GGUFReader(src)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    writer = GGUFWriter(tmp, arch_of(reader))
    copy_metadata(reader, writer, overrides={"general.file_type": (0, GGUFValueType.UINT32, None)})
    for t in reader.tensors:
        writer.add_tensor(t.name, dequantized(t), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
