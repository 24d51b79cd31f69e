"""Server optimizers (Reddi et al. 2021, Algorithm 2; Hsu et al. 2019): FedAvgM, FedAdagrad, FedAdam
and FedYogi, one step per sync round or per full FedBuff buffer, their moments kept in the state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedstream.aggregation import (
    AggregationError,
    AggregatorState,
    ClientUpdate,
    RoundContext,
    state_from_bytes,
    state_to_bytes,
)
from fedstream.cli import main
from fedstream.registry import PluginError, build_registry, default_registry, get_plugin_manager

OPTIMIZERS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
# Non-default values, so that a parameter the optimizer ignores makes the comparison fail.
PARAMS = {
    "fedavgm": {"server_lr": 0.7, "momentum": 0.8},
    "fedadagrad": {"server_lr": 0.05, "beta1": 0.7, "tau": 0.01},
    "fedadam": {"server_lr": 0.02, "beta1": 0.8, "beta2": 0.95, "tau": 0.01},
    "fedyogi": {"server_lr": 0.02, "beta1": 0.8, "beta2": 0.95, "tau": 0.01},
}
# A float32 and a float64 tensor, named with slashes as Keras names them.
SHAPES = {"dense/kernel": ((4, 3), np.float32), "dense/bias": ((3,), np.float64)}
# How far clients move in each round: large, then small, so that Yogi's v both grows and shrinks.
SCALES = (0.1, 0.003, 0.1, 0.003, 0.05, 0.002, 0.08)


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


def random_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.normal(0.0, 1.0, shape).astype(dtype) for name, (shape, dtype) in SHAPES.items()}


def trained(rng: np.random.Generator, base: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """A client's weights after local training from ``base``: base plus a random move."""
    return {name: (w + rng.normal(0.0, scale, w.shape)).astype(w.dtype) for name, w in base.items()}


def reference_step(name: str, p: dict, x: np.ndarray, m: np.ndarray, v: np.ndarray, change: np.ndarray):
    """One server step on one float64 tensor, as the papers write it (sign folded in: change = w - x)."""
    if name == "fedavgm":
        m = p["momentum"] * m + change
        return x + p["server_lr"] * m, m, v
    m = p["beta1"] * m + (1 - p["beta1"]) * change
    if name == "fedadagrad":
        v = v + change**2
    elif name == "fedadam":
        v = p["beta2"] * v + (1 - p["beta2"]) * change**2
    else:  # fedyogi
        v = v - (1 - p["beta2"]) * change**2 * np.sign(v - change**2)
    return x + p["server_lr"] * m / (np.sqrt(v) + p["tau"]), m, v


class Reference:
    """The optimizer with m_{-1} = 0 and v_{-1} = tau^2, on the whole model in float64."""

    def __init__(self, name: str, params: dict, model: dict[str, np.ndarray]) -> None:
        self.name, self.p = name, params
        self.m = {t: np.zeros(w.shape) for t, w in model.items()}
        self.v = {t: np.full(w.shape, params.get("tau", 0.0) ** 2) for t, w in model.items()}

    def step(self, x: dict[str, np.ndarray], change: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for t, current in x.items():
            moved, self.m[t], self.v[t] = reference_step(
                self.name, self.p, current.astype(np.float64), self.m[t], self.v[t], change[t]
            )
            out[t] = moved.astype(current.dtype)
        return out


def assert_model_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        assert actual[name].dtype == want.dtype, name
        rtol = 1e-6 if want.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(actual[name], want, rtol=rtol, atol=1e-12, err_msg=name)


def assert_moments(state: AggregatorState, reference: Reference, name: str) -> None:
    for t in SHAPES:
        np.testing.assert_allclose(state.arrays[f"m/{t}"], reference.m[t], rtol=1e-9, atol=1e-15)
        if name != "fedavgm":
            np.testing.assert_allclose(state.arrays[f"v/{t}"], reference.v[t], rtol=1e-9, atol=1e-15)


# -- sync ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sync_rounds_follow_the_papers_update_with_the_state_carried_between_rounds(registry, name):
    # GIVEN 4 rounds of 3 clients with random weights and example counts
    rng = np.random.default_rng(7)
    aggregator = registry.create(name, PARAMS[name])
    x = random_model(rng)
    reference = Reference(name, PARAMS[name], x)
    state = None

    for round_number, scale in enumerate(SCALES[:4], start=1):
        clients = [
            (trained(rng, x, scale), int(rng.integers(1, 200)), float(rng.uniform())) for _ in range(3)
        ]
        # WHEN the round streams through begin/accept/finish, with the previous round's state
        aggregator.begin(x, RoundContext(round=round_number, state=state))
        for i, (weights, n, accuracy) in enumerate(clients):
            aggregator.accept(ClientUpdate(f"c{i}", weights, n, metrics={"eval_accuracy": accuracy}))
        result = aggregator.finish()

        # THEN the new model is one step with Delta = sum n_k (w_k - x) / sum n_k
        total = sum(n for _, n, _ in clients)
        change = {t: sum(n * (w[t].astype(np.float64) - x[t]) for w, n, _ in clients) / total for t in x}
        expected = reference.step(x, change)
        assert_model_close(result.weights, expected)
        # AND the state holds m (and v) after this step, which the next round reads
        assert result.state.values == {"step": round_number}
        assert_moments(result.state, reference, name)
        # AND the round reports the clients' example-weighted metrics and the step
        weighted = sum(n * a for _, n, a in clients) / total
        assert result.metrics["eval_accuracy"] == pytest.approx(weighted)
        assert result.metrics["num_clients"] == 3.0 and result.metrics["server_step"] == round_number
        x, state = result.weights, result.state


def test_fedavgm_without_momentum_and_with_server_lr_1_is_fedavg(registry):
    # GIVEN FedAvgM with momentum 0 and server_lr 1, and FedAvg, fed the same three rounds
    rng = np.random.default_rng(3)
    fedavgm = registry.create("fedavgm", {"momentum": 0.0, "server_lr": 1.0})
    fedavg = registry.create("fedavg")
    x = {"w": rng.normal(0, 1, (5, 2))}  # float64: FedAvg's sum is float64 too
    state = None
    for round_number in (1, 2, 3):
        updates = [ClientUpdate(f"c{i}", trained(rng, x, 0.1), int(rng.integers(1, 50))) for i in range(3)]
        fedavgm.begin(x, RoundContext(round_number, state=state))
        fedavg.begin(x, RoundContext(round_number))
        for update in updates:
            fedavgm.accept(update)
            fedavg.accept(update)
        with_momentum, plain = fedavgm.finish(), fedavg.finish()

        # THEN each round publishes FedAvg's model
        np.testing.assert_allclose(with_momentum.weights["w"], plain.weights["w"], rtol=1e-13)
        x, state = plain.weights, with_momentum.state


def test_fedadams_first_step_moves_every_coordinate_by_about_server_lr(registry):
    # GIVEN a client whose move spans 1 to 100 per coordinate, all much larger than tau (1e-3)
    aggregator = registry.create("fedadam", {"server_lr": 0.01})
    x = {"w": np.zeros(6, np.float32)}
    move = np.array([1.0, -2.0, 5.0, -7.0, 20.0, -100.0], np.float32)

    aggregator.begin(x, RoundContext(round=1))
    aggregator.accept(ClientUpdate("a", {"w": move}, 10))
    result = aggregator.finish()

    # THEN every coordinate moves by about server_lr in the clients' direction, whatever its size
    # (FedAvg would have moved it by the full 1 to 100): m / sqrt(v) = 0.1 move / (0.1 |move| + tau)
    np.testing.assert_allclose(result.weights["w"], 0.01 * np.sign(move), rtol=0.011)


# -- async ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer_size", [2, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_async_steps_follow_the_papers_update_on_fedbuffs_buffered_mean(registry, name, buffer_size):
    # GIVEN 2K + 1 updates from clients that trained on versions up to 2 behind the newest
    rng = np.random.default_rng(11)
    aggregator = registry.create(name, {**PARAMS[name], "buffer_size": buffer_size})
    published = [random_model(rng)]
    reference = Reference(name, PARAMS[name], published[0])
    buffer = {t: np.zeros(w.shape) for t, w in published[0].items()}
    state, steps = None, 0

    for i in range(2 * buffer_size + 1):
        newest = len(published) - 1
        base_version = max(0, newest - int(rng.integers(0, 3)))
        base = published[base_version]
        weights = trained(rng, base, SCALES[i % len(SCALES)])
        staleness = newest - base_version
        update = ClientUpdate(f"c{i}", weights, 10, base_weights=base)

        # WHEN each update is applied with the state the previous call returned
        result = aggregator.apply_async(published[-1], update, staleness=staleness, state=state)
        state = result.state

        # THEN updates are buffered as (1 + staleness)^-1/2 (w - x_base) ...
        s = (1 + staleness) ** -0.5
        for t in buffer:
            buffer[t] += s * (weights[t].astype(np.float64) - base[t])
        if (i + 1) % buffer_size:
            assert result.weights is None
            assert result.state.values == {"count": (i + 1) % buffer_size, "step": steps}
            continue
        # ... and every K-th takes one optimizer step from the newest model with Delta = buffer / K
        expected = reference.step(published[-1], {t: b / buffer_size for t, b in buffer.items()})
        assert result.weights is not None
        assert_model_close(result.weights, expected)
        steps += 1
        assert result.state.values == {"count": 0, "step": steps}
        assert result.metrics["server_step"] == steps and result.metrics["applied_updates"] == buffer_size
        assert_moments(result.state, reference, name)
        published.append(expected)
        buffer = {t: np.zeros(b.shape) for t, b in buffer.items()}

    # AND the last state holds the partial buffer and the moments of the last step, side by side
    moments = ["m"] if name == "fedavgm" else ["m", "v"]
    assert set(state.arrays) == {f"{k}/{t}" for k in ["buffer", *moments] for t in SHAPES}
    for t, b in buffer.items():
        np.testing.assert_allclose(state.arrays[f"buffer/{t}"], b, rtol=1e-12)
    assert_moments(state, reference, name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_async_state_survives_the_hosts_safetensors_round_trip(registry, name):
    # GIVEN a step taken and one update buffered, the state persisted as the host does
    rng = np.random.default_rng(5)
    aggregator = registry.create(name, {"buffer_size": 2})
    x = random_model(rng)
    state = None
    for i in range(3):
        update = ClientUpdate(f"c{i}", trained(rng, x, 0.1), 10, base_weights=x)
        result = aggregator.apply_async(x, update, staleness=0, state=state)
        state, x = result.state, result.weights or x
    restored, _ = state_from_bytes(state_to_bytes(state), max_bytes=1 << 20)

    # WHEN a fresh aggregator (a new Lambda) takes the next update from the restored state
    last = ClientUpdate("last", trained(rng, x, 0.1), 10, base_weights=x)
    after_trip = registry.create(name, {"buffer_size": 2}).apply_async(x, last, staleness=0, state=restored)
    direct = aggregator.apply_async(x, last, staleness=0, state=state)

    # THEN it publishes the same model and the same moments
    for t in x:
        np.testing.assert_array_equal(after_trip.weights[t], direct.weights[t])
    assert after_trip.state.values == direct.state.values == {"count": 0, "step": 2}
    for key, array in direct.state.arrays.items():
        np.testing.assert_array_equal(after_trip.state.arrays[key], array)


def test_baseless_updates_are_refused_as_by_fedbuff(registry):
    # (staleness is the host's to judge: tests/unit/test_host.py)
    aggregator = registry.create("fedyogi", {"max_staleness": 2})
    x = {"w": np.zeros(2, np.float32)}
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(x, ClientUpdate("nobase", x, 1), staleness=0)
    assert info.value.reason == "missing_base_weights"


# -- refusals ------------------------------------------------------------------------------------

MODEL = {"w": np.zeros((2, 2), np.float32)}
M, V = np.zeros((2, 2)), np.ones((2, 2))
BAD_STATES = {
    "fedavgm's state for fedadam": ("fedadam", AggregatorState({"m/w": M}, {"step": 1})),
    "a moment of another shape": ("fedadam", AggregatorState({"m/w": M, "v/w": np.ones(4)}, {"step": 1})),
    "another model's tensor": ("fedavgm", AggregatorState({"m/other": M}, {"step": 1})),
    "moments without a step": ("fedyogi", AggregatorState({"m/w": M, "v/w": V}, {})),
    "a step as text": ("fedyogi", AggregatorState({"m/w": M, "v/w": V}, {"step": "1"})),
    "a negative second moment": ("fedadagrad", AggregatorState({"m/w": M, "v/w": -V}, {"step": 1})),
    "an async buffer": ("fedavgm", AggregatorState({"buffer/w": M}, {"count": 1, "step": 0})),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_a_state_that_does_not_fit_is_refused_as_bad_state(registry, case):
    name, state = BAD_STATES[case]
    with pytest.raises(AggregationError) as info:
        registry.create(name).begin(MODEL, RoundContext(round=2, state=state))
    assert info.value.reason == "bad_state"


def test_an_async_state_that_does_not_fit_is_refused_as_bad_state(registry):
    aggregator = registry.create("fedadam", {"buffer_size": 2})
    update = ClientUpdate("a", MODEL, 1, base_weights=MODEL)
    # a buffer already as full as the buffer size, and a buffer shaped like another model
    for state in (
        AggregatorState({"buffer/w": M}, {"count": 2, "step": 0}),
        AggregatorState({"buffer/w": np.zeros(3)}, {"count": 1, "step": 0}),
    ):
        with pytest.raises(AggregationError) as info:
            aggregator.apply_async(MODEL, update, staleness=0, state=state)
        assert info.value.reason == "bad_state"


@pytest.mark.parametrize(
    ("name", "params", "named"),
    [
        ("fedadam", {"lr": 0.1}, "lr"),
        ("fedadagrad", {"beta2": 0.99}, "beta2"),  # Adagrad has no second-moment decay
        ("fedavgm", {"beta1": 0.9}, "beta1"),
        ("fedyogi", {"beta1": 1.0}, "beta1"),
        ("fedadam", {"tau": 0.0}, "tau"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
    ],
)
def test_unknown_or_out_of_range_parameters_are_refused_by_the_registry(registry, name, params, named):
    with pytest.raises(PluginError) as info:
        registry.create(name, params)
    assert f"invalid parameters for aggregator {name!r}" in str(info.value) and named in str(info.value)


def test_a_round_whose_step_would_overflow_is_refused_and_its_state_is_untouched(registry):
    # GIVEN FedAvgM whose momentum carries a huge move into the next round, near float32's limit
    aggregator = registry.create("fedavgm", {"momentum": 0.9})
    x = {"w": np.array([1e38, 0.0], np.float32)}
    aggregator.begin(x, RoundContext(round=1))
    aggregator.accept(ClientUpdate("a", {"w": np.array([3e38, 0.0], np.float32)}, 1))
    first = aggregator.finish()
    kept = {key: array.copy() for key, array in first.state.arrays.items()}

    # WHEN the next round moves on: x + 0.9 * 2e38 + 0.4e38 = 5.2e38 is beyond float32
    aggregator.begin(first.weights, RoundContext(round=2, state=first.state))
    aggregator.accept(ClientUpdate("a", {"w": np.array([3.4e38, 0.0], np.float32)}, 1))
    with pytest.raises(AggregationError) as info:
        aggregator.finish()

    # THEN it is refused as non_finite and the state it started from is as it was
    assert info.value.reason == "non_finite" and "'w'" in str(info.value)
    assert first.state.values == {"step": 1}
    for key, array in kept.items():
        np.testing.assert_array_equal(first.state.arrays[key], array)


def test_an_update_that_would_make_the_step_overflow_is_refused_before_it_is_buffered(registry):
    # GIVEN a global model near float32's limit and one honest update buffered (K = 2)
    aggregator = registry.create("fedavgm", {"buffer_size": 2, "server_lr": 1.0})
    current, base = {"w": np.array([3e38, 0.0], np.float32)}, {"w": np.zeros(2, np.float32)}
    honest = aggregator.apply_async(
        current,
        ClientUpdate("a", {"w": np.array([1.0, 2.0], np.float32)}, 10, base_weights=base),
        staleness=0,
    )
    kept = {key: array.copy() for key, array in honest.state.arrays.items()}

    # WHEN a finite but huge update arrives: x + (1 + 3.4e38) / 2 = 4.7e38 would overflow float32
    huge = ClientUpdate("bad", {"w": np.array([3.4e38, 0.0], np.float32)}, 10, base_weights=base)
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(current, huge, staleness=0, state=honest.state)

    # THEN it is refused, naming the client, and the state it was given is as it was
    assert info.value.reason == "non_finite" and "'bad'" in str(info.value)
    assert honest.state.values == {"count": 1, "step": 0}
    for key, array in kept.items():
        np.testing.assert_array_equal(honest.state.arrays[key], array)
    # AND that state still takes an honest update and steps: x + ((1, 2) + (3, 4)) / 2
    second = aggregator.apply_async(
        current,
        ClientUpdate("b", {"w": np.array([3.0, 4.0], np.float32)}, 10, base_weights=base),
        staleness=0,
        state=honest.state,
    )
    np.testing.assert_allclose(second.weights["w"], [3e38 + 2.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_an_update_whose_square_overflows_the_second_moment_is_refused(registry, name):
    # GIVEN a float64 model, one honest update buffered (K = 2)
    aggregator = registry.create(name, {"buffer_size": 2})
    x = {"w": np.zeros(2)}
    honest = aggregator.apply_async(x, ClientUpdate("a", {"w": np.ones(2)}, 1, base_weights=x), staleness=0)

    # WHEN a client moves by 1e200, whose square (v) overflows float64 though the move does not
    huge = ClientUpdate("bad", {"w": np.array([1e200, 0.0])}, 1, base_weights=x)
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(x, huge, staleness=0, state=honest.state)

    # THEN it is refused before it enters the buffer
    assert info.value.reason == "non_finite" and "'bad'" in str(info.value)
    assert honest.state.values == {"count": 1, "step": 0}
    np.testing.assert_array_equal(honest.state.arrays["buffer/w"], [1.0, 1.0])


# -- registration --------------------------------------------------------------------------------


def test_the_optimizers_are_listed_by_fedstream_plugins_list_with_both_modes(capsys):
    assert set(default_registry().names()) >= set(OPTIMIZERS)
    assert main(["plugins", "list", "--json"]) == 0

    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    for name in OPTIMIZERS:
        assert listed[name]["modes"] == ["async", "sync"]
        assert listed[name]["source"] == "built-in"
        assert ("Hsu" if name == "fedavgm" else "Reddi") in listed[name]["description"]
        assert default_registry().info(name).modes == frozenset({"sync", "async"})


def test_defaults(registry):
    def defaults(name):
        return {p["name"]: p["default"] for p in registry.info(name).parameters()}

    fedbuffs = {"buffer_size": None, "max_staleness": 50}
    assert defaults("fedavgm") == {**fedbuffs, "server_lr": 1.0, "momentum": 0.9}
    assert defaults("fedadagrad") == {**fedbuffs, "server_lr": 0.1, "beta1": 0.9, "tau": 1e-3}
    adam = {**fedbuffs, "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert defaults("fedadam") == defaults("fedyogi") == adam


@pytest.mark.parametrize(("clients", "buffer_size"), [(None, 3), (2, 1), (10, 5), (200, 10)])
def test_the_async_buffer_defaults_as_fedbuffs_and_needs_one_client_more(registry, clients, buffer_size):
    for name in OPTIMIZERS:
        aggregator = registry.create(name, num_clients=clients)
        assert (aggregator.buffer_size, aggregator.min_clients) == (buffer_size, buffer_size + 1)
