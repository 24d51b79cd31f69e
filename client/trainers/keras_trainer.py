"""The Keras trainer: the built-in models (:func:`small_cnn`, :func:`mlp`, :func:`default_model_for`)
and :class:`KerasTrainer`, which trains any Keras 3 model, with the seeded model build (``_build_seeded``).

TensorFlow and Keras are imported only inside the functions that build or train a model: importing
this module does not import them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from fedstream.client.data import ClientData
from fedstream.client.quiet import import_tensorflow
from fedstream.client.trainers.base import FitResult, _check_names, _finish, fit_rng

from fedstream.aggregation import Scalar
from fedstream.weights import Weights

if TYPE_CHECKING:
    import keras

    ModelFn = Callable[[tuple[int, ...], int], keras.Model]

EVAL_BATCH_SIZE = 256


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Conv(8, 3x3) → max-pool → dense logits; about 13.5k parameters on 28x28 images."""
    import_tensorflow()  # its start-up lines go to the debug log
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
    import_tensorflow()  # its start-up lines go to the debug log
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
        import_tensorflow()  # its start-up lines go to the debug log
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

    import_tensorflow()  # its start-up lines go to the debug log
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
