"""The live view of a local run: sync rounds and async versions each get their own columns, every
column has a header, and an async run never speaks of an execution."""

from __future__ import annotations

import io
from types import SimpleNamespace

from fedstream.local.progress import Progress
from fedstream.local.run import RoundRow


def row(**fields):
    base = dict(round=1, version=1, duration_seconds=2.5, clients=3, at_deadline=False, train_loss=0.5)
    base |= dict(
        eval_accuracy_clients=0.8, test_loss=0.4, test_accuracy=0.81, epsilon=None, elapsed_seconds=4.2
    )
    return RoundRow(**{**base, **fields})


def render(mode: str, rows: list[RoundRow], status: str) -> tuple[list[str], str, list[list[str]]]:
    config = SimpleNamespace(
        mode=mode, aggregator="fedbuff", dataset="digits", clients=3, min_clients=None, rounds=5
    )
    view = Progress(io.StringIO(), config, ["site-1", "site-2", "site-3"], enabled=False)
    view.status = status
    for r in rows:
        view.rows.append(r)
    table = view._render()
    cells = [[str(c) for c in column._cells] for column in table.columns]
    return [str(c.header) for c in table.columns], str(table.caption), cells


def test_async_rows_show_versions_applied_updates_and_elapsed_time_not_rounds():
    headers, caption, cells = render(
        "async", [row(version=2, clients=3), row(version=5, clients=9)], "SUCCEEDED"
    )
    assert headers == ["version", "applied", "train loss", "test accuracy", "epsilon", "elapsed s"]
    assert all(headers) and "execution" not in caption
    assert cells[0] == ["2", "5"] and cells[1] == ["3", "9"] and cells[-1] == ["4.2", "4.2"]


def test_sync_rows_say_how_each_round_closed_under_a_named_column():
    headers, caption, cells = render("sync", [row(), row(round=2, at_deadline=True)], "RUNNING")
    assert headers[-1] == "closed" and all(headers)
    assert cells[-1] == ["complete", "at deadline"] and caption == "execution RUNNING"
