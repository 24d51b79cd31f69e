"""``fedstream local --serve``: the embedded AWS, the handlers and the state machine, with no clients.

It creates the resources a deployment has, runs the stream and finalize handlers behind their
pollers, and writes what a deployment's operator and sites get: ``outputs.json`` (the stack's outputs,
as ``cdk deploy --outputs-file`` writes them, plus ``EndpointUrl``) and ``clients/<id>.json`` (each
site's ``fedstream client --config``). Runs are then started, watched and stopped with ``fedstream
run ... --outputs outputs.json``, and clients run in other terminals; the AWS CLI or boto3 pointed at
the endpoint sees the same resources. It serves until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading

from fedstream.local.embedded import REGION, EmbeddedAWS, create_resources
from fedstream.local.run import (
    NO_TARGET,
    LocalRunConfig,
    _environment,
    _forget_store,
    _log_stream,
    _pollers,
    _quiet_loggers,
    _termination_interrupts,
    handler_settings,
)
from fedstream.registry import default_registry
from fedstream.server.store import store_for
from fedstream.settings import HandlerSettings

STACK_NAME = "fedstream-local"


def client_output_name(client_id: str) -> str:
    """``site-1`` -> ``ClientSite1Config``, as the stack names its outputs."""
    parts = [p for p in client_id.replace(".", "-").replace("_", "-").split("-") if p]
    return "Client" + "".join(p[:1].upper() + p[1:] for p in parts) + "Config"


def serve_local(
    config: LocalRunConfig, ready: threading.Event | None = None, stop: threading.Event | None = None
) -> int:
    """Serve ``config``'s deployment (mode, aggregator, clients, and rounds and quorum as run
    defaults; its clients and run are not started) until Ctrl-C, or until ``stop`` is set;
    ``ready`` is set once the outputs are written."""
    registry = default_registry()
    client_ids = [f"site-{i + 1}" for i in range(config.clients)]
    min_clients = config.min_clients or config.clients
    aggregator = registry.create(
        config.aggregator, config.params, seed=config.seed, mode=config.mode, num_clients=config.clients
    )
    out = config.out
    (out / "clients").mkdir(parents=True, exist_ok=True)
    real_stdout = sys.stdout
    with contextlib.ExitStack() as stack:
        if not config.verbose:
            stack.enter_context(_quiet_loggers("moto", "werkzeug", "botocore", "urllib3"))
        stack.enter_context(_termination_interrupts())
        aws = stack.enter_context(EmbeddedAWS(log_path=None if config.verbose else out / "aws.log"))
        stack.enter_context(_log_stream(out / "logs.jsonl", verbose=config.verbose))
        resources = create_resources(aws, "fedstream-serve", client_ids, config.mode)
        settings = handler_settings(config, resources, client_ids)
        stack.enter_context(_environment(settings.to_env()))
        stack.callback(_forget_store, store_for(HandlerSettings.from_env()))
        for poller in _pollers(aws, resources, config.mode):
            poller.start()
            stack.callback(poller.stop)
        outputs: dict[str, str] = {
            "Mode": config.mode,
            "Aggregator": config.aggregator,
            "Region": REGION,
            "BucketName": resources.bucket,
            "UpdatesTableName": resources.updates_table,
            "RunTableName": resources.run_table,
            "TopicArn": resources.topic_arn,
            "EndpointUrl": aws.endpoint,
            "RunInputDefaults": json.dumps(
                {
                    "rounds": config.rounds,
                    "min_clients": min_clients,
                    "round_timeout": config.round_timeout,
                    "target_accuracy": config.target_accuracy or NO_TARGET,
                    "client_settings": aggregator.client_settings(None),
                },
                sort_keys=True,
            ),
        }
        if resources.state_machine_arn:
            outputs["StateMachineArn"] = resources.state_machine_arn
        for client_id in client_ids:
            client_config = {
                "client_id": client_id,
                "queue_url": resources.queue_urls[client_id],
                "bucket": resources.bucket,
                "updates_table": resources.updates_table,
                "region": REGION,
                "endpoint_url": aws.endpoint,
            }
            outputs[client_output_name(client_id)] = json.dumps(client_config)
            (out / "clients" / f"{client_id}.json").write_text(json.dumps(client_config, indent=2) + "\n")
        outputs_file = out / "outputs.json"
        outputs_file.write_text(json.dumps({STACK_NAME: outputs}, indent=2) + "\n")
        print(
            f"fedstream local --serve: {config.mode} · {config.aggregator} · {len(client_ids)} clients, "
            f"the embedded AWS at {aws.endpoint}\n"
            f"  outputs:  {outputs_file}\n"
            f"  a client: fedstream client --config {out / 'clients' / 'site-1.json'} --dataset digits\n"
            f"  a run:    fedstream run start --outputs {outputs_file} --dataset digits\n"
            f"            fedstream run watch RUN_ID --outputs {outputs_file}\n"
            "Ctrl-C stops it.",
            file=real_stdout,
            flush=True,
        )
        if ready is not None:
            ready.set()
        try:
            while not (stop is not None and stop.is_set()):
                threading.Event().wait(0.5)
        except KeyboardInterrupt:
            print("fedstream local --serve: stopped", file=sys.stderr, flush=True)
    return 0
