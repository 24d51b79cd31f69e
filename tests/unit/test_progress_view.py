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
        mode=mode, aggregator="fedbuff", dataset="digits", clients=3, min_clients=None, rounds=5, updates=20
    )
    view = Progress(io.StringIO(), config, ["site-1", "site-2", "site-3"], enabled=False)
    view.status = status
    for r in rows:
        view.rows.append(r)
    table = view._render()
    cells = [[str(c) for c in column._cells] for column in table.columns]
    return [str(c.header) for c in table.columns], str(table.caption), cells


def test_async_rows_show_versions_applied_rejected_buffered_staleness_and_elapsed_time_not_rounds():
    headers, caption, cells = render(
        "async",
        [
            row(version=2, clients=3, buffered=1, staleness_p50=0.0, staleness_max=1.0),
            row(
                version=5,
                clients=9,
                buffered=0,
                staleness_p50=1.5,
                staleness_max=3.0,
                rejected={"stale": 1, "norm_bound": 2},
            ),
        ],
        "SUCCEEDED",
    )
    assert headers == [
        "version",
        "applied",
        "rejected",
        "buffered",
        "staleness",
        "test accuracy",
        "elapsed s",
    ]
    assert all(headers) and "execution" not in caption
    assert cells[0] == ["2", "5"] and cells[1] == ["3", "9"] and cells[2] == ["0", "3"]
    assert cells[3] == ["1", "0"] and cells[4] == ["0/1", "1.5/3"] and cells[-1] == ["4.2", "4.2"]
    # the reasons, most first, and how often a row is written
    assert "rejected: norm_bound 2, stale 1" in caption
    assert "a row per version evaluated (at most 2 a second" in caption


def test_an_async_view_gets_an_epsilon_column_only_when_the_aggregator_reports_one():
    headers, _, _ = render("async", [row(epsilon=None)], "RUNNING")
    assert "epsilon" not in headers
    headers, _, cells = render("async", [row(epsilon=1.234)], "RUNNING")
    assert headers[-1] == "epsilon" and cells[-1] == ["1.23"]


def test_a_long_run_shows_its_newest_rows_and_counts_the_others():
    rows = [row(version=v) for v in range(1, Progress.SHOWN_ROWS + 6)]
    _, caption, cells = render("async", rows, "RUNNING")
    assert cells[0][0] == "6" and cells[0][-1] == str(Progress.SHOWN_ROWS + 5)
    assert "5 earlier rows not shown" in caption


def test_sync_rows_say_how_each_round_closed_under_a_named_column():
    headers, caption, cells = render("sync", [row(), row(round=2, at_deadline=True)], "RUNNING")
    assert headers[-1] == "closed" and all(headers)
    assert cells[-1] == ["complete", "at deadline"] and caption == "execution RUNNING"
