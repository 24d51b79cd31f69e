"""The wire format: what round-trips, and every kind of payload a decoder must refuse."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from safetensors.numpy import save as raw_safetensors

from fedstream.weights import ModelSpec, WireFormatError, decode, encode, load_file, save_file, sha256_hex


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
