"""``fedstream local``: the whole system on one machine.

A moto server is the AWS; the state machine is the stack's own definition; the Lambda handlers run
in-process behind event-source pollers; N client processes run the real client code.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from fedstream import faults, keys
from fedstream.bounds import InfluenceBounds
from fedstream.cli import CliError
from fedstream.local.clients import (
    Client,
    ProcessClient,
    ThreadClient,
    process_client,
    stop_clients,
    wait_until_ready,
)
from fedstream.local.embedded import EmbeddedAWS, Resources, create_resources
from fedstream.local.faults import ClientFaults, FaultPlan, ServiceFaults
from fedstream.local.pollers import Poller, QueuePoller, StreamPoller
from fedstream.registry import default_registry
from fedstream.server.store import Store, store_for
from fedstream.settings import HandlerSettings
from fedstream.weights import decode, encode, sha256_hex

log = logging.getLogger("fedstream.local")
NO_TARGET = 2.0  # an accuracy no model reaches: "no target" for the state machine's Choice


@dataclass
class LocalRunConfig:
    mode: str = "sync"
    aggregator: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    clients: int = 3
    rounds: int = 3
    dataset: str = "mnist-5k"
    partition: str = "iid"
    min_clients: int | None = None
    round_timeout: int = 300
    stragglers: int = 0
    straggler_factor: float = 1.0
    straggler_delay: float = 0.0
    target_accuracy: float | None = None
    seed: int = 0
    out: Path = Path("runs/local")
    trainer: str = "keras"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float | None = None
    progress: bool = True
    client_timeout: float = 600.0  # how long finished clients get to exit before they are stopped
    startup_timeout: float = 600.0  # how long clients get to load their data and model
    updates: int = 20
    max_seconds: float = 0.0
    # "process": one `fedstream client` process each; "thread": clients share this process (load tests)
    client_runtime: str = "process"
    visibility_timeout: int = 300
    # fault specs (fedstream.local.faults), e.g. "aggregate.after_flip", "kill:site-2:1"
    faults: tuple[str, ...] = ()
    # how far one client's update may move the model (fedstream.bounds); InfluenceBounds.off() for none
    bounds: InfluenceBounds = field(default_factory=InfluenceBounds)
    # client id -> attack spec (fedstream.local.attack), e.g. {"site-4": "sign-flip:10"}
    attackers: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # None: a new one, run-YYYYmmdd-HHMMSS-xxxxxx
    # the libraries' own output (moto, botocore, TensorFlow's start-up lines) on the terminal
    verbose: bool = False


@dataclass
class RoundRow:
    round: int
    version: int
    duration_seconds: float | None
    clients: int
    at_deadline: bool
    train_loss: float | None
    eval_accuracy_clients: float | None
    test_loss: float | None
    test_accuracy: float | None
    epsilon: float | None
    elapsed_seconds: float  # run start -> the server committed this version (both modes alike)
    committed_at: float | None = None  # epoch seconds, the server's clock
    # async: the updates consumed since the previous row (fedstream.local.async_stats)
    staleness_p50: float | None = None
    staleness_p95: float | None = None
    staleness_max: float | None = None
    stream_wait_p50: float | None = None
    stream_wait_max: float | None = None
    in_flight_max: int | None = None
    # async: updates rejected up to this version, by reason; updates waiting in the buffer at it
    rejected: dict[str, int] = field(default_factory=dict)
    buffered: int | None = None


@dataclass
class RunSummary:
    run_id: str
    status: str
    error: str | None
    rounds: list[RoundRow]
    initial_accuracy: float | None
    final_version: int
    wall_seconds: float
    rejected: dict[str, int]
    client_exit_codes: dict[str, int | None]
    out: Path
    counts: dict[str, int] = field(default_factory=dict)
    # per handler: invocations, failed invocations, records delivered, dead letters
    handlers: dict[str, dict[str, int]] = field(default_factory=dict)
    # what the fault plan injected: fault point or service fault -> times; client faults -> 1
    faults_injected: dict[str, int] = field(default_factory=dict)
    # async: staleness, stream wait and updates in flight over the whole run (async_stats.run_summary)
    async_stats: dict[str, Any] = field(default_factory=dict)
    # client -> reason -> rejected updates, from the handlers' "update rejected" warnings
    rejected_by_client: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def accuracies(self) -> list[float]:
        return [r.test_accuracy for r in self.rounds if r.test_accuracy is not None]


class _Evaluator:
    """Central evaluation of each global version on the held-out test set (a simulation luxury)."""

    def __init__(self, config: LocalRunConfig) -> None:
        from fedstream.client.data import ClientData, load_dataset
        from fedstream.client.trainers import KerasTrainer, NumpyTrainer, default_model_for

        ds = load_dataset(config.dataset)
        data = ClientData(ds.x_test[:1], ds.y_test[:1], ds.x_test, ds.y_test, num_classes=ds.num_classes)
        if config.trainer == "numpy":
            self.trainer: Any = NumpyTrainer(data, seed=config.seed)
        elif config.trainer == "keras":
            self.trainer = KerasTrainer(default_model_for(config.dataset), data, seed=config.seed)
        else:  # instant[:N] or the user's module:function, evaluating on all of the dataset
            from fedstream.client.trainers import build_trainer

            self.trainer = build_trainer(config.trainer, config.dataset, "iid", 1, 0, seed=config.seed)

    def initial_weights(self) -> dict[str, Any]:
        return self.trainer.initial_weights()

    def evaluate(self, weights: dict[str, Any]) -> dict[str, float]:
        return self.trainer.evaluate(weights) if self.trainer else {}


class _JsonLines(logging.Formatter):
    """The local runtime's own records (pollers, fault injection) as JSON lines beside the handlers'."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "timestamp": self.formatTime(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@contextlib.contextmanager
def _log_stream(path: Path, *, verbose: bool = False) -> Iterator[IO[str]]:
    """Route stdout (Powertools JSON logs and EMF metrics) to a file; keep the real one for the view.

    The runtime's own log (``fedstream.local``: a handler invocation that raised and is retried, a
    dead letter) goes there too, as JSON lines, not to the terminal (``verbose``: both).
    """
    real = sys.stdout
    runtime = logging.getLogger("fedstream.local")
    with path.open("a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_JsonLines())
        runtime.addHandler(handler)
        if verbose:
            runtime.addHandler(loud := logging.StreamHandler(sys.stderr))
        sys.stdout = stream
        try:
            yield real
        finally:
            sys.stdout = real
            runtime.removeHandler(handler)
            if verbose:
                runtime.removeHandler(loud)


def run_local(config: LocalRunConfig) -> RunSummary:
    """Run ``config`` on the embedded AWS. Whatever the run starts is stopped when it returns or raises.

    Each resource (the embedded AWS, the stdout redirection, the handlers' environment, the store
    with the service-fault hooks, the pollers, the clients, the client faults, the fault points, the
    live view) goes on an :class:`contextlib.ExitStack` as soon as it exists, so an error at any
    point stops what was started, in reverse order. A run that ends (SUCCEEDED or FAILED) shuts
    down in order first: the clients get ``client_timeout`` to finish, the pollers deliver what is
    left, the outputs are read; then the stack unwinds the rest.

    Ctrl-C (or SIGTERM, SIGHUP) once the embedded AWS is up ends the run as ``INTERRUPTED``: the
    execution is stopped (async: the run is ended), the clients get 2 s to stop before they are
    killed, the pollers finish the invocation in hand, and the outputs are written with every
    round or version measured so far. A second Ctrl-C kills what is left and exits at once.
    """
    from fedstream.local.progress import Progress

    registry = default_registry()
    # Fail fast, before anything starts.
    chosen = registry.create(
        config.aggregator, config.params, seed=config.seed, mode=config.mode, num_clients=config.clients
    )
    if config.mode == "async" and chosen.min_clients > config.clients:
        raise CliError(
            f"{config.aggregator} needs at least {chosen.min_clients} clients to make progress "
            f"(each has one update in flight, and one refused update must not stall the run), "
            f"got {config.clients}"
        )
    client_ids = [f"site-{i + 1}" for i in range(config.clients)]
    _check_attackers(config, client_ids)
    plan = FaultPlan.parse(config.faults, client_ids)
    if (plan.kills or plan.hangs) and config.client_runtime != "process":
        raise CliError("kill: and hang: faults need process clients (client_runtime='process')")
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    # A run's outputs replace a previous run's in the same --out (nothing else there is touched):
    # no client log or model of another run is left to mix with this one's.
    for stale in Progress.OUTPUT_FILES:
        (out / stale).unlink(missing_ok=True)
    if (out / "clients").is_dir():
        for log in (out / "clients").glob("*.log"):
            log.unlink()
    (out / "clients").mkdir(exist_ok=True)
    run_id = config.run_id or new_run_id()
    live = _Live()

    with contextlib.ExitStack() as stack:
        if not config.verbose:
            stack.enter_context(_quiet_loggers("moto", "werkzeug", "botocore", "urllib3"))
        stack.enter_context(_termination_interrupts())
        # moto's own messages go to aws.log (-v: the terminal); it restores the variables it sets
        aws = stack.enter_context(
            EmbeddedAWS(
                log_path=None if config.verbose else out / "aws.log",
                state_machine_faults=plan.state_machine_faults,
            )
        )
        console_stream = stack.enter_context(_log_stream(out / "logs.jsonl", verbose=config.verbose))
        progress = Progress(console_stream, config, client_ids, enabled=config.progress)
        close_progress = _once(progress.close)
        stack.callback(close_progress)
        clients: dict[str, Client] = {}
        # On an error, whichever clients exist are stopped at once (SIGTERM, SIGKILL 2 s later).
        stack.callback(stop_clients, clients, 0, 2.0)
        pollers: list[Poller] = []
        client_faults: ClientFaults | None = None
        service_faults = ServiceFaults(plan)
        settings: HandlerSettings | None = None
        status: str | None = None
        error: str | None = None
        counts: dict[str, int] = {}
        started, started_at = time.monotonic(), time.time()
        try:
            resources = create_resources(aws, f"fedstream-{run_id[-6:]}", client_ids, config.mode)
            settings = handler_settings(config, resources, client_ids)
            stack.enter_context(_environment(settings.to_env()))  # what the handlers read, as in Lambda
            handler_store = store_for(HandlerSettings.from_env())  # the Store the handlers will use
            stack.callback(_forget_store, handler_store)  # and with it the fault hooks on its clients
            service_faults.install({"s3": handler_store.s3, "dynamodb": handler_store.dynamodb.meta.client})
            evaluator = _Evaluator(config)
            initial = evaluator.initial_weights()
            live.initial_accuracy = evaluator.evaluate(initial).get("eval_accuracy")
            data = encode(initial, {"run_id": run_id, "version": "0", "creator": "fedstream local"})
            if config.mode == "sync":  # async: start_run publishes version 0
                aws.client("s3").put_object(
                    Bucket=resources.bucket, Key=keys.global_key(run_id, 0), Body=data
                )

            pollers += _pollers(aws, resources, config.mode, redeliver_batches=plan.redeliver_batches)
            for poller in pollers:
                poller.start()
                stack.callback(poller.stop)
            _start_clients(aws, resources, config, client_ids, out, clients)
            wait_until_ready(clients, timeout=config.startup_timeout)
            client_faults = ClientFaults(plan, clients)
            stack.callback(_stop_client_faults, client_faults)
            client_faults.hang_now()
            client_faults.start()
            plan.arm_handler_points()
            stack.callback(faults.disarm)
            aggregator = registry.create(
                config.aggregator,
                config.params,
                seed=config.seed,
                mode=config.mode,
                num_clients=config.clients,
            )
            started, started_at = time.monotonic(), time.time()
            progress.update(None, "RUNNING")
            if config.mode == "async":
                status, error, counts = _run_async(
                    aws, settings, run_id, data, config, aggregator, evaluator, progress, started_at, live
                )
            else:
                status, error = _run_sync(
                    aws,
                    resources,
                    settings,
                    run_id,
                    data,
                    config,
                    aggregator,
                    evaluator,
                    progress,
                    started_at,
                    live,
                )
            # The run ended (an exception above unwinds the stack instead): an orderly shutdown.
            _stop_client_faults(client_faults)
            codes = stop_clients(clients, config.client_timeout if status == "SUCCEEDED" else 5)
            for poller in pollers:
                poller.drain(timeout=120.0)  # every record gets its verdict, up to a point
                poller.stop()
        except KeyboardInterrupt:
            # Stop at once and keep what was measured; a second Ctrl-C exits without waiting.
            stack.enter_context(_exit_on_second_interrupt(clients, aws))
            close_progress()
            print(
                "fedstream local: interrupted; stopping the clients and writing the outputs "
                "(Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )
            if status is None:
                status, error = "INTERRUPTED", "interrupted (Ctrl-C or a termination signal)"
            if settings is not None:
                _end_interrupted_run(aws, settings, run_id, live)
            if client_faults is not None:
                _stop_client_faults(client_faults)
            codes = stop_clients(clients, 0, grace=1.0)
            for poller in pollers:
                poller.stop(timeout=10.0)  # the invocation in hand finishes; nothing new starts
            if settings is not None and config.mode == "async":
                with contextlib.suppress(Exception):
                    _add_latest_version(Store(settings, aws.session()), run_id, evaluator, live, started_at)
        rows = live.rows
        injected = {**faults.fired(), **service_faults.injected}
        if client_faults is not None:
            injected.update(dict.fromkeys(client_faults.done, 1))
        faults.disarm()
        close_progress()
        async_summary: dict[str, Any] = {}
        if config.mode == "async" and settings is not None:
            store = Store(settings, aws.session())
            state = store.run_state(run_id) or {}
            counts = {name: int(state.get(name, 0)) for name in ASYNC_COUNTS}
            if status != "INTERRUPTED":
                # Every published version, evaluated once the clients are gone (live, only some were).
                rows = _every_version(store, run_id, evaluator, started_at) or rows
            async_summary = _async_figures(store, run_id, rows, out / "logs.jsonl")
        wall = time.monotonic() - started
        final_version = rows[-1].version if rows else 0
        if settings is not None:
            with contextlib.suppress(Exception):  # an interrupted run may not have written version 0
                key = keys.global_key(run_id, final_version) if config.mode == "sync" else live.final_key
                final = aws.client("s3").get_object(Bucket=settings.bucket, Key=key)
                (out / "final_model.safetensors").write_bytes(final["Body"].read())
    summary = RunSummary(
        run_id=run_id,
        status=status,
        error=error,
        rounds=rows,
        initial_accuracy=live.initial_accuracy,
        final_version=final_version,
        wall_seconds=wall,
        rejected=_rejections(out / "logs.jsonl"),
        rejected_by_client=_rejections_by_client(out / "logs.jsonl"),
        client_exit_codes=codes,
        out=out,
        counts=counts,
        handlers={p.function_name: p.stats() for p in pollers},
        faults_injected=injected,
        async_stats=async_summary,
    )
    _write_outputs(summary, config)
    progress.summary(summary)
    return summary


ASYNC_COUNTS = ("received", "applied", "rejected", "buffered")


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class _Live:
    """What a run has started and measured so far: what an interrupted run stops and reports."""

    rows: list[RoundRow] = field(default_factory=list)
    initial_accuracy: float | None = None
    execution_arn: str | None = None  # sync
    final_key: str | None = None  # async: the newest global model's key


@contextlib.contextmanager
def _signal_handlers(handler: Any, *signums: int) -> Iterator[None]:
    """``handler`` for these signals during the block, then the handlers before it (main thread only:
    elsewhere Python cannot set them, and the block runs unchanged)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def _termination_interrupts() -> contextlib.AbstractContextManager[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does (outputs kept)."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return _signal_handlers(interrupt, signal.SIGTERM, signal.SIGHUP)


def _exit_on_second_interrupt(
    clients: dict[str, Client], aws: EmbeddedAWS
) -> contextlib.AbstractContextManager[None]:
    """While an interrupted run shuts down, another Ctrl-C kills the clients and the embedded AWS
    and exits with 130 at once (its outputs are not written)."""
    import signal

    def exit_now(signum: int, frame: Any) -> None:
        for client in clients.values():
            if isinstance(client, ProcessClient) and client.process is not None:
                with contextlib.suppress(OSError):
                    client.process.kill()
        aws.kill()
        sys.__stderr__.write("\nfedstream local: interrupted again; stopped without writing the outputs\n")
        sys.__stderr__.flush()
        os._exit(130)

    return _signal_handlers(exit_now, signal.SIGINT, signal.SIGTERM)


def handler_settings(config: LocalRunConfig, resources: Resources, client_ids: list[str]) -> HandlerSettings:
    """The functions' settings for ``config`` on ``resources`` (what a deployment sets)."""
    return resources.handler_settings(
        config.mode,
        aggregator=config.aggregator,
        aggregator_params=config.params,
        client_ids=tuple(client_ids),
        min_clients=config.min_clients or config.clients,
        seed=config.seed,
        bounds=config.bounds,
    )


def _end_interrupted_run(aws: EmbeddedAWS, settings: HandlerSettings, run_id: str, live: _Live) -> None:
    """Stop the sync execution, or end the async run, so nothing goes on behind the outputs."""
    from fedstream.server import asynchronous

    with contextlib.suppress(Exception):  # whatever had not started yet needs no stopping
        if live.execution_arn is not None:
            aws.client("stepfunctions").stop_execution(
                executionArn=live.execution_arn, error="Interrupted", cause="fedstream local was interrupted"
            )
        elif settings.mode == "async":
            version = live.rows[-1].version if live.rows else 0
            asynchronous.end_run(Store(settings, aws.session()), run_id, "interrupted", version)


def _add_latest_version(
    store: Store, run_id: str, evaluator: _Evaluator, live: _Live, started_at: float
) -> None:
    """An interrupted async run: a row for the newest version if the live view had not evaluated it."""
    state = store.run_state(run_id) or {}
    if "global_key" not in state:
        return
    live.final_key = str(state["global_key"])
    version = int(state.get("version", 0))
    if version == 0 or (live.rows and live.rows[-1].version >= version):
        return
    weights, _ = decode(store.get_bytes(live.final_key))
    reported = json.loads(state.get("last_metrics") or "{}")
    committed_at = float(state.get("version_at") or time.time())
    live.rows.append(
        _version_row(
            len(live.rows) + 1,
            version,
            int(state.get("applied", 0)),
            reported,
            evaluator.evaluate(weights),
            committed_at,
            started_at,
        )
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block; then put back what was there (or nothing)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only critical records from these libraries' loggers during the run; their levels after it."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _forget_store(store: Store) -> None:
    """Drop the handlers' cached Store of this run (its clients, fault hooks and cached models).

    ``store_for`` keeps one per settings for the life of the process, as a warm Lambda does; every
    run has settings of its own, so this one would never be used again.
    """
    from fedstream.server import store as store_module

    for key, cached in list(store_module._stores.items()):
        if cached is store:
            del store_module._stores[key]


def _stop_client_faults(client_faults: ClientFaults) -> None:
    """Stop killing and freezing clients, and let the frozen ones go. Safe to call again."""
    client_faults.stop()
    if client_faults.ident is not None:
        client_faults.join(timeout=30)
    client_faults.release()


def _once(function: Any) -> Any:
    """``function`` that does its work on the first call only."""
    called = False

    def once() -> None:
        nonlocal called
        if not called:
            called = True
            function()

    return once


def _run_sync(
    aws: EmbeddedAWS,
    resources: Resources,
    settings: HandlerSettings,
    run_id: str,
    data: bytes,
    config: LocalRunConfig,
    aggregator: Any,
    evaluator: _Evaluator,
    progress: Any,
    started_at: float,
    live: _Live,
) -> tuple[str, str | None]:
    min_clients = config.min_clients or config.clients
    key0 = keys.global_key(run_id, 0)
    execution = aws.client("stepfunctions").start_execution(
        stateMachineArn=resources.state_machine_arn,
        name=run_id,
        input=json.dumps(
            {
                "run_id": run_id,
                "rounds": config.rounds,
                "min_clients": min_clients,
                "round_timeout": config.round_timeout,
                "target_accuracy": config.target_accuracy if config.target_accuracy else NO_TARGET,
                "version": 0,
                "object_key": key0,
                "sha256": sha256_hex(data),
                "client_settings": aggregator.client_settings(None),
            }
        ),
    )["executionArn"]
    live.execution_arn = execution
    return _watch(aws, settings, execution, run_id, evaluator, progress, started_at, live.rows)


def _run_async(
    aws: EmbeddedAWS,
    settings: HandlerSettings,
    run_id: str,
    data: bytes,
    config: LocalRunConfig,
    aggregator: Any,
    evaluator: _Evaluator,
    progress: Any,
    started_at: float,
    live: _Live,
) -> tuple[str, str | None, dict[str, int]]:
    from fedstream.server import asynchronous

    store = Store(settings, aws.session())
    asynchronous.start_run(
        store,
        run_id,
        data,
        client_settings=aggregator.client_settings(None),
        max_updates=config.updates,
        target_accuracy=config.target_accuracy,
        max_seconds=config.max_seconds,
    )
    from fedstream.local.async_stats import percentiles
    from fedstream.local.logs import LogTail, rejection_events, staleness_values

    rows = live.rows
    tail = LogTail(config.out / "logs.jsonl")  # the handlers' metric lines, as they are written
    rejected: dict[str, int] = {}
    staleness: list[float] = []  # of the updates taken since the last row
    seen, last_eval = 0, 0.0
    while True:
        state = store.run_state(run_id) or {}
        version = int(state.get("version", 0))
        finished = state.get("status") != "RUNNING"
        # Central evaluation costs CPU the clients need: at most twice a second, and the last one.
        if version != seen and (finished or time.monotonic() - last_eval >= 0.5):
            seen, last_eval = version, time.monotonic()
            committed_at = float(state.get("version_at") or time.time())
            live.final_key = str(state["global_key"])
            weights, _ = decode(store.get_bytes(live.final_key))
            test = evaluator.evaluate(weights)
            reported = json.loads(state.get("last_metrics") or "{}")
            applied = int(state.get("applied", 0))
            row = _version_row(len(rows) + 1, seen, applied, reported, test, committed_at, started_at)
            entries = tail.entries()
            for _, reason, count in rejection_events(entries):
                rejected[reason] = rejected.get(reason, 0) + count
            staleness += staleness_values(entries)
            figures = percentiles(staleness)
            row.staleness_p50, row.staleness_p95, row.staleness_max = (
                figures["p50"],
                figures["p95"],
                figures["max"],
            )
            row.rejected, row.buffered = dict(rejected), int(state.get("buffered", 0))
            staleness = []
            rows.append(row)
            progress.round_closed(row)
            continue
        progress.update(None, str(state.get("status")))
        if state.get("status") != "RUNNING":
            break
        if config.max_seconds and time.time() - started_at > config.max_seconds:
            asynchronous.end_run(store, run_id, "wall_clock", seen)
        time.sleep(0.3)
    live.final_key = str(state["global_key"])
    counts = {name: int(state.get(name, 0)) for name in ASYNC_COUNTS}
    return str(state["status"]), state.get("failure"), counts


def _pollers(
    aws: EmbeddedAWS, resources: Resources, mode: str, *, redeliver_batches: int = 0
) -> list[Poller]:
    """The run's event sources, not started yet."""
    from fedstream.handlers import aggregate, async_update, finalize

    stream_handler = async_update.lambda_handler if mode == "async" else aggregate.lambda_handler
    sqs = aws.client("sqs")

    def dead_letter(record: dict[str, Any]) -> None:
        """Like an event source mapping's on-failure destination: the record's details go to the DLQ."""
        sqs.send_message(QueueUrl=resources.dlq_url, MessageBody=json.dumps(record, default=str))

    pollers: list[Poller] = [
        StreamPoller(
            aws.client("dynamodbstreams"),
            resources.stream_arn,
            stream_handler,
            f"{mode}-stream",
            dead_letter=dead_letter,
            redeliver_batches=redeliver_batches,
        )
    ]
    if resources.finalize_queue_url:
        pollers.append(
            QueuePoller(aws.client("sqs"), resources.finalize_queue_url, finalize.lambda_handler, "finalize")
        )
    return pollers


def _start_clients(
    aws: EmbeddedAWS,
    resources: Resources,
    config: LocalRunConfig,
    client_ids: list[str],
    out: Path,
    clients: dict[str, Client],
) -> None:
    """Build every client into ``clients``, then start them; whoever stops ``clients`` stops them all."""
    from fedstream.local.attack import TRAINER_SPEC as attack_trainer
    from fedstream.local.attack import attacker_env

    max_idle = max(config.round_timeout * 2, 120)
    for index, client_id in enumerate(client_ids):
        straggler = index >= config.clients - config.stragglers
        attack = config.attackers.get(client_id)
        log_path = out / "clients" / f"{client_id}.log"
        log_path.unlink(missing_ok=True)
        if config.client_runtime == "thread":
            clients[client_id] = _thread_client(aws, resources, config, client_id, index, straggler, log_path)
            continue
        arguments = [
            "--queue-url",
            resources.queue_urls[client_id],
            "--bucket",
            resources.bucket,
            "--updates-table",
            resources.updates_table,
            "--region",
            "us-east-1",
            "--endpoint-url",
            aws.endpoint,
            "--trainer",
            config.trainer if attack is None else attack_trainer,
            "--dataset",
            config.dataset,
            "--partition",
            config.partition,
            "--num-clients",
            str(config.clients),
            "--client-index",
            str(index),
            "--seed",
            str(config.seed),
            "--epochs",
            str(config.epochs),
            "--batch-size",
            str(config.batch_size),
            "--visibility-timeout",
            str(config.visibility_timeout),
            "--max-idle",
            str(max_idle),
            "--events",
        ]
        if config.learning_rate is not None:
            arguments += ["--learning-rate", str(config.learning_rate)]
        if straggler:
            arguments += ["--slowdown", str(config.straggler_factor), "--delay", str(config.straggler_delay)]
        # An attacker is an ordinary client process whose trainer lies (fedstream.local.attack).
        env = None if attack is None else attacker_env(attack, config.trainer, config.learning_rate)
        clients[client_id] = process_client(client_id, arguments, log_path, env)
    for client in clients.values():
        client.start()


def _thread_client(
    aws: EmbeddedAWS,
    resources: Resources,
    config: LocalRunConfig,
    client_id: str,
    index: int,
    straggler: bool,
    log_path: Path,
) -> ThreadClient:
    from fedstream.client.cli import SlowTrainer
    from fedstream.client.runner import FederatedClient
    from fedstream.client.trainers import build_trainer
    from fedstream.settings import ClientSettings

    trainer: Any = build_trainer(
        config.trainer,
        config.dataset,
        config.partition,
        config.clients,
        index,
        seed=config.seed,
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
    )
    if client_id in config.attackers:
        from fedstream.local.attack import AttackTrainer

        trainer = AttackTrainer(trainer, config.attackers[client_id])
    if straggler and (config.straggler_factor > 1.0 or config.straggler_delay > 0):
        trainer = SlowTrainer(trainer, config.straggler_factor, config.straggler_delay)
    settings = ClientSettings(
        client_id=client_id,
        queue_url=resources.queue_urls[client_id],
        bucket=resources.bucket,
        updates_table=resources.updates_table,
        endpoint_url=aws.endpoint,
        visibility_timeout=config.visibility_timeout,
    )
    client = FederatedClient(settings, trainer, session=aws.session())
    if isinstance(trainer, SlowTrainer):
        trainer.stop = client.stop  # a stopped run does not wait out the straggler's sleep
    return ThreadClient(client_id, client, log_path, max_idle=max(config.round_timeout * 2, 120))


def _watch(
    aws: EmbeddedAWS,
    settings: HandlerSettings,
    execution_arn: str,
    run_id: str,
    evaluator: _Evaluator,
    progress: Any,
    started_at: float,
    rows: list[RoundRow],
) -> tuple[str, str | None]:
    """Follow the execution, adding a row to ``rows`` as each round closes."""
    from fedstream.runs import recorded_failure

    sfn = aws.client("stepfunctions")
    store = Store(settings, aws.session())
    status = "RUNNING"
    while True:
        description = sfn.describe_execution(executionArn=execution_arn)
        status = description["status"]
        round_number = len(rows) + 1
        item = store.round_item(run_id, round_number)
        if item and item.get("status") == "closed":
            rows.append(_round_row(store, run_id, item, evaluator, started_at))
            progress.round_closed(rows[-1])
            continue
        progress.update(item, status)
        if status != "RUNNING":
            break
        time.sleep(0.3)
    error = None
    if status != "SUCCEEDED":
        failed = store.round_item(run_id, len(rows) + 1) or {}
        error = (
            failed.get("failure")
            or recorded_failure((store.run_state(run_id) or {}).get("failure"))
            or description.get("error")
            or status
        )
    return status, error


def _round_row(
    store: Any, run_id: str, item: dict[str, Any], evaluator: _Evaluator, started_at: float
) -> RoundRow:
    from datetime import datetime

    result = json.loads(item["result"])
    closed = item.get("closed_at")
    committed_at = datetime.fromisoformat(closed).timestamp() if closed else time.time()
    weights, _ = decode(store.get_bytes(result["object_key"]))
    test = evaluator.evaluate(weights)
    metrics = result["metrics"]
    duration = None
    if item.get("opened_at") and item.get("closed_at"):
        duration = (
            datetime.fromisoformat(item["closed_at"]) - datetime.fromisoformat(item["opened_at"])
        ).total_seconds()
    return RoundRow(
        round=int(item["round"]),
        version=int(result["version"]),
        duration_seconds=duration,
        clients=len(result["clients"]),
        at_deadline=bool(result.get("at_deadline")),
        train_loss=metrics.get("train_loss"),
        eval_accuracy_clients=metrics.get("eval_accuracy"),
        test_loss=test.get("eval_loss"),
        test_accuracy=test.get("eval_accuracy"),
        epsilon=metrics.get("epsilon"),
        elapsed_seconds=committed_at - started_at,
        committed_at=committed_at,
    )


def _every_version(store: Store, run_id: str, evaluator: _Evaluator, started_at: float) -> list[RoundRow]:
    """A row per published async version, at its commit time: the same clock as sync rounds."""
    items = store.run_items_with_prefix(run_id, "version#")
    versions = sorted((int(i["sk"].split("#")[1]), i) for i in items if "committed_at" in i)
    rows, applied = [], 0
    for number, item in versions:
        applied += len(item.get("applied", []))
        weights, _ = decode(store.get_bytes(str(item["key"])))
        test = evaluator.evaluate(weights)
        reported = json.loads(item.get("metrics") or "{}")
        committed_at = float(item["committed_at"])
        rows.append(_version_row(len(rows) + 1, number, applied, reported, test, committed_at, started_at))
    return rows


def _version_row(
    row: int,
    version: int,
    applied: int,
    reported: dict[str, Any],
    test: dict[str, float],
    committed_at: float,
    started_at: float,
) -> RoundRow:
    """An async version's row: ``applied`` updates in it, the clients' last reported metrics."""
    return RoundRow(
        round=row,
        version=version,
        duration_seconds=None,
        clients=applied,
        at_deadline=False,
        train_loss=reported.get("train_loss"),
        eval_accuracy_clients=reported.get("eval_accuracy"),
        test_loss=test.get("eval_loss"),
        test_accuracy=test.get("eval_accuracy"),
        epsilon=reported.get("epsilon"),
        elapsed_seconds=committed_at - started_at,
        committed_at=committed_at,
    )


def _async_figures(store: Store, run_id: str, rows: list[RoundRow], log_path: Path) -> dict[str, Any]:
    """Staleness, stream wait, updates in flight and in the buffer, per row and for the run, from the
    markers; the rejections up to each row, by reason, from the handlers' metric lines."""
    from fedstream.local import async_stats
    from fedstream.local.logs import json_lines, rejection_events

    updates = async_stats.from_markers(store.run_items_with_prefix(run_id, "update#"))
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    rejections = rejection_events(json_lines(text))
    previous = float("-inf")
    for row in rows:
        end = row.committed_at if row.committed_at is not None else float("inf")
        for name, value in async_stats.row_stats(updates, previous, end).items():
            setattr(row, name, value)
        taken = sum(1 for u in updates if u.taken and u.consumed_at <= end)
        row.buffered = max(0, taken - row.clients)
        row.rejected = {}
        for at, reason, count in rejections:
            if at <= end:
                row.rejected[reason] = row.rejected.get(reason, 0) + count
        previous = end
    return async_stats.run_summary(updates)


def _rejections(log_path: Path) -> dict[str, int]:
    """UpdatesRejected counts by reason, read back from the EMF lines in the log stream."""
    from fedstream.local.logs import metric_counts

    return metric_counts(log_path.read_text(), "UpdatesRejected", "reason") if log_path.exists() else {}


def _rejections_by_client(log_path: Path) -> dict[str, dict[str, int]]:
    from fedstream.local.logs import rejections_by_client

    return rejections_by_client(log_path.read_text()) if log_path.exists() else {}


def _check_attackers(config: LocalRunConfig, client_ids: list[str]) -> None:
    """Every attacker is one of the run's clients with an attack spec that parses (before anything starts)."""
    from fedstream.local.attack import AttackSpecError, parse_attack

    unknown = sorted(set(config.attackers) - set(client_ids))
    if unknown:
        raise CliError(f"attackers {unknown} are not clients of this run ({client_ids[0]}..{client_ids[-1]})")
    for client_id, spec in config.attackers.items():
        try:
            parse_attack(spec)
        except AttackSpecError as exc:
            raise CliError(f"attack of {client_id}: {exc}") from None


def _config_json(config: LocalRunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in LocalRunConfig.__dataclass_fields__:
        value = getattr(config, name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, InfluenceBounds):
            value = value.model_dump()
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _write_outputs(summary: RunSummary, config: LocalRunConfig) -> None:
    out = summary.out
    rows = [asdict(r) for r in summary.rounds]
    config_json = _config_json(config)
    (out / "metrics.json").write_text(
        json.dumps(
            {
                "run_id": summary.run_id,
                "status": summary.status,
                "error": summary.error,
                "wall_seconds": summary.wall_seconds,
                "final_version": summary.final_version,
                "initial_test_accuracy": summary.initial_accuracy,
                "rejected": summary.rejected,
                "rejected_by_client": summary.rejected_by_client,
                "counts": summary.counts,
                "handlers": summary.handlers,
                "faults_injected": summary.faults_injected,
                "async": summary.async_stats,
                "client_exit_codes": summary.client_exit_codes,
                "config": config_json,
                "rounds": rows,
            },
            indent=2,
        )
    )
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(RoundRow.__dataclass_fields__))
        writer.writeheader()
        # a cell per field: the rejections by reason as JSON
        writer.writerows({**row, "rejected": json.dumps(row["rejected"])} for row in rows)
    if rows:
        from fedstream.local.plot import plot_run

        title = f"{config.mode} · {config.aggregator} · {config.dataset}"
        plot_run(summary.rounds, out / "accuracy.png", mode=config.mode, title=title)
