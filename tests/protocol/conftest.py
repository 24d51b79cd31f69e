"""The round protocol and the async step on a ``MemoryStore``: no moto, no TensorFlow, no network.

``Run`` drives the real server modules (``fedstream.server.sync``, ``finalize``, ``asynchronous``)
as the handlers do, on any ``Repository``: it plays the clients (an upload, then an update record as
the stream delivers it), the stream (one record, or one batch, at a time) and the state machine
(``InitRun``, ``OpenRound``, the token recorded from the topic, ``MarkDeadline``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from fedstream import keys
from fedstream.errors import Refused
from fedstream.registry import AggregatorRegistry, default_registry
from fedstream.schemas import UpdateRecord
from fedstream.server import asynchronous, sync
from fedstream.server.asynchronous import Arrival, BatchResult
from fedstream.server.memory import MemoryStore
from fedstream.server.store import Repository
from fedstream.settings import HandlerSettings
from fedstream.weights import Weights, decode, encode, sha256_hex

CLIENTS = ("site-1", "site-2", "site-3")
ROUND_TOKEN = "token-round-1"
TOPIC = "arn:aws:sns:us-east-1:123456789012:models"


def make_settings(mode: str = "sync", **fields: Any) -> HandlerSettings:
    defaults: dict[str, Any] = {
        "aggregator": "fedavg" if mode == "sync" else "fedasync",
        "min_clients": 2,
        "client_ids": CLIENTS,
        "seed": 1,
    }
    return HandlerSettings(
        mode=mode,  # type: ignore[arg-type]
        bucket="bucket",
        run_table="runs",
        updates_table="updates",
        topic_arn=TOPIC,
        **(defaults | fields),
    )


def base_weights() -> Weights:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias": np.zeros(3, dtype=np.float32),
    }


def shifted(weights: Weights, by: float) -> Weights:
    return {name: (array + by).astype(array.dtype) for name, array in weights.items()}


def assert_model(actual: Weights, expected: Weights, atol: float = 1e-6) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(actual[name], array, rtol=1e-5, atol=atol)


class Run:
    """One run on a ``Repository``, driven as clients, stream and state machine drive it."""

    def __init__(
        self,
        store: Repository,
        settings: HandlerSettings,
        *,
        run_id: str = "run-1",
        upload: Callable[[str, bytes], None] | None = None,
        registry: AggregatorRegistry | None = None,
    ) -> None:
        self.store, self.settings, self.run_id = store, settings, run_id
        self.base = base_weights()
        self.registry = registry or default_registry()
        self._upload = upload or (lambda key, data: store.put_object(key, data))  # type: ignore[attr-defined]
        self.tokens: dict[int, str] = {}  # each round's task token, as recorded from the topic

    # ---- the state machine ------------------------------------------------------------------------
    def start_sync(self, *, min_clients: int = 2, token: str | None = ROUND_TOKEN) -> None:
        """``InitRun`` and ``OpenRound`` (round 1 on version 0), then the round's token as the finalize
        function records it from the topic."""
        data = encode(self.base, {"run_id": self.run_id, "version": "0"})
        assert self.store.put_once(keys.global_key(self.run_id, 0), data)
        state = {
            "run_id": self.run_id,
            "sk": "state",
            "mode": "sync",
            "status": "RUNNING",
            "version": 0,
            "global_key": keys.global_key(self.run_id, 0),
            "global_sha256": sha256_hex(data),
            "round": 0,
            "min_clients": min_clients,
        }
        self.store.create_items([state])
        self.open_round(1, version=0, min_clients=min_clients, token=token)

    def open_round(
        self, number: int, *, version: int, min_clients: int = 2, token: str | None = None, timeout: int = 60
    ) -> None:
        self.store.create_items(
            [
                {
                    "run_id": self.run_id,
                    "sk": f"round#{number}",
                    "round": number,
                    "version": version,
                    "status": "open",
                    "reported_count": 0,
                    "min_clients": min_clients,
                    "opened_at": datetime.now(UTC).isoformat(),
                    "round_timeout": timeout,
                }
            ]
        )
        if token:
            assert sync.record_round_token(self.store, self.run_id, number, token)
            self.tokens[number] = token

    def mark_deadline(self, number: int = 1, *, passed: bool = True) -> str:
        """``MarkDeadline``: a fresh finalize id on the round; with ``passed``, its deadline is behind us
        (and the state machine's wait on the round's own token timed out)."""
        finalize_id = str(uuid.uuid4())
        if passed and isinstance(self.store, MemoryStore) and number in self.tokens:
            self.store.expire_token(self.tokens[number])
        sets: dict[str, Any] = {"finalize_id": finalize_id, "deadline_at": datetime.now(UTC).isoformat()}
        if passed:
            sets["opened_at"] = (datetime.now(UTC) - timedelta(seconds=600)).isoformat()
        if isinstance(self.store, MemoryStore):
            self.store.update_item(self.run_id, f"round#{number}", sets=sets, removes=("finalize_token",))
        else:  # the real Store: the same write through its generic conditional update
            self.store.conditional_update(  # type: ignore[attr-defined]
                {"run_id": self.run_id, "sk": f"round#{number}"},
                "SET " + ", ".join(f"{name} = :{name}" for name in sets) + " REMOVE finalize_token",
                "attribute_exists(run_id)",
                {f":{name}": value for name, value in sets.items()},
            )
        return finalize_id

    # ---- the clients ------------------------------------------------------------------------------
    def upload(self, client: str, weights: Weights | bytes, *, version: int = 0) -> tuple[str, str]:
        nonce = uuid.uuid4().hex[:8]
        data = weights if isinstance(weights, bytes) else encode(weights, {"upload": nonce})
        key = keys.update_key(self.run_id, client, version, nonce)
        self._upload(key, data)
        return key, sha256_hex(data)

    def record(
        self,
        client: str,
        weights: Weights | bytes,
        *,
        examples: int = 10,
        round: int | None = 1,
        version: int = 0,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Upload an update and return its record as the stream's new image (numbers as Decimals)."""
        key, sha = self.upload(client, weights, version=version)
        fields: dict[str, Any] = {
            "client_id": client,
            "run_id": self.run_id,
            "base_version": version,
            "round": round,
            "object_key": key,
            "sha256": sha,
            "num_examples": examples,
            "task_token": ROUND_TOKEN if round == 1 else None,
            "metrics": {"train_loss": 1.0, "eval_accuracy": 0.5},
        }
        fields.update(overrides)
        text = UpdateRecord.create(**fields).model_dump_json(exclude_none=True)
        return json.loads(text, parse_float=Decimal, parse_int=Decimal)

    def update(self, client: str, base_version: int, by: float = 1.0, **kw: Any) -> dict[str, Any]:
        """An async update: the base model moved by ``by``, trained from ``base_version``."""
        return self.record(client, shifted(self.base, by), round=None, version=base_version, **kw)

    # ---- the stream -------------------------------------------------------------------------------
    def deliver(self, *images: dict[str, Any], store: Repository | None = None) -> list[str]:
        """Each record as the aggregate handler takes it: "registered", "closed", or the refusal's
        reason. Any other exception fails the record (the stream retries it) and is raised."""
        outcomes = []
        for image in images:
            try:
                _, closed = sync.handle_sync_record(store or self.store, self.settings, self.registry, image)
            except Refused as refused:
                outcomes.append(refused.reason)
                continue
            outcomes.append("registered" if closed is None else "closed")
        return outcomes

    def batch(self, *images: dict[str, Any], store: Repository | None = None) -> BatchResult:
        """One async stream batch, as the async update handler takes it."""
        return asynchronous.handle_async_batch(
            store or self.store, self.settings, self.registry, [Arrival(image) for image in images]
        )

    def start_async(self, **kw: Any) -> None:
        asynchronous.start_run(self.store, self.run_id, encode(self.base, {"run_id": self.run_id}), **kw)

    # ---- what a user sees -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return self.store.run_state(self.run_id) or {}

    def round(self, number: int = 1) -> dict[str, Any]:
        return self.store.round_item(self.run_id, number) or {}

    def model(self, version: int | None = None) -> Weights:
        """The global model of ``version`` (default: the run's current one), as stored."""
        key = str(self.state()["global_key"]) if version is None else keys.global_key(self.run_id, version)
        weights, _ = decode(self.store.get_bytes(key))
        return weights

    def mean(self, *shift_examples: tuple[float, int]) -> Weights:
        """The example-weighted mean of updates that shifted the base by ``shift`` each."""
        total = sum(n for _, n in shift_examples)
        shift = sum(by * n for by, n in shift_examples) / total
        return {name: array + shift for name, array in self.base.items()}


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(make_settings("sync"))


@pytest.fixture
def run(store: MemoryStore) -> Run:
    """A sync run on a MemoryStore: round 1 open on version 0, its token recorded; FedAvg, three
    expected clients, a quorum of two at the deadline."""
    run = Run(store, store.settings)
    run.start_sync()
    return run


@pytest.fixture
def async_run(request: pytest.FixtureRequest) -> Run:
    """An async run at version 0; ``@pytest.mark.aggregator(name, **params)`` picks the aggregator
    (default FedAsync with alpha 0.6 and a staleness bound of 1000)."""
    marker = request.node.get_closest_marker("aggregator")
    name, params = ("fedasync", {"max_staleness": 1000})
    if marker:
        name, params = marker.args[0], dict(marker.kwargs)
    settings = make_settings("async", aggregator=name, aggregator_params=params)
    run = Run(MemoryStore(settings), settings, run_id="run-a")
    run.start_async()
    return run
