"""Datasets and partitions: shapes, ranges, determinism, and the label skew each scheme promises."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from fedstream.client import data
from fedstream.client.data import (
    ClientData,
    DatasetUnavailableError,
    client_shard,
    load_dataset,
    partition,
    read_idx,
)

SCHEMES = ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2"]


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    return load_dataset("mnist-5k").y_train


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    num_classes = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum() for p in parts
    ]
    return float(np.mean(distances))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_disjoint_and_covers_every_example(mnist_labels, scheme):
    parts = partition(mnist_labels, 10, scheme, seed=3)

    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(mnist_labels)
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_deterministic_for_a_seed(mnist_labels, scheme):
    first = partition(mnist_labels, 8, scheme, seed=7)
    again = partition(mnist_labels, 8, scheme, seed=7)
    other = partition(mnist_labels, 8, scheme, seed=8)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_with_small_alpha_skews_labels_far_more_than_iid(mnist_labels):
    iid = label_skew(mnist_labels, partition(mnist_labels, 10, "iid", seed=0))
    mild = label_skew(mnist_labels, partition(mnist_labels, 10, "dirichlet:100", seed=0))
    strong = label_skew(mnist_labels, partition(mnist_labels, 10, "dirichlet:0.1", seed=0))

    assert iid < 0.1 and mild < 0.1
    assert strong > 0.5 and strong > 5 * iid


def test_dirichlet_gives_every_client_a_minimum_of_examples():
    labels = load_dataset("digits").y_train

    parts = partition(labels, 50, "dirichlet:0.01", seed=1)

    assert min(len(p) for p in parts) >= data.MIN_EXAMPLES_PER_CLIENT
    assert sum(len(p) for p in parts) == len(labels)


def test_shards_give_each_client_only_a_few_labels(mnist_labels):
    # GIVEN 400 examples of each label and 20 shards of 200: every shard holds one label
    parts = partition(mnist_labels, 10, "shards:2", seed=0)

    assert all(len(np.unique(mnist_labels[p])) <= 2 for p in parts)
    assert all(len(p) == 400 for p in parts)


def test_shards_that_straddle_labels_still_give_few_labels_per_client():
    # GIVEN 21 shards of ~68 digits each: a shard may span two labels
    labels = load_dataset("digits").y_train

    parts = partition(labels, 7, "shards:3", seed=0)

    assert all(len(np.unique(labels[p])) <= 2 * 3 for p in parts)
    assert np.mean([len(np.unique(labels[p])) for p in parts]) < 5


@pytest.mark.parametrize(
    "scheme",
    [
        "",
        "random",
        "iid:3",
        "dirichlet",
        "dirichlet:x",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "shards",
        "shards:0",
        "shards:1.5",
        "shards:two",
    ],
)
def test_bad_scheme_is_a_clear_value_error(scheme):
    with pytest.raises(ValueError, match=r"partition scheme .*expected 'iid', 'dirichlet:ALPHA'"):
        partition(np.arange(100) % 10, 4, scheme, seed=0)


def test_impossible_partitions_are_value_errors():
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="num_clients"):
        partition(labels, 0, "iid", seed=0)
    with pytest.raises(ValueError, match="cannot give 11 clients"):
        partition(labels, 11, "iid", seed=0)
    with pytest.raises(ValueError, match="cannot cut 10 examples into 12 shards"):
        partition(labels, 4, "shards:3", seed=0)


def test_mnist_5k_has_4000_train_and_1000_test_images_in_unit_range():
    ds = load_dataset("mnist-5k")

    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_test).tolist() == [100] * 10


def test_digits_split_is_about_80_20_in_unit_range():
    ds = load_dataset("digits")

    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.18 < len(ds.x_test) / 1797 < 0.22
    assert ds.x_train.shape[1:] == ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0


def test_split_is_the_same_on_every_load():
    first, again = load_dataset("digits"), load_dataset("digits")

    np.testing.assert_array_equal(first.x_test, again.x_test)
    np.testing.assert_array_equal(first.y_train, again.y_train)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="mnist-5k, digits, fashion-mnist"):
        load_dataset("cifar-10")


def test_client_shards_are_the_partition_of_train_and_an_iid_share_of_test():
    ds = load_dataset("mnist-5k")
    parts = partition(ds.y_train, 4, "dirichlet:0.3", seed=5)

    shards = [client_shard("mnist-5k", "dirichlet:0.3", 4, i, seed=5) for i in range(4)]

    for shard, part in zip(shards, parts, strict=True):
        np.testing.assert_array_equal(shard.x_train, ds.x_train[part])
        np.testing.assert_array_equal(shard.y_train, ds.y_train[part])
        assert shard.num_classes == 10 and shard.input_shape == (28, 28, 1)
    assert [len(s.y_eval) for s in shards] == [250] * 4
    eval_rows = np.concatenate([s.x_eval.reshape(len(s.x_eval), -1) for s in shards])
    assert len(np.unique(eval_rows, axis=0)) == len(np.unique(ds.x_test.reshape(1000, -1), axis=0))


def test_client_index_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"client_index 4 is outside 0\.\.3"):
        client_shard("digits", "iid", 4, 4, seed=0)


def test_client_data_infers_num_classes_and_checks_lengths():
    x = np.zeros((5, 3), dtype=np.float32)

    assert ClientData(x, np.array([0, 1, 2, 1, 0]), x[:2], np.array([4, 0])).num_classes == 5
    assert ClientData(x, np.zeros(5, dtype=np.int64), x[:1], np.zeros(1), num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="same number"):
        ClientData(x, np.zeros(4), x, np.zeros(5))


def test_fashion_mnist_missing_tells_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")

    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def test_fashion_mnist_reads_gzipped_and_plain_idx_files(monkeypatch, tmp_path):
    # GIVEN a miniature Fashion-MNIST: training files gzipped, test files plain
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    train_y = (np.arange(12) % 10).astype(np.uint8)
    test_x = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    test_y = np.array([9, 0, 1, 2], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, compress=False)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)

    ds = load_dataset("fashion-mnist")

    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(ds.x_train[..., 0], train_x / 255.0, rtol=1e-6)
    assert ds.y_test.tolist() == [9, 0, 1, 2] and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10


def test_read_idx_handles_big_endian_ints_and_rejects_other_files(tmp_path):
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    write_idx(tmp_path / "ints", values, compress=False)

    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), np.arange(6).reshape(2, 3))

    (tmp_path / "junk").write_bytes(b"\x89PNG not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "short").write_bytes((tmp_path / "ints").read_bytes()[:-4])
    with pytest.raises(ValueError, match="promises 36 bytes, file has 32"):
        read_idx(tmp_path / "short")
