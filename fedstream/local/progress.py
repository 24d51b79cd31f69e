"""The live progress view and the closing summary of a local run (rich)."""

from __future__ import annotations

from typing import IO, Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rejected_text(rejected: dict[str, int], total: bool = True) -> str:
    """``0``, or the total and each reason, most first: ``3 (norm_bound 2, stale 1)``."""
    count = sum(rejected.values())
    by_count = sorted(rejected.items(), key=lambda item: -item[1])
    reasons = ", ".join(f"{reason} {n}" for reason, n in by_count)
    if not total:
        return reasons
    return f"{count} ({reasons})" if count else "0"


def staleness_text(row: Any) -> str:
    if row.staleness_p50 is None:
        return "-"
    return f"{row.staleness_p50:g}/{row.staleness_max:g}"


class Progress:
    # What a run writes into --out, besides one log per client in clients/.
    OUTPUT_FILES = (
        "metrics.json",
        "metrics.csv",
        "accuracy.png",
        "final_model.safetensors",
        "logs.jsonl",
        "aws.log",
    )

    def __init__(self, stream: IO[str], config: Any, client_ids: list[str], enabled: bool = True) -> None:
        self.console = Console(file=stream)
        self.config = config
        self.required = config.min_clients or len(client_ids)
        self.rows: list[Any] = []
        self.status = "STARTING"  # until every client has loaded its data and model
        self.current: dict[str, Any] | None = None
        self.enabled = enabled
        self._live = Live(self._render(), console=self.console, refresh_per_second=4) if enabled else None
        if self._live:
            self._live.start()
        else:
            self.console.print(
                f"fedstream local: {config.mode} · {config.aggregator} · {len(client_ids)} clients · "
                + (f"{config.rounds} rounds" if config.mode == "sync" else f"{config.updates} updates")
                + f" · {config.dataset}"
            )

    SYNC_COLUMNS = ("round", "clients", "duration s", "train loss", "test accuracy", "epsilon", "closed")
    # async: no rounds and no execution. A row per version the view evaluated (at most two a second):
    # updates applied and rejected (by reason) up to it, waiting in the buffer at it, the staleness of
    # the updates taken since the previous row, and when it was committed. Every version is in
    # metrics.json at the end. Epsilon only for an aggregator that reports it.
    ASYNC_COLUMNS = (
        "version",
        "applied",
        "rejected",
        "buffered",
        "staleness",
        "test accuracy",
        "elapsed s",
    )
    ASYNC_RATE = (
        "a row per version evaluated (at most 2 a second; every version in metrics.json); "
        "staleness p50/max of the updates taken since the row before"
    )
    SHOWN_ROWS = 30  # the newest rows; a long run's earlier ones are counted in the caption

    def _render(self) -> Table:
        sync = self.config.mode == "sync"
        if self.status == "STARTING":
            caption = f"starting the embedded AWS and {self.config.clients} clients"
        else:
            caption = f"execution {self.status}" if sync else f"run {self.status.lower()}"
        if not sync and self.rows and self.rows[-1].rejected:
            caption += f" · rejected: {rejected_text(self.rows[-1].rejected, total=False)}"
        if not sync:
            caption += f" · {self.ASYNC_RATE}"
        hidden = max(0, len(self.rows) - self.SHOWN_ROWS)
        if hidden:
            caption += f" · {hidden} earlier rows not shown"
        table = Table(
            title=f"fedstream local · {self.config.mode} · {self.config.aggregator} · {self.config.dataset}",
            caption=caption,
            box=box.SIMPLE_HEAD,  # no cell borders: an async row fits in 80 columns
            show_edge=False,
            collapse_padding=True,
        )
        with_epsilon = not sync and any(row.epsilon is not None for row in self.rows)
        columns = self.SYNC_COLUMNS if sync else self.ASYNC_COLUMNS + (("epsilon",) if with_epsilon else ())
        for column in columns:
            table.add_column(column, justify="right", no_wrap=True)
        for row in self.rows[hidden:]:
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
                cells = [
                    str(row.version),
                    str(row.clients),
                    str(sum(row.rejected.values())),
                    "-" if row.buffered is None else str(row.buffered),
                    staleness_text(row),
                    _fmt(row.test_accuracy),
                    _fmt(row.elapsed_seconds, 1),
                ]
                table.add_row(*cells, *([_fmt(row.epsilon, 2)] if with_epsilon else []))
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
                head = (
                    f"version {row.version}: {row.clients} applied, {rejected_text(row.rejected)} rejected, "
                    f"{row.buffered} buffered, staleness p50/max {staleness_text(row)}"
                )
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
        style = {"SUCCEEDED": "green", "INTERRUPTED": "yellow"}.get(summary.status, "red")
        self.console.print(
            f"[{style}]run {summary.run_id}: {summary.status}[/{style}] in {summary.wall_seconds:.1f} s"
        )
        if summary.error:
            self.console.print(f"[red]{summary.error}[/red]")
        if summary.rejected:
            self.console.print(f"updates rejected: {summary.rejected}")
        written = [name for name in self.OUTPUT_FILES if (summary.out / name).exists()]
        self.console.print(f"outputs in {summary.out}/ ({', '.join(written)}, clients/)")
