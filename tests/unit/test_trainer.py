"""Trainers: the named-array weights, local training, FedProx, clipping and user-supplied trainers.

Tiny models on the 8x8 digits, one local epoch: the whole module runs in a few seconds after
TensorFlow's import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fedstream.client.data import ClientData, load_dataset
from fedstream.client.trainers import (
    FitResult,
    KerasTrainer,
    NumpyTrainer,
    Trainer,
    TrainerSpecError,
    build_trainer,
    clip_update,
    load_user_trainer,
    mlp,
    small_cnn,
)

from fedstream.aggregation import delta, global_norm
from fedstream.schemas import TrainingMetrics
from fedstream.weights import ModelSpec, decode, encode

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> ClientData:
    ds = load_dataset("digits")
    return ClientData(ds.x_train, ds.y_train, ds.x_test, ds.y_test, num_classes=ds.num_classes)


@pytest.fixture(scope="module")
def keras_trainer(digits) -> KerasTrainer:
    return KerasTrainer(mlp, digits, seed=1)


def update_norm(result: FitResult, base: dict[str, np.ndarray]) -> float:
    return global_norm(delta(result.weights, base))


def test_keras_weights_are_named_by_layer_in_model_order(keras_trainer):
    weights = keras_trainer.initial_weights()

    assert list(weights) == ["dense/kernel", "dense/bias", "logits/kernel", "logits/bias"]
    assert [w.shape for w in weights.values()] == [(64, 32), (32,), (32, 10), (10,)]
    assert all(w.dtype == np.float32 for w in weights.values())


def test_keras_weights_round_trip_through_the_wire_format(keras_trainer):
    # GIVEN weights that differ from the model's current ones
    rng = np.random.default_rng(0)
    original = {
        n: rng.normal(size=w.shape).astype(np.float32) for n, w in keras_trainer.get_weights().items()
    }

    decoded, _ = decode(encode(original), ModelSpec.of(keras_trainer.initial_weights()))
    keras_trainer.set_weights(decoded)
    back = keras_trainer.get_weights()

    assert list(back) == list(original)
    for name in original:
        np.testing.assert_array_equal(back[name], original[name])
        assert back[name].dtype == np.float32


def test_small_cnn_names_and_shapes():
    images = np.zeros((4, 28, 28, 1), np.float32)
    data = ClientData(images, np.arange(4), images, np.arange(4), num_classes=10)

    weights = KerasTrainer(small_cnn, data).initial_weights()

    assert {n: w.shape for n, w in weights.items()} == {
        "conv/kernel": (3, 3, 1, 8),
        "conv/bias": (8,),
        "logits/kernel": (13 * 13 * 8, 10),
        "logits/bias": (10,),
    }


def test_set_weights_rejects_foreign_weights(keras_trainer):
    weights = keras_trainer.initial_weights()
    with pytest.raises(ValueError, match=r"missing \['logits/bias'\], unexpected \['other'\]"):
        foreign = {name: array for name, array in weights.items() if name != "logits/bias"}
        keras_trainer.set_weights({**foreign, "other": weights["logits/bias"]})
    with pytest.raises(ValueError, match="tensor 'dense/bias' has shape"):
        keras_trainer.set_weights({**weights, "dense/bias": np.zeros(3, np.float32)})


def test_local_training_improves_eval_accuracy_and_reports_the_record_metrics(keras_trainer):
    initial = keras_trainer.initial_weights()
    before = keras_trainer.evaluate(initial)

    result = keras_trainer.fit(initial, {"local_epochs": 3})

    assert result.num_examples == len(keras_trainer.data.y_train)
    assert result.metrics["eval_accuracy"] > before["eval_accuracy"] + 0.3
    assert set(result.metrics) == set(TrainingMetrics.model_fields)
    TrainingMetrics(**result.metrics)
    assert list(result.weights) == list(initial)
    assert all(w.dtype == np.float32 for w in result.weights.values())


def test_training_is_deterministic_for_a_seed(digits):
    # Bit for bit, even while another thread draws from Python's global `random` (botocore's retry
    # back-off does, e.g. a poller retrying): Keras draws its initializers' seeds from it, which
    # once made the two models start, and so end, apart on a loaded machine. KerasTrainer builds
    # the model from a generator of its own; the fit's ops are deterministic on CPU.
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()
            time.sleep(0.0005)

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        first, second = KerasTrainer(mlp, digits, seed=5), KerasTrainer(mlp, digits, seed=5)
        a = first.fit(first.initial_weights(), {})
        b = second.fit(second.initial_weights(), {})
    finally:
        stop.set()
        drawer.join()

    for name in first.initial_weights():
        np.testing.assert_array_equal(first.initial_weights()[name], second.initial_weights()[name])
    for name in a.weights:
        np.testing.assert_array_equal(a.weights[name], b.weights[name])


def test_large_proximal_mu_keeps_the_update_near_the_global_model(keras_trainer):
    initial = keras_trainer.initial_weights()

    free = keras_trainer.fit(initial, {"proximal_mu": 0.0})
    held = keras_trainer.fit(initial, {"proximal_mu": 10.0})

    assert update_norm(free, initial) > 0.3
    assert update_norm(held, initial) < 0.2 * update_norm(free, initial)


def test_dp_clip_norm_bounds_the_update(keras_trainer):
    initial = keras_trainer.initial_weights()

    result = keras_trainer.fit(initial, {"dp_clip_norm": 0.05})

    assert update_norm(result, initial) == pytest.approx(0.05, rel=1e-4)
    assert all(w.dtype == np.float32 for w in result.weights.values())


def test_clip_update_scales_only_updates_above_the_norm():
    base = {"w": np.zeros(2, np.float32)}
    small, large = {"w": np.array([0.3, 0.4], np.float32)}, {"w": np.array([3.0, 4.0], np.float32)}

    assert clip_update(small, base, 1.0) is small
    np.testing.assert_allclose(clip_update(large, base, 1.0)["w"], [0.6, 0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="dp_clip_norm must be > 0"):
        clip_update(large, base, 0.0)


def test_numpy_trainer_learns_digits(digits):
    trainer = NumpyTrainer(digits, seed=0)
    initial = trainer.initial_weights()

    result = trainer.fit(initial, {})

    assert list(initial) == ["dense/kernel", "dense/bias"] and initial["dense/kernel"].shape == (64, 10)
    assert trainer.evaluate(initial)["eval_accuracy"] < 0.2
    assert result.metrics["eval_accuracy"] > 0.8
    TrainingMetrics(**result.metrics)


def test_numpy_trainer_supports_the_proximal_term_and_clipping(digits):
    trainer = NumpyTrainer(digits, seed=0)
    initial = trainer.initial_weights()

    free = update_norm(trainer.fit(initial, {}), initial)
    held = update_norm(trainer.fit(initial, {"proximal_mu": 1.0}), initial)
    clipped = update_norm(trainer.fit(initial, {"dp_clip_norm": 0.5}), initial)

    assert held < 0.2 * free
    assert clipped == pytest.approx(0.5, rel=1e-4)


USER_MODULE = textwrap.dedent(
    """
    import keras
    import numpy as np
    from fedstream.client.data import ClientData
    from fedstream.client.trainers import NumpyTrainer

    SEEN = {}

    def _data():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(40, 5)).astype(np.float32)
        y = (x[:, 0] > 0).astype(np.int64)
        return ClientData(x[:30], y[:30], x[30:], y[30:], num_classes=2)

    def keras_pair(client_index, seed):
        SEEN.update(client_index=client_index, seed=seed)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2, name="out")], name="user")
        return model, _data()

    def own_trainer(**context):
        SEEN.update(context)
        return NumpyTrainer(_data())

    def wrong():
        return 42

    NOT_CALLABLE = 1
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "silo_trainer.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "silo_trainer.py"
    sys.modules.pop("silo_trainer", None)


def test_user_function_returning_a_keras_model_and_data(user_module):
    trainer = load_user_trainer("silo_trainer:keras_pair", seed=3, client_index=2, num_clients=4)

    assert isinstance(trainer, KerasTrainer)
    assert sys.modules["silo_trainer"].SEEN == {"client_index": 2, "seed": 3}
    initial = trainer.initial_weights()
    assert list(initial) == ["out/kernel", "out/bias"]
    assert trainer.fit(initial, {}).num_examples == 30


def test_user_function_returning_a_trainer_from_a_file_path(user_module):
    trainer = load_user_trainer(f"{user_module}:own_trainer", dataset="digits", client_index=0, epochs=2)

    assert isinstance(trainer, NumpyTrainer) and isinstance(trainer, Trainer)
    assert trainer.fit(trainer.initial_weights(), {}).num_examples == 30


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("silo_trainer", "is not 'module:function'"),
        ("silo_trainer:", "is not 'module:function'"),
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("/nowhere/silo.py:make", "cannot import '/nowhere/silo.py'"),
        ("silo_trainer:missing", "has no 'missing'"),
        ("silo_trainer:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
        ("silo_trainer:wrong", r"returned int; expected \(keras_model, ClientData\)"),
    ],
)
def test_bad_user_trainer_specs_are_clear_errors(user_module, spec, message):
    with pytest.raises(TrainerSpecError, match=message):
        load_user_trainer(spec)


def test_build_trainer_kinds(digits):
    numpy_trainer = build_trainer("numpy", "digits", "iid", num_clients=3, client_index=1, seed=0)
    keras_trainer = build_trainer("keras", "digits", "dirichlet:0.5", num_clients=3, client_index=0, epochs=2)

    assert isinstance(numpy_trainer, NumpyTrainer) and len(numpy_trainer.data.y_train) in (479, 480)
    assert isinstance(keras_trainer, KerasTrainer) and keras_trainer.epochs == 2
    assert next(iter(keras_trainer.initial_weights())) == "dense/kernel"
    with pytest.raises(ValueError, match="unknown trainer 'torch'"):
        build_trainer("torch", "digits", "iid", num_clients=1, client_index=0)


def test_client_modules_and_the_numpy_trainer_need_no_tensorflow():
    code = (
        "import sys\n"
        "from fedstream.client.trainers import build_trainer\n"
        "trainer = build_trainer('numpy', 'digits', 'iid', num_clients=2, client_index=0)\n"
        "trainer.fit(trainer.initial_weights(), {})\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)

    assert completed.returncode == 0, completed.stderr
