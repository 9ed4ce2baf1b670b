"""Reading HF checkpoint folders tensor by tensor (safetensors format, memory-mapped).

A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`.
Headers are parsed and checked up front (a truncated file fails before any weight is read);
each tensor is then a zero-copy memory map until it is converted. Our own reader because the
`safetensors` numpy backend cannot return float8 tensors; writing uses `safetensors` itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, mis-shaped or corrupt; the message names it."""


DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class SafetensorsFile:
    """One .safetensors file: its header, and tensors as memory maps."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, "
                                      f"file of {size} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                                      f"{info.get('dtype')!r}")
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
            if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its "
                                      f"shape {shape} and dtype {info['dtype']}")
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at "
                                      f"byte {self.data_start + end} but the file has {size}")
            self.tensors[name] = (dtype, shape, start, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy until it is used)."""
        dtype, shape, start, _ = self.tensors[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=shape)


class CheckpointReader:
    """All tensors of a HF checkpoint folder, by key."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder} has no *.safetensors files and no "
                                      "model.safetensors.index.json")
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {}
        for name in files:
            if not (folder / name).exists():
                raise CheckpointError(f"{folder}: shard {name} listed in the index is missing")
            self.files[name] = SafetensorsFile(folder / name)
        self.key_file: dict[str, SafetensorsFile] = {}
        for name, f in self.files.items():
            for key in f.tensors:
                self.key_file[key] = f
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.files[name].tensors:
                    raise CheckpointError(f"{folder}: index says tensor {key!r} is in {name}, "
                                          "but that file does not hold it")

    def keys(self) -> list[str]:
        return list(self.key_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def shape(self, key: str) -> tuple[int, ...]:
        return self.key_file[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.key_file[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        if key not in self.key_file:
            raise CheckpointError(f"checkpoint has no tensor {key!r}")
        return self.key_file[key].get(key)
