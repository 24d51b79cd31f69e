"""Robust aggregators: coordinate-wise median and trimmed mean (Yin et al. 2018), (Multi-)Krum
(Blanchard et al. 2017), in sync rounds and on FedBuff's buffer in async mode."""

from __future__ import annotations

import json

import fedstream.plugins._robust
import numpy as np
import pytest
from scipy import stats

from fedstream.aggregation import AggregationError, AsyncState, ClientUpdate, RoundContext
from fedstream.registry import PluginError, build_registry, get_plugin_manager
from fedstream.weights import decode, encode

NAMES = ("median", "trimmed-mean", "krum")


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


def random_model(rng: np.random.Generator, dtype=np.float32, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "dense/kernel": (scale * rng.normal(size=(3, 4))).astype(dtype),
        "dense/bias": (scale * rng.normal(size=5)).astype(dtype),
    }


def run_round(aggregator, global_weights, rows, num_examples=None, **metrics):
    aggregator.begin(global_weights, RoundContext(round=1))
    for i, row in enumerate(rows):
        examples = 10 if num_examples is None else num_examples[i]
        aggregator.accept(ClientUpdate(f"site-{i}", row, examples, metrics))
    return aggregator.finish()


# ---- reference definitions, straight from the papers, on the stacked updates ------------------


def stacked(rows, name) -> np.ndarray:
    return np.stack([row[name].astype(np.float64) for row in rows])


def reference_median(rows, **_):
    return {name: np.median(stacked(rows, name), axis=0) for name in rows[0]}


def reference_trimmed_mean(rows, beta, **_):
    return {name: stats.trim_mean(stacked(rows, name), beta, axis=0) for name in rows[0]}


def reference_krum(rows, f, m, **_):
    """Blanchard et al. 2017: score(i) = sum of the n - f - 2 smallest ||u_i - u_j||^2, j != i
    (at least 1); average the m updates with the lowest scores."""
    names = list(rows[0])
    flat = [np.concatenate([row[name].astype(np.float64).ravel() for name in names]) for row in rows]
    n = len(flat)
    closest = max(1, n - f - 2)
    scores = []
    for i in range(n):
        distances = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(distances[:closest]))
    chosen = np.argsort(scores, kind="stable")[:m]
    mean = np.mean([flat[i] for i in chosen], axis=0)
    out, start = {}, 0
    for name in names:
        size = rows[0][name].size
        out[name] = mean[start : start + size].reshape(rows[0][name].shape)
        start += size
    return out


REFERENCES = {"median": reference_median, "trimmed-mean": reference_trimmed_mean, "krum": reference_krum}
CASES = [
    ("median", {}),
    ("trimmed-mean", {"beta": 0.0}),
    ("trimmed-mean", {"beta": 0.1}),
    ("trimmed-mean", {"beta": 0.25}),
    ("trimmed-mean", {"beta": 0.45}),
    ("krum", {"f": 0, "m": 1}),
    ("krum", {"f": 1, "m": 1}),
    ("krum", {"f": 2, "m": 3}),
    ("krum", {"f": 1, "m": 20}),  # m beyond n: the plain mean
]


def assert_matches(result, expected, dtype):
    for name, tensor in expected.items():
        assert result[name].dtype == dtype
        if dtype == np.float64:
            np.testing.assert_allclose(result[name], tensor, rtol=1e-12, atol=1e-12)
        else:  # both rounded to float32 once: at most one float32 ulp apart
            np.testing.assert_allclose(result[name], tensor.astype(dtype), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize(("name", "params"), CASES)
def test_a_sync_round_equals_the_reference_definition(registry, name, params, n, dtype):
    rng = np.random.default_rng(1000 * n + len(params))
    global_weights = random_model(rng, dtype)
    rows = [random_model(rng, dtype) for _ in range(n)]

    result = run_round(registry.create(name, params), global_weights, rows)

    assert_matches(result.weights, REFERENCES[name](rows, **params), dtype)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_results_do_not_depend_on_the_block_size(registry, monkeypatch, name, params):
    # GIVEN blocks of 7 values, so every tensor spans several blocks and blocks end mid-tensor
    monkeypatch.setattr(fedstream.plugins._robust, "BLOCK_VALUES", 7 * 6)
    rng = np.random.default_rng(7)
    rows = [random_model(rng, np.float64) for _ in range(6)]

    result = run_round(registry.create(name, params), random_model(rng, np.float64), rows)

    assert_matches(result.weights, REFERENCES[name](rows, **params), np.float64)


@pytest.mark.parametrize("name", NAMES)
def test_num_examples_does_not_weight_the_updates(registry, name):
    rng = np.random.default_rng(3)
    global_weights = random_model(rng)
    rows = [random_model(rng) for _ in range(5)]

    equal = run_round(registry.create(name), global_weights, rows, [10] * 5)
    skewed = run_round(registry.create(name), global_weights, rows, [1, 1000, 3, 7, 50])

    for tensor in global_weights:
        np.testing.assert_array_equal(equal.weights[tensor], skewed.weights[tensor])


# ---- robustness: what FedAvg cannot do -------------------------------------------------------


ROBUST_CASES = [
    ("median", {}),
    ("trimmed-mean", {}),  # beta 0.25 cuts 1 of 6 at each end
    ("krum", {"f": 1}),
    ("krum", {"f": 1, "m": 3}),
]


def honest_and_one_attacker(seed: int):
    rng = np.random.default_rng(seed)
    center = random_model(rng, np.float64)
    honest = [
        {
            name: (tensor + 0.01 * rng.normal(size=tensor.shape)).astype(np.float32)
            for name, tensor in center.items()
        }
        for _ in range(5)
    ]
    attacker = {name: tensor * np.float32(1e6) for name, tensor in honest[0].items()}
    rows = [*honest[:2], attacker, *honest[2:]]
    return center, honest, rows


def within_honest_range(result, honest) -> bool:
    """Every coordinate between the honest updates' smallest and largest value there."""
    return all(
        np.all(stacked(honest, name).min(axis=0) - 1e-6 <= result[name])
        and np.all(result[name] <= stacked(honest, name).max(axis=0) + 1e-6)
        for name in result
    )


@pytest.mark.parametrize(("name", "params"), ROBUST_CASES)
def test_one_update_scaled_by_a_million_does_not_move_the_result(registry, name, params):
    # GIVEN 5 honest updates within ~0.01 of each other, and one of them scaled by 1e6
    center, honest, rows = honest_and_one_attacker(seed=11)

    result = run_round(registry.create(name, params), center, rows).weights
    # THEN every coordinate stays within the honest updates' range (a spread of ~0.05)
    assert within_honest_range(result, honest)
    # AND the whole model stays within 0.1 (L2) of the honest mean, as close as an honest update is
    honest_mean = {tensor: stacked(honest, tensor).mean(axis=0) for tensor in center}
    distance = np.sqrt(sum(np.sum((result[t] - honest_mean[t]) ** 2) for t in center))
    assert distance < 0.1


def test_fedavg_is_moved_by_the_scaled_update(registry):
    # The same round through FedAvg: the attacker drags the mean by ~1e6 / 6 of its weights.
    center, honest, rows = honest_and_one_attacker(seed=11)
    result = run_round(registry.create("fedavg", {"weighted": False}), center, rows).weights
    assert not within_honest_range(result, honest)


def test_krum_reports_which_updates_it_left_out(registry):
    center, _, rows = honest_and_one_attacker(seed=12)

    krum = run_round(registry.create("krum", {"f": 1}), center, rows)
    multi = run_round(registry.create("krum", {"f": 1, "m": 5}), center, rows)

    # the attacker is update 2 (site-2): Multi-Krum with m = 5 keeps exactly the honest five
    assert krum.metrics["krum_selected"] == 1.0
    assert sum(1 for key in krum.metrics if key.startswith("krum_excluded.")) == 5
    assert krum.metrics["krum_excluded.site-2"] == 1.0
    assert multi.metrics["krum_selected"] == 5.0
    assert [key for key in multi.metrics if key.startswith("krum_excluded.")] == ["krum_excluded.site-2"]


# ---- sync bookkeeping -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rounds_report_client_metrics_and_start_empty(registry, name):
    rng = np.random.default_rng(5)
    aggregator = registry.create(name)
    global_weights = random_model(rng)
    run_round(aggregator, global_weights, [random_model(rng, scale=100.0) for _ in range(4)])

    rows = [random_model(rng) for _ in range(4)]
    result = run_round(aggregator, global_weights, rows, [1, 1, 1, 1], train_loss=0.5, eval_accuracy=0.75)

    # the second round sees only its own 4 updates
    assert_matches(result.weights, run_round(registry.create(name), global_weights, rows).weights, np.float32)
    assert result.metrics["num_clients"] == 4.0 and result.metrics["num_examples"] == 4.0
    assert result.metrics["train_loss"] == pytest.approx(0.5)
    assert result.metrics["eval_accuracy"] == pytest.approx(0.75)


def test_trimmed_mean_reports_how_much_it_cut(registry):
    rng = np.random.default_rng(6)
    rows = [random_model(rng) for _ in range(9)]
    result = run_round(registry.create("trimmed-mean", {"beta": 0.25}), rows[0], rows)
    assert result.metrics["trimmed_per_end"] == 2.0  # floor(0.25 * 9)


@pytest.mark.parametrize("name", NAMES)
def test_a_round_without_updates_is_an_error(registry, name):
    aggregator = registry.create(name)
    aggregator.begin(random_model(np.random.default_rng(0)), RoundContext(round=1))
    with pytest.raises(AggregationError) as info:
        aggregator.finish()
    assert info.value.reason == "no_updates"


# ---- async: FedBuff's buffer, the deltas kept one by one --------------------------------------


def persisted(state: AsyncState) -> AsyncState:
    """What the host writes between two invocations (server/asynchronous.py) and reads back."""
    arrays, meta = decode(encode(state.arrays, {"values": json.dumps(state.values)}))
    return AsyncState(arrays=arrays, values=json.loads(meta["values"]))


def async_updates(seed: int, count: int, dtype=np.float32):
    """Updates trained from a few older bases, with staleness 0..4 and their staleness-weighted deltas."""
    rng = np.random.default_rng(seed)
    bases = [random_model(rng, dtype) for _ in range(3)]
    updates, deltas = [], []
    for i in range(count):
        base, staleness = bases[i % 3], i % 5
        update = ClientUpdate(f"site-{i}", random_model(rng, dtype), 10, base_weights=base)
        weight = (1.0 + staleness) ** -0.5
        deltas.append({k: weight * (update.weights[k].astype(np.float64) - base[k]) for k in base})
        updates.append((update, staleness))
    return random_model(rng, dtype), updates, deltas


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "params"), [CASES[0], CASES[3], CASES[6], CASES[7]])
def test_k_updates_are_buffered_then_one_robust_step_is_taken(registry, name, params, dtype):
    # GIVEN K = 5, server_lr 0.5, and a host that persists the state between every two updates
    settings = {**params, "buffer_size": 5, "server_lr": 0.5}
    current, updates, deltas = async_updates(seed=21, count=5, dtype=dtype)
    state, direct_state, results = None, None, []
    for update, staleness in updates:
        result = registry.create(name, settings).apply_async(
            current, update, staleness=staleness, state=state
        )
        direct = registry.create(name, settings).apply_async(
            current, update, staleness=staleness, state=direct_state
        )
        results.append(result)
        state = persisted(result.state) if result.state is not None else None
        direct_state = direct.state

    # THEN the first four are buffered, as float64 deltas, with nothing published
    assert [r.weights for r in results[:4]] == [None] * 4
    assert [r.metrics["buffer_fill"] for r in results[:4]] == [1.0, 2.0, 3.0, 4.0]
    assert all(a.dtype == np.float64 for a in results[3].state.arrays.values())
    # AND the fifth steps x + eta * robust(s(tau_i) d_i), and empties the buffer
    robust = REFERENCES[name](deltas, **params)
    expected = {k: current[k].astype(np.float64) + 0.5 * robust[k] for k in current}
    assert_matches(results[4].weights, expected, dtype)
    assert results[4].state is None
    assert results[4].metrics["applied_updates"] == 5.0
    # AND the round trip through the wire format changed nothing, bit for bit
    for k in current:
        np.testing.assert_array_equal(results[4].weights[k], direct.weights[k])


def test_krum_names_the_buffered_updates_it_left_out(registry):
    current, updates, _ = async_updates(seed=22, count=3)
    aggregator = registry.create("krum", {"buffer_size": 3, "f": 0})
    state = None
    for update, staleness in updates:
        result = aggregator.apply_async(current, update, staleness=staleness, state=state)
        state = result.state and persisted(result.state)
    assert result.metrics["krum_selected"] == 1.0
    excluded = sorted(key for key in result.metrics if key.startswith("krum_excluded."))
    assert len(excluded) == 2 and set(excluded) < {f"krum_excluded.site-{i}" for i in range(3)}


@pytest.mark.parametrize("name", NAMES)
def test_an_update_that_could_overflow_a_step_is_refused_and_the_state_is_untouched(registry, name):
    # GIVEN a global model near float32's limit and one buffered honest update
    aggregator = registry.create(name, {"buffer_size": 3, "server_lr": 1.0})
    current, base = {"w": np.array([3e38, 0.0], np.float32)}, {"w": np.zeros(2, np.float32)}
    honest = ClientUpdate("a", {"w": np.array([1.0, 2.0], np.float32)}, 10, base_weights=base)
    state = aggregator.apply_async(current, honest, staleness=0).state
    before = ({k: v.copy() for k, v in state.arrays.items()}, dict(state.values))

    # WHEN a finite update arrives with which x + delta = 6.4e38 would overflow float32
    huge = ClientUpdate("bad", {"w": np.array([3.4e38, 0.0], np.float32)}, 10, base_weights=base)
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(current, huge, staleness=0, state=state)

    # THEN it is refused, naming the client, and the given state is exactly as it was
    assert info.value.reason == "non_finite" and "'bad'" in str(info.value)
    assert state.values == before[1] and state.arrays.keys() == before[0].keys()
    for key, array in before[0].items():
        np.testing.assert_array_equal(state.arrays[key], array)
    # AND the buffer still takes honest updates and steps
    second = aggregator.apply_async(current, honest, staleness=0, state=state)
    third = aggregator.apply_async(current, honest, staleness=0, state=second.state)
    np.testing.assert_allclose(third.weights["w"], [3e38 + 1.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_a_state_that_does_not_match_the_model_is_refused(registry, name):
    aggregator = registry.create(name, {"buffer_size": 4})
    current, updates, _ = async_updates(seed=23, count=2)
    update, staleness = updates[0]
    good = aggregator.apply_async(current, update, staleness=staleness).state
    shapes = {k: np.zeros(3) for k in good.arrays}
    wrong = [
        AsyncState(arrays={k: v for k, v in current.items()}, values={"count": 1}),  # fedbuff's layout
        AsyncState(arrays=good.arrays, values={"count": 2}),  # says 2, holds 1
        AsyncState(arrays=shapes, values={"count": 1}),  # wrong shapes
        AsyncState(arrays=good.arrays, values={"count": "many"}),
    ]
    for state in wrong:
        with pytest.raises(AggregationError) as info:
            aggregator.apply_async(current, update, staleness=staleness, state=state)
        assert info.value.reason == "bad_state"


@pytest.mark.parametrize("name", NAMES)
def test_async_refuses_updates_without_base_weights(registry, name):
    # (staleness is the host's to judge: tests/unit/test_host.py)
    aggregator = registry.create(name, {"max_staleness": 2})
    current, _, _ = async_updates(seed=24, count=1)
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(current, ClientUpdate("x", current, 1), staleness=0)
    assert info.value.reason == "missing_base_weights"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("clients", "buffer_size"), [(None, 3), (4, 2), (10, 5), (200, 10)])
def test_the_buffer_defaults_as_fedbuffs_and_needs_one_client_more(registry, name, clients, buffer_size):
    aggregator = registry.create(name, num_clients=clients)
    assert (aggregator.buffer_size, aggregator.min_clients) == (buffer_size, buffer_size + 1)
    assert aggregator.max_staleness == 50
    assert registry.create(name, {"buffer_size": 7}, num_clients=clients).buffer_size == 7


# ---- registry ---------------------------------------------------------------------------------


def test_the_three_are_built_in_for_both_modes_and_cite_their_papers(registry):
    for name, author in [("median", "Yin"), ("trimmed-mean", "Yin"), ("krum", "Blanchard")]:
        info = registry.info(name)
        assert info.modes == frozenset({"sync", "async"}) and info.source == "built-in"
        assert author in info.description
        registry.create(name, mode="sync")
        registry.create(name, mode="async")
    defaults = {p["name"]: p["default"] for p in registry.info("krum").parameters()}
    assert defaults == {"buffer_size": None, "server_lr": 1.0, "max_staleness": 50, "f": 1, "m": 1}
    assert {p["name"]: p["default"] for p in registry.info("trimmed-mean").parameters()}["beta"] == 0.25


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("trimmed-mean", {"beta": 0.5}, "beta: Input should be less than 0.5"),
        ("trimmed-mean", {"beta": -0.1}, "beta: Input should be greater than or equal to 0"),
        ("krum", {"m": 0}, "m: Input should be greater than or equal to 1"),
        ("krum", {"f": -1}, "f: Input should be greater than or equal to 0"),
        ("median", {"beta": 0.1}, "beta: Extra inputs are not permitted"),
        ("median", {"buffer_size": 0}, "buffer_size: Input should be greater than or equal to 1"),
    ],
)
def test_bad_parameters_are_refused_with_a_clear_message(registry, name, params, message):
    with pytest.raises(PluginError) as info:
        registry.validate_params(name, params)
    assert f"invalid parameters for aggregator {name!r}" in str(info.value)
    assert message in str(info.value)
