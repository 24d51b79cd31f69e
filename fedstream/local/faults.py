"""Faults the local runtime can inject, named by short specs (``fedstream local --fault SPEC``).

=================================  ==========================================================
``aggregate.<point>[:N]``          the aggregate handler raises at that point N times (default 1);
                                   points: ``fedstream.faults.POINTS``
``throttle:<service>:<Op>[:N]``    the handlers' next N ``Op`` calls are throttled (S3 ``SlowDown``
                                   503, DynamoDB ``ThrottlingException``); service s3 | dynamodb
``error:<service>:<Op>[:N]``       the same with a transient ``InternalError`` (HTTP 500)
``kill:<client>[:ROUND]``          SIGKILL the client while it trains round (or version) ROUND
                                   (default 1), then start it again
``hang:<client>``                  SIGSTOP the client once it is ready: it never answers again
                                   (the runtime lets it go at the end of the run)
``redeliver:N``                    the stream poller delivers each of its first N batches twice
``sfn:<service>:<Op>[:N[:SKIP]]``  the state machine's own ``Op`` calls are throttled N times
                                   (default 1) after the first SKIP (default 0): DynamoDB
                                   ``ProvisionedThroughputExceededException``, SNS ``Throttled``;
                                   service dynamodb | sns (``embedded.inject_state_machine_faults``)
``sfn:<service>:<Op>:N:SKIP:lost``  the same calls reach the service and take effect, and their
                                   answer is lost: a server error (DynamoDB ``InternalServerError``,
                                   SNS ``InternalError``) makes the state machine retry them
=================================  ==========================================================

Throttles and errors are answered before the request leaves botocore (its ``before-send``
event), so the SDK's own retry policy handles them exactly as it handles the real service's.
"""

from __future__ import annotations

import json
import signal
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from botocore.awsrequest import AWSResponse

from fedstream import faults
from fedstream.cli import CliError

SERVICES = ("s3", "dynamodb")


@dataclass(frozen=True)
class ServiceFault:
    kind: str  # "throttle" | "error"
    service: str
    operation: str
    times: int


@dataclass(frozen=True)
class FaultPlan:
    points: dict[str, int] = field(default_factory=dict)
    service_faults: tuple[ServiceFault, ...] = ()
    kills: dict[str, int] = field(default_factory=dict)
    hangs: tuple[str, ...] = ()
    redeliver_batches: int = 0
    # "service:Operation:N:SKIP", for the embedded AWS's state machine interpreter
    state_machine_faults: tuple[str, ...] = ()

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...], client_ids: list[str] | None = None) -> FaultPlan:
        points: dict[str, int] = {}
        service_faults: list[ServiceFault] = []
        kills: dict[str, int] = {}
        hangs: list[str] = []
        redeliver = 0
        state_machine: list[str] = []
        for spec in specs:
            head, _, rest = spec.partition(":")
            try:
                if head in faults.POINTS:
                    points[head] = points.get(head, 0) + _count(rest or "1", spec)
                elif head in ("throttle", "error"):
                    service, _, rest = rest.partition(":")
                    operation, _, times = rest.partition(":")
                    if service not in SERVICES or not operation:
                        raise ValueError(f"expects {head}:s3|dynamodb:Operation[:N]")
                    service_faults.append(ServiceFault(head, service, operation, _count(times or "1", spec)))
                elif head == "kill":
                    client_id, _, at = rest.partition(":")
                    kills[_client(client_id, client_ids)] = _count(at or "1", spec)
                elif head == "hang":
                    hangs.append(_client(rest, client_ids))
                elif head == "redeliver":
                    redeliver += _count(rest or "1", spec)
                elif head == "sfn":
                    service, _, rest = rest.partition(":")
                    operation, _, rest = rest.partition(":")
                    times, _, rest = rest.partition(":")
                    skip, _, when = rest.partition(":")
                    if service not in ("dynamodb", "sns") or not operation or when not in ("", "lost"):
                        raise ValueError("expects sfn:dynamodb|sns:Operation[:N[:SKIP[:lost]]]")
                    skipped = 0 if not skip else _count(skip, spec) if skip != "0" else 0
                    lost = ":lost" if when else ""
                    state_machine.append(
                        f"{service}:{operation}:{_count(times or '1', spec)}:{skipped}{lost}"
                    )
                else:
                    others = ["throttle:", "error:", "kill:", "hang:", "redeliver:", "sfn:"]
                    known = ", ".join([*sorted(faults.POINTS), *others])
                    raise ValueError(f"unknown fault; known: {known}")
            except ValueError as exc:
                raise CliError(f"--fault {spec}: {exc}") from None
        return cls(points, tuple(service_faults), kills, tuple(hangs), redeliver, tuple(state_machine))

    def arm_handler_points(self) -> None:
        for name, times in self.points.items():
            faults.arm(name, times)


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


def _client(client_id: str, client_ids: list[str] | None) -> str:
    if client_ids is not None and client_id not in client_ids:
        raise ValueError(f"no client {client_id!r} in this run ({', '.join(client_ids)})")
    return client_id


# ---- AWS service faults ---------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data


def _response(fault: ServiceFault, url: str) -> AWSResponse:
    request_id = uuid.uuid4().hex
    if fault.service == "s3":
        code, status = ("SlowDown", 503) if fault.kind == "throttle" else ("InternalError", 500)
        body = (
            f"<Error><Code>{code}</Code><Message>injected</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        )
        headers = {"Content-Type": "application/xml", "x-amz-request-id": request_id}
    else:
        throttled = fault.kind == "throttle"
        code, status = ("ThrottlingException", 400) if throttled else ("InternalServerError", 500)
        body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "injected"})
        headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-RequestId": request_id}
    return AWSResponse(url, status, headers, _Body(body.encode()))


class ServiceFaults:
    """Answers the next N calls of an operation with a throttle or an error, then lets calls through."""

    def __init__(self, plan: FaultPlan) -> None:
        self.remaining = {(f.service, f.operation, f.kind): f.times for f in plan.service_faults}
        self.faults = {(f.service, f.operation, f.kind): f for f in plan.service_faults}
        self.injected: dict[str, int] = {}
        self._lock = threading.Lock()

    def install(self, service_clients: dict[str, Any]) -> None:
        """Register on the given boto3 clients (by service name), e.g. the handlers' Store's."""
        for service, operation, kind in self.faults:
            client = service_clients[service]
            client.meta.events.register(
                f"before-send.{client.meta.service_model.endpoint_prefix}.{operation}",
                self._handler(service, operation, kind),
            )

    def _handler(self, service: str, operation: str, kind: str) -> Any:
        key = (service, operation, kind)

        def before_send(request: Any, **_: Any) -> AWSResponse | None:
            with self._lock:
                if self.remaining[key] <= 0:
                    return None
                self.remaining[key] -= 1
                name = f"{kind}:{service}:{operation}"
                self.injected[name] = self.injected.get(name, 0) + 1
            return _response(self.faults[key], request.url)

        return before_send


# ---- client faults --------------------------------------------------------------------------------


class ClientFaults(threading.Thread):
    """Watches the process clients' events and kills or stops them as the plan says."""

    def __init__(self, plan: FaultPlan, clients: dict[str, Any]) -> None:
        super().__init__(name="client-faults", daemon=True)
        self.plan, self.clients = plan, clients
        self.done: list[str] = []
        self._stop_event = threading.Event()

    def hang_now(self) -> None:
        for client_id in self.plan.hangs:
            self.clients[client_id].signal(signal.SIGSTOP)
            self.done.append(f"hang:{client_id}")

    def release(self) -> None:
        """Let hung clients go at the end of the run: they find "training complete" and exit."""
        for client_id in self.plan.hangs:
            self.clients[client_id].signal(signal.SIGCONT)

    def run(self) -> None:
        pending = dict(self.plan.kills)
        while pending and not self._stop_event.wait(0.05):
            for client_id, at in list(pending.items()):
                client = self.clients[client_id]
                if any(e["event"] == "training" and _round_or_version(e) == at for e in client.events()):
                    client.kill_and_restart()
                    self.done.append(f"kill:{client_id}:{at}")
                    del pending[client_id]

    def stop(self) -> None:
        self._stop_event.set()


def _round_or_version(event: dict[str, Any]) -> Any:
    return event["round"] if event.get("round") is not None else event.get("version")
