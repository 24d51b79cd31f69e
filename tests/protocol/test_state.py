"""The aggregator state between steps, as the hosts keep it: written with each version, read by the
next step from storage (not from the process that wrote it), and the same after a crash and retry.

FedAvgM (server_lr 1, momentum 0.9) makes the state visible in the model: with clients that move
the model by the same mean delta D every step, step 1 moves it by D and step 2 by 0.9 D + D. A host
that dropped the momentum would move it by D again."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedstream import keys
from fedstream.server.memory import Crash, MemoryStore
from fedstream.weights import decode
from tests.protocol.conftest import ROUND_TOKEN, Run, assert_model, make_settings, shifted

HONEST = (("site-1", 1.0, 10), ("site-2", 2.0, 30), ("site-3", 4.0, 60))
D = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100  # the round's example-weighted mean delta: 3.1
MOMENTUM = 0.9


@pytest.fixture
def opt_run() -> Run:
    settings = make_settings("sync", aggregator="fedavgm", aggregator_params={"momentum": MOMENTUM})
    run = Run(MemoryStore(settings), settings)
    run.start_sync()
    return run


def reports(run: Run, number: int) -> list[dict[str, Any]]:
    base = run.model(number - 1)
    token = ROUND_TOKEN if number == 1 else f"token-round-{number}"
    return [
        run.record(c, shifted(base, by), examples=n, round=number, version=number - 1, task_token=token)
        for c, by, n in HONEST
    ]


def next_round(run: Run, number: int) -> None:
    run.open_round(number, version=number - 1, token=f"token-round-{number}")


def moved(run: Run, by: float) -> dict[str, np.ndarray]:
    return {name: array + by for name, array in run.base.items()}


def named_state(run: Run) -> tuple[str, dict[str, np.ndarray]]:
    key = str(run.state()["aggregator_state_key"])
    assert key.startswith(f"runs/{run.run_id}/state/")
    arrays, _ = decode(run.store.get_bytes(key, 10**8))
    return key, arrays


def test_sync_rounds_carry_the_momentum_from_one_round_to_the_next_through_storage(opt_run: Run) -> None:
    run = opt_run
    # GIVEN round 1 closed by three reports whose mean delta is D
    assert run.deliver(*reports(run, 1))[-1] == "closed"
    assert_model(run.model(1), moved(run, D), atol=1e-5)
    _, state = named_state(run)
    np.testing.assert_allclose(state["m/dense/bias"], D)

    # WHEN round 2 closes on another process (nothing cached) with the same mean delta
    next_round(run, 2)
    assert run.deliver(*reports(run, 2), store=run.store.another_process())[-1] == "closed"  # type: ignore[attr-defined]

    # THEN it moved by 0.9 D + D: the momentum came back from the stored state
    assert_model(run.model(2), moved(run, D + MOMENTUM * D + D), atol=1e-5)


@pytest.mark.parametrize("after", [False, True], ids=["before_the_model_write", "after_the_model_write"])
def test_a_crash_around_the_model_write_leaves_model_and_state_belonging_together(
    opt_run: Run, after: bool
) -> None:
    run = opt_run
    store = run.store
    assert isinstance(store, MemoryStore)
    first, second, third = reports(run, 1)
    run.deliver(first, second)
    # GIVEN the close crashes once the state is written: before the model write, or after it (the
    # model is there, the version not published)
    store.crash("put_once", after=after)
    with pytest.raises(Crash):
        run.deliver(third)
    assert run.state()["version"] == 0

    # WHEN the stream retries the record on a fresh process
    assert run.deliver(third, store=store.another_process()) == ["duplicate"]  # registered before the crash
    assert run.state()["version"] == 1

    # THEN version 1 names the state its own close wrote (the model's metadata says which), and
    # round 2 steps with that state's momentum exactly as without the crash
    key, state = named_state(run)
    _, meta = decode(store.get_bytes(keys.global_key(run.run_id, 1)))
    assert meta["aggregator_state"] == key
    np.testing.assert_allclose(state["m/dense/kernel"], D, rtol=1e-6)
    next_round(run, 2)
    run.deliver(*reports(run, 2), store=store.another_process())
    assert_model(run.model(2), moved(run, D + MOMENTUM * D + D), atol=1e-5)


@pytest.fixture
def async_opt_run() -> Run:
    params = {"momentum": MOMENTUM, "buffer_size": 2}
    settings = make_settings("async", aggregator="fedavgm", aggregator_params=params)
    run = Run(MemoryStore(settings), settings, run_id="run-a")
    run.start_async()
    return run


def test_async_steps_carry_the_momentum_across_invocations_and_a_crash_before_the_commit(
    async_opt_run: Run,
) -> None:
    run = async_opt_run
    store = run.store
    assert isinstance(store, MemoryStore)
    # GIVEN two updates from version 0 that move it by 1 and 3: one step of mean delta 2
    run.batch(run.update("site-1", 0, by=1.0), store=store.another_process())
    run.batch(run.update("site-2", 0, by=3.0), store=store.another_process())
    assert run.state()["version"] == 1
    assert_model(run.model(), moved(run, 2.0))

    # WHEN the next two come from version 1 (deltas 1 and 3 again), the second batch crashing
    # before its commit once and retried on a fresh process
    run.batch(run.update("site-3", 1, by=3.0), store=store.another_process())
    last = run.update("site-1", 1, by=5.0)
    crashing = store.another_process()
    crashing.crash("commit_async_step")
    with pytest.raises(Crash):
        run.batch(last, store=crashing)
    run.batch(last, store=store.another_process())

    # THEN the second step used the stored momentum: 2 + (0.9 * 2 + 2)
    assert run.state()["version"] == 2
    assert_model(run.model(), moved(run, 2.0 + MOMENTUM * 2.0 + 2.0))
    # and a redelivered batch changes nothing
    run.batch(last, store=store.another_process())
    assert run.state()["version"] == 2
