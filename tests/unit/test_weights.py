"""The wire format: what round-trips, and every kind of payload a decoder must refuse."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save as raw_safetensors

from fedstream.weights import (
    ModelSpec,
    WireFormatError,
    decode,
    encode,
    header_budget,
    load_file,
    save_file,
    sha256_hex,
)


@pytest.fixture
def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Deliberately not in alphabetical order, and one tensor of each allowed float dtype.
    return {
        "dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias": rng.normal(size=(3,)).astype(np.float16),
        "a_scale": rng.normal(size=(2, 2)).astype(np.float64),
    }


def reject(data: bytes, spec: ModelSpec | None = None, **kwargs) -> WireFormatError:
    with pytest.raises(WireFormatError) as info:
        decode(data, spec, **kwargs)
    return info.value


# --- round trip ----------------------------------------------------------------------------------


def test_round_trip_keeps_order_values_dtypes_and_metadata(model):
    data = encode(model, {"version": "7", "creator": "test"})

    weights, metadata = decode(data, ModelSpec.of(model))

    assert list(weights) == ["dense/kernel", "dense/bias", "a_scale"]
    for name, array in model.items():
        assert weights[name].dtype == array.dtype
        np.testing.assert_array_equal(weights[name], array)
    assert metadata == {"version": "7", "creator": "test"}


def test_file_round_trip_returns_the_payload_sha256(tmp_path, model):
    path = tmp_path / "m.safetensors"

    digest = save_file(path, model, {"k": "v"})

    assert digest == sha256_hex(path.read_bytes())
    weights, metadata = load_file(path, ModelSpec.of(model))
    assert list(weights) == list(model)
    assert metadata == {"k": "v"}


def test_matching_sha256_is_accepted(model):
    data = encode(model)
    weights, _ = decode(data, expected_sha256=sha256_hex(data))
    assert set(weights) == set(model)


# --- payloads that are not safetensors -----------------------------------------------------------


def test_truncated_payload_is_rejected(model):
    data = encode(model)
    assert reject(data[: len(data) // 2]).reason == "truncated"


def test_payload_over_the_size_limit_is_rejected(model):
    data = encode(model)
    error = reject(data, max_bytes=len(data) - 1)
    assert error.reason == "too_large"
    assert str(len(data)) in str(error)


def test_file_over_the_size_limit_is_rejected_before_reading(tmp_path, model):
    path = tmp_path / "big.safetensors"
    save_file(path, model)
    with pytest.raises(WireFormatError) as info:
        load_file(path, max_bytes=10)
    assert info.value.reason == "too_large"


def test_pickle_is_rejected_without_being_loaded():
    # GIVEN a pickle whose loading would run code
    payload = pickle.dumps({"dense/kernel": np.zeros(3, np.float32)}, protocol=4)
    error = reject(payload)
    assert error.reason == "not_safetensors"
    assert "pickle" in str(error)


def test_npy_with_an_object_array_is_rejected():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    error = reject(buffer.getvalue())
    assert error.reason == "not_safetensors"
    assert ".npy" in str(error)


def test_zip_archive_is_rejected():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.weights.h5", b"\x00" * 64)
    error = reject(buffer.getvalue())
    assert error.reason == "not_safetensors"
    assert "zip" in str(error)


def test_random_bytes_are_rejected():
    assert reject(b"definitely not a model").reason == "not_safetensors"


def test_header_that_is_not_json_is_malformed(model):
    data = bytearray(encode(model))
    data[9] = ord("!")  # the header starts with '{' and the next byte breaks the JSON
    assert reject(bytes(data)).reason == "malformed"


def test_sha256_mismatch_is_rejected(model):
    data = encode(model)
    assert reject(data, expected_sha256="0" * 64).reason == "sha256_mismatch"


# --- the header budget ---------------------------------------------------------------------------


@pytest.fixture
def unparsed(monkeypatch):
    """Fails the test if anything parses a header (Python's JSON parser or safetensors')."""

    def parse(*_args, **_kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr("fedstream.weights._parse_header", parse)
    monkeypatch.setattr("fedstream.weights._st_load", parse)


def test_the_header_budget_of_a_model_is_its_entries_plus_1_mib_of_metadata(model):
    budget = header_budget(ModelSpec.of(model))
    # 3 tensors: 256 bytes each, plus 24 per character of their names and per dimension
    names, dimensions = len("dense/kernel") + len("dense/bias") + len("a_scale"), 2 + 1 + 2
    assert budget.max_bytes == (1 << 20) + 3 * 256 + 24 * (names + dimensions)
    assert budget.max_bytes - (1 << 20) > 2 * len(encode(model))  # what encode writes, twice over
    assert header_budget(None).max_bytes == 16 << 20


def test_a_header_over_the_budget_of_the_model_is_refused_before_it_is_parsed(model, unparsed):
    spec = ModelSpec.of(model)
    limit = header_budget(spec).max_bytes
    data = encode(model, {"padding": "x" * limit})

    error = reject(data, spec)

    assert error.reason == "header_too_large"
    assert f"exceeds the limit of {limit} for this model" in str(error)


def test_without_a_spec_a_header_may_hold_up_to_16_mib(model, monkeypatch):
    # GIVEN 2 MiB of metadata: too much for this model's updates, fine for a file without a spec
    data = encode(model, {"padding": "x" * (2 << 20)})
    assert reject(data, ModelSpec.of(model)).reason == "header_too_large"
    assert decode(data)[1]["padding"] == "x" * (2 << 20)

    # WHEN the header is over 16 MiB THEN it is refused before it is parsed
    big = encode(model, {"padding": "x" * (16 << 20)})
    monkeypatch.setattr("fedstream.weights._parse_header", pytest.fail)
    error = reject(big)
    assert error.reason == "header_too_large"
    assert f"exceeds the limit of {16 << 20}" in str(error)


def test_a_header_with_more_values_than_the_model_needs_is_refused_before_it_is_parsed(model, unparsed):
    # 20,000 short metadata entries: 200 KB, within the bytes, but 20,000 values to create
    keys = encode(model, {f"k{i}": "" for i in range(20_000)})
    error = reject(keys, ModelSpec.of(model))
    assert error.reason == "malformed"
    assert "commas (values), over the limit of" in str(error)

    # 5,000 empty arrays riding in a tensor entry (safetensors itself would ignore the field)
    junk = _payload(_h(_t("a", "[4]", "[0,16]", extra=',"x":[' + ",".join(["[]"] * 5_000) + "]")), _F32)
    spec = ModelSpec.of({"a": np.zeros(4, np.float32)})
    error = reject(junk, spec)
    assert error.reason == "malformed"
    assert "objects and arrays" in str(error)


def test_without_a_spec_more_than_one_object_or_array_per_8_header_bytes_is_refused(unparsed):
    junk = _payload(_h(_t("a", "[4]", "[0,16]", extra=',"x":[' + ",".join(["{}"] * 5_000) + "]")), _F32)
    error = reject(junk)
    assert error.reason == "malformed"
    assert "objects and arrays ('{' and '[' bytes), over the limit of" in str(error)


@pytest.mark.parametrize(
    ("key", "values"),
    [
        # async: the lineage of a version, "client#version" refs with 64-character client ids
        ("applied", [f"{'c' * 58}-{i:05d}#{1_000_000 + i}" for i in range(10_000)]),
        ("applied", [f"c{i}#{i}" for i in range(16_000)]),
        # sync: the clients a round accepted
        ("clients", [f"{'s' * 58}-{i:05d}" for i in range(10_000)]),
    ],
    ids=["10k-long-refs", "16k-short-refs", "10k-clients"],
)
def test_a_global_model_with_server_metadata_for_a_big_run_still_decodes(key, values):
    # GIVEN a global model as the server writes it (sync.py / asynchronous.py), for a run far bigger
    # than any so far: clients decode it against their spec
    model = {"dense/kernel": np.ones((4, 3), np.float32), "dense/bias": np.ones(3, np.float32)}
    metadata = {
        "run_id": "r" * 64,
        "version": "1000001",
        "parent_version": "1000000",
        "round": "1000001",
        "aggregator": "fedbuff",
        "creator": "fedstream.async_update",
        "created_at": "2030-01-01T00:00:00.000000+00:00",
        key: json.dumps(values),
        "metrics": json.dumps({f"metric_{i}": i / 7 for i in range(100)}),
    }
    data = encode(model, metadata)

    for spec in (ModelSpec.of(model), None):
        weights, decoded = decode(data, spec)
        assert json.loads(decoded[key]) == values
        assert list(weights) == list(model)
        payload = np.frombuffer(data, np.uint8)
        assert all(np.shares_memory(array, payload) for array in weights.values())  # still zero-copy


def test_models_with_long_or_bracketed_tensor_names_are_within_their_budget():
    # jax key paths, a deep module path, a non-BMP name, a rank-8 tensor
    model = {
        "['params']['Dense_0']['kernel']": np.ones((3, 2), np.float32),
        "encoder." * 40 + "weight": np.ones(2, np.float32),
        "\U0001f600" * 20: np.ones(1, np.float32),
        "w": np.ones((1,) * 8, np.float32),
        "": np.ones(1, np.float32),
    }
    data = encode(model, {"applied": json.dumps([f"c{i}#{i}" for i in range(100)])})

    for spec in (ModelSpec.of(model), None):
        weights, _ = decode(data, spec)
        assert list(weights) == list(model)


# --- tensors that do not match the model ---------------------------------------------------------


def test_missing_tensor_is_rejected(model):
    spec = ModelSpec.of(model)
    del model["a_scale"]
    error = reject(encode(model), spec)
    assert error.reason == "tensor_names"
    assert "a_scale" in str(error)


def test_extra_tensor_is_rejected(model):
    spec = ModelSpec.of(model)
    model["smuggled"] = np.zeros(1, np.float32)
    error = reject(encode(model), spec)
    assert error.reason == "tensor_names"
    assert "smuggled" in str(error)


def test_renamed_tensor_is_rejected(model):
    spec = ModelSpec.of(model)
    model["dense/weights"] = model.pop("dense/kernel")
    assert reject(encode(model), spec).reason == "tensor_names"


def test_reshaped_tensor_is_rejected(model):
    spec = ModelSpec.of(model)
    model["dense/kernel"] = model["dense/kernel"].reshape(3, 4)
    error = reject(encode(model), spec)
    assert error.reason == "tensor_shape"
    assert "dense/kernel" in str(error)


def test_float_dtype_different_from_the_model_is_rejected(model):
    spec = ModelSpec.of(model)
    model["dense/kernel"] = model["dense/kernel"].astype(np.float64)
    assert reject(encode(model), spec).reason == "tensor_dtype"


def test_integer_tensor_is_rejected_even_without_a_spec():
    data = raw_safetensors({"step": np.arange(3, dtype=np.int64)})
    error = reject(data)
    assert error.reason == "tensor_dtype"
    assert "int64" in str(error)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    array = np.ones(4, np.float32)
    array[2] = bad
    assert reject(raw_safetensors({"w": array})).reason == "non_finite"


def test_encode_refuses_non_finite_and_integer_tensors():
    with pytest.raises(WireFormatError) as info:
        encode({"w": np.array([1.0, np.nan], np.float32)})
    assert info.value.reason == "non_finite"
    with pytest.raises(WireFormatError) as info:
        encode({"w": np.array([1, 2], np.int32)})
    assert info.value.reason == "tensor_dtype"


# --- zero-copy decoding ----------------------------------------------------------------------------


def test_plain_payload_decodes_to_read_only_views_of_its_bytes(model):
    data = encode(model)

    weights, _ = decode(data, ModelSpec.of(model))

    payload = np.frombuffer(data, np.uint8)
    for name, array in weights.items():
        assert np.shares_memory(array, payload), name
        assert not array.flags.writeable
        np.testing.assert_array_equal(array, model[name])


def test_finite_values_whose_sum_overflows_are_accepted():
    # The fast finiteness check sums the tensor; an overflowing sum falls back to the exact check.
    weights = {"w": np.full(4, 3e38, np.float32), "h": np.full(4, 60000.0, np.float16)}
    decoded, _ = decode(encode(weights))
    np.testing.assert_array_equal(decoded["w"], weights["w"])
    np.testing.assert_array_equal(decoded["h"], weights["h"])


def _payload(header: str, body: bytes, pad_to: int = 8) -> bytes:
    raw = header.encode()
    raw += b" " * (-(8 + len(raw)) % pad_to)
    return struct.pack("<Q", len(raw)) + raw + body


_F32 = np.arange(1, 5, dtype=np.float32).tobytes()  # 16 bytes: 1, 2, 3, 4


def _t(name: str, shape: str, offsets: str, dtype: str = "F32", extra: str = "") -> str:
    """One tensor entry of a header, as raw JSON text (so duplicates and NaN can be written)."""
    return f'"{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}{extra}}}'


def _h(*entries: str) -> str:
    return "{" + ",".join(entries) + "}"


_HEADERS = {
    "plain": _h(_t("a", "[2]", "[0,8]"), _t("b", "[2]", "[8,16]")),
    "listed out of order": _h(_t("b", "[2]", "[8,16]"), _t("a", "[2]", "[0,8]")),
    "empty tensor": _h(_t("a", "[4,0]", "[0,0]"), _t("b", "[4]", "[0,16]")),
    "metadata": _h('"__metadata__":{"k":"v"}', _t("a", "[2]", "[0,16]", "F64")),
    "gap": _h(_t("a", "[1]", "[0,4]"), _t("b", "[2]", "[8,16]")),
    "not from zero": _h(_t("a", "[3]", "[4,16]")),
    "short of the end": _h(_t("a", "[3]", "[0,12]")),
    "overlap": _h(_t("a", "[4]", "[0,16]"), _t("b", "[1]", "[0,4]")),
    "size differs from shape": _h(_t("a", "[3]", "[0,16]")),
    "duplicate name": _h(_t("a", "[4]", "[0,16]"), _t("a", "[2]", "[0,8]")),
    "extra field": _h(_t("a", "[4]", "[0,16]", extra=',"x":1')),
    "bf16": _h(_t("a", "[8]", "[0,16]", "BF16")),
    "int32": _h(_t("a", "[4]", "[0,16]", "I32")),
    "unknown dtype": _h(_t("a", "[4]", "[0,16]", "F33")),
    "dtype not a string": '{"a":{"dtype":["F32"],"shape":[4],"data_offsets":[0,16]}}',
    "empty tensor at the end": _h(_t("a", "[4]", "[0,16]"), _t("b", "[0]", "[16,16]")),
    "float shape": _h(_t("a", "[4.0]", "[0,16]")),
    "bool shape": _h(_t("a", "[true]", "[0,4]"), _t("b", "[3]", "[4,16]")),
    "negative shape": _h(_t("a", "[-4]", "[0,16]")),
    "three offsets": _h(_t("a", "[4]", "[0,16,16]")),
    "huge shape": _h(_t("a", "[18446744073709551616]", "[0,16]")),
    "NaN literal": _h('"__metadata__":{"k":NaN}', _t("a", "[4]", "[0,16]")),
    "number metadata": _h('"__metadata__":{"k":1}', _t("a", "[4]", "[0,16]")),
    "lone surrogate": _h(_t("\\ud800", "[4]", "[0,16]")),
    "no tensors": _h('"__metadata__":{"k":"v"}'),
    "tensor info not an object": '{"a":[1,2]}',
}


def _outcome(data: bytes) -> tuple:
    try:
        weights, metadata = decode(data)
    except WireFormatError as exc:
        return ("rejected", exc.reason)
    return ("accepted", {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in weights.items()}, metadata)


@pytest.mark.parametrize("pad_to", [8, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("case", list(_HEADERS))
def test_zero_copy_decoding_accepts_and_rejects_exactly_what_safetensors_does(case, pad_to, monkeypatch):
    # GIVEN a hand-written header over 16 bytes of data (and 4 more for "short of the end")
    body = _F32 + (bytes(4) if case == "short of the end" else b"")
    data = _payload(_HEADERS[case], body, pad_to)

    # WHEN it is decoded, and decoded again with the zero-copy path switched off (safetensors parses)
    fast = _outcome(data)
    monkeypatch.setattr("fedstream.weights._views", lambda *_: None)
    reference = _outcome(data)

    # THEN both give the same tensors, or the same reason to refuse
    assert fast == reference
