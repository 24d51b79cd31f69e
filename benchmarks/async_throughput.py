"""How fast the async stream handler drains a backlog on the embedded AWS, with no client running.

``--records`` updates (one per client, all trained from version 0, a ``--params``-float32 model)
are uploaded and recorded as clients would, before the stream poller starts (every new version is
announced to ``--queues`` client queues: the embedded AWS's SNS delivers to each in turn, which
costs it about as much as the rest of a batch at a few hundred queues); then the local
runtime's stream poller hands them to ``fedstream.handlers.async_update`` in batches of ``--batch`` and the
script times how long the handler takes to consume them all (FedAsync, ``max_staleness`` above the
backlog so that every update is applied). It prints records per second, counting the handler's
invocations only and counting the whole drain, and the AWS requests per record.

    .venv/bin/python benchmarks/async_throughput.py                 # 300 records, batches of 10
    .venv/bin/python benchmarks/async_throughput.py --batch 50

It uses only interfaces older than the batched handler (``create_resources``, ``start_run``,
``StreamPoller``, the handler module), so the same file measures an earlier commit too: check that
commit out in a worktree and run this file with ``PYTHONPATH`` set to the worktree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import numpy as np
from botocore.client import BaseClient

from fedstream import keys
from fedstream.local.embedded import EmbeddedAWS, aws_environment, create_resources
from fedstream.local.pollers import StreamPoller
from fedstream.schemas import UpdateRecord
from fedstream.settings import HandlerSettings
from fedstream.weights import encode, sha256_hex


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--batch", type=int, default=10, help="records per handler invocation at most")
    parser.add_argument("--params", type=int, default=1000, help="float32 parameters of the model")
    parser.add_argument("--queues", type=int, default=10, help="client queues subscribed to the topic")
    args = parser.parse_args()
    for noisy in ("moto", "werkzeug", "botocore", "urllib3", "fedstream"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)

    with EmbeddedAWS() as aws:
        os.environ.update(aws_environment(aws.endpoint, aws.port))
        clients = [f"site-{n}" for n in range(args.records)]
        resources = create_resources(aws, f"bench-{uuid.uuid4().hex[:6]}", clients[: args.queues], "async")
        settings = HandlerSettings(
            mode="async",
            bucket=resources.bucket,
            run_table=resources.run_table,
            updates_table=resources.updates_table,
            topic_arn=resources.topic_arn,
            aggregator="fedasync",
            aggregator_params={"max_staleness": args.records + 1},
            client_ids=tuple(clients),
        )
        os.environ.update(settings.to_env())
        from fedstream.handlers import async_update

        from fedstream.server.asynchronous import start_run
        from fedstream.server.store import Store, store_for

        run_id = "run-bench"
        rng = np.random.default_rng(0)
        base = {"dense/kernel": rng.normal(size=args.params).astype(np.float32)}
        start_run(Store(settings, aws.session()), run_id, encode(base, {"run_id": run_id, "version": "0"}))
        s3, table = aws.client("s3"), Store(settings, aws.session()).updates
        for client in clients:
            data = encode(
                {
                    "dense/kernel": (base["dense/kernel"] + rng.normal(size=args.params) * 0.01).astype(
                        np.float32
                    )
                }
            )
            key = keys.update_key(run_id, client, 0, uuid.uuid4().hex[:8])
            s3.put_object(Bucket=resources.bucket, Key=key, Body=data)
            record = UpdateRecord.create(
                client_id=client,
                run_id=run_id,
                base_version=0,
                object_key=key,
                sha256=sha256_hex(data),
                num_examples=10,
            )
            table.put_item(Item=json.loads(record.model_dump_json(exclude_none=True), parse_float=Decimal))

        requests: Counter[str] = Counter()
        busy = [0.0]
        original_call, original_handler = BaseClient._make_api_call, async_update.lambda_handler

        def counted(client: Any, operation: str, params: Any) -> Any:
            requests[f"{client.meta.service_model.service_name} {operation}"] += 1
            return original_call(client, operation, params)

        def timed(event: dict[str, Any], context: Any) -> Any:
            began = time.perf_counter()
            try:
                return original_handler(event, context)
            finally:
                busy[0] += time.perf_counter() - began

        store_for(HandlerSettings.from_env())  # clients made before timing starts
        poller = StreamPoller(
            aws.client("dynamodbstreams"), resources.stream_arn, timed, "async-stream", batch_size=args.batch
        )
        BaseClient._make_api_call = counted
        # The handler's JSON logs go to stdout; they are not what this script prints.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            started = time.perf_counter()
            poller.start()
            try:
                while poller.delivered < args.records and time.perf_counter() - started < 600:
                    time.sleep(0.01)
                drained = time.perf_counter() - started
            finally:
                poller.stop()
                BaseClient._make_api_call = original_call
        handler_requests = (
            sum(requests.values())
            - requests["dynamodbstreams GetRecords"]
            - requests["dynamodbstreams DescribeStream"]
            - requests["dynamodbstreams GetShardIterator"]
        )
        state = Store(settings, aws.session()).run_state(run_id) or {}
    print(
        f"{poller.delivered} records in {poller.invocations} invocations (batches of at most {args.batch}), "
        f"{args.params:,}-parameter model, {args.queues} client queues; state: applied "
        f"{state.get('applied')}, rejected {state.get('rejected')}, version {state.get('version')}"
    )
    print(f"records/s, handler invocations only: {poller.delivered / busy[0]:.1f} ({busy[0]:.1f} s)")
    print(f"records/s, whole drain (with the poller):  {poller.delivered / drained:.1f} ({drained:.1f} s)")
    print(f"AWS requests per record (handler): {handler_requests / max(poller.delivered, 1):.2f}")
    for name, count in requests.most_common():
        print(f"  {name}: {count}")


if __name__ == "__main__":
    main()
