"""Sharded safetensors checkpoints, read and written one tensor at a time.

``peft-pat merge`` must prune a model larger than RAM, so nothing here holds more than one tensor:
:func:`read_tensor` reads a tensor's bytes straight from the file into a fresh tensor (no memory map,
so the process's resident memory does not grow with the shard), and :class:`SafetensorsWriter` writes
the header first (all output shapes are known in advance) and then each tensor as it is produced.

The file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes; offsets are relative
to the end of the header.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
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
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: its file, dtype, shape and byte range (absolute file offsets)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (header length {size}).")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not a safetensors file: its header is not JSON ({exc}).") from exc
    return header, 8 + size


def read_specs(path: str | Path) -> list[TensorSpec]:
    """The tensors of one safetensors file, in file order."""
    path = Path(path)
    header, data_start = _read_header(path)
    specs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which peft-pat cannot read.")
        begin, end = info["data_offsets"]
        specs.append(
            TensorSpec(name, path, _DTYPES[info["dtype"]], tuple(info["shape"]), data_start + begin, data_start + end)
        )
    return sorted(specs, key=lambda s: s.begin)


def _byte_view(tensor: torch.Tensor):
    """A writable/readable uint8 numpy view of a contiguous CPU tensor's memory (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def read_tensor(spec: TensorSpec, handle: BinaryIO | None = None, rows: slice | None = None) -> torch.Tensor:
    """Read one tensor (or the rows ``rows`` of its first dimension) into a new CPU tensor, with plain
    file reads."""
    if sys.byteorder != "little":
        raise CheckpointError("Reading safetensors (little-endian) on a big-endian machine is not supported.")
    full = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    if full.numel() * full.element_size() != spec.nbytes:
        raise CheckpointError(
            f"{spec.file}: tensor {spec.name!r} has {spec.nbytes} bytes, expected {full.numel() * full.element_size()}."
        )
    start, stop = (0, spec.shape[0] if spec.shape else 1) if rows is None else (rows.start, rows.stop)
    row_bytes = spec.nbytes // max(1, spec.shape[0]) if spec.shape else spec.nbytes
    shape = (stop - start, *spec.shape[1:]) if rows is not None else spec.shape
    tensor = torch.empty(shape, dtype=spec.dtype)
    expected = tensor.numel() * tensor.element_size()
    if expected == 0:
        return tensor
    own = handle is None
    f = open(spec.file, "rb") if own else handle
    try:
        f.seek(spec.begin + start * row_bytes)
        if f.readinto(memoryview(_byte_view(tensor))) != expected:
            raise CheckpointError(f"{spec.file} is truncated (tensor {spec.name!r}).")
    finally:
        if own:
            f.close()
    return tensor


class SafetensorsWriter:
    """Write a safetensors file whose tensor names, dtypes and shapes are known up front.

    ``with SafetensorsWriter(path, [(name, dtype, shape), ...]) as writer: writer.write(name, tensor)``
    in the declared order; a tensor may also be written in consecutive pieces along its first
    dimension (several ``write`` calls with the same name). Only the piece being written is in
    memory. Closing checks that every declared tensor was written completely.
    """

    def __init__(self, path: str | Path, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self._layout = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in layout]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._layout:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._next = 0
        self._rows_done = 0  # rows of the current tensor written so far
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self.total_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as (the next rows of) the declared tensor ``name``."""
        if self._next >= len(self._layout):
            raise CheckpointError(f"{self.path}: tensor {name!r} was not declared.")
        expected_name, dtype, shape = self._layout[self._next]
        whole = tuple(tensor.shape) == shape and self._rows_done == 0
        piece = (
            len(shape) > 0
            and tuple(tensor.shape[1:]) == shape[1:]
            and self._rows_done + (tensor.shape[0] if tensor.dim() else 0) <= shape[0]
        )
        if name != expected_name or tensor.dtype != dtype or not (whole or piece):
            raise CheckpointError(
                f"{self.path}: expected (rows {self._rows_done}.. of) tensor {expected_name!r} {dtype} {list(shape)}, "
                f"got {name!r} {tensor.dtype} {list(tensor.shape)}."
            )
        if tensor.numel():
            self._file.write(memoryview(_byte_view(tensor.detach().cpu().contiguous())))
        self._rows_done = shape[0] if whole and shape else self._rows_done + tensor.shape[0]
        if not shape or self._rows_done == shape[0]:
            self._next += 1
            self._rows_done = 0

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._layout):
            missing = [name for name, _, _ in self._layout[self._next :]]
            raise CheckpointError(f"{self.path}: {len(missing)} declared tensors were not written ({missing[:3]}).")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def read_json(path: Path, what: str) -> dict:
    """A JSON file as a dict, or a clear error naming the file (a truncated download, a hand edit)."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the {what} is damaged (a truncated copy or download?). "
            "Copy or save it again."
        ) from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not the object a {what} is.")
    return value


def checkpoint_shards(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a transformers checkpoint folder (one, or all listed in its index)."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; it is not a transformers sharded-checkpoint index.")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {missing[:3]}.")
        return [folder / n for n in names]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (
        f" It has {others[:3]}: load it with transformers and save it again with save_pretrained() (safetensors)."
        if others
        else ""
    )
    raise CheckpointError(f"{folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.{hint}")
