"""Every refusal is a ``fedstream.errors.Refused`` with its reason; the server passes it on unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fedstream.handlers import async_update

from fedstream import keys
from fedstream.aggregation import (
    AggregationError,
    Aggregator,
    AsyncResult,
    AsyncState,
    ClientUpdate,
    PrivacyBudgetExhausted,
)
from fedstream.bounds import OutOfBounds
from fedstream.errors import Refused
from fedstream.local.embedded import EmbeddedAWS
from fedstream.local.logs import json_lines, metric_counts
from fedstream.registry import AggregatorInfo, AggregatorRegistry, NoParams
from fedstream.server import finalize, sync
from fedstream.server.asynchronous import start_run
from fedstream.server.store import CorruptObject
from fedstream.weights import Weights, WireFormatError, encode
from tests.handlers.conftest import FakeContext, SyncWorld, _deployment, global_weights, stream_event


@pytest.mark.parametrize(
    "kind",
    [WireFormatError, AggregationError, OutOfBounds, sync.Rejected, finalize.FinalizeRefused],
)
def test_each_refusal_is_a_refused_with_its_reason_and_message(kind: type[Refused]) -> None:
    refusal = kind("some_reason", "what was wrong")

    assert isinstance(refusal, Refused) and isinstance(refusal, ValueError)
    assert refusal.reason == "some_reason"
    assert str(refusal) == "what was wrong"


def test_an_exhausted_privacy_budget_is_an_aggregation_error_with_its_reason() -> None:
    refusal = PrivacyBudgetExhausted("epsilon 8.1 > budget 8")

    assert isinstance(refusal, AggregationError) and isinstance(refusal, Refused)
    assert refusal.reason == "privacy_budget_exhausted"
    assert str(refusal) == "epsilon 8.1 > budget 8"


class _RefusesEveryUpdate(Aggregator):
    modes = frozenset({"async"})

    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AsyncState | None = None,
    ) -> AsyncResult:
        raise AggregationError("x", f"the plugin refuses {update.client_id!r}")


@pytest.fixture(scope="module")
def aws() -> Iterator[EmbeddedAWS]:
    with EmbeddedAWS() as server:
        yield server


@pytest.fixture
def refusing_world(aws: EmbeddedAWS, monkeypatch: pytest.MonkeyPatch) -> SyncWorld:
    """An async run at version 0 whose aggregator (a plugin) refuses every update."""
    registry = AggregatorRegistry()
    registry.add(
        AggregatorInfo(
            "refuses", lambda params, ctx: _RefusesEveryUpdate(), NoParams, frozenset({"async"}), "", "test"
        )
    )
    monkeypatch.setattr(async_update, "default_registry", lambda: registry)
    resources, settings = _deployment(aws, monkeypatch, mode="async", aggregator="refuses")
    world = SyncWorld(aws, resources, settings, "run-r", global_weights())
    start_run(world.store, world.run_id, encode(world.base, {"run_id": world.run_id, "version": "0"}))
    return world


def test_a_plugins_aggregation_error_in_async_mode_is_a_rejection_with_its_reason(
    refusing_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    world = refusing_world
    shifted = {name: (array + 1).astype(array.dtype) for name, array in world.base.items()}
    item = world.record("site-1", shifted, round=None, version=0, task_token=None)
    capsys.readouterr()

    response = async_update.lambda_handler(stream_event(item), FakeContext())

    out = capsys.readouterr().out
    assert response == {"batchItemFailures": []}
    assert metric_counts(out, "UpdatesRejected", "reason") == {"x": 1}
    [logged] = [e for e in json_lines(out) if e.get("message") == "update rejected"]
    assert logged["reason"] == "x"
    assert logged["detail"] == "the plugin refuses 'site-1'"
    assert world.run_state()["version"] == 0


def test_a_global_model_that_fails_its_checks_is_a_fault_not_a_refusal(refusing_world: SyncWorld) -> None:
    # A refusal would be counted against the update that needed the model; a fault is retried.
    world = refusing_world
    world.put_object(keys.global_key(world.run_id, 7), b"\x00" * 16)

    with pytest.raises(CorruptObject) as info:
        world.store.global_model(world.run_id, 7)

    assert not isinstance(info.value, Refused)
    assert isinstance(info.value.__cause__, WireFormatError)
