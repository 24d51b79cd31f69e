"""The attacking client of ``fedstream local`` (fedstream.local.attack) and the options that set it up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedstream.client.trainers import FitResult, Trainer, load_user_trainer

from fedstream.bounds import InfluenceBounds
from fedstream.cli import CliError, main
from fedstream.local import attack
from fedstream.local.attack import Attack, AttackSpecError, AttackTrainer, parse_attack, parse_attackers
from fedstream.local.cli import parse_bounds
from fedstream.local.logs import rejections_by_client
from fedstream.local.run import LocalRunConfig, _config_json, run_local


class FakeTrainer:
    """Adds ``step`` to every weight and reports 7 examples; counts its fits."""

    def __init__(self, step: float = 0.5, dtype: Any = np.float32) -> None:
        self.step, self.dtype, self.fits = step, dtype, 0

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {"w": np.array([1.0, -2.0, 3.0], self.dtype), "b": np.zeros(2, self.dtype)}

    def fit(self, weights: Mapping[str, np.ndarray], settings: Mapping[str, Any]) -> FitResult:
        self.fits += 1
        new = {name: (w + self.step).astype(w.dtype) for name, w in weights.items()}
        return FitResult(new, 7, {"train_loss": 0.25, "eval_accuracy": 0.5})

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"eval_loss": 1.0, "eval_accuracy": 0.1}


BASE = {"w": np.array([1.0, -2.0, 3.0], np.float32), "b": np.zeros(2, np.float32)}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sign-flip:10", Attack("sign-flip", 10.0)),
        ("sign-flip:10:examples=1000000000", Attack("sign-flip", 10.0, 10**9)),
        ("scale:1e6", Attack("scale", 1e6)),
        ("scale:2.5:examples=1e3", Attack("scale", 2.5, 1000)),
        ("copy", Attack("copy")),
        ("copy:examples=500", Attack("copy", 1.0, 500)),
    ],
)
def test_attack_specs_parse(spec: str, expected: Attack) -> None:
    assert parse_attack(spec) == expected
    assert parse_attack(str(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("flip:10", "unknown attack 'flip'"),
        ("sign-flip", "needs one factor"),
        ("sign-flip:ten", "must be a number"),
        ("scale:0", "> 0"),
        ("scale:inf", "> 0"),
        ("copy:3", "copy takes no factor"),
        ("sign-flip:10:examples=1000000001", "between 1 and 1000000000"),
        ("sign-flip:10:examples=0", "between 1 and"),
        ("sign-flip:10:examples=many", "whole number"),
        ("sign-flip:10:3", "needs one factor"),
    ],
)
def test_bad_attack_specs_say_what_is_wrong(spec: str, fragment: str) -> None:
    with pytest.raises(AttackSpecError, match=fragment):
        parse_attack(spec)


def test_sign_flip_reports_base_minus_factor_times_the_honest_delta() -> None:
    inner = FakeTrainer(step=0.5)
    trainer = AttackTrainer(inner, "sign-flip:10")

    result = trainer.fit(BASE, {})

    np.testing.assert_allclose(result.weights["w"], BASE["w"] - 10 * 0.5)
    np.testing.assert_allclose(result.weights["b"], [-5.0, -5.0])
    assert result.weights["w"].dtype == np.float32
    assert result.num_examples == 7  # the honest count unless the spec claims one
    assert result.metrics == {"train_loss": 0.25, "eval_accuracy": 0.5}  # honest-looking metrics
    assert inner.fits == 1
    np.testing.assert_array_equal(BASE["w"], [1.0, -2.0, 3.0])  # the global weights are not touched


def test_scale_boosts_the_honest_delta_and_claims_the_examples_it_is_told() -> None:
    trainer = AttackTrainer(FakeTrainer(step=0.25), "scale:1e6:examples=1000000000")

    result = trainer.fit(BASE, {})

    np.testing.assert_allclose(result.weights["w"], BASE["w"] + 0.25e6)
    assert result.num_examples == 10**9


def test_copy_returns_the_global_model_without_training() -> None:
    inner = FakeTrainer()
    trainer = AttackTrainer(inner, "copy:examples=300")

    result = trainer.fit(BASE, {})

    assert inner.fits == 0
    for name in BASE:
        np.testing.assert_array_equal(result.weights[name], BASE[name])
        assert result.weights[name] is not BASE[name]
    assert result.num_examples == 300
    assert result.metrics["eval_accuracy"] == 0.1


def test_an_update_past_the_dtype_range_is_clipped_to_stay_finite() -> None:
    base = {"w": np.array([1.0, -1.0], np.float16)}
    trainer = AttackTrainer(FakeTrainer(step=1.0), "scale:1e9")

    weights = trainer.fit(base, {}).weights["w"]

    assert weights.dtype == np.float16 and np.all(np.isfinite(weights))
    assert weights[0] == np.finfo(np.float16).max and weights[1] == np.finfo(np.float16).max


def test_the_wrapper_is_a_trainer_and_passes_initial_weights_and_evaluate_through() -> None:
    trainer = AttackTrainer(FakeTrainer(), "copy")

    assert isinstance(trainer, Trainer)
    np.testing.assert_array_equal(trainer.initial_weights()["w"], BASE["w"])
    assert trainer.evaluate(BASE) == {"eval_loss": 1.0, "eval_accuracy": 0.1}


def test_the_client_loads_the_attacker_as_a_module_function_trainer(monkeypatch) -> None:
    # GIVEN the environment the local runtime gives an attacker's process
    env = attack.attacker_env("sign-flip:3", "instant:4", learning_rate=None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # WHEN the client builds its trainer from --trainer fedstream.local.attack:make
    trainer = load_user_trainer(
        attack.TRAINER_SPEC, dataset="digits", partition="iid", num_clients=2, client_index=1, seed=5
    )

    # THEN it is the honest instant trainer, wrapped: its update is -3 times the honest one
    assert isinstance(trainer, AttackTrainer) and trainer.attack == Attack("sign-flip", 3.0)
    base = trainer.initial_weights()
    honest = trainer.inner.fit(base, {}).weights["dense/kernel"]
    np.testing.assert_allclose(trainer.fit(base, {}).weights["dense/kernel"], -3 * honest, rtol=1e-6)


def test_make_without_an_attack_in_the_environment_fails_clearly(monkeypatch) -> None:
    monkeypatch.delenv(attack.ATTACK_ENV, raising=False)
    with pytest.raises(AttackSpecError, match="FEDSTREAM_ATTACK"):
        attack.make("digits", "iid", 2, 0)


def test_attack_options_map_clients_to_specs() -> None:
    assert parse_attackers(["site-4=sign-flip:10", " site-1 = copy "]) == {
        "site-4": "sign-flip:10",
        "site-1": "copy",
    }
    with pytest.raises(AttackSpecError, match="CLIENT=SPEC"):
        parse_attackers(["sign-flip:10"])
    with pytest.raises(AttackSpecError, match="twice"):
        parse_attackers(["site-1=copy", "site-1=scale:2"])
    with pytest.raises(AttackSpecError, match="unknown attack"):
        parse_attackers(["site-1=nonsense"])


def test_bound_options_set_influence_bounds() -> None:
    assert parse_bounds([]) == InfluenceBounds()
    assert parse_bounds([], off=True) == InfluenceBounds.off()
    bounds = parse_bounds(["norm_factor=5", "max_examples=1000", "max_update_norm=2.5"])
    assert (bounds.norm_factor, bounds.max_examples, bounds.max_update_norm) == (5.0, 1000, 2.5)
    assert bounds.example_factor == InfluenceBounds().example_factor
    off_but_absolute = parse_bounds(["max_update_norm=100"], off=True)
    assert off_but_absolute.norm_factor == 0 and off_but_absolute.max_update_norm == 100
    assert parse_bounds(["max_update_norm=3", "max_update_norm=none"]).max_update_norm is None


@pytest.mark.parametrize(
    ("pairs", "fragment"),
    [
        (["norm_facter=5"], "unknown bound 'norm_facter'; choose one of norm_factor"),
        (["norm_factor"], "NAME=VALUE"),
        (["norm_factor=-1"], "norm_factor='-1'"),
        (["window=many"], "window='many'"),
        (["min_reference=0"], "min_reference"),
    ],
)
def test_bad_bound_options_say_what_is_wrong(pairs: list[str], fragment: str) -> None:
    with pytest.raises(CliError, match=fragment):
        parse_bounds(pairs)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--bound", "nope=1"], "unknown bound 'nope'"),
        (["--attack", "site-2=flip:3"], "unknown attack 'flip'"),
        (["--attack", "site-9=copy"], "--attack site-9: not a client of this run (site-1..site-2)"),
    ],
)
def test_fedstream_local_refuses_bad_options_in_one_line_before_starting(
    capsys, tmp_path: Path, argv: list[str], fragment: str
) -> None:
    out = tmp_path / "run"

    code = main(["local", "--clients", "2", "--trainer", "numpy", "--out", str(out), *argv])

    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_config_in_metrics_json_shows_bounds_and_attackers() -> None:
    config = LocalRunConfig(bounds=InfluenceBounds.off(), attackers={"site-2": "scale:1e6"})

    written = json.loads(json.dumps(_config_json(config)))

    assert written["bounds"] == InfluenceBounds.off().model_dump()
    assert written["attackers"] == {"site-2": "scale:1e6"}
    assert written["out"] == "runs/local"


def test_rejections_are_counted_per_client_and_reason_from_the_warnings() -> None:
    lines = [
        {"level": "WARNING", "message": "update rejected", "reason": "norm_bound", "client_id": "site-4"},
        {"_aws": {}, "UpdatesRejected": [1.0], "reason": "norm_bound"},  # the metric line: not a warning
        {"level": "WARNING", "message": "update rejected", "reason": "norm_bound", "client_id": "site-4"},
        {"level": "WARNING", "message": "update rejected", "reason": "replay", "client_id": "site-1"},
        {"level": "INFO", "message": "round closed", "client_id": "site-1"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\nnot json\n"

    assert rejections_by_client(text) == {"site-4": {"norm_bound": 2}, "site-1": {"replay": 1}}


def test_run_local_refuses_an_attacker_that_is_not_a_client(tmp_path: Path) -> None:
    config = LocalRunConfig(clients=2, trainer="numpy", attackers={"site-3": "copy"}, out=tmp_path / "x")
    with pytest.raises(CliError, match="site-3"):
        run_local(config)
