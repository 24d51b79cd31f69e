"""The client's queue loop against the embedded AWS: a backlog of versions is read to the end."""

from __future__ import annotations

import threading
import time

import numpy as np

from client.runner import FederatedClient
from client.trainer import InstantTrainer
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
