"""The NumPy trainer: multinomial logistic regression by minibatch SGD, no TensorFlow."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
from fedstream.client.data import ClientData
from fedstream.client.trainers.base import FitResult, _check_names, _finish, fit_rng

from fedstream.aggregation import Scalar
from fedstream.weights import Weights


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
