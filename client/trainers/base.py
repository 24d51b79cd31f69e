"""What every trainer shares: the :class:`Trainer` protocol, :class:`FitResult`, :class:`TrainerSpecError`,
:func:`fit_rng` (the generator of one local fit), :func:`clip_update`, and the helpers ``_finish``
(``dp_clip_norm`` and the eval metrics of the returned weights) and ``_check_names``.

The settings a trainer's ``fit`` understands are listed in :mod:`fedstream.client.trainers`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedstream.aggregation import Scalar, delta, global_norm
from fedstream.weights import Weights


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


def _check_names(weights: Mapping[str, np.ndarray], names: list[str]) -> None:
    missing = [n for n in names if n not in weights]
    extra = [n for n in weights if n not in names]
    if missing or extra:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {extra}")
