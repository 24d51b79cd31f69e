"""``fedstream run``: start, watch, stop and list the runs of a deployment.

The same commands work against a stack on AWS and against ``fedstream local --serve``. They find the
deployment from the stack's CloudFormation outputs (``--stack NAME``) or from an outputs file
(``--outputs FILE``: what ``cdk deploy --outputs-file`` writes, or what ``fedstream local --serve``
writes). Credentials come from the standard AWS chain; the embedded AWS takes any.

- ``run start``: makes the initial model (``--model FILE``, or version 0 of ``--trainer`` for
  ``--dataset``), uploads it and starts the run: a sync execution of the state machine, or an async
  run with its limits. It prints the run id.
- ``run status RUN_ID`` / ``run watch RUN_ID``: rounds (sync) or versions (async), the clients'
  reported metrics, rejections by reason and staleness (async), from the run table.
- ``run stop RUN_ID``: ends the run (sync: stops the execution), marks it ``STOPPED`` and tells
  the clients training is complete.
- ``run list``: every run of the deployment, newest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedstream.cli import CliError

LOCAL_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@dataclass(frozen=True)
class Deployment:
    """What the commands need of a deployment: its stack outputs."""

    mode: str
    aggregator: str
    region: str
    bucket: str
    run_table: str
    updates_table: str
    topic_arn: str
    state_machine_arn: str | None = None
    run_defaults: dict[str, Any] = field(default_factory=dict)
    endpoint_url: str | None = None  # the embedded AWS of `fedstream local --serve`
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_outputs(cls, outputs: dict[str, str]) -> Deployment:
        missing = [
            name
            for name in ("Mode", "Aggregator", "BucketName", "RunTableName", "UpdatesTableName", "TopicArn")
            if name not in outputs
        ]
        if missing:
            raise CliError(f"the stack outputs lack {', '.join(missing)}: not a fedstream stack?")
        clients = {}
        for name, value in outputs.items():
            if name.startswith("Client") and name.endswith("Config"):
                config = json.loads(value)
                clients[str(config["client_id"])] = config
        return cls(
            mode=outputs["Mode"],
            aggregator=outputs["Aggregator"],
            region=outputs.get("Region", "us-east-1"),
            bucket=outputs["BucketName"],
            run_table=outputs["RunTableName"],
            updates_table=outputs["UpdatesTableName"],
            topic_arn=outputs["TopicArn"],
            state_machine_arn=outputs.get("StateMachineArn"),
            run_defaults=json.loads(outputs.get("RunInputDefaults") or "{}"),
            endpoint_url=outputs.get("EndpointUrl"),
            clients=clients,
        )

    def session(self) -> Any:
        """The operator's credentials (placeholders for the embedded AWS, as a client gets)."""
        from fedstream.client.runner import default_session

        return default_session(self.region, self.endpoint_url)

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint_url)

    def store(self) -> Any:
        """The server's own :class:`~fedstream.server.store.Store` on this deployment."""
        from fedstream.server.store import Store
        from fedstream.settings import HandlerSettings

        if self.endpoint_url:
            os.environ["FEDSTREAM_ENDPOINT_URL"] = self.endpoint_url
        settings = HandlerSettings(
            mode=self.mode,  # type: ignore[arg-type]
            bucket=self.bucket,
            run_table=self.run_table,
            updates_table=self.updates_table,
            topic_arn=self.topic_arn,
            aggregator=self.aggregator,
            client_ids=tuple(self.clients),
        )
        return Store(settings, self.session())


def load_outputs(path: Path) -> dict[str, str]:
    """A stack's outputs from a file: ``cdk deploy --outputs-file`` (``{stack: {key: value}}``) or flat."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"--outputs {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"--outputs {path}: not JSON ({exc})") from None
    if isinstance(data, dict) and "Mode" not in data and len(data) == 1:
        data = next(iter(data.values()))
    if not isinstance(data, dict):
        raise CliError(f"--outputs {path}: expected the stack's outputs as a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def stack_outputs(stack: str, region: str | None) -> dict[str, str]:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        [description] = (
            boto3.Session(region_name=region)
            .client("cloudformation")
            .describe_stacks(StackName=stack)["Stacks"]
        )
    except (ClientError, BotoCoreError) as exc:
        raise CliError(f"--stack {stack}: {exc}") from None
    return {o["OutputKey"]: o["OutputValue"] for o in description.get("Outputs", [])}


def deployment(args: argparse.Namespace) -> Deployment:
    if args.outputs is not None:
        return Deployment.from_outputs(load_outputs(args.outputs))
    if args.stack:
        return Deployment.from_outputs(stack_outputs(args.stack, args.region))
    raise CliError("name the deployment: --outputs FILE (cdk deploy --outputs-file) or --stack NAME")


# ---- the commands -------------------------------------------------------------------------------
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="start, watch, stop and list the runs of a deployment")
    commands = run.add_subparsers(dest="run_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, description=help)
        where = parser.add_mutually_exclusive_group()
        where.add_argument(
            "--outputs", type=Path, help="the stack's outputs file (cdk deploy --outputs-file)"
        )
        where.add_argument("--stack", help="the stack's name, to read its outputs from CloudFormation")
        parser.add_argument("--region", help="the stack's region (with --stack; default: the AWS chain's)")
        return parser

    start = command("start", "upload the initial model and start a run")
    model = start.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, help="the initial model, a .safetensors file")
    model.add_argument(
        "--trainer", default="keras", help="make version 0 of this trainer's model (default keras)"
    )
    start.add_argument("--dataset", help="the dataset the clients train on (with --trainer)")
    start.add_argument("--seed", type=int, default=0, help="seed of the initial model (default 0)")
    start.add_argument("--run-id", help="the run's id (default: run-YYYYmmdd-HHMMSS-xxxxxx)")
    start.add_argument("--rounds", type=int, help="sync: at most this many rounds (default: the stack's)")
    start.add_argument("--min-clients", type=int, help="sync: quorum to close a round at its deadline")
    start.add_argument("--round-timeout", type=int, help="sync: round deadline in seconds")
    start.add_argument(
        "--target-accuracy", type=float, help="stop once the clients report this eval accuracy"
    )
    start.add_argument("--updates", type=int, default=0, help="async: stop after this many applied updates")
    start.add_argument("--max-seconds", type=float, default=0.0, help="async: wall-clock limit (0: none)")
    start.set_defaults(func=start_command)

    status = command("status", "a run's state: rounds or versions, metrics, rejections")
    status.add_argument("run_id")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=status_command)

    watch = command("watch", "follow a run until it ends: a line per round or version")
    watch.add_argument("run_id")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between reads (default 2)")
    watch.add_argument(
        "--test-dataset",
        help="score each version on this dataset's held-out test set (needs the client extra)",
    )
    watch.add_argument(
        "--trainer", default="keras", help="with --test-dataset: keras or numpy (default keras)"
    )
    watch.set_defaults(func=watch_command)

    stop = command("stop", "end a run now, and tell the clients where the topic lets the operator publish")
    stop.add_argument("run_id")
    stop.set_defaults(func=stop_command)

    listing = command("list", "every run of the deployment, newest first")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=list_command)


def initial_model(args: argparse.Namespace) -> bytes:
    if args.model is not None:
        from fedstream.weights import WireFormatError, decode

        try:
            data = args.model.read_bytes()
            decode(data)
        except OSError as exc:
            raise CliError(f"--model {args.model}: {exc.strerror or exc}") from None
        except WireFormatError as exc:
            raise CliError(f"--model {args.model}: not a fedstream model: {exc}") from None
        return data
    if not args.dataset:
        raise CliError("--dataset is needed to make the initial model (or give --model FILE)")
    from fedstream.client.model_files import build_initial

    return build_initial(args.trainer, args.dataset, args.seed)


def start_command(args: argparse.Namespace) -> int:
    from fedstream import keys
    from fedstream.weights import sha256_hex

    where = deployment(args)
    for option, value in (("--rounds", args.rounds), ("--min-clients", args.min_clients)):
        if value is not None and value < 1:
            raise CliError(f"{option} must be at least 1, got {value}")
    if args.updates < 0 or args.max_seconds < 0:
        raise CliError("--updates and --max-seconds must be 0 (no limit) or more")
    data = initial_model(args)
    run_id = args.run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    store = where.store()
    if where.mode == "sync":
        if not where.state_machine_arn:
            raise CliError("the stack outputs have no StateMachineArn: is it a sync deployment?")
        key = keys.global_key(run_id, 0)
        store.put_once(key, data)
        run_input = {
            **where.run_defaults,
            "run_id": run_id,
            "version": 0,
            "object_key": key,
            "sha256": sha256_hex(data),
        }
        for name, value in (
            ("rounds", args.rounds),
            ("min_clients", args.min_clients),
            ("round_timeout", args.round_timeout),
            ("target_accuracy", args.target_accuracy),
        ):
            if value is not None:
                run_input[name] = value
        where.client("stepfunctions").start_execution(
            stateMachineArn=where.state_machine_arn, name=run_id, input=json.dumps(run_input)
        )
    else:
        from fedstream.server import asynchronous

        if store.run_state(run_id) is not None:
            raise CliError(f"--run-id {run_id}: that run exists already")
        asynchronous.start_run(
            store,
            run_id,
            data,
            client_settings=where.run_defaults.get("client_settings") or {},
            max_updates=args.updates,
            target_accuracy=args.target_accuracy,
            max_seconds=args.max_seconds,
        )
    print(run_id)
    return 0


def run_status(where: Deployment, run_id: str) -> dict[str, Any]:
    """What a user sees of a run: its state, each round or version with the clients' metrics."""
    store = where.store()
    state = store.run_state(run_id)
    if state is None:
        raise CliError(f"no run {run_id!r} in this deployment (`fedstream run list`)")
    status: dict[str, Any] = {
        "run_id": run_id,
        "mode": state.get("mode"),
        "status": state.get("status"),
        "version": int(state.get("version", 0)),
        "started_at": state.get("started_at"),
        "finished_at": state.get("finished_at"),
        "finish_reason": state.get("finish_reason") or recorded_failure(state.get("failure")),
    }
    if state.get("mode") == "sync":
        rounds = []
        for item in sorted(store.run_items_with_prefix(run_id, "round#"), key=lambda i: int(i["round"])):
            entry: dict[str, Any] = {"round": int(item["round"]), "status": item.get("status")}
            if item.get("result"):
                result = json.loads(item["result"])
                entry |= {
                    "version": result.get("version"),
                    "clients": len(result.get("clients", [])),
                    "at_deadline": bool(result.get("at_deadline")),
                    "metrics": result.get("metrics", {}),
                }
            else:
                entry["reported"] = int(item.get("reported_count", 0))
            rounds.append(entry)
        status["rounds"] = rounds
        return status
    from fedstream.local.async_stats import from_markers, percentiles

    markers = from_markers(store.run_items_with_prefix(run_id, "update#"))
    rejected: dict[str, int] = {}
    for marker in markers:
        if marker.outcome.startswith("rejected:"):
            reason = marker.outcome.split(":", 1)[1]
            rejected[reason] = rejected.get(reason, 0) + 1
    staleness = percentiles([float(m.staleness) for m in markers if m.taken and m.staleness is not None])
    versions = []
    for item in sorted(
        store.run_items_with_prefix(run_id, "version#"), key=lambda i: int(i["sk"].split("#")[1])
    ):
        if "committed_at" in item:
            versions.append(
                {
                    "version": int(item["sk"].split("#")[1]),
                    "applied": len(item.get("applied", [])),
                    "committed_at": float(item["committed_at"]),
                    "key": item.get("key"),
                    "metrics": json.loads(item.get("metrics") or "{}"),
                }
            )
    status |= {
        "counts": {name: int(state.get(name, 0)) for name in ("received", "applied", "rejected", "buffered")},
        "rejected_by_reason": rejected,
        "staleness": {"p50": staleness["p50"], "max": staleness["max"]},
        "versions": versions,
    }
    return status


def recorded_failure(recorded: str | None) -> str | None:
    """The state machine's record of a failed task (``{"Error": ..., "Cause": ...}``), in one line."""
    if not recorded:
        return None
    try:
        failure = json.loads(recorded)
    except ValueError:
        return recorded
    if isinstance(failure, dict):
        return f"{failure.get('Error')}: {failure.get('Cause')}"
    return str(failure)


def _accuracy(metrics: dict[str, Any]) -> str:
    value = metrics.get("eval_accuracy")
    return "-" if value is None else f"{float(value):.4f}"


def entry_line(mode: str, entry: dict[str, Any]) -> str:
    """One round or version of a run, as ``status`` and ``watch`` print it."""
    if mode == "sync":
        if "metrics" not in entry:
            return f"round {entry['round']}: {entry['status']}, {entry['reported']} reported"
        closed = "at deadline" if entry["at_deadline"] else "complete"
        return (
            f"round {entry['round']}: {entry['clients']} clients, version {entry['version']}, "
            f"client eval accuracy {_accuracy(entry['metrics'])} ({closed})"
        )
    return (
        f"version {entry['version']}: {entry['applied']} applied, "
        f"client eval accuracy {_accuracy(entry['metrics'])}"
    )


def timing_line(started_at: str | None, finished_at: str | None) -> str:
    """ "started 2026-12-02 17:25:03 UTC, finished 17:26:15 UTC (1 min 12 s)" from the run item's
    ISO 8601 times; "" when it has none."""
    from datetime import UTC, datetime

    def parse(text: str | None) -> datetime | None:
        try:
            return datetime.fromisoformat(str(text)).astimezone(UTC) if text else None
        except ValueError:
            return None

    started, finished = parse(started_at), parse(finished_at)
    if started is None:
        return ""
    line = f"started {started:%Y-%m-%d %H:%M:%S} UTC"
    if finished is not None:
        seconds = max(0, round((finished - started).total_seconds()))
        took = f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
        line += f", finished {finished:%Y-%m-%d %H:%M:%S} UTC ({took})"
    return line


def status_lines(status: dict[str, Any]) -> list[str]:
    head = f"{status['run_id']}: {status['mode']} {status['status']}, version {status['version']}"
    if status.get("finish_reason"):
        head += f" ({status['finish_reason']})"
    lines = [head]
    if when := timing_line(status.get("started_at"), status.get("finished_at")):
        lines.append("  " + when)
    if status["mode"] == "async":
        counts, staleness = status["counts"], status["staleness"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(status["rejected_by_reason"].items()))
        lines.append(
            f"  updates: {counts['received']} received, {counts['applied']} applied, "
            f"{counts['rejected']} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {counts['buffered']} buffered; staleness p50/max "
            + ("-" if staleness["p50"] is None else f"{staleness['p50']:g}/{staleness['max']:g}")
        )
    for entry in status.get("rounds", status.get("versions", [])):
        lines.append("  " + entry_line(status["mode"], entry))
    return lines


def status_command(args: argparse.Namespace) -> int:
    status = run_status(deployment(args), args.run_id)
    print(json.dumps(status, indent=2) if args.json else "\n".join(status_lines(status)))
    return 0


class _TestSet:
    """``run watch --test-dataset``: each new version scored on the dataset's held-out test set."""

    def __init__(self, where: Deployment, dataset: str, trainer: str) -> None:
        from fedstream.client.data import ClientData, load_dataset
        from fedstream.client.trainers import KerasTrainer, NumpyTrainer, default_model_for

        ds = load_dataset(dataset)
        data = ClientData(ds.x_test[:1], ds.y_test[:1], ds.x_test, ds.y_test, num_classes=ds.num_classes)
        if trainer == "numpy":
            self.trainer: Any = NumpyTrainer(data)
        elif trainer == "keras":
            self.trainer = KerasTrainer(default_model_for(dataset), data)
        else:
            raise CliError(f"--trainer: the test set is scored with keras or numpy, not {trainer!r}")
        self.store = where.store()

    def accuracy(self, key: str) -> float:
        from fedstream.weights import decode

        weights, _ = decode(self.store.get_object(key)[0])
        return float(self.trainer.evaluate(weights)["eval_accuracy"])


def model_key(status: dict[str, Any], entry: dict[str, Any]) -> str:
    from fedstream import keys

    if status["mode"] == "sync":
        return keys.global_key(status["run_id"], int(entry["version"]))
    return str(entry["key"])


def watch_command(args: argparse.Namespace) -> int:
    """A line per round (sync) or version (async) as it is committed, then the run's end; exit 0 if
    it succeeded. ``--test-dataset`` adds each version's accuracy on the held-out test set."""
    where = deployment(args)
    test = _TestSet(where, args.test_dataset, args.trainer) if args.test_dataset else None
    shown = 0
    while True:
        status = run_status(where, args.run_id)
        entries = status.get("rounds", status.get("versions", []))
        committed = [e for e in entries if "metrics" in e]
        for entry in committed[shown:]:
            line = entry_line(status["mode"], entry)
            if test is not None:
                line += f", test accuracy {test.accuracy(model_key(status, entry)):.4f}"
            print(line, flush=True)
        shown = len(committed)
        if status["status"] != "RUNNING":
            lines = status_lines(status)
            print(lines[0], flush=True)
            if status["mode"] == "async":
                print(lines[1].strip(), flush=True)
            return 0 if status["status"] == "SUCCEEDED" else 1
        time.sleep(max(0.2, args.interval))


def fetch_model(args: argparse.Namespace, run_id: str, version: int | None) -> tuple[bytes, str]:
    """A run's final model (or ``version``) and its s3:// address, from the deployment."""
    from fedstream import keys

    where = deployment(args)
    store = where.store()
    state = store.run_state(run_id)
    if state is None:
        raise CliError(f"--run: no run {run_id!r} in this deployment (`fedstream run list`)")
    if version is None:
        key = str(state["global_key"])
    elif state.get("mode") == "sync" or version == 0:
        key = keys.global_key(run_id, version)
    else:
        item = store.run_items(run_id, [f"version#{version}"]).get(f"version#{version}")
        if item is None:
            raise CliError(f"--version {version}: run {run_id} published no such version")
        key = str(item["key"])
    try:
        data, _ = store.get_object(key)
    except Exception as exc:  # a missing or unreadable object, named
        raise CliError(f"--version {version}: {exc}") from None
    return data, f"s3://{where.bucket}/{key}"


def stop_command(args: argparse.Namespace) -> int:
    from fedstream.schemas import TrainingComplete
    from fedstream.server.store import ConditionFailed

    where = deployment(args)
    store = where.store()
    state = store.run_state(args.run_id)
    if state is None:
        raise CliError(f"no run {args.run_id!r} in this deployment (`fedstream run list`)")
    if state.get("status") != "RUNNING":
        raise CliError(f"run {args.run_id} is {state.get('status')} already")
    if state.get("mode") == "sync" and state.get("execution_arn"):
        where.client("stepfunctions").stop_execution(
            executionArn=state["execution_arn"], error="Stopped", cause="fedstream run stop"
        )
    now = datetime.now(UTC).isoformat()
    try:
        store.finish_run(args.run_id, "stopped", now, status="STOPPED")
    except ConditionFailed:
        raise CliError(f"run {args.run_id} ended before it could be stopped") from None
    version = int(state.get("version", 0))
    told = "clients told"
    try:
        store.publish(
            TrainingComplete(run_id=args.run_id, reason="stopped", final_version=version).model_dump()
        )
    except Exception as exc:  # the topic's policy: in sync mode only the state machine publishes
        told = (
            f"clients not told ({type(exc).__name__}): they stop at their --max-idle, "
            "or with --follow move on when the next run starts"
        )
    print(f"{args.run_id}: STOPPED at version {version}; {told}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    # newest first: by start time (every run item records it), then by run id
    runs = sorted(
        deployment(args).store().list_runs(),
        key=lambda r: (str(r.get("started_at") or ""), str(r["run_id"])),
        reverse=True,
    )
    rows = [
        {
            "run_id": r["run_id"],
            "mode": r.get("mode"),
            "status": r.get("status"),
            "version": int(r.get("version", 0)),
            "started_at": r.get("started_at"),
        }
        for r in runs
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            started = row["started_at"] or ""
            print(f"{row['run_id']}  {row['mode']}  {row['status']}  version {row['version']}  {started}")
    if not rows:
        print("no runs yet", file=sys.stderr)
    return 0
