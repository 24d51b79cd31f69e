"""The embedded AWS: a moto server on 127.0.0.1 with the same resources the CDK stack creates."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import boto3

REGION = "us-east-1"
ACCOUNT = "123456789012"
# Package data of fedstream.stacks (the repo's stacks/ folder): the same definition the stack deploys.
STATE_MACHINE_FILE = files("fedstream.stacks") / "state_machine.asl.json"


def aws_environment(endpoint: str, port: int) -> dict[str, str]:
    """Variables that point boto3 (and moto's state machine interpreter) at the embedded AWS."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ACCOUNT_ID_ENDPOINT_MODE": "disabled",
        "FEDSTREAM_ENDPOINT_URL": endpoint,
        "MOTO_PORT": str(port),
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": "fedstream",
    }


_DYNAMODB_ITEM_OPERATIONS = (
    "get_item",
    "put_item",
    "update_item",
    "delete_item",
    "transact_write_items",
    "transact_get_items",
    "batch_write_item",
)


def make_dynamodb_item_operations_atomic() -> None:
    """Give moto's DynamoDB the isolation the real service guarantees.

    DynamoDB applies a conditional write or a transaction atomically. moto's server handles
    requests on several threads without a lock, and a failed transaction restores a snapshot of
    the whole table, which can undo a concurrent write. Serialising item operations in-process
    restores the real semantics, so concurrency tests exercise fedstream's logic, not moto's races.
    """
    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, "_fedstream_atomic", False):
        return
    lock = threading.RLock()
    for name in _DYNAMODB_ITEM_OPERATIONS:
        original = getattr(DynamoDBBackend, name)

        def locked(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, locked)
    DynamoDBBackend._fedstream_atomic = True


def make_dynamodb_transactions_item_scoped() -> None:
    """Roll a failed DynamoDB transaction back item by item, not by copying whole tables.

    moto's ``transact_write_items`` deep-copies every table it touches before each transaction, so
    its cost grows with the table: an async run, which writes one marker item per update, slows
    down update after update. This version checks every condition first (item operations are
    serialised, see :func:`make_dynamodb_item_operations_atomic`) and cancels with the reasons
    before writing anything, as DynamoDB does; only then does it write, keeping copies of just the
    items it touches in case a write fails.
    """
    from moto.dynamodb.comparisons import get_filter_expression
    from moto.dynamodb.exceptions import (
        MultipleTransactionsException,
        TooManyTransactionsException,
        TransactionCanceledException,
    )
    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, "_fedstream_item_scoped", False):
        return

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        if len(transact_items) > 100:
            raise TooManyTransactionsException()
        operations = []
        seen: set[tuple[str, str]] = set()
        for entry in transact_items:
            op_type, op = next(iter(entry.items()))
            table = self.get_table(op["TableName"])
            if op_type == "Put":
                key = {table.hash_key_attr: op["Item"][table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = op["Item"][table.range_key_attr]
            else:
                key = op["Key"]
            identity = (op["TableName"], str(sorted(key.items())))
            if identity in seen:
                raise MultipleTransactionsException()
            seen.add(identity)
            operations.append((op_type, op, table, key))
        errors: list[tuple[str | None, str | None, Any]] = []
        for _, op, _, key in operations:
            current = self.get_item(op["TableName"], key)
            condition = op.get("ConditionExpression")
            holds = condition is None or get_filter_expression(
                condition, op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
            ).expr(current)
            errors.append(
                (None, None, None)
                if holds
                else ("ConditionalCheckFailed", "The conditional request failed", None)
            )
        if any(code is not None for code, _, _ in errors):
            raise TransactionCanceledException(errors)
        snapshots = []
        for _, _op, table, key in operations:
            hash_key, range_key = self.get_keys_value(table, key)
            snapshots.append((table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))))
        try:
            for op_type, op, _, key in operations:
                names, values = op.get("ExpressionAttributeNames"), op.get("ExpressionAttributeValues")
                if op_type == "Put":
                    self.put_item(op["TableName"], op["Item"])
                elif op_type == "Delete":
                    self.delete_item(op["TableName"], key)
                elif op_type == "Update":
                    self.update_item(
                        op["TableName"],
                        key,
                        update_expression=op["UpdateExpression"],
                        expression_attribute_names=names,
                        expression_attribute_values=values,
                    )
        except Exception:
            for table, hash_key, range_key, item in snapshots:
                holder = table.items[hash_key] if range_key is not None else table.items
                slot = range_key if range_key is not None else hash_key
                if item is None:
                    holder.pop(slot, None)
                else:
                    holder[slot] = item
            raise

    DynamoDBBackend.transact_write_items = transact_write_items
    DynamoDBBackend._fedstream_item_scoped = True


def make_sns_publish_reach_every_subscription() -> None:
    """Deliver a topic's messages to all its subscriptions, as SNS does.

    moto's ``Topic.publish`` takes the first page (100) of ``list_subscriptions_by_topic`` and
    drops the message for every later subscription, so in a run with more than 99 clients the
    last clients (and the finalize queue) would never hear of a round.
    """
    from moto.moto_api._internal import mock_random
    from moto.sns.models import Topic

    if getattr(Topic, "_fedstream_all_subscriptions", False):
        return

    def publish(
        self: Any,
        message: str,
        subject: str | None = None,
        message_attributes: Any = None,
        group_id: str | None = None,
        deduplication_id: str | None = None,
        message_structure: str | None = None,
    ) -> str:
        message_id = str(mock_random.uuid4())
        for subscription in self.sns_backend._get_topic_subscriptions(self):
            subscription.publish(
                message,
                message_id,
                subject=subject,
                message_attributes=message_attributes,
                group_id=group_id,
                deduplication_id=deduplication_id,
                message_structure=message_structure,
            )
        self.sent_notifications.append((message_id, message, subject, message_attributes, group_id))
        return message_id

    Topic.publish = publish
    Topic._fedstream_all_subscriptions = True


def make_execution_start_time_a_string() -> None:
    """Give executions ``$$.Execution.StartTime`` as Step Functions does: an ISO 8601 string
    (``2026-12-02T17:25:03.123Z``). moto's context object holds a datetime, which a ``putItem``
    of it cannot write."""
    from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

    if getattr(ExecutionWorker, "_fedstream_start_time_string", False):
        return
    original = ExecutionWorker._get_evaluation_environment

    def environment(self: Any, _original: Any = original) -> Any:
        env = _original(self)
        execution = env.states.context_object.context_object_data["Execution"]
        started = execution.get("StartTime")
        if isinstance(started, datetime):
            started = started.astimezone(UTC) if started.tzinfo else started.replace(tzinfo=UTC)
            execution["StartTime"] = (
                started.strftime("%Y-%m-%dT%H:%M:%S.") + f"{started.microsecond // 1000:03d}Z"
            )
        return env

    ExecutionWorker._get_evaluation_environment = environment
    ExecutionWorker._fedstream_start_time_string = True


STATE_MACHINE_FAULTS_ENV = "FEDSTREAM_STATE_MACHINE_FAULTS"
_THROTTLED = {"dynamodb": "ProvisionedThroughputExceededException", "sns": "Throttled"}
# A call the service applied whose answer never arrived: the SDK sees a server error.
_LOST = {"dynamodb": "InternalServerErrorException", "sns": "InternalError"}


def inject_state_machine_faults(specs: list[str]) -> None:
    """Throttle the state machine's own calls to DynamoDB or SNS, as the services would.

    moto's interpreter makes a boto3 client per task call (``boto_client_for`` in each service
    module); each client made here answers the chosen operation with the service's throttling
    error before the request leaves botocore, ``times`` times after the first ``skip`` calls. The
    interpreter turns it into the error name a real execution sees (``DynamoDB.Provisioned
    ThroughputExceededException``, ``SNS.ThrottledException``), so the definition's Retry and
    Catch run as on AWS. ``specs``: ``service:Operation:times:skip[:lost]`` (``fedstream local
    --fault sfn:``). With ``lost`` the call reaches the service, which applies it, and the answer
    is replaced by a server error (``DynamoDB.InternalServerErrorException``,
    ``SNS.InternalErrorException``): the retry repeats a call that already took effect.
    """
    from botocore.exceptions import ClientError
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_dynamodb,
        state_task_service_sns,
    )

    lock = threading.Lock()
    rules: list[dict[str, Any]] = []
    for spec in specs:
        service, operation, times, skip, *when = spec.split(":")
        lost = when == ["lost"]
        rules.append(
            {"service": service, "operation": operation, "times": int(times), "skip": int(skip), "lost": lost}
        )

    def rule_hook(rule: dict[str, Any]) -> Any:
        calls = [0]

        def hook(**_: Any) -> None:
            with lock:
                calls[0] += 1
                failing = rule["skip"] < calls[0] <= rule["skip"] + rule["times"]
            if failing:
                code = (_LOST if rule["lost"] else _THROTTLED)[rule["service"]]
                applied = " after the service applied it" if rule["lost"] else ""
                print(  # to the server's stderr: aws.log in a local run
                    f"fedstream fault: the state machine's {rule['service']} {rule['operation']} call "
                    f"{calls[0]} answered {code}{applied}",
                    file=sys.stderr,
                    flush=True,
                )
                raise ClientError(
                    {
                        "Error": {
                            "Code": code,
                            "Message": f"{'answer lost' if rule['lost'] else 'throttled'} by "
                            "fedstream local --fault sfn:",
                        },
                        "ResponseMetadata": {
                            "HTTPStatusCode": 500 if rule["lost"] else 400,
                            "RequestId": "fedstream-fault",
                        },
                    },
                    rule["operation"],
                )

        return hook

    hooks = [(rule, rule_hook(rule)) for rule in rules]
    for module in (state_task_service_dynamodb, state_task_service_sns):
        original = module.boto_client_for

        def patched(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            client = _original(*args, **kwargs)
            service = client.meta.service_model.service_name
            for rule, hook in hooks:
                if rule["service"] == service:
                    event = "after-call" if rule["lost"] else "before-call"
                    client.meta.events.register(f"{event}.{service}.{rule['operation']}", hook)
            return client

        module.boto_client_for = patched


def serve_in_this_process() -> tuple[Any, int]:
    """Start a patched ``ThreadedMotoServer`` on loopback with Step Functions executions on."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    make_dynamodb_transactions_item_scoped()
    make_dynamodb_item_operations_atomic()
    make_sns_publish_reach_every_subscription()
    make_execution_start_time_a_string()
    if os.environ.get(STATE_MACHINE_FAULTS_ENV):
        inject_state_machine_faults(os.environ[STATE_MACHINE_FAULTS_ENV].split(","))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    # moto's state machine interpreter calls SNS, SQS and DynamoDB at localhost:$MOTO_PORT.
    os.environ.update(aws_environment(endpoint, int(port)))
    request = urllib.request.Request(  # noqa: S310 - http on loopback only
        f"{endpoint}/moto-api/config",
        data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()  # noqa: S310 - http on loopback only
    return server, int(port)


def main() -> None:
    """``python -m fedstream.local.embedded``: serve, print the port, stop when stdin closes."""
    server, port = serve_in_this_process()
    print(port, flush=True)
    # Nobody reads this pipe any more: a full one would block the server.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    with contextlib.suppress(KeyboardInterrupt):  # started by hand and stopped with Ctrl-C
        sys.stdin.read()
    server.stop()


class EmbeddedAWS:
    """The embedded AWS: a moto server on 127.0.0.1, in a process of its own.

    A separate process is what the handlers and clients would talk to in the cloud: a service
    over HTTP that does not share their interpreter (nor its lock) and whose state they cannot
    touch. ``in_process=True`` runs the server on a thread of this process instead.

    The server process has a process group of its own, so a Ctrl-C at the terminal reaches only
    whoever started it, which then stops it (closing its stdin). Its stderr (moto's own messages)
    goes to ``log_path`` if given.
    """

    def __init__(
        self,
        in_process: bool = False,
        log_path: os.PathLike[str] | str | None = None,
        state_machine_faults: tuple[str, ...] = (),
    ) -> None:
        self.in_process = in_process
        self.log_path = log_path
        self.state_machine_faults = state_machine_faults
        self._server: Any = None
        self._process: subprocess.Popen[str] | None = None
        self.port = 0
        self.endpoint = ""
        self._session: boto3.Session | None = None
        self._clients: dict[str, Any] = {}
        self._environ_before: dict[str, str | None] = {}
        self._environ_set: dict[str, str] = {}

    def __enter__(self) -> EmbeddedAWS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and point this process's environment at it (:meth:`stop` undoes both)."""
        names = aws_environment("", 0)
        self._environ_before = {name: os.environ.get(name) for name in names}
        if self.in_process:
            if self.state_machine_faults:
                inject_state_machine_faults(list(self.state_machine_faults))
            self._server, self.port = serve_in_this_process()
        else:
            with contextlib.ExitStack() as files:
                stderr = None if self.log_path is None else files.enter_context(open(self.log_path, "ab"))
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "fedstream.local.embedded"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    process_group=0,
                    env={**os.environ, STATE_MACHINE_FAULTS_ENV: ",".join(self.state_machine_faults)},
                )
            assert self._process.stdout is not None
            line = self._process.stdout.readline()
            if not line.strip().isdigit():
                self._stop_process()
                raise RuntimeError(f"the embedded AWS did not start (it printed {line!r})")
            self.port = int(line)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._environ_set = aws_environment(self.endpoint, self.port)
        os.environ.update(self._environ_set)

    def stop(self) -> None:
        """Stop the server (its port is closed on return) and restore the environment. Idempotent."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._process is not None:
            self._stop_process()
        self._restore_environment()

    def kill(self) -> None:
        """SIGKILL the server process, without waiting (for an exit that cannot wait)."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.kill()

    def _stop_process(self) -> None:
        """Stop the server process now. It holds nothing worth waiting for (a graceful stop takes
        about a second: werkzeug's shutdown poll and the interpreter's exit), so it is killed."""
        process, self._process = self._process, None
        assert process is not None
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()

    def _restore_environment(self) -> None:
        """Put back the variables :meth:`start` set, unless something else has set them since."""
        for name, value in self._environ_set.items():
            if os.environ.get(name) != value:
                continue
            before = self._environ_before.get(name)
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
        self._environ_set = {}

    def session(self) -> boto3.Session:
        """One session for the process: it loads each service model once."""
        if self._session is None:
            self._session = boto3.Session(
                aws_access_key_id="testing",
                aws_secret_access_key="testing",  # noqa: S106 - the embedded AWS takes any key
                region_name=REGION,
            )
        return self._session

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.session().client(service, endpoint_url=self.endpoint)
        return self._clients[service]


@dataclass(frozen=True)
class Resources:
    bucket: str
    run_table: str
    updates_table: str
    topic_arn: str
    queue_urls: dict[str, str]
    finalize_queue_url: str | None
    dlq_url: str
    stream_arn: str
    state_machine_arn: str | None

    def handler_settings(self, mode: str, **fields: Any) -> Any:
        """The functions' settings on these resources (what the stack sets in their environment)."""
        from fedstream.settings import HandlerSettings

        return HandlerSettings(
            mode=mode,  # type: ignore[arg-type]
            bucket=self.bucket,
            run_table=self.run_table,
            updates_table=self.updates_table,
            topic_arn=self.topic_arn,
            **fields,
        )


def state_machine_definition(topic_arn: str, run_table: str, finalize_queue_url: str) -> str:
    """The stack's definition with its substitutions filled in, exactly as CDK would."""
    text = STATE_MACHINE_FILE.read_text()
    for name, value in {
        "TopicArn": topic_arn,
        "RunTable": run_table,
        "FinalizeQueueUrl": finalize_queue_url,
    }.items():
        text = text.replace("${" + name + "}", value)
    return text


def create_resources(aws: EmbeddedAWS, prefix: str, client_ids: list[str], mode: str) -> Resources:
    s3, ddb, sns, sqs = (aws.client(s) for s in ("s3", "dynamodb", "sns", "sqs"))
    bucket = f"{prefix}-models"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    run_table, updates_table = f"{prefix}-runs", f"{prefix}-updates"
    ddb.create_table(
        TableName=run_table,
        KeySchema=[
            {"AttributeName": "run_id", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "run_id", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    table = ddb.create_table(
        TableName=updates_table,
        KeySchema=[
            {"AttributeName": "client_id", "KeyType": "HASH"},
            {"AttributeName": "update_id", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "client_id", "AttributeType": "S"},
            {"AttributeName": "update_id", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_IMAGE"},
    )
    stream_arn = table["TableDescription"]["LatestStreamArn"]
    topic_arn = sns.create_topic(Name=f"{prefix}-model-ready")["TopicArn"]
    dlq_url = sqs.create_queue(QueueName=f"{prefix}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
    queue_urls = {}
    for client_id in client_ids:
        url = sqs.create_queue(
            QueueName=f"{prefix}-client-{client_id}",
            Attributes={"VisibilityTimeout": "300", "RedrivePolicy": redrive},
        )["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(
            TopicArn=topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"}
        )
        queue_urls[client_id] = url
    finalize_url = state_machine_arn = None
    if mode == "sync":
        finalize_url = sqs.create_queue(
            QueueName=f"{prefix}-finalize", Attributes={"VisibilityTimeout": "5", "RedrivePolicy": redrive}
        )["QueueUrl"]
        # Server-only: the state machine sends each round's token and deadline here (no subscription).
        state_machine_arn = aws.client("stepfunctions").create_state_machine(
            name=f"{prefix}-rounds",
            definition=state_machine_definition(topic_arn, run_table, finalize_url),
            roleArn=f"arn:aws:iam::{ACCOUNT}:role/{prefix}-state-machine",
        )["stateMachineArn"]
    return Resources(
        bucket=bucket,
        run_table=run_table,
        updates_table=updates_table,
        topic_arn=topic_arn,
        queue_urls=queue_urls,
        finalize_queue_url=finalize_url,
        dlq_url=dlq_url,
        stream_arn=stream_arn,
        state_machine_arn=state_machine_arn,
    )


if __name__ == "__main__":
    main()
