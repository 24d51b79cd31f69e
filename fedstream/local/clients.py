"""The local runtime's clients: real ``fedstream client`` processes, or threads for many light ones.

Both run the same :class:`fedstream.client.runner.FederatedClient` loop against the embedded AWS. A process
client is what a silo runs; a thread client shares this process (one boto3 session, no interpreter
start-up), which is how a load test runs hundreds of clients on one machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from fedstream.cli import CliError

READY = '"event": "ready"'


class ProcessClient:
    """One ``fedstream client`` process; its stdout (one JSON event per line) and logs go to a file."""

    def __init__(self, client_id: str, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.client_id, self.command, self.log_path, self.env = client_id, command, log_path, env
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            # A process group of its own: a Ctrl-C at the terminal reaches `fedstream local` only,
            # which stops its clients in order (the client's own Ctrl-C handling is for a silo's shell).
            self.process = subprocess.Popen(
                self.command, stdout=log_file, stderr=subprocess.STDOUT, env=self.env, process_group=0
            )

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith('{"event"'):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
        return events

    def ready(self) -> bool:
        """Ready since the last (re)start: the log holds one "ready" event per start."""
        return self.log_path.read_text(errors="replace").count(READY) > self.restarts

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def kill_and_restart(self) -> None:
        """SIGKILL (no clean-up runs, as when a machine dies), then the same command again."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.restarts += 1
        self.start()

    def wait(self, deadline: float) -> None:
        """Wait until the process exits on its own or ``deadline`` (``time.monotonic()``) passes."""
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=max(0.1, deadline - time.monotonic()))

    def request_stop(self) -> None:
        """SIGTERM: the client stops after its current step (a long poll, an upload)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.process.terminate()

    def force_stop(self) -> None:
        """SIGKILL, and reap the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()


class ThreadClient(threading.Thread):
    """A :class:`FederatedClient` on a thread of this process, with its events in a log file."""

    def __init__(self, client_id: str, client: Any, log_path: Path, max_idle: float) -> None:
        super().__init__(name=f"client-{client_id}", daemon=True)
        self.client_id, self.client, self.log_path, self.max_idle = client_id, client, log_path, max_idle
        self._log: IO[str] = log_path.open("a", buffering=1)
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self.exit_code: int | None = None
        client.on_event = self._on_event

    def _on_event(self, event: str, fields: dict[str, Any]) -> None:
        with self._log_lock:
            line = {"event": event, "client_id": self.client_id, "at": time.time(), **fields}
            self._log.write(json.dumps(line) + "\n")
        if event == "ready":
            self._ready.set()

    def run(self) -> None:
        try:
            self.exit_code = self.client.run(max_idle_seconds=self.max_idle)
        except Exception as exc:
            with self._log_lock:
                self._log.write(f"client failed: {exc!r}\n")
            self.exit_code = 1
        finally:
            self._log.close()

    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def returncode(self) -> int | None:
        return self.exit_code

    def wait(self, deadline: float) -> None:
        if self.ident is not None:
            self.join(timeout=max(0.1, deadline - time.monotonic()))

    def request_stop(self) -> None:
        self.client.stop.set()  # the loop ends after its current step (a long poll, an upload)

    def force_stop(self) -> None:
        """A thread cannot be killed: wait for its current long poll to end."""
        if self.ident is None:  # never started: only its log is open
            with self._log_lock:
                self._log.close()
            return
        self.join(timeout=self.client.settings.wait_seconds + 5)


Client = ProcessClient | ThreadClient


def process_client(
    client_id: str, arguments: list[str], log_path: Path, env: dict[str, str] | None = None
) -> ProcessClient:
    command = [sys.executable, "-m", "fedstream.cli", "client", "--client-id", client_id, *arguments]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    return ProcessClient(client_id, command, log_path, env)


def wait_until_ready(clients: dict[str, Client], timeout: float) -> None:
    """Rounds start once every client has loaded its data and model, so deadlines measure training."""
    deadline = time.monotonic() + timeout
    waiting = set(clients)
    while waiting and time.monotonic() < deadline:
        for client_id in list(waiting):
            client = clients[client_id]
            if client.ready():
                waiting.discard(client_id)
            elif client.returncode is not None:
                raise CliError(
                    f"client {client_id} exited with {client.returncode} before it was ready; "
                    f"see {client.log_path}"
                )
        time.sleep(0.1)
    if waiting:
        raise CliError(f"clients not ready after {timeout:.0f} s: {sorted(waiting)}")


def stop_clients(clients: dict[str, Client], timeout: float, grace: float = 10.0) -> dict[str, int | None]:
    """Wait up to ``timeout`` for clients to finish on their own, then stop the rest.

    Those still running are asked to stop all at once (SIGTERM, or a thread's stop event), get
    ``grace`` seconds together to do so, and are then killed (a thread: waited for). Clients that
    never started are fine (their code is None). Safe to call again: stopped clients return at once.
    """
    deadline = time.monotonic() + timeout
    if timeout > 0:
        for client in clients.values():
            client.wait(deadline)
    running = [client for client in clients.values() if client.returncode is None]
    for client in running:
        client.request_stop()
    grace_deadline = time.monotonic() + grace
    for client in running:
        client.wait(grace_deadline)
    for client in running:
        client.force_stop()
    return {client_id: client.returncode for client_id, client in clients.items()}
