"""The deploy context: what ``-c key=value`` accepts, and the message a wrong value gets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from fedstream.stacks.config import ConfigError, DeploymentConfig

from fedstream.registry import default_registry
from fedstream.settings import HandlerSettings
from tests.infrastructure.conftest import REPO_ROOT, feature_flags


def config(**context: object) -> DeploymentConfig:
    base: dict[str, object] = {"mode": "sync", "aggregator": "fedavg", "clients": "site-a,site-b"}
    base.update(context)
    return DeploymentConfig.from_context(
        {**feature_flags(), **{k: v for k, v in base.items() if v is not None}}
    )


def error_of(**context: object) -> str:
    with pytest.raises(ConfigError) as caught:
        config(**context)
    return str(caught.value)


def test_command_line_strings_are_parsed_into_a_config():
    parsed = config(
        mode="sync",
        aggregator="fedprox",
        aggregator_params='{"mu": 0.1}',
        clients="site-a, site-b,site-c",
        rounds="7",
        min_clients="2",
        round_timeout="600",
    )
    assert parsed.clients == ("site-a", "site-b", "site-c")
    assert parsed.aggregator_params == {"mu": 0.1}
    assert (parsed.rounds, parsed.quorum, parsed.round_timeout) == (7, 2, 600)


def test_the_quorum_defaults_to_a_majority_of_the_clients():
    assert config(clients="a,b,c,d,e").quorum == 3
    assert config(clients="a").quorum == 1


def test_an_unknown_mode_names_the_two_modes():
    message = error_of(mode="batch")
    assert "mode" in message and "sync or async" in message and "'batch'" in message


def test_a_missing_mode_says_how_to_pass_it():
    message = error_of(mode=None)
    assert "mode is required" in message and "-c mode=" in message


def test_an_unknown_aggregator_lists_the_registered_ones():
    message = error_of(aggregator="fedmagic")
    assert "unknown aggregator 'fedmagic'" in message
    assert "fedavg" in message and "fedasync" in message


def test_an_aggregator_of_the_other_mode_is_refused_with_the_fitting_ones():
    message = error_of(mode="async", aggregator="fedavg")
    assert "runs in sync mode, not 'async'" in message
    assert "fedasync" in message and "fedbuff" in message


def test_parameters_the_aggregator_refuses_fail_the_synth():
    message = error_of(aggregator="fedprox", aggregator_params='{"mu": -1}')
    assert "invalid parameters for aggregator 'fedprox'" in message and "mu" in message
    assert "momentum" in error_of(aggregator="fedavg", aggregator_params='{"momentum": 0.9}')


def test_parameters_that_are_not_json_say_so():
    message = error_of(aggregator_params="{mu: 0.1}")
    assert "aggregator_params" in message and "not valid JSON" in message


@pytest.mark.parametrize("clients", [None, "", " , "])
def test_no_clients_fails_the_synth(clients):
    message = error_of(clients=clients)
    assert "clients" in message


@pytest.mark.parametrize("clients", ["site a", "site-a,*", "../x", "-lead"])
def test_client_ids_must_be_plain_identifiers(clients):
    assert "client ids must be" in error_of(clients=clients)


def test_duplicate_clients_and_colliding_output_names_are_refused():
    assert "listed twice" in error_of(clients="site-a,site-a")
    assert "same output name" in error_of(clients="site-a,site_a")


def test_client_ids_that_overflow_the_lambda_environment_are_refused():
    clients = ",".join(f"hospital-{i:02d}-" + "x" * 40 for i in range(60))
    assert "Lambda's environment holds 4 KB" in error_of(clients=clients)


def test_min_clients_cannot_exceed_the_clients():
    assert "min_clients=3 is more than the 2 clients" in error_of(min_clients="3")


def test_a_misspelt_context_key_is_not_ignored():
    message = error_of(client="site-a")
    assert "unknown context client" in message


def test_trust_for_a_client_that_is_not_deployed_is_refused():
    trust = json.dumps({"site-z": {"kind": "account", "account_id": "111122223333", "external_id": "xx"}})
    assert "not in clients" in error_of(client_trust=trust)


def test_a_cross_account_trust_needs_an_external_id():
    trust = json.dumps({"site-a": {"kind": "account", "account_id": "111122223333"}})
    assert "external_id" in error_of(client_trust=trust)


def test_a_model_too_large_for_lambda_memory_says_what_to_lower():
    message = error_of(max_model_mb="2000", download_threads="8")
    assert "Lambda memory" in message and "download_threads" in message


def test_memory_grows_with_the_model():
    small, large = config(max_model_mb="10"), config(max_model_mb="500")
    assert small.memory_mb == 1024
    assert large.memory_mb >= 500 * 8 and large.memory_mb % 64 == 0


def test_aggregators_that_hold_every_update_are_sized_for_them():
    clients = ",".join(f"site-{i}" for i in range(10))
    # fedavg streams: the global, the sum, the mean, the encoded version and 4 downloads in flight
    assert config(clients=clients).memory_mb == 64 * math.ceil((512 + 100 * 8) / 64) == 1344
    # sync median holds all 10 clients' updates as downloaded (1x the model each)
    sync = config(clients=clients, aggregator="median")
    assert sync.held_updates == 10
    assert sync.memory_mb == 64 * math.ceil((512 + 100 * (8 + 10)) / 64)
    # async krum holds K = 4 float64 deltas, and the host holds the new and previous state blobs
    buffered = config(
        mode="async", clients=clients, aggregator="krum", aggregator_params='{"buffer_size": 4}'
    )
    assert buffered.held_updates == 4
    assert buffered.memory_mb == 64 * math.ceil((512 + 100 * (8 + 6 * 4)) / 64)
    assert config(mode="async", aggregator="fedbuff", clients=clients).held_updates == 0


@pytest.mark.parametrize(
    ("aggregator", "params", "clients"),
    [
        ("median", "{}", 3),
        ("trimmed-mean", "{}", 10),
        ("krum", '{"f": 2}', 40),
        ("trimmed-mean", '{"buffer_size": 3}', 10),
        ("krum", '{"buffer_size": "7"}', 10),  # a string from -c, parsed as the aggregator parses it
    ],
)
def test_the_sized_buffer_is_the_buffer_the_aggregator_keeps(aggregator, params, clients):
    chosen = config(
        mode="async",
        aggregator=aggregator,
        aggregator_params=params,
        clients=",".join(f"site-{i}" for i in range(clients)),
    )
    kept = default_registry().create(aggregator, chosen.aggregator_params, mode="async", num_clients=clients)
    assert chosen.held_updates == kept.buffer_size


def test_too_many_held_updates_say_what_to_lower():
    many = ",".join(f"site-{i}" for i in range(90))
    message = error_of(aggregator="median", clients=many)
    assert "median holding 90 updates at once" in message and "fewer clients" in message
    message = error_of(mode="async", aggregator="krum", aggregator_params='{"buffer_size": 20}')
    assert "krum holding 20 updates at once" in message and "a smaller buffer_size" in message


def test_the_handler_environment_round_trips_through_handler_settings():
    chosen = config(
        mode="async", aggregator="fedbuff", aggregator_params='{"buffer_size": 1}', max_updates="50"
    )
    env = chosen.handler_settings(bucket="b", run_table="r", updates_table="u", topic_arn="arn:t").to_env()
    settings = HandlerSettings.from_env(env)
    assert settings.mode == "async" and settings.aggregator == "fedbuff"
    assert settings.aggregator_params == {"buffer_size": 1}
    assert settings.client_ids == ("site-a", "site-b") and settings.max_updates == 50


def test_cdk_synth_with_a_bad_context_exits_with_one_clear_line(tmp_path):
    # GIVEN the context the CDK CLI hands the app (CDK_CONTEXT_JSON) with an unknown mode
    context = {**feature_flags(), "mode": "batch", "aggregator": "fedavg", "clients": "site-a"}
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(context), "CDK_OUTDIR": str(tmp_path)}
    # WHEN app.py runs as `cdk synth` would run it
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # THEN it fails, and the last line says what is wrong and how to fix it
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fedstream: invalid deploy context: mode: must be sync or async")
    assert "Traceback" not in result.stderr


def test_a_buffer_that_too_few_clients_would_fill_fails_the_synth():
    # FedBuff steps every K updates and each client has one in flight: K = 3 needs 4 clients
    message = error_of(mode="async", aggregator="fedbuff", aggregator_params='{"buffer_size": 3}')
    assert "needs at least 4 clients" in message and "2 deployed" in message
