"""The instant trainer: no learning, a seeded step at once (load tests and overhead benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from fedstream.client.trainers.base import FitResult, _check_names, _finish, fit_rng

from fedstream.aggregation import Scalar
from fedstream.weights import Weights


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
