"""The live progress view and the closing summary of a local run (rich)."""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class Progress:
    # What a run writes into --out, besides one log per client in clients/.
    OUTPUT_FILES = ("metrics.json", "metrics.csv", "accuracy.png", "final_model.safetensors", "logs.jsonl")

    def __init__(self, stream: IO[str], config: Any, client_ids: list[str], enabled: bool = True) -> None:
        self.console = Console(file=stream)
        self.config = config
        self.required = config.min_clients or len(client_ids)
        self.rows: list[Any] = []
        self.status = "RUNNING"
        self.current: dict[str, Any] | None = None
        self.enabled = enabled
        self._live = Live(self._render(), console=self.console, refresh_per_second=4) if enabled else None
        if self._live:
            self._live.start()
        else:
            self.console.print(
                f"fedstream local: {config.mode} · {config.aggregator} · {len(client_ids)} clients · "
                f"{config.rounds} rounds · {config.dataset}"
            )

    SYNC_COLUMNS = ("round", "clients", "duration s", "train loss", "test accuracy", "epsilon", "closed")
    # async: no rounds and no execution: each evaluated version, the updates applied up to it, the
    # clients' last reported loss, and when it was committed (staleness per version is computed from
    # the update markers at the end: metrics.json and accuracy.png)
    ASYNC_COLUMNS = ("version", "applied", "train loss", "test accuracy", "epsilon", "elapsed s")

    def _render(self) -> Table:
        sync = self.config.mode == "sync"
        table = Table(
            title=f"fedstream local · {self.config.mode} · {self.config.aggregator} · {self.config.dataset}",
            caption=f"execution {self.status}" if sync else f"run {self.status.lower()}",
        )
        for column in self.SYNC_COLUMNS if sync else self.ASYNC_COLUMNS:
            table.add_column(column, justify="right")
        for row in self.rows:
            if sync:
                table.add_row(
                    str(row.round),
                    str(row.clients),
                    _fmt(row.duration_seconds, 1),
                    _fmt(row.train_loss),
                    _fmt(row.test_accuracy),
                    _fmt(row.epsilon, 2),
                    "at deadline" if row.at_deadline else "complete",
                )
            else:
                table.add_row(
                    str(row.version),
                    str(row.clients),
                    _fmt(row.train_loss),
                    _fmt(row.test_accuracy),
                    _fmt(row.epsilon, 2),
                    _fmt(row.elapsed_seconds, 1),
                )
        if self.current and self.current.get("status") in ("open", "aggregating"):
            table.add_row(
                str(self.current.get("round")),
                f"{self.current.get('reported_count', 0)}/{len(self.config_clients())}",
                "",
                "",
                "",
                "",
                str(self.current.get("status")),
            )
        return table

    def config_clients(self) -> range:
        return range(self.config.clients)

    def update(self, round_item: dict[str, Any] | None, status: str) -> None:
        self.current, self.status = round_item, status
        if self._live:
            self._live.update(self._render())

    def round_closed(self, row: Any) -> None:
        self.rows.append(row)
        if self._live:
            self._live.update(self._render())
        else:
            if self.config.mode == "sync":
                head = f"round {row.round}: {row.clients} clients"
            else:
                head = f"version {row.version}: {row.clients} updates applied"
            self.console.print(
                f"{head}, test accuracy {_fmt(row.test_accuracy)}"
                + (" (closed at deadline)" if row.at_deadline else "")
            )

    def close(self) -> None:
        if self._live:
            self._live.update(self._render())
            self._live.stop()
            self.console.print()

    def summary(self, summary: Any) -> None:
        style = "green" if summary.status == "SUCCEEDED" else "red"
        self.console.print(
            f"[{style}]run {summary.run_id}: {summary.status}[/{style}] in {summary.wall_seconds:.1f} s"
        )
        if summary.error:
            self.console.print(f"[red]{summary.error}[/red]")
        if summary.rejected:
            self.console.print(f"updates rejected: {summary.rejected}")
        written = [name for name in self.OUTPUT_FILES if (summary.out / name).exists()]
        self.console.print(f"outputs in {summary.out}/ ({', '.join(written)}, clients/)")
