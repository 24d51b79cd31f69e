"""Where updates meet their aggregator: the one round and the one async step every host takes.

The sync handler (``fedstream.server.sync``) and the offline CLI run a round with ``sync_round``
after judging its updates together (``fedstream.bounds.admit_round``); the async handler
(``fedstream.server.asynchronous``) and ``fedstream aggregate --mode async`` call ``async_step``
for each update, after their own checks (identity, duplicates, one update in flight). Staleness
and the influence bounds are judged here or in ``admit_round``, once, for every aggregator: a
plugin never sees a stale, unchanged or outsized update. The state the aggregator returns
(``RoundResult.state``, ``AsyncResult.state``) is the host's to persist with the version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from fedstream.aggregation import (
    Aggregator,
    AggregatorState,
    AsyncResult,
    ClientUpdate,
    MetricsMean,
    RoundContext,
    RoundResult,
)
from fedstream.bounds import InfluenceBounds, check_change, check_norm, delta_norm, remember_norm
from fedstream.errors import Refused
from fedstream.weights import Weights, all_finite


def staleness_of(current_version: int, base_version: int) -> int:
    """Versions between the one an update was trained on and the one it meets; a base from the
    future is refused (``future_base_version``)."""
    staleness = current_version - base_version
    if staleness < 0:
        raise Refused("future_base_version", f"base version {base_version} > current {current_version}")
    return staleness


def check_stale(aggregator: Aggregator, staleness: int) -> None:
    """Refuse an update staler than the aggregator's ``max_staleness`` (``stale``)."""
    limit = aggregator.max_staleness
    if limit is not None and staleness > limit:
        raise Refused("stale", f"update is {staleness} versions stale (max {limit})")


@dataclass
class Step:
    result: AsyncResult
    norm: float  # the update's delta norm from the model it was trained on
    norms: list[float]  # the bounds' reference window, with this update taken
    num_examples: int  # the update's example count as applied (after the cap)


def async_step(
    aggregator: Aggregator,
    current: Weights,
    update: ClientUpdate,
    *,
    staleness: int,
    state: AggregatorState | None,
    bounds: InfluenceBounds,
    norms: list[float],
    trained_from: Weights,
) -> Step:
    """Judge ``update`` (staleness, ``no_change``, ``norm_bound``, the example cap) and hand it to
    the aggregator; refuse a step whose weights are not finite (``non_finite``). Raises ``Refused``
    with the reason; the given state and window are never changed."""
    check_stale(aggregator, staleness)
    norm = delta_norm(update.weights, trained_from)
    check_change(norm, update.client_id)
    check_norm(bounds, norm, norms, update.client_id)
    if bounds.max_examples is not None and update.num_examples > bounds.max_examples:
        update = replace(update, num_examples=bounds.max_examples)
    result = aggregator.apply_async(current, update, staleness=staleness, state=state)
    if result.weights is not None and not all_finite(result.weights):
        raise Refused(
            "non_finite", f"applying the update of {update.client_id!r} would make the model non-finite"
        )
    return Step(result, norm, remember_norm(bounds, norms, norm), update.num_examples)


def sync_round(
    aggregator: Aggregator,
    global_weights: Weights,
    context: RoundContext,
    updates: Iterable[ClientUpdate],
    nothing: Callable[[], Exception],
) -> RoundResult:
    """One round: ``begin`` (with the previous round's state in ``context``), each admitted update
    in turn (``updates`` may download lazily: one in memory at a time), ``finish``. ``nothing()`` is
    raised when no update came.

    The round's metrics always hold the example-weighted means of what the clients reported
    (``train_loss``, ``eval_accuracy``, ...) and the counts, whatever the plugin returns: the run's
    target accuracy does not depend on each plugin remembering to average them. A metric the plugin
    returns itself takes precedence."""
    aggregator.begin(global_weights, context)
    reported = MetricsMean()
    for update in updates:
        aggregator.accept(update)
        reported.add(update.metrics, update.num_examples)
    if not reported.num_clients:
        raise nothing()
    result = aggregator.finish()
    result.metrics = {**reported.result(), **result.metrics}
    return result
