"""A local run that fails to start, or is interrupted, stops everything it started.

Left running, a poller keeps calling the stopped moto server and prints ``Connection refused``
tracebacks into whatever test runs next; a client process outlives the test; the handlers' settings
stay in ``os.environ``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import fedstream.local.run as run_module
from fedstream.cli import CliError
from fedstream.local.clients import READY, ProcessClient
from fedstream.local.embedded import EmbeddedAWS, aws_environment
from fedstream.local.run import LocalRunConfig, run_local
from fedstream.settings import ENV_PREFIX

pytestmark = pytest.mark.e2e


class Recorded:
    """What a run started, recorded by wrapping the run module's factories."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.servers: list[EmbeddedAWS] = []
        self.clients: list[ProcessClient] = []
        servers, clients = self.servers, self.clients

        class RecordedAWS(EmbeddedAWS):
            def start(self) -> None:
                super().start()
                servers.append(self)

        def process_client(*args: Any, **kwargs: Any) -> ProcessClient:
            client = real_process_client(*args, **kwargs)
            clients.append(client)
            return client

        real_process_client = run_module.process_client
        monkeypatch.setattr(run_module, "EmbeddedAWS", RecordedAWS)
        monkeypatch.setattr(run_module, "process_client", process_client)


def run_environment() -> dict[str, str]:
    """The variables a run sets: the embedded AWS's and the handlers' settings (importing the
    handlers or TensorFlow sets others, once per process, with ``setdefault``)."""
    names = set(aws_environment("", 0))
    return {k: v for k, v in os.environ.items() if k in names or k.startswith(ENV_PREFIX)}


def config(out: Path, **fields: Any) -> LocalRunConfig:
    return LocalRunConfig(
        clients=2, rounds=1, dataset="digits", trainer="numpy", progress=False, out=out, **fields
    )


def assert_everything_stopped(recorded: Recorded, threads_before: set[threading.Thread]) -> None:
    started = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert started == [], f"threads the run left running: {[t.name for t in started]}"
    assert [c.returncode is not None for c in recorded.clients] == [True, True]
    [server] = recorded.servers
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_clients_not_ready_in_time_stop_the_run_and_everything_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a run whose clients cannot be ready in time (the wait for them ends at once)
    recorded = Recorded(monkeypatch)
    environ, threads_before = run_environment(), set(threading.enumerate())
    caplog.set_level(logging.DEBUG, logger="fedstream.local")

    # WHEN it starts: the embedded AWS, the pollers and two client processes, then gives up
    with pytest.raises(CliError, match="clients not ready after 0 s"):
        run_local(config(tmp_path, startup_timeout=0))

    # THEN no poller or client is left running, the server's port is closed, os.environ is as
    # it was, and no poller logged an error (no "Connection refused" for a later test to print)
    assert_everything_stopped(recorded, threads_before)
    assert run_environment() == environ
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("interruption", [RuntimeError("starting the execution failed"), KeyboardInterrupt()])
def test_an_error_or_ctrl_c_once_the_clients_are_ready_stops_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: BaseException
) -> None:
    # GIVEN a run that fails (or is interrupted) as it starts the state machine's execution,
    # after its clients are ready and a fault plan froze one of them
    recorded = Recorded(monkeypatch)
    environ, threads_before = run_environment(), set(threading.enumerate())

    def fail_to_start(*args: Any, **kwargs: Any) -> Any:
        raise interruption

    monkeypatch.setattr(run_module, "_run_sync", fail_to_start)

    # WHEN it runs: the error comes out as it was; Ctrl-C ends the run as INTERRUPTED
    if isinstance(interruption, KeyboardInterrupt):
        summary = run_local(config(tmp_path, faults=("hang:site-2",)))
        assert summary.status == "INTERRUPTED" and summary.rounds == []
        assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "INTERRUPTED"
    else:
        with pytest.raises(RuntimeError):
            run_local(config(tmp_path, faults=("hang:site-2",)))

    # THEN the pollers, the fault thread and the clients (the frozen one too) are stopped
    assert_everything_stopped(recorded, threads_before)
    assert run_environment() == environ
    assert all(READY in c.log_path.read_text() for c in recorded.clients)
