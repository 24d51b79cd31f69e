"""A sync world on one moto server: resources, a run with an open round, and sample events."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from boto3.dynamodb.types import TypeSerializer

from fedstream import keys
from fedstream.local.embedded import EmbeddedAWS, Resources, aws_environment, create_resources
from fedstream.schemas import UpdateRecord
from fedstream.server.store import Store
from fedstream.settings import HandlerSettings
from fedstream.weights import encode, sha256_hex

CLIENTS = ("site-1", "site-2", "site-3")
_serializer = TypeSerializer()


@pytest.fixture(scope="session")
def aws() -> Iterator[EmbeddedAWS]:
    server = EmbeddedAWS()
    server.start()
    yield server
    server.stop()


def global_weights(rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    return {
        "dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias": np.zeros(3, dtype=np.float32),
    }


@dataclass
class SyncWorld:
    aws: EmbeddedAWS
    resources: Resources
    settings: HandlerSettings
    run_id: str
    base: dict[str, np.ndarray]

    def put_object(self, key: str, data: bytes) -> None:
        self.aws.client("s3").put_object(Bucket=self.resources.bucket, Key=key, Body=data)

    def upload(
        self, client_id: str, weights: dict[str, np.ndarray] | bytes, *, version: int = 0
    ) -> tuple[str, str]:
        nonce = uuid.uuid4().hex[:8]
        # Each upload is a new object, as a client's training makes one (its own sha256).
        data = weights if isinstance(weights, bytes) else encode(weights, {"upload": nonce})
        key = keys.update_key(self.run_id, client_id, version, nonce)
        self.put_object(key, data)
        return key, sha256_hex(data)

    def record(
        self,
        client_id: str,
        weights: Any,
        *,
        num_examples: int = 10,
        round: int = 1,
        version: int = 0,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Upload an update and put its record, as a client would; returns the record item."""
        key, sha = self.upload(client_id, weights, version=version)
        fields = dict(
            client_id=client_id,
            run_id=self.run_id,
            base_version=version,
            round=round,
            object_key=key,
            sha256=sha,
            num_examples=num_examples,
            task_token="token-round-1",
            metrics={"train_loss": 1.0, "eval_accuracy": 0.5},
        )
        fields.update(overrides)
        item = json.loads(UpdateRecord.create(**fields).model_dump_json(exclude_none=True))
        self.store_record(item)
        return item

    def store_record(self, item: dict[str, Any]) -> None:
        self.store.updates.put_item(Item=json.loads(json.dumps(item), parse_float=Decimal))

    @functools.cached_property
    def store(self) -> Store:
        return Store(self.settings, self.aws.session())

    def round_item(self, round_number: int = 1) -> dict[str, Any]:
        return self.store.round_item(self.run_id, round_number) or {}

    def run_state(self) -> dict[str, Any]:
        return self.store.run_state(self.run_id) or {}


def stream_event(*items: dict[str, Any]) -> dict[str, Any]:
    """A Lambda DynamoDB-stream event with one INSERT per item (typed NewImage, as Lambda sends)."""
    records = []
    for n, item in enumerate(items):
        typed = json.loads(json.dumps(item), parse_float=Decimal)
        image = {k: _serializer.serialize(v) for k, v in typed.items()}
        records.append(
            {
                "eventID": f"e{n}-{uuid.uuid4().hex[:6]}",
                "eventName": "INSERT",
                "eventSource": "aws:dynamodb",
                "awsRegion": "us-east-1",
                "dynamodb": {
                    "Keys": {k: image[k] for k in ("client_id", "update_id") if k in image},
                    "NewImage": image,
                    "SequenceNumber": str(1000 + n),
                    "StreamViewType": "NEW_IMAGE",
                },
                "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/x",
            }
        )
    return {"Records": records}


class FakeContext:
    function_name = "aggregate"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:aggregate"
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def _deployment(
    aws: EmbeddedAWS, monkeypatch: pytest.MonkeyPatch, **settings_fields: Any
) -> tuple[Resources, HandlerSettings]:
    """Fresh resources (no state machine: the tests play its part) and the handlers' environment."""
    for name, value in aws_environment(aws.endpoint, aws.port).items():
        monkeypatch.setenv(name, value)
    resources = create_resources(aws, f"t{uuid.uuid4().hex[:8]}", list(CLIENTS), mode="async")
    settings = HandlerSettings(
        bucket=resources.bucket,
        run_table=resources.run_table,
        updates_table=resources.updates_table,
        topic_arn=resources.topic_arn,
        client_ids=CLIENTS,
        seed=1,
        **settings_fields,
    )
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    return resources, settings


@pytest.fixture
def world(aws: EmbeddedAWS, monkeypatch: pytest.MonkeyPatch) -> SyncWorld:
    resources, settings = _deployment(aws, monkeypatch, mode="sync", aggregator="fedavg", min_clients=2)
    run_id = "run-1"
    base = global_weights()
    data = encode(base, {"run_id": run_id, "version": "0"})
    aws.client("s3").put_object(Bucket=resources.bucket, Key=keys.global_key(run_id, 0), Body=data)
    ddb = aws.client("dynamodb")
    ddb.put_item(
        TableName=resources.run_table,
        Item={
            "run_id": {"S": run_id},
            "sk": {"S": "state"},
            "mode": {"S": "sync"},
            "status": {"S": "RUNNING"},
            "version": {"N": "0"},
            "global_key": {"S": keys.global_key(run_id, 0)},
            "global_sha256": {"S": sha256_hex(data)},
            "round": {"N": "0"},
        },
    )
    ddb.put_item(
        TableName=resources.run_table,
        Item={
            "run_id": {"S": run_id},
            "sk": {"S": "round#1"},
            "round": {"N": "1"},
            "version": {"N": "0"},
            "status": {"S": "open"},
            "reported_count": {"N": "0"},
            "min_clients": {"N": "2"},
            "opened_at": {"S": "2026-01-01T00:00:00+00:00"},
            # what the finalize function recorded from the topic
            "task_token": {"S": "token-round-1"},
        },
    )
    return SyncWorld(aws, resources, settings, run_id, base)


@pytest.fixture
def async_world(
    aws: EmbeddedAWS, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> SyncWorld:
    """An async run at version 0; ``@pytest.mark.aggregator(name, **params)`` picks the aggregator."""
    from fedstream.server.asynchronous import start_run

    marker = request.node.get_closest_marker("aggregator")
    name, params = ("fedasync", {"max_staleness": 1000})
    if marker:
        name, params = marker.args[0], dict(marker.kwargs)
    resources, settings = _deployment(
        aws, monkeypatch, mode="async", aggregator=name, aggregator_params=params
    )
    world = SyncWorld(aws, resources, settings, "run-a", global_weights())
    start_run(world.store, world.run_id, encode(world.base, {"run_id": world.run_id, "version": "0"}))
    return world
