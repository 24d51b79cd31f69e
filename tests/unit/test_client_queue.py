"""The client's queue loop against the embedded AWS: a backlog of versions is read to the end, and
in async mode a client has one update in flight at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fedstream.client.runner import FederatedClient
from fedstream.client.trainers import InstantTrainer

from fedstream import keys
from fedstream.local.embedded import EmbeddedAWS, create_resources
from fedstream.schemas import ModelReady, TrainingComplete
from fedstream.settings import ClientSettings
from fedstream.weights import encode, sha256_hex


def test_a_client_behind_by_25_versions_trains_once_on_the_newest() -> None:
    with EmbeddedAWS() as aws:
        # GIVEN 25 published versions waiting on the client's queue (async mode publishes often)
        resources = create_resources(aws, "backlog", ["site-1"], mode="async")
        s3, sqs = aws.client("s3"), aws.client("sqs")
        queue = resources.queue_urls["site-1"]
        for version in range(25):
            data = encode({"dense/kernel": np.full(10, version, dtype=np.float32)})
            key = keys.global_key("run-b", version)
            s3.put_object(Bucket=resources.bucket, Key=key, Body=data)
            message = ModelReady(run_id="run-b", version=version, object_key=key, sha256=sha256_hex(data))
            sqs.send_message(QueueUrl=queue, MessageBody=message.model_dump_json())
        settings = ClientSettings(
            client_id="site-1",
            queue_url=queue,
            bucket=resources.bucket,
            updates_table=resources.updates_table,
            endpoint_url=aws.endpoint,
            wait_seconds=1,
        )
        client = FederatedClient(settings, InstantTrainer(10), session=aws.session())
        loop = threading.Thread(target=client.run, daemon=True)

        # WHEN it starts, and the run ends once it has reported
        loop.start()
        deadline = time.monotonic() + 30
        while client.stats.trained == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        sqs.send_message(QueueUrl=queue, MessageBody=TrainingComplete(run_id="run-b").model_dump_json())
        loop.join(timeout=30)

        # THEN it trained once, on version 24, skipped the 24 older ones, and left the queue empty
        assert not loop.is_alive()
        assert (client.stats.trained, client.stats.skipped, client.stats.last_version) == (1, 24, 24)
        records = aws.client("dynamodb").scan(TableName=resources.updates_table)["Items"]
        assert [int(r["base_version"]["N"]) for r in records] == [24]
        attributes = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
        assert attributes["ApproximateNumberOfMessages"] == "0"
        assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


@dataclass
class QueueWorld:
    aws: EmbeddedAWS
    bucket: str
    queue: str
    updates_table: str

    def publish(
        self, version: int, consumed: tuple[str, ...] = (), run_id: str = "run-f", round: int | None = None
    ) -> None:
        data = encode({"dense/kernel": np.full(10, version, dtype=np.float32)})
        key = keys.global_key(run_id, version)
        self.aws.client("s3").put_object(Bucket=self.bucket, Key=key, Body=data)
        message = ModelReady(
            run_id=run_id,
            version=version,
            round=round,
            object_key=key,
            sha256=sha256_hex(data),
            consumed=list(consumed),
        )
        self.aws.client("sqs").send_message(QueueUrl=self.queue, MessageBody=message.model_dump_json())

    def complete(self, run_id: str = "run-f", reason: str = "done") -> None:
        body = TrainingComplete(run_id=run_id, reason=reason).model_dump_json()
        self.aws.client("sqs").send_message(QueueUrl=self.queue, MessageBody=body)

    def queue_counts(self) -> tuple[int, int]:
        attributes = self.aws.client("sqs").get_queue_attributes(QueueUrl=self.queue, AttributeNames=["All"])
        values = attributes["Attributes"]
        hidden = values["ApproximateNumberOfMessagesNotVisible"]
        return int(values["ApproximateNumberOfMessages"]), int(hidden)

    def reported_versions(self) -> list[int]:
        return [version for _, version in self.reported()]

    def reported(self) -> list[tuple[str, int]]:
        """(run, base version) of every update record, in order."""
        records = self.aws.client("dynamodb").scan(TableName=self.updates_table)["Items"]
        return sorted((r["run_id"]["S"], int(r["base_version"]["N"])) for r in records)


@pytest.fixture
def queue_world() -> Iterator[QueueWorld]:
    with EmbeddedAWS() as aws:
        resources = create_resources(aws, "flight", ["site-1"], mode="async")
        yield QueueWorld(aws, resources.bucket, resources.queue_urls["site-1"], resources.updates_table)


def start_client(
    world: QueueWorld, trainer: Any = None, follow: bool = False, **settings: Any
) -> tuple[FederatedClient, threading.Thread]:
    client_settings = ClientSettings(
        client_id="site-1",
        queue_url=world.queue,
        bucket=world.bucket,
        updates_table=world.updates_table,
        endpoint_url=world.aws.endpoint,
        wait_seconds=1,
        **settings,
    )
    client = FederatedClient(
        client_settings, trainer or InstantTrainer(10), session=world.aws.session(), follow=follow
    )
    loop = threading.Thread(target=client.run, daemon=True)
    loop.start()
    return client, loop


def wait_for(condition: Callable[[], bool], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def finish(world: QueueWorld, loop: threading.Thread) -> None:
    world.complete()
    loop.join(timeout=60)
    assert not loop.is_alive()


def test_an_async_client_trains_again_only_once_its_update_is_named_consumed(queue_world: QueueWorld) -> None:
    # GIVEN a client that trained on version 0
    world = queue_world
    world.publish(0)
    client, loop = start_client(world)
    wait_for(lambda: client.stats.trained == 1)

    # WHEN versions 1 and 2 arrive without naming its update
    world.publish(1)
    world.publish(2)

    # THEN it reads them, keeps only the newest (received, not deleted) and does not train
    wait_for(lambda: world.queue_counts() == (0, 1))
    assert client.stats.trained == 1 and client.in_flight is not None

    # WHEN version 3 names its update as consumed
    world.publish(3, consumed=("site-2#0", "site-1#0"))

    # THEN it trains on version 3, and only on it
    wait_for(lambda: client.stats.trained == 2)
    finish(world, loop)
    assert world.reported_versions() == [0, 3]
    assert client.stats.ack_timeouts == 0


class DivergingTrainer(InstantTrainer):
    """Training on version 0 diverges to NaN; later versions train normally."""

    def fit(self, weights: Any, settings: Any) -> Any:
        result = super().fit(weights, settings)
        if float(weights["dense/kernel"][0]) == 0.0:
            result.weights = {"dense/kernel": np.full_like(result.weights["dense/kernel"], np.nan)}
        return result


def test_a_client_whose_training_diverges_skips_that_version_and_serves_the_next(
    queue_world: QueueWorld,
) -> None:
    # GIVEN a global model (version 0) on which this client's training produces NaN weights
    world = queue_world
    world.publish(0)
    client, loop = start_client(world, DivergingTrainer(10))

    # THEN it reports nothing for version 0, deletes its message, and stays up
    wait_for(lambda: client.stats.failed_steps == 1 and world.queue_counts() == (0, 0))
    assert loop.is_alive() and client.stats.trained == 0

    # AND when version 1 comes it trains and reports as usual
    world.publish(1)
    wait_for(lambda: client.stats.trained == 1)
    finish(world, loop)
    assert world.reported_versions() == [1]


def test_an_async_client_whose_release_never_comes_trains_again_after_the_ack_timeout(
    queue_world: QueueWorld,
) -> None:
    # GIVEN a client that trained on version 0, and a server message naming it that was lost
    world = queue_world
    world.publish(0)
    client, loop = start_client(world, ack_timeout_seconds=2.0)
    wait_for(lambda: client.stats.trained == 1)

    # WHEN version 1 arrives without naming its update, and nothing else comes
    world.publish(1)

    # THEN after the ack timeout it trains on version 1 anyway
    wait_for(lambda: client.stats.trained == 2)
    finish(world, loop)
    assert world.reported_versions() == [0, 1]
    assert client.stats.ack_timeouts == 1


def test_a_following_client_takes_part_in_each_run_in_turn(queue_world: QueueWorld) -> None:
    # GIVEN a following client (a site's service) that trained in run A
    world = queue_world
    world.publish(3, run_id="run-a")
    client, loop = start_client(world, follow=True)
    wait_for(lambda: client.stats.trained == 1)

    # WHEN run A ends
    world.complete("run-a")

    # THEN the client stays up with its queue empty
    wait_for(lambda: world.queue_counts() == (0, 0) and client.run_id is None)
    assert loop.is_alive()

    # AND when the operator starts run B, it takes part from B's version 0 (below A's last version)
    world.publish(0, run_id="run-b")
    wait_for(lambda: client.stats.trained == 2)
    assert world.reported() == [("run-a", 3), ("run-b", 0)]
    assert (client.stats.runs, client.run_id) == (2, "run-b")
    client.stop.set()
    loop.join(timeout=60)
    assert not loop.is_alive()


@pytest.mark.parametrize("follow", [True, False], ids=["following", "one-run"])
def test_a_sync_run_stopped_without_telling_clients_holds_only_a_client_that_does_not_follow(
    queue_world: QueueWorld, follow: bool
) -> None:
    # GIVEN a client that trained in round 1 of sync run A, which the operator then stopped (a sync
    # stack's topic admits only the state machine: the clients are not told)
    world = queue_world
    world.publish(0, run_id="run-a", round=1)
    client, loop = start_client(world, follow=follow)
    wait_for(lambda: client.stats.trained == 1)

    # WHEN the operator starts run B
    world.publish(0, run_id="run-b", round=1)

    # THEN a following client moves to B and trains in it; a one-run client keeps waiting for A
    # and deletes B's message as not its run's
    if follow:
        wait_for(lambda: client.stats.trained == 2)
        assert world.reported() == [("run-a", 0), ("run-b", 0)] and client.run_id == "run-b"
        client.stop.set()
    else:
        wait_for(lambda: world.queue_counts() == (0, 0) and client.stats.skipped == 1)
        assert world.reported() == [("run-a", 0)] and client.run_id == "run-a"
        world.complete("run-a")
    loop.join(timeout=60)
    assert not loop.is_alive()


def test_a_new_client_takes_part_in_the_newest_run_on_its_queue_not_a_left_over_one(
    queue_world: QueueWorld,
) -> None:
    # GIVEN a queue holding version 7 of an old run, then version 0 of the run the operator started
    world = queue_world
    world.publish(7, run_id="run-old")
    time.sleep(0.01)  # SQS dates messages to the millisecond
    world.publish(0, run_id="run-new")

    # WHEN a client starts
    client, loop = start_client(world)

    # THEN it trains in the new run, though the left-over version is higher, and drops the left-over
    wait_for(lambda: client.stats.trained == 1 and world.queue_counts() == (0, 0))
    assert world.reported() == [("run-new", 0)] and client.stats.skipped == 1
    world.complete("run-new")
    loop.join(timeout=60)
    assert not loop.is_alive()
