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
import this package without it.

One module per concern; this package holds :func:`build_trainer` (the client CLI's trainer from a
spec string) and re-exports the public names of the others:

- ``base`` — the :class:`Trainer` protocol, :class:`FitResult`, :class:`TrainerSpecError`,
  :func:`fit_rng`, :func:`clip_update` and the helpers every trainer shares;
- ``keras_trainer`` — the built-in Keras models and :class:`KerasTrainer`;
- ``numpy_trainer`` — :class:`NumpyTrainer`;
- ``instant`` — :class:`InstantTrainer`;
- ``user`` — :func:`load_user_trainer`, the ``module:function`` loader.
"""

from __future__ import annotations

from fedstream.client.data import client_shard
from fedstream.client.trainers.base import FitResult, Trainer, TrainerSpecError, clip_update, fit_rng
from fedstream.client.trainers.instant import InstantTrainer
from fedstream.client.trainers.keras_trainer import (
    DEFAULT_KERAS_LEARNING_RATES,
    EVAL_BATCH_SIZE,
    KerasTrainer,
    default_model_for,
    mlp,
    small_cnn,
)
from fedstream.client.trainers.numpy_trainer import NumpyTrainer
from fedstream.client.trainers.user import USER_FUNCTION_PARAMETERS, _resolve, load_user_trainer

__all__ = [
    "DEFAULT_KERAS_LEARNING_RATES",
    "EVAL_BATCH_SIZE",
    "TRAINER_KINDS",
    "USER_FUNCTION_PARAMETERS",
    "FitResult",
    "InstantTrainer",
    "KerasTrainer",
    "NumpyTrainer",
    "Trainer",
    "TrainerSpecError",
    "build_trainer",
    "check_trainer_spec",
    "clip_update",
    "default_model_for",
    "fit_rng",
    "load_user_trainer",
    "mlp",
    "small_cnn",
]

TRAINER_KINDS = ("keras", "numpy", "instant[:PARAMS]", "module:function")


def check_trainer_spec(kind: str) -> None:
    """Raise :class:`TrainerSpecError` unless :func:`build_trainer` accepts ``kind``, without building it.

    ``keras`` and ``numpy`` are accepted as they are (TensorFlow is not imported); ``instant[:N]`` needs
    a whole number N >= 1; a ``module:function`` (or ``path/to/file.py:function``) spec is imported and
    its function must exist and be callable — it is not called.
    """
    if kind in ("keras", "numpy"):
        return
    if kind == "instant" or kind.startswith("instant:"):
        size = kind.partition(":")[2]
        if kind.endswith(":") or (size and (not size.isdigit() or int(size) < 1)):
            raise TrainerSpecError(
                f"instant trainer size must be a whole number of parameters >= 1, got {size!r}"
            )
        return
    if ":" in kind:
        _resolve(kind)
        return
    raise TrainerSpecError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")


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
