"""Local training: the pluggable :class:`Trainer` and the trainers that ship with fedstream.

A trainer turns the global weights into a client update. The runner hands :meth:`Trainer.fit` the
decoded global weights and the aggregator's client settings; these keys are understood (others are
ignored, so an aggregator may address settings to other trainers):

- ``proximal_mu`` (float, default 0) — FedProx (Li et al. 2020): minimise
  ``F_k(w) + mu/2 * ||w - w_global||^2`` over the trainable weights. With plain SGD keep
  ``learning_rate * mu < 2`` or the proximal pull overshoots.
- ``dp_clip_norm`` (float) — client-side clipping for differential privacy: the update
  ``delta = w - w_global`` (all tensors together) is scaled to an L2 norm of at most this value
  before it is returned, so ``FitResult.weights = w_global + clip(delta)``. Noise is the server's job.
- ``local_epochs`` (int) and ``learning_rate`` (float) — override the trainer's own values.

TensorFlow is imported only when a Keras trainer or model is built: the server side and the CLI
import this module without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from fedstream.client.data import ClientData, client_shard

from fedstream.aggregation import Scalar, delta, global_norm
from fedstream.weights import Weights

if TYPE_CHECKING:
    import keras

    ModelFn = Callable[[tuple[int, ...], int], keras.Model]

TRAINER_KINDS = ("keras", "numpy", "instant[:PARAMS]", "module:function")
EVAL_BATCH_SIZE = 256


@dataclass
class FitResult:
    """A client update: full weights after local training, the examples seen per epoch, metrics.

    ``metrics`` holds ``train_loss``, ``train_accuracy`` (over the last local epoch, without the
    proximal term), ``train_seconds`` and, when the client has eval data, ``eval_loss`` and
    ``eval_accuracy`` of the returned weights: the fields of ``fedstream.schemas.TrainingMetrics``.
    """

    weights: Weights
    num_examples: int
    metrics: dict[str, float]


@runtime_checkable
class Trainer(Protocol):
    def initial_weights(self) -> Weights:
        """The weights a run starts from (deterministic for the trainer's seed)."""
        ...

    def fit(self, weights: Weights, settings: Mapping[str, Scalar]) -> FitResult:
        """Train locally from ``weights`` (the global model) and return the update."""
        ...

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """``eval_loss`` and ``eval_accuracy`` on the client's eval data (empty without any)."""
        ...


class TrainerSpecError(ValueError):
    """A ``module:function`` trainer spec cannot be loaded or returned the wrong thing."""


def fit_rng(seed: int, weights: Weights, *extra: int) -> np.random.Generator:
    """The generator for one local fit: a function of the seed and of the global weights trained.

    A client that crashes and trains the same global model again (a redelivered message) makes
    the same update, so a run with faults ends with the model of the run without them.
    """
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return np.random.default_rng([seed, *extra, int.from_bytes(digest.digest(), "little")])


def clip_update(weights: Weights, base: Weights, clip_norm: float) -> Weights:
    """``base + delta * min(1, clip_norm / ||delta||)`` with ``delta = weights - base``, dtypes kept."""
    if clip_norm <= 0:
        raise ValueError(f"dp_clip_norm must be > 0, got {clip_norm}")
    update = delta(weights, base)
    norm = global_norm(update)
    if norm <= clip_norm:
        return weights
    scale = clip_norm / norm
    return {name: (base[name] + update[name] * scale).astype(weights[name].dtype) for name in weights}


def _finish(
    trainer: Trainer, new: Weights, base: Weights, settings: Mapping[str, Scalar], train: dict[str, float]
) -> Weights:
    """Apply ``dp_clip_norm`` and add the eval metrics of the weights actually returned."""
    clip_norm = settings.get("dp_clip_norm")
    if clip_norm is not None:
        new = clip_update(new, base, float(clip_norm))
    train.update(trainer.evaluate(new))
    return new


# --- Keras ------------------------------------------------------------------------------------


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Conv(8, 3x3) → max-pool → dense logits; about 13.5k parameters on 28x28 images."""
    import keras

    inputs = keras.Input(shape=input_shape)
    x = inputs if len(input_shape) == 3 else keras.layers.Reshape((*input_shape, 1), name="channels")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def mlp(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Flatten → Dense(32, relu) → dense logits; about 2.4k parameters on 8x8 digits."""
    import keras

    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(32, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


# The small MLP on 8x8 digits learns several times faster with a larger step than the CNN default.
DEFAULT_KERAS_LEARNING_RATES = {"digits": 0.2}


def default_model_for(dataset: str) -> ModelFn:
    """The built-in model for a dataset name: ``mlp`` for 8x8 ``digits``, ``small_cnn`` otherwise."""
    return mlp if dataset == "digits" else small_cnn


class KerasTrainer:
    """Trains a Keras 3 model with SGD and sparse categorical cross-entropy.

    ``model`` is a built model or a ``model_fn(input_shape, num_classes)``; it must output logits
    (``from_logits=False`` for a softmax output). The model is built once; weights travel as named
    arrays keyed by the variable paths without the model's own name (``"conv/kernel"``), in
    ``model.weights`` order, so layer names must be the same in every process: name your layers.
    One ``tf.GradientTape`` loop serves plain training and FedProx alike.
    """

    def __init__(
        self,
        model: keras.Model | ModelFn,
        data: ClientData,
        epochs: int = 1,
        batch_size: int = 32,
        learning_rate: float = 0.05,
        seed: int = 0,
        from_logits: bool = True,
    ) -> None:
        import keras

        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed
        self.from_logits = from_logits
        if isinstance(model, keras.Model):
            keras.utils.set_random_seed(seed)
            self.model = model
        else:
            self.model = _build_seeded(model, data.input_shape, data.num_classes, seed)
        if not self.model.built:
            self.model.build((None, *data.input_shape))
        self.names = _variable_names(self.model)
        self._initial = self.get_weights()
        self._optimizer: Any = None
        self._train_step: Callable[..., Any] | None = None
        self._eval_step: Callable[..., Any] | None = None

    def initial_weights(self) -> Weights:
        return {name: array.copy() for name, array in self._initial.items()}

    def get_weights(self) -> Weights:
        return {
            name: np.array(v.numpy(), copy=True)
            for name, v in zip(self.names, self.model.weights, strict=True)
        }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        _check_names(weights, self.names)
        for name, variable in zip(self.names, self.model.weights, strict=True):
            array = np.asarray(weights[name])
            if tuple(array.shape) != tuple(variable.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {array.shape}, the model expects {variable.shape}"
                )
            variable.assign(array.astype(variable.dtype))

    def fit(self, weights: Weights, settings: Mapping[str, Scalar]) -> FitResult:
        import tensorflow as tf

        self.set_weights(weights)
        mu = float(settings.get("proximal_mu", 0.0) or 0.0)
        epochs = int(settings.get("local_epochs", self.epochs))
        step = self._build_train_step(float(settings.get("learning_rate", self.learning_rate)))
        name_of = {id(v): name for name, v in zip(self.names, self.model.weights, strict=True)}
        anchors = [
            tf.constant(weights[name_of[id(v)]], dtype=v.dtype) for v in self.model.trainable_variables
        ]
        mu_tensor = tf.constant(mu, dtype=tf.float32)
        rng = fit_rng(self.seed, weights)
        x, y = self.data.x_train, self.data.y_train
        started = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                batch_loss, batch_correct = step(x[batch], y[batch], anchors, mu_tensor)
                loss_sum += float(batch_loss) * len(batch)
                correct += int(batch_correct)
        metrics = {
            "train_loss": loss_sum / max(len(y), 1),
            "train_accuracy": correct / max(len(y), 1),
            "train_seconds": time.perf_counter() - started,
        }
        new = _finish(self, self.get_weights(), weights, settings, metrics)
        return FitResult(weights=new, num_examples=len(y), metrics=metrics)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        x, y = self.data.x_eval, self.data.y_eval
        if len(y) == 0:
            return {}
        self.set_weights(weights)
        step = self._build_eval_step()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), EVAL_BATCH_SIZE):
            batch_loss, batch_correct = step(
                x[start : start + EVAL_BATCH_SIZE], y[start : start + EVAL_BATCH_SIZE]
            )
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        return {"eval_loss": loss_sum / len(y), "eval_accuracy": correct / len(y)}

    def _build_train_step(self, learning_rate: float) -> Callable[..., Any]:
        import keras
        import tensorflow as tf

        if self._train_step is not None:
            self._optimizer.learning_rate.assign(learning_rate)
            return self._train_step
        model, from_logits = self.model, self.from_logits
        variables = model.trainable_variables
        self._optimizer = optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
        optimizer.build(variables)

        @tf.function(reduce_retracing=True)
        def train_step(x, y, anchors, mu):
            with tf.GradientTape() as tape:
                outputs = model(x, training=True)
                data_loss = tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(y, outputs, from_logits=from_logits)
                )
                loss = (data_loss + tf.add_n(model.losses)) if model.losses else data_loss
                proximal = tf.add_n(
                    [tf.reduce_sum(tf.square(w - a)) for w, a in zip(variables, anchors, strict=True)]
                )
                loss = loss + 0.5 * mu * proximal
            optimizer.apply(tape.gradient(loss, variables), variables)
            return data_loss, _count_correct(y, outputs)

        self._train_step = train_step
        return train_step

    def _build_eval_step(self) -> Callable[..., Any]:
        import keras
        import tensorflow as tf

        if self._eval_step is None:
            model, from_logits = self.model, self.from_logits

            @tf.function(reduce_retracing=True)
            def eval_step(x, y):
                outputs = model(x, training=False)
                losses = keras.losses.sparse_categorical_crossentropy(y, outputs, from_logits=from_logits)
                return tf.reduce_sum(losses), _count_correct(y, outputs)

            self._eval_step = eval_step
        return self._eval_step


_BUILD_LOCK = threading.Lock()


def _build_seeded(
    model_fn: ModelFn, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> keras.Model:
    """``model_fn``'s model, with initial weights that are a function of ``seed`` alone.

    ``keras.utils.set_random_seed`` seeds the process-wide generators, and Keras 3 draws the seed
    of every unseeded initializer from Python's global ``random``. Any other thread that draws from
    it between the two (botocore's retry back-off calls ``random.random()``: a poller retrying, a
    client thread) changes the weights; that, not the training ops, is what made two runs with
    one seed differ under load. So the build draws those seeds from a private ``random.Random(seed)``
    (the numbers ``set_random_seed(seed)`` gives the global one: the same weights as before).

    The fit needs nothing more: on CPU (oneDNN off) its ops gave the same bits in every repeat,
    loaded machine or not, for a given seed and global model (``fit_rng`` orders the batches).
    ``tf.config.experimental.enable_op_determinism()`` costs about nothing here but gives other
    (equally repeatable) numbers, is process-wide, and makes ops without a deterministic kernel
    raise in user models, so it is not turned on.
    """
    import random

    import keras

    try:
        from keras.src.random import seed_generator
    except ImportError:  # another Keras layout: the global generators only
        seed_generator = None
    with _BUILD_LOCK:
        keras.utils.set_random_seed(seed)  # NumPy and TensorFlow too, for model functions that use them
        if seed_generator is None or not hasattr(seed_generator, "python_random"):
            return model_fn(input_shape, num_classes)
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            return model_fn(input_shape, num_classes)
        finally:
            seed_generator.python_random = shared


def _count_correct(y, outputs):
    import tensorflow as tf

    predicted = tf.argmax(outputs, axis=-1, output_type=tf.int64)
    return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int64)), tf.int64))


def _variable_names(model: keras.Model) -> list[str]:
    """Variable paths without the model's own name prefix, made unique in ``model.weights`` order."""
    prefix = f"{model.name}/"
    names: list[str] = []
    for variable in model.weights:
        path = variable.path.removeprefix(prefix)
        name, suffix = path, 1
        while name in names:
            name, suffix = f"{path}_{suffix}", suffix + 1
        names.append(name)
    return names


def _check_names(weights: Mapping[str, np.ndarray], names: list[str]) -> None:
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")


# --- numpy ------------------------------------------------------------------------------------


class NumpyTrainer:
    """Multinomial logistic regression by minibatch SGD in numpy: no TensorFlow, fast to start.

    Weights are ``"dense/kernel"`` (features x classes) and ``"dense/bias"``, float32, starting at
    zero. Used by load tests and fast end-to-end tests; supports ``proximal_mu`` (its gradient is
    ``mu * (w - w_global)``) and ``dp_clip_norm`` like every trainer.
    """

    def __init__(
        self,
        data: ClientData,
        epochs: int = 1,
        batch_size: int = 32,
        learning_rate: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.data = data
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.seed = seed
        self.num_features = int(np.prod(data.input_shape, dtype=np.int64))

    def initial_weights(self) -> Weights:
        return {
            "dense/kernel": np.zeros((self.num_features, self.data.num_classes), dtype=np.float32),
            "dense/bias": np.zeros(self.data.num_classes, dtype=np.float32),
        }

    def fit(self, weights: Weights, settings: Mapping[str, Scalar]) -> FitResult:
        _check_names(weights, ["dense/kernel", "dense/bias"])
        mu = float(settings.get("proximal_mu", 0.0) or 0.0)
        epochs = int(settings.get("local_epochs", self.epochs))
        lr = float(settings.get("learning_rate", self.learning_rate))
        anchor_w = weights["dense/kernel"].astype(np.float64)
        anchor_b = weights["dense/bias"].astype(np.float64)
        w, b = anchor_w.copy(), anchor_b.copy()
        x, y = self._features(self.data.x_train), self.data.y_train
        rng = fit_rng(self.seed, weights)
        started = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0
            order = rng.permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                xb, yb = x[batch], y[batch]
                probs = _softmax(xb @ w + b)
                loss_sum += float(-np.log(probs[np.arange(len(yb)), yb] + 1e-12).sum())
                correct += int((probs.argmax(axis=1) == yb).sum())
                probs[np.arange(len(yb)), yb] -= 1.0
                probs /= len(yb)
                w -= lr * (xb.T @ probs + mu * (w - anchor_w))
                b -= lr * (probs.sum(axis=0) + mu * (b - anchor_b))
        metrics = {
            "train_loss": loss_sum / max(len(y), 1),
            "train_accuracy": correct / max(len(y), 1),
            "train_seconds": time.perf_counter() - started,
        }
        new = {"dense/kernel": w.astype(np.float32), "dense/bias": b.astype(np.float32)}
        new = _finish(self, new, weights, settings, metrics)
        return FitResult(weights=new, num_examples=len(y), metrics=metrics)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        y = self.data.y_eval
        if len(y) == 0:
            return {}
        logits = self._features(self.data.x_eval) @ weights["dense/kernel"].astype(np.float64)
        probs = _softmax(logits + weights["dense/bias"])
        loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        return {"eval_loss": loss, "eval_accuracy": float((probs.argmax(axis=1) == y).mean())}

    def _features(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), self.num_features).astype(np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class InstantTrainer:
    """No learning at all: each fit returns the global weights plus a small seeded step, at once.

    For load tests and overhead benchmarks, where the server's work is what is measured and a real
    trainer would only add CPU time. The model is one float32 tensor ``"dense/kernel"`` of
    ``num_params`` values. Each fit is a pure function of the seed, the client index and the
    global weights (:func:`fit_rng`).
    """

    def __init__(self, num_params: int = 1000, num_examples: int = 10, seed: int = 0, client_index: int = 0):
        if num_params < 1:
            raise ValueError(f"an instant trainer needs at least 1 parameter, got {num_params}")
        self.num_params, self.num_examples = num_params, num_examples
        self.seed, self.client_index = seed, client_index

    def initial_weights(self) -> Weights:
        return {"dense/kernel": np.zeros(self.num_params, dtype=np.float32)}

    def fit(self, weights: Weights, settings: Mapping[str, Scalar]) -> FitResult:
        _check_names(weights, ["dense/kernel"])
        rng = fit_rng(self.seed, weights, self.client_index)
        step = rng.normal(0.0, 0.01, size=self.num_params).astype(np.float32)
        new = {"dense/kernel": weights["dense/kernel"] + step}
        train = {"train_loss": float(np.abs(new["dense/kernel"]).mean()), "train_seconds": 0.0}
        return FitResult(_finish(self, new, weights, settings, train), self.num_examples, train)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return {}


# --- user trainers ----------------------------------------------------------------------------

USER_FUNCTION_PARAMETERS = (
    "dataset",
    "partition",
    "num_clients",
    "client_index",
    "seed",
    "epochs",
    "batch_size",
)


def load_user_trainer(
    spec: str,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    learning_rate: float = 0.05,
    **context: Any,
) -> Trainer:
    """Load a trainer from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The function is called with those of these keyword arguments that it declares by name (all of
    them if it takes ``**kwargs``): ``dataset``, ``partition``, ``num_clients``, ``client_index``,
    ``seed``, ``epochs``, ``batch_size`` — the values the client was started with. It returns either

    - ``(keras_model, ClientData)``: the model must output logits for integer labels
      ``0..num_classes-1``; fedstream trains it with a :class:`KerasTrainer` (SGD, sparse categorical
      cross-entropy, FedProx and clipping included). Name the layers: weight names come from them.
    - or any object with the :class:`Trainer` methods, used as it is.

    Example, ``my_silo.py``::

        import keras
        import numpy as np
        from fedstream.client.data import ClientData

        def make(seed, **_):
            rows = np.load("/data/silo/features.npy")           # float32 (n, 20), never leaves
            labels = np.load("/data/silo/labels.npy")           # int64 (n,) in 0..2
            cut = int(0.8 * len(rows))
            data = ClientData(rows[:cut], labels[:cut], rows[cut:], labels[cut:], num_classes=3)
            model = keras.Sequential([
                keras.Input((20,)),
                keras.layers.Dense(16, activation="relu", name="hidden"),
                keras.layers.Dense(3, name="logits"),
            ])
            return model, data

    and the client runs with ``--trainer my_silo:make`` (the module importable, e.g. from the
    working directory on ``PYTHONPATH``) or ``--trainer ./my_silo.py:make``.
    """
    function = _resolve(spec)
    available = {
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        **{k: v for k, v in context.items() if k in USER_FUNCTION_PARAMETERS},
    }
    result = function(**_accepted_arguments(function, available))
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], ClientData):
        model, data = result
        return KerasTrainer(
            model, data, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed
        )
    if isinstance(result, Trainer):
        return result
    raise TrainerSpecError(
        f"{spec} returned {type(result).__name__}; expected (keras_model, ClientData) or an object with "
        "initial_weights(), fit(weights, settings) and evaluate(weights)"
    )


def _resolve(spec: str) -> Callable[..., Any]:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise TrainerSpecError(
            f"trainer spec {spec!r} is not 'module:function' or 'path/to/file.py:function'"
        )
    try:
        module = _import(module_name)
    except (ImportError, OSError) as exc:
        raise TrainerSpecError(f"trainer spec {spec!r}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise TrainerSpecError(f"trainer spec {spec!r}: module {module_name!r} has no {function_name!r}")
    if not callable(function):
        raise TrainerSpecError(f"trainer spec {spec!r}: {function_name!r} is not callable")
    return function


def _import(module_name: str) -> Any:
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name).resolve()
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    name = f"fedstream_user_trainer_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _accepted_arguments(function: Callable[..., Any], available: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return available
    return {p.name: available[p.name] for p in parameters if p.name in available}


def build_trainer(
    kind: str,
    dataset: str,
    partition: str,
    num_clients: int,
    client_index: int,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float | None = None,
) -> Trainer:
    """The client CLI's trainer: ``"keras"`` (the built-in model for the dataset), ``"numpy"``
    (logistic regression, no TensorFlow), or a ``"module:function"`` spec (:func:`load_user_trainer`).

    The built-in kinds train on :func:`fedstream.client.data.client_shard` of the dataset; ``learning_rate``
    defaults to each trainer's own.
    """
    if kind in ("keras", "numpy"):
        data = client_shard(dataset, partition, num_clients, client_index, seed)
        rate = {} if learning_rate is None else {"learning_rate": learning_rate}
        if kind == "numpy":
            return NumpyTrainer(data, epochs=epochs, batch_size=batch_size, seed=seed, **rate)
        model_fn = default_model_for(dataset)
        if not rate and dataset in DEFAULT_KERAS_LEARNING_RATES:
            rate = {"learning_rate": DEFAULT_KERAS_LEARNING_RATES[dataset]}
        return KerasTrainer(model_fn, data, epochs=epochs, batch_size=batch_size, seed=seed, **rate)
    if kind == "instant" or kind.startswith("instant:"):
        size = kind.partition(":")[2]
        if size and not size.isdigit():
            raise ValueError(f"instant trainer size must be a whole number of parameters, got {size!r}")
        return InstantTrainer(int(size or 1000), seed=seed, client_index=client_index)
    if ":" in kind:
        rate = {} if learning_rate is None else {"learning_rate": learning_rate}
        return load_user_trainer(
            kind,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            dataset=dataset,
            partition=partition,
            num_clients=num_clients,
            client_index=client_index,
            **rate,
        )
    raise ValueError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")
