"""The model wire format: safetensors bytes holding an ordered set of named float arrays.

Decoding never executes anything. Before safetensors parses a byte of it, the payload is checked
for the size limit and for the signatures of formats that can carry code (pickle, zip, ``.npy``),
and its JSON header against a budget (``header_budget``: bytes, and the objects, arrays and commas
that bound how many values parsing can create), so that decoding costs about the payload plus the
model, never a multiple of a crafted header. After parsing, every tensor is checked against the
expected :class:`ModelSpec` (names, shapes, dtypes) and for NaN/Inf.

A plain payload (float16/32/64 tensors laid out back to back, as ``encode`` writes them) decodes
without a copy: its arrays are read-only numpy views into the payload's bytes, taken only after
every check safetensors makes has held (see ``_views``). Anything else is parsed by safetensors
itself, which names what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedstream.errors import Refused

Weights = dict[str, np.ndarray]

ALLOWED_DTYPES = frozenset({"float16", "float32", "float64"})
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_ORDER_KEY = "fedstream.tensor_order"
_VIEW_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_U64_LIMIT = 2**64


# --- header budget ---------------------------------------------------------------------------------
# Parsing JSON costs far more memory than its text: CPython spends 50-100 bytes on each value of a
# few bytes (a 10 MB header of short keys or empty arrays took 0.5-1.1 GB to decode), and
# safetensors' own parser as much again. So a header is bounded before anything parses it: in
# bytes, and in the objects/arrays (``{`` and ``[`` bytes) and commas it holds, which bound how many
# values parsing can create (every value after the first of an object or array follows a comma,
# and nesting deeper than the parsers' recursion limits fails cheaply). The counts include bytes
# inside strings, so they over-count, never under-count.
#
# With a spec the budget is what ``encode`` writes for that model, with room to spare:
# - per tensor, its entry ``"name":{"dtype":"F32","shape":[...],"data_offsets":[b,e]}`` and its
#   name again in the tensor-order metadata (JSON inside a JSON string): at most 95 bytes of
#   syntax plus 40 digits of offsets, so ``_TENSOR_ENTRY_BYTES``, plus ``_BYTES_PER_UNIT`` for each
#   character of its name (6 bytes escaped in the entry, 14 in the order list for a non-BMP one)
#   and each dimension (up to 20 digits and a comma); rank + 5 commas and 3 brackets, and twice
#   any in its name;
# - metadata: ``_METADATA_BYTES`` (1 MiB) with ``_METADATA_ITEMS`` commas and ``_METADATA_CONTAINERS``
#   brackets. A client's update carries ~200 bytes of it; a global model the server writes carries
#   its lineage (async "applied": ~80 bytes per "client#version" ref, as many refs as one version
#   took: the buffer plus one batch, tens) or its round's accepted client ids (sync "clients", up
#   to ~68 bytes each) and a metrics object: 1 MiB / 16,384 items is 12,000+ refs of 64-character
#   client ids, or 16,384 shorter ones, far beyond any version or round so far. Clients decode
#   global models against their spec, so this allowance must hold the largest server metadata.
# Decoding then costs at most a few MB beyond the payload and the model, whatever the header holds.
# Without a spec (the server's own objects, an operator's initial model) the bytes are bounded by
# ``_HEADER_LIMIT``: 16 MiB holds ~60,000 tensors with 80-character names beside the 1 MiB of
# metadata, more than any model under the 512 MiB payload limit has; safetensors' own limit is
# 100 MB. Objects and arrays are then bounded by density: an entry holds 3 in 50+ bytes, so more
# than one per ``_MIN_BYTES_PER_CONTAINER`` bytes is not a model's header (names full of brackets,
# like ``['params']['w']`` key paths, stay under it).
_HEADER_LIMIT = 16 * 1024 * 1024
_METADATA_BYTES = 1024 * 1024
_METADATA_ITEMS = 16_384
_METADATA_CONTAINERS = 1024
_TENSOR_ENTRY_BYTES = 256
_BYTES_PER_UNIT = 24
_COMMAS_PER_TENSOR = 5
_CONTAINERS_PER_TENSOR = 3
_MIN_BYTES_PER_CONTAINER = 8


@dataclass(frozen=True)
class HeaderBudget:
    """The most a safetensors header may hold: bytes, commas (None: unbounded) and ``{``/``[``."""

    max_bytes: int
    max_commas: int | None
    max_containers: int | None  # None: one per _MIN_BYTES_PER_CONTAINER bytes of the header


def header_budget(spec: ModelSpec | None) -> HeaderBudget:
    """The header budget for payloads of ``spec``'s model (see the comment above), or without one."""
    if spec is None:
        return HeaderBudget(_HEADER_LIMIT, None, None)
    return spec.header_budget


class WireFormatError(Refused):
    """A model payload that fails the wire format's checks; ``reason`` is a short machine-readable
    code for logs and metrics. Constructed as ``WireFormatError(reason, message)``."""


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

    @cached_property
    def header_budget(self) -> HeaderBudget:
        bytes_ = commas = containers = 0
        for tensor in self.tensors:
            bytes_ += _TENSOR_ENTRY_BYTES + _BYTES_PER_UNIT * (len(tensor.name) + len(tensor.shape))
            commas += _COMMAS_PER_TENSOR + len(tensor.shape) + 2 * tensor.name.count(",")
            containers += _CONTAINERS_PER_TENSOR + 2 * (tensor.name.count("[") + tensor.name.count("{"))
        return HeaderBudget(
            bytes_ + _METADATA_BYTES, commas + _METADATA_ITEMS, containers + _METADATA_CONTAINERS
        )

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


def _check_arrays(weights: Mapping[str, np.ndarray], *, check_finite: bool = True) -> None:
    for name, array in weights.items():
        if str(array.dtype) not in ALLOWED_DTYPES:
            raise WireFormatError(
                "tensor_dtype", f"tensor {name!r} has dtype {array.dtype}; allowed: {sorted(ALLOWED_DTYPES)}"
            )
        if check_finite and not _all_finite(array):
            raise WireFormatError("non_finite", f"tensor {name!r} contains NaN or Inf")


def all_finite(weights: Mapping[str, np.ndarray]) -> bool:
    """True when no tensor holds a NaN or an Inf."""
    return all(_all_finite(array) for array in weights.values())


def _all_finite(array: np.ndarray) -> bool:
    """True when no value is NaN or Inf, with no full-size temporary in the common case.

    A NaN or an Inf anywhere makes the sum of squares (one BLAS dot product, the fastest full
    pass numpy has) NaN or Inf, so a finite result proves every value finite; only a non-finite
    one (a NaN/Inf, or values above ~1e19 whose squares overflow) needs the element-wise check.
    """
    if array.dtype in (np.float32, np.float64) and array.flags.c_contiguous:
        flat = array.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(array).all())


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
    well_formed = header_len is not None and 8 + header_len <= len(data) and data[8:9] == b"{"
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


def _check_header_budget(data: bytes, header_len: int, spec: ModelSpec | None) -> None:
    """Refuse a header over its budget (``header_budget``) before anything parses it: three byte counts."""
    budget = header_budget(spec)
    model = " for this model" if spec is not None else ""
    if header_len > budget.max_bytes:
        raise WireFormatError(
            "header_too_large",
            f"safetensors header of {header_len} bytes exceeds the limit of {budget.max_bytes}{model}",
        )
    end = 8 + header_len
    containers = data.count(b"{", 8, end) + data.count(b"[", 8, end)
    max_containers = budget.max_containers
    if max_containers is None:
        max_containers = _METADATA_CONTAINERS + header_len // _MIN_BYTES_PER_CONTAINER
    if containers > max_containers:
        raise WireFormatError(
            "malformed",
            f"payload is not valid safetensors: its header holds {containers} objects and arrays "
            f"('{{' and '[' bytes), over the limit of {max_containers}{model}",
        )
    if budget.max_commas is not None and (commas := data.count(b",", 8, end)) > budget.max_commas:
        raise WireFormatError(
            "malformed",
            f"payload is not valid safetensors: its header holds {commas} commas (values), over the "
            f"limit of {budget.max_commas}{model}",
        )


def decode(
    data: bytes,
    spec: ModelSpec | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_sha256: str | None = None,
    check_finite: bool = True,
) -> tuple[Weights, dict[str, str]]:
    """Parse and validate a safetensors payload; returns (weights in their saved order, metadata).

    Treat the arrays as read-only: a plain payload's are read-only views into ``data`` (``_views``).
    ``check_finite=False`` skips only the NaN/Inf scan, for bytes this process cannot have seen
    change since a full decode passed (a round close reads exactly the S3 object version its
    registration validated); every other check still runs.

    Memory: the payload, the header within its budget parsed once (and by safetensors, after
    Python's parse is freed, only when the payload is not plain), and a copy of the tensors only
    when they are not plain.
    """
    if len(data) > max_bytes:
        raise WireFormatError("too_large", f"payload of {len(data)} bytes exceeds the limit of {max_bytes}")
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise WireFormatError("sha256_mismatch", "payload sha256 does not match the record")
    _check_structure(data)
    (header_len,) = struct.unpack("<Q", data[:8])
    _check_header_budget(data, header_len, spec)
    try:
        header = _parse_header(data, header_len)
        raw_metadata = header.get("__metadata__") if isinstance(header, dict) else None
        arrays = None if header is None else _views(data, header_len, header)
        if arrays is None:
            # Not plain: safetensors parses the header again and copies the tensors. Python's
            # parse is let go first; only the metadata is kept (a header Python refused to parse
            # strictly, with a duplicate key or a NaN, is read leniently once safetensors accepts it).
            strict, header = header is not None, None
            arrays = _st_load(data)
            if not strict:
                raw_metadata = json.loads(_header_text(data, header_len)).get("__metadata__")
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WireFormatError("malformed", f"payload is not valid safetensors: {exc}") from exc
    except KeyError as exc:  # safetensors.numpy has no numpy type for this dtype (e.g. BF16)
        raise WireFormatError(
            "tensor_dtype", f"a tensor has dtype {exc}, which numpy cannot hold; allowed: F16, F32, F64"
        ) from None
    metadata = {str(k): str(v) for k, v in (raw_metadata or {}).items()}
    order = _tensor_order(metadata, arrays)
    weights = {name: arrays[name] for name in order}
    _check_arrays(weights, check_finite=check_finite)
    if spec is not None:
        spec.check(weights)
    metadata.pop(_ORDER_KEY, None)
    return weights, metadata


def _parse_header(data: bytes, header_len: int) -> object | None:
    """The header as JSON, parsed once and strictly; None when it has a duplicate key or a NaN literal.

    Raises ValueError (not JSON, or not UTF-8, which safetensors refuses too) or RecursionError.
    """
    try:
        return json.loads(
            _header_text(data, header_len), object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
    except _NotPlain:
        return None


def _header_text(data: bytes, header_len: int) -> str:
    return str(memoryview(data)[8 : 8 + header_len], "utf-8")  # no copy of the bytes first


def _views(data: bytes, header_len: int, header: object) -> dict[str, np.ndarray] | None:
    """Zero-copy arrays for a plain payload, or None to leave the payload to safetensors.

    ``header`` is the payload's header as ``_parse_header`` read it: a UTF-8 JSON object with no
    duplicate key and no NaN/Infinity literal. The views are taken only when everything safetensors
    checks holds, and a little more: string metadata; every tensor exactly ``dtype`` (F16, F32 or
    F64), ``shape`` and ``data_offsets`` of unsigned 64-bit integers; the tensors back to back from
    offset 0 to the end of the payload, each holding exactly prod(shape) x itemsize bytes, aligned to
    its itemsize. The arrays are read-only views into ``data`` (which they keep alive).
    """
    if not isinstance(header, dict) or not header.keys() - {"__metadata__"}:
        return None
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(_utf8(k) and _utf8(v) for k, v in metadata.items()):
        return None
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _utf8(name) or not isinstance(info, dict) or info.keys() != {"dtype", "shape", "data_offsets"}:
            return None
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        dtype = _VIEW_DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None or not _u64_list(shape) or not _u64_list(offsets) or len(offsets) != 2:
            return None
        tensors.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    body = 8 + header_len
    position = 0
    for begin, end, _, dtype, shape in sorted(tensors):
        misaligned = (body + begin) % dtype.itemsize
        if begin != position or end - begin != math.prod(shape) * dtype.itemsize or misaligned:
            return None
        position = end
    if body + position != len(data):
        return None
    return {
        name: np.frombuffer(data, dtype, count=math.prod(shape), offset=body + begin).reshape(shape)
        for begin, _, name, dtype, shape in tensors
    }


class _NotPlain(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _NotPlain("duplicate key")
    return result


def _no_constant(name: str) -> object:
    raise _NotPlain(f"{name} is not JSON")


def _utf8(value: object) -> bool:
    """A string Rust can hold too (no lone surrogate from a ``\\ud800`` escape)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _u64_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and 0 <= v < _U64_LIMIT for v in value)


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
