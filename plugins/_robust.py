"""What the robust aggregators (``median``, ``trimmed-mean``, ``krum``) share.

A robust rule needs every update side by side, so unlike FedAvg's running sum these aggregators
hold all of them until they combine: memory O(K * model). Sync keeps each accepted update's arrays
(the decoded payloads, not copied) until ``finish``; async keeps the K float64 deltas of the buffer.
``stacks/`` sizes the functions for it (``constants.AGGREGATORS_HOLDING_UPDATES``).

Sync: ``finish`` combines the clients' weights w_1..w_n themselves. The coordinate-wise median and
trimmed mean are translation-equivariant and Krum's distances translation-invariant, so this equals
g + robust(w_1 - g, ..., w_n - g) for the global weights g.

Async: FedBuff's buffer (Nguyen et al. 2022, plugins/fedbuff.py) with the deltas kept one by one::

    d_i = s(tau_i) * (w_i - x_{base(i)})      s(tau) = (1 + tau)^(-1/2), float64
    after K updates:  x <- x + eta_g * robust(d_1, ..., d_K),  and the buffer empties

The buffer is ``AsyncState.arrays`` with one array per update and tensor, named ``"{i}/{tensor}"``
(i = 0..count-1), and ``AsyncState.values`` = {"count": n, "client/{i}": client id}.

Every rule's result is, coordinate by coordinate, a mean of some of its inputs (the middle one or
two, the untrimmed ones, the selected rows), computed as sum(v / count) so that it stays between
the smallest and the largest input even near the dtype's limit. So an update is refused as
``non_finite`` before it enters the buffer when x + eta_g * d_i would overflow the model's dtype,
and no step from a buffer of accepted deltas can overflow: x does not change while a buffer fills.

Rules work in float64, block by block of coordinates (K rows x about 2**18 / K values of scratch),
and cast back to each tensor's dtype. They are unweighted, as in their papers: ``num_examples``
weighs only the reported training metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import numpy as np
from fedstream.plugins.fedbuff import FedBuffParams, default_buffer_size, weighted_delta

from fedstream.aggregation import (
    AggregationError,
    Aggregator,
    AsyncResult,
    AsyncState,
    ClientUpdate,
    MetricsMean,
    RoundContext,
    RoundResult,
    Scalar,
    cast_like,
)
from fedstream.weights import Weights

# float64 scratch values per block, whatever the number of rows (2 MiB): beyond the held updates
# and the result, a rule needs only this much.
BLOCK_VALUES = 1 << 18


class RobustParams(FedBuffParams):
    """FedBuff's buffer_size, server_lr and max_staleness: async mode only, sync ignores them."""


def blocks(rows: Sequence[Weights], like: Weights) -> Iterator[tuple[str, slice, np.ndarray]]:
    """(tensor name, flat span, the rows' values there as a float64 rows x span array), block by block.

    The array is one scratch buffer, refilled for each block: a consumer may reorder it in place.
    """
    width = max(1, BLOCK_VALUES // len(rows))
    scratch = np.empty((len(rows), width), np.float64)
    for name, reference in like.items():
        flats = [np.asarray(row[name]).reshape(-1) for row in rows]
        for start in range(0, reference.size, width):
            span = slice(start, min(start + width, reference.size))
            block = scratch[:, : span.stop - start]
            for target, flat in zip(block, flats, strict=True):
                target[...] = flat[span]
            yield name, span, block


def coordinatewise(
    rows: Sequence[Weights], like: Weights, reduce: Callable[[np.ndarray], np.ndarray]
) -> Weights:
    """``reduce`` (rows x span -> span) applied to every coordinate of every tensor, in float64."""
    out = {name: np.empty(reference.shape, np.float64) for name, reference in like.items()}
    for name, span, block in blocks(rows, like):
        out[name].reshape(-1)[span] = reduce(block)
    return out


def mean_of_rows(rows: np.ndarray) -> np.ndarray:
    """The column means as sum(v / count): between the column's extremes, with no overflow."""
    return np.add.reduce(rows / rows.shape[0], axis=0)


def middle_mean(block: np.ndarray, cut: int) -> np.ndarray:
    """Each column's mean without its ``cut`` smallest and ``cut`` largest values (reorders ``block``)."""
    count = block.shape[0]
    if cut:
        block.partition(sorted({cut, count - cut - 1}), axis=0)
    return mean_of_rows(block[cut : count - cut])


class RobustAggregator(Aggregator):
    """Holds every update (sync: the round's; async: the buffer's) and hands them to ``combine``."""

    name: ClassVar[str]

    def __init__(self, params: RobustParams, num_clients: int | None = None) -> None:
        self.params = params
        self.buffer_size = params.buffer_size or default_buffer_size(num_clients)
        self.max_staleness = params.max_staleness
        # As FedBuff: K clients fill the buffer, one more keeps it going when one update is refused.
        self.min_clients = self.buffer_size + 1
        self._global: Weights | None = None
        self._rows: list[Weights] = []
        self._sources: list[str] = []
        self._metrics = MetricsMean()

    def combine(
        self, rows: Sequence[Weights], like: Weights, sources: Sequence[str]
    ) -> tuple[Weights, dict[str, float]]:
        """The rule: float64 tensors shaped like ``like``, and its metrics; ``sources`` names each row."""
        raise NotImplementedError

    # -- sync ----------------------------------------------------------------------------------

    def begin(self, global_weights: Weights, context: RoundContext) -> None:
        self._global, self._rows, self._sources, self._metrics = global_weights, [], [], MetricsMean()

    def accept(self, update: ClientUpdate) -> None:
        assert self._global is not None, "begin() must be called before accept()"
        self._rows.append(update.weights)
        self._sources.append(update.client_id)
        self._metrics.add(update.metrics, update.num_examples)

    def finish(self) -> RoundResult:
        assert self._global is not None, "begin() must be called before finish()"
        if not self._rows:
            raise AggregationError("no_updates", f"{self.name}: nothing to aggregate, no update was accepted")
        combined, metrics = self.combine(self._rows, self._global, self._sources)
        weights = cast_like(combined, self._global)
        result = RoundResult(weights=weights, metrics={**self._metrics.result(), **metrics})
        self._global, self._rows, self._sources = None, [], []
        return result

    # -- async ---------------------------------------------------------------------------------

    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AsyncState | None = None,
    ) -> AsyncResult:
        fresh, weight = weighted_delta(self.name, update, staleness)
        count = self._buffered(state, global_weights)
        self._refuse_overflow(global_weights, fresh, update.client_id)

        held = state if state is not None and count else AsyncState()
        arrays = {**held.arrays, **{f"{count}/{name}": tensor for name, tensor in fresh.items()}}
        values: dict[str, Scalar] = {**held.values, "count": count + 1, f"client/{count}": update.client_id}
        metrics = {"staleness": float(staleness), "staleness_weight": weight}
        if count + 1 < self.buffer_size:
            return AsyncResult(
                weights=None,
                state=AsyncState(arrays=arrays, values=values),
                metrics={**metrics, "buffer_fill": float(count + 1)},
            )
        rows = [{name: arrays[f"{i}/{name}"] for name in global_weights} for i in range(count + 1)]
        sources = [str(values.get(f"client/{i}", i)) for i in range(count + 1)]
        step, rule_metrics = self.combine(rows, global_weights, sources)
        weights = {
            name: (current + self.params.server_lr * step[name]).astype(current.dtype)
            for name, current in global_weights.items()
        }
        return AsyncResult(
            weights=weights,
            state=None,
            metrics={**metrics, **rule_metrics, "applied_updates": float(count + 1)},
        )

    def _refuse_overflow(self, global_weights: Weights, fresh: Weights, client_id: str) -> None:
        """Refuse the delta when x + eta_g * d alone leaves the dtype's range (NaN fails too)."""
        for name, current in global_weights.items():
            with np.errstate(over="ignore", invalid="ignore"):
                reached = np.abs(current + self.params.server_lr * fresh[name])
            if not np.all(reached <= np.finfo(current.dtype).max):
                raise AggregationError(
                    "non_finite",
                    f"with {client_id!r}'s update a {self.name} step could overflow tensor {name!r}",
                )

    @staticmethod
    def _buffered(state: AsyncState | None, global_weights: Weights) -> int:
        """How many deltas ``state`` holds, after checking it holds exactly those, shaped like the model."""
        if state is None:
            return 0
        try:
            count = int(state.values.get("count", 0))
        except (TypeError, ValueError):
            count = -1
        expected = {
            f"{i}/{name}": current.shape
            for i in range(max(count, 0))
            for name, current in global_weights.items()
        }
        if count < 0 or set(state.arrays) != set(expected):
            raise AggregationError(
                "bad_state", f"the buffered state does not hold {count} deltas of this model's tensors"
            )
        for key, shape in expected.items():
            if state.arrays[key].shape != shape:
                raise AggregationError("bad_state", f"buffered delta {key!r} is not shaped like the model")
        return count
