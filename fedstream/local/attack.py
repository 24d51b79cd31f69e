"""A malicious client for ``fedstream local``: it exists to evaluate defences on one machine.

The influence bounds (:mod:`fedstream.bounds`) and the robust aggregators (``median``,
``trimmed-mean``, ``krum``) claim to limit what one participant can do to the global model. This
module makes such a participant, so a local run (``fedstream local --attack site-4=sign-flip:10``)
or a benchmark (``benchmarks/learning_quality.py --robustness``) can measure the claim. The
production client has no attack option: the local runtime starts an attacker as an ordinary
``fedstream client`` process with ``--trainer fedstream.local.attack:make`` and puts the attack in
its environment (:data:`ATTACK_ENV`, :data:`TRAINER_ENV`, :data:`LEARNING_RATE_ENV`).

An attacker trains honestly with the trainer every other client uses, then lies about the result.
With ``base`` the global weights it was sent and ``delta = trained - base``, an attack spec is
``KIND[:FACTOR][:examples=N]``:

- ``sign-flip:F`` — reports ``base - F * delta`` (gradient ascent, F times as far);
- ``scale:F`` — reports ``base + F * delta`` (a boosted honest update, e.g. ``scale:1e6``);
- ``copy`` — does not train; reports ``base`` itself (free-riding);
- ``examples=N`` (any kind) — claims N training examples, at most 10**9 (the record schema's limit);
  otherwise the honest count.

Values beyond a tensor's dtype range are clipped to it, so the update stays finite and passes the
client's own encoding checks. The reported training metrics are the honest ones (an attacker
lies about those too, plausibly); ``copy`` reports the evaluation of ``base``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedstream.schemas import MAX_EXAMPLES

ATTACK_ENV = "FEDSTREAM_ATTACK"  # the attack spec
TRAINER_ENV = "FEDSTREAM_ATTACK_TRAINER"  # the honest trainer kind (build_trainer), default keras
LEARNING_RATE_ENV = "FEDSTREAM_ATTACK_LEARNING_RATE"  # the honest trainer's learning rate, if set
TRAINER_SPEC = "fedstream.local.attack:make"
KINDS = ("sign-flip", "scale", "copy")
USAGE = "sign-flip:F | scale:F | copy, each optionally followed by :examples=N"


class AttackSpecError(ValueError):
    """An attack spec that cannot be parsed."""


@dataclass(frozen=True)
class Attack:
    kind: str
    factor: float = 1.0
    examples: int | None = None

    def __str__(self) -> str:
        text = self.kind if self.kind == "copy" else f"{self.kind}:{self.factor:g}"
        return text if self.examples is None else f"{text}:examples={self.examples}"


def parse_attack(spec: str) -> Attack:
    """``"sign-flip:10:examples=1000000000"`` -> ``Attack("sign-flip", 10.0, 1000000000)``."""
    kind, *rest = [part.strip() for part in spec.strip().split(":")]
    if kind not in KINDS:
        raise AttackSpecError(f"unknown attack {kind!r} in {spec!r}; expected {USAGE}")
    examples: int | None = None
    if rest and rest[-1].startswith("examples="):
        text = rest.pop().removeprefix("examples=")
        try:
            examples = int(float(text)) if "e" in text.lower() else int(text)
        except (ValueError, OverflowError):
            raise AttackSpecError(f"examples must be a whole number, got {text!r} in {spec!r}") from None
        if not 1 <= examples <= MAX_EXAMPLES:
            raise AttackSpecError(
                f"examples must be between 1 and {MAX_EXAMPLES}, got {examples} in {spec!r}"
            )
    if kind == "copy":
        if rest:
            raise AttackSpecError(f"copy takes no factor, got {spec!r}; expected {USAGE}")
        return Attack("copy", 1.0, examples)
    if len(rest) != 1:
        raise AttackSpecError(f"{kind} needs one factor, e.g. {kind}:10, got {spec!r}; expected {USAGE}")
    try:
        factor = float(rest[0])
    except ValueError:
        raise AttackSpecError(f"the factor of {kind} must be a number, got {rest[0]!r} in {spec!r}") from None
    if not np.isfinite(factor) or factor <= 0:
        raise AttackSpecError(f"the factor of {kind} must be a finite number > 0, got {rest[0]!r}")
    return Attack(kind, factor, examples)


def parse_attackers(pairs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["site-4=sign-flip:10"]`` -> ``{"site-4": "sign-flip:10"}``, every spec checked."""
    attackers: dict[str, str] = {}
    for pair in pairs or ():
        client_id, sep, spec = pair.partition("=")
        client_id = client_id.strip()
        if not sep or not client_id or not spec.strip():
            raise AttackSpecError(f"--attack expects CLIENT=SPEC, e.g. site-4=sign-flip:10, got {pair!r}")
        if client_id in attackers:
            raise AttackSpecError(f"--attack names {client_id!r} twice")
        parse_attack(spec)
        attackers[client_id] = spec.strip()
    return attackers


def _finite(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        limit = float(np.finfo(dtype).max)
        values = np.clip(np.nan_to_num(values, nan=0.0, posinf=limit, neginf=-limit), -limit, limit)
    return values.astype(dtype)


def poison(
    attack: Attack, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The weights the attacker reports instead of ``trained``, each tensor in ``base``'s dtype."""
    out: dict[str, Any] = {}
    for name, reference in base.items():
        reference = np.asarray(reference)
        if attack.kind == "copy":
            out[name] = reference.copy()
            continue
        step = np.subtract(trained[name], reference, dtype=np.float64)
        sign = -1.0 if attack.kind == "sign-flip" else 1.0
        out[name] = _finite(reference.astype(np.float64) + sign * attack.factor * step, reference.dtype)
    return out


class AttackTrainer:
    """Wraps an honest :class:`fedstream.client.trainers.Trainer`; ``fit`` reports what the attack says."""

    def __init__(self, inner: Any, attack: Attack | str) -> None:
        self.inner = inner
        self.attack = parse_attack(attack) if isinstance(attack, str) else attack

    def initial_weights(self) -> Any:
        return self.inner.initial_weights()

    def evaluate(self, weights: Any) -> dict[str, float]:
        return self.inner.evaluate(weights)

    def fit(self, weights: Any, settings: Mapping[str, Any]) -> Any:
        from fedstream.client.trainers import FitResult

        if self.attack.kind == "copy":
            metrics: dict[str, float] = {"train_seconds": 0.0, **self.inner.evaluate(weights)}
            examples = self.attack.examples or _honest_examples(self.inner)
            return FitResult(poison(self.attack, weights, weights), examples, metrics)
        result = self.inner.fit(weights, settings)
        return FitResult(
            poison(self.attack, result.weights, weights),
            self.attack.examples or result.num_examples,
            dict(result.metrics),
        )


def _honest_examples(trainer: Any) -> int:
    """What the trainer would report without training: its training shard's size, else 1."""
    data = getattr(trainer, "data", None)
    count = len(data.y_train) if data is not None else int(getattr(trainer, "num_examples", 1))
    return max(1, count)


def make(
    dataset: str,
    partition: str,
    num_clients: int,
    client_index: int,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 32,
) -> AttackTrainer:
    """The ``--trainer fedstream.local.attack:make`` entry point: the attack comes from the environment."""
    from fedstream.client.trainers import build_trainer

    spec = os.environ.get(ATTACK_ENV)
    if not spec:
        raise AttackSpecError(f"{TRAINER_SPEC} needs the attack spec in ${ATTACK_ENV}")
    attack = parse_attack(spec)
    kind = os.environ.get(TRAINER_ENV) or "keras"
    if kind == TRAINER_SPEC:
        raise AttackSpecError(f"${TRAINER_ENV} must name the honest trainer, not {TRAINER_SPEC}")
    rate = os.environ.get(LEARNING_RATE_ENV)
    inner = build_trainer(
        kind,
        dataset,
        partition,
        num_clients,
        client_index,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=float(rate) if rate else None,
    )
    return AttackTrainer(inner, attack)


def attacker_env(spec: str, trainer: str, learning_rate: float | None) -> dict[str, str]:
    """The environment of an attacker's client process."""
    env = {ATTACK_ENV: spec, TRAINER_ENV: trainer}
    if learning_rate is not None:
        env[LEARNING_RATE_ENV] = repr(learning_rate)
    return env
