"""``fedstream client``: run one FL client against a deployed (or embedded) fedstream."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedstream.settings import ClientSettings


class SlowTrainer:
    """Wraps a trainer so each fit takes ``factor`` times as long plus ``delay`` seconds (a straggler).

    The wait ends early when ``stop`` is set (a client on a thread being stopped), so stopping a
    run never waits out a straggler's sleep.
    """

    def __init__(self, inner: Any, factor: float, delay: float = 0.0) -> None:
        self.inner, self.factor, self.delay = inner, factor, delay
        self.stop = threading.Event()

    def initial_weights(self) -> Any:
        return self.inner.initial_weights()

    def evaluate(self, weights: Any) -> dict[str, float]:
        return self.inner.evaluate(weights)

    def fit(self, weights: Any, settings: Mapping[str, Any]) -> Any:
        started = time.monotonic()
        result = self.inner.fit(weights, settings)
        self.stop.wait(max(0.0, (self.factor - 1.0) * (time.monotonic() - started)) + self.delay)
        return result


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "client",
        help="run an FL client: poll the queue, train locally, upload updates",
        description="Run one federated-learning client. Settings come from --config (the stack's "
        "outputs as JSON) or the individual flags; credentials from the standard AWS chain.",
    )
    parser.add_argument("--config", type=Path, help="JSON file with the ClientSettings fields")
    parser.add_argument("--client-id")
    parser.add_argument("--queue-url")
    parser.add_argument("--bucket")
    parser.add_argument("--updates-table")
    parser.add_argument("--region")
    parser.add_argument("--endpoint-url", help="an AWS endpoint override (the embedded AWS)")
    parser.add_argument("--trainer", default="keras", help="keras | numpy | module:function")
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--num-clients", type=int, default=1)
    parser.add_argument("--client-index", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--slowdown", type=float, default=1.0, help="train this many times slower")
    parser.add_argument("--delay", type=float, default=0.0, help="extra seconds after each local fit")
    parser.add_argument(
        "--visibility-timeout", type=int, help="seconds a received message stays hidden while training"
    )
    parser.add_argument(
        "--ack-timeout",
        dest="ack_timeout_seconds",
        type=float,
        help="async: seconds to wait for the server to consume an update before training again (300)",
    )
    parser.add_argument("--run-id", help="take part in this run only (default: the newest run on the queue)")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="do not exit when the run ends: wait for the next run and take part in it (a site's service)",
    )
    parser.add_argument("--max-idle", type=float, help="exit 3 after this many seconds without a message")
    parser.add_argument("--events", action="store_true", help="print one JSON line per step on stdout")
    parser.set_defaults(func=run_client)


def client_settings(args: argparse.Namespace) -> ClientSettings:
    fields: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
    for name in (
        "client_id",
        "queue_url",
        "bucket",
        "updates_table",
        "region",
        "endpoint_url",
        "visibility_timeout",
        "ack_timeout_seconds",
        "run_id",
    ):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    from fedstream.cli import CliError

    missing = [n for n in ("client_id", "queue_url", "bucket", "updates_table") if n not in fields]
    if missing:
        raise CliError(f"missing client settings: {', '.join(missing)} (use --config or the flags)")
    fields.pop("role_arn", None)
    return ClientSettings.model_validate(fields)


def run_client(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    from fedstream.client.runner import FederatedClient
    from fedstream.client.trainers import build_trainer

    settings = client_settings(args)
    if args.follow and settings.run_id is not None:
        from fedstream.cli import CliError

        raise CliError(f"--follow takes part in every run; this client is set to run {settings.run_id} only")
    trainer: Any = build_trainer(
        args.trainer,
        args.dataset,
        args.partition,
        args.num_clients,
        args.client_index,
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
    )
    if args.slowdown > 1.0 or args.delay > 0:
        trainer = SlowTrainer(trainer, args.slowdown, args.delay)

    def on_event(event: str, fields: dict[str, Any]) -> None:
        if args.events:
            line = {"event": event, "client_id": settings.client_id, "at": time.time(), **fields}
            print(json.dumps(line), flush=True)

    client = FederatedClient(settings, trainer, on_event=on_event, follow=args.follow)
    client.install_signal_handlers()
    return client.run(max_idle_seconds=args.max_idle)
