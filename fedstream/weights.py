"""The model wire format: safetensors bytes holding an ordered set of named float arrays.

Decoding never executes anything. Before safetensors parses a byte of it, the payload is checked
for the size limit and for the signatures of formats that can carry code (pickle, zip, ``.npy``).
After parsing, every tensor is checked against the expected :class:`ModelSpec` (names, shapes,
dtypes) and for NaN/Inf.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

Weights = dict[str, np.ndarray]

ALLOWED_DTYPES = frozenset({"float16", "float32", "float64"})
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_ORDER_KEY = "fedstream.tensor_order"
_HEADER_LIMIT = 100 * 1024 * 1024


class WireFormatError(ValueError):
    """A model payload was rejected; ``reason`` is a short machine-readable code for logs and metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ModelSpec:
    """The architecture a payload must match: tensor names in order, with shapes and dtypes."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> ModelSpec:
        return cls(tuple(TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in weights.items()))

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    def check(self, weights: Mapping[str, np.ndarray]) -> None:
        expected = {t.name: t for t in self.tensors}
        missing = [n for n in expected if n not in weights]
        extra = [n for n in weights if n not in expected]
        if missing or extra:
            raise WireFormatError(
                "tensor_names", f"tensor names differ from the model: missing {missing}, unexpected {extra}"
            )
        for name, array in weights.items():
            spec = expected[name]
            if tuple(array.shape) != spec.shape:
                raise WireFormatError(
                    "tensor_shape", f"tensor {name!r} has shape {tuple(array.shape)}, expected {spec.shape}"
                )
            if str(array.dtype) != spec.dtype:
                raise WireFormatError(
                    "tensor_dtype", f"tensor {name!r} has dtype {array.dtype}, expected {spec.dtype}"
                )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_arrays(weights: Mapping[str, np.ndarray]) -> None:
    for name, array in weights.items():
        if str(array.dtype) not in ALLOWED_DTYPES:
            raise WireFormatError(
                "tensor_dtype", f"tensor {name!r} has dtype {array.dtype}; allowed: {sorted(ALLOWED_DTYPES)}"
            )
        if not np.isfinite(array).all():
            raise WireFormatError("non_finite", f"tensor {name!r} contains NaN or Inf")


def encode(weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named float arrays (order kept) and string metadata to safetensors bytes."""
    arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}
    _check_arrays(arrays)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_ORDER_KEY] = json.dumps(list(arrays))
    return _st_save(arrays, metadata=meta)


def _signature(data: bytes) -> str | None:
    if data[:6] == b"\x93NUMPY":
        return "a .npy array"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive (.npz, .keras or similar)"
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return None


def _check_structure(data: bytes) -> None:
    """Reject anything that is not a well-formed safetensors envelope, naming what it looks like."""
    header_len = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else None
    well_formed = (
        header_len is not None
        and header_len <= _HEADER_LIMIT
        and 8 + header_len <= len(data)
        and data[8:9] == b"{"
    )
    if well_formed:
        return
    kind = _signature(data)
    if kind is not None:
        raise WireFormatError("not_safetensors", f"payload is {kind}; only safetensors is ever loaded")
    if header_len is not None and data[8:9] == b"{":
        raise WireFormatError(
            "truncated", f"safetensors header claims {header_len} bytes but the payload has {len(data)}"
        )
    raise WireFormatError("not_safetensors", f"payload of {len(data)} bytes is not safetensors")


def decode(
    data: bytes,
    spec: ModelSpec | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_sha256: str | None = None,
) -> tuple[Weights, dict[str, str]]:
    """Parse and validate a safetensors payload; returns (weights in their saved order, metadata)."""
    if len(data) > max_bytes:
        raise WireFormatError("too_large", f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise WireFormatError("sha256_mismatch", "payload sha256 does not match the record")
    _check_structure(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
        arrays = _st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireFormatError("malformed", f"payload is not valid safetensors: {exc}") from exc
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    order = _tensor_order(metadata, arrays)
    weights = {name: arrays[name] for name in order}
    _check_arrays(weights)
    if spec is not None:
        spec.check(weights)
    metadata.pop(_ORDER_KEY, None)
    return weights, metadata


def _tensor_order(metadata: dict[str, str], arrays: Mapping[str, np.ndarray]) -> list[str]:
    try:
        order = json.loads(metadata.get(_ORDER_KEY, "null"))
    except ValueError:
        order = None
    if not isinstance(order, list) or sorted(order) != sorted(arrays):
        return sorted(arrays)
    return [str(n) for n in order]


def save_file(
    path: str | Path, weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a model file; returns its sha256."""
    data = encode(weights, metadata)
    Path(path).write_bytes(data)
    return sha256_hex(data)


def load_file(
    path: str | Path, spec: ModelSpec | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[Weights, dict[str, str]]:
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise WireFormatError("too_large", f"{path} has {size} bytes, over the limit of {max_bytes}")
    return decode(path.read_bytes(), spec, max_bytes=max_bytes)
