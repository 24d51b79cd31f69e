"""What the MemoryStore promises beyond what moto can confirm (``test_parity.py`` checks the rest
against a Store over moto): Step Functions' answer to a token answered twice, processes and their
caches, and its crash and interleaving hooks."""

from __future__ import annotations

import pytest

from fedstream.server.memory import Crash, MemoryBackend, MemoryStore
from fedstream.server.store import Repository
from fedstream.weights import encode
from tests.protocol.conftest import base_weights, make_settings


def test_a_task_token_is_answered_once_as_step_functions_allows() -> None:
    # GIVEN a store (moto cannot confirm this one: it answers InvalidToken to the tests' made-up tokens)
    store = MemoryStore(make_settings())
    store.expire_token("timed-out")

    # WHEN a token is answered, answered again (either way), and an expired one is answered
    answers = [
        store.send_task_success("tok", {"version": 1}),
        store.send_task_success("tok", {"version": 2}),
        store.send_task_failure("tok", "AggregationFailed", "late"),
        store.send_task_failure("timed-out", "QuorumNotReached", "x" * 40_000),
    ]

    # THEN only the first call is accepted, as Store reports TaskTimedOut (False); every call is kept
    assert answers == [True, False, False, False]
    assert [(c.kind, c.token, c.accepted) for c in store.callbacks] == [
        ("success", "tok", True),
        ("success", "tok", False),
        ("failure", "tok", False),
        ("failure", "timed-out", False),
    ]
    assert store.callbacks[0].output == {"version": 1} and len(store.callbacks[-1].cause) == 32_000


def test_processes_share_the_tables_and_the_bucket_but_not_their_caches() -> None:
    # GIVEN one store that cached version 0 of a run, and another process on the same backend
    store = MemoryStore(make_settings())
    data = encode(base_weights())
    store.put_once("runs/r/global/v0.safetensors", data)
    store.global_model("r", 0, "runs/r/global/v0.safetensors")
    other = store.another_process()

    # THEN the other sees the object, but has no cache of its own, and the MemoryStore is a Repository
    assert other.get_bytes("runs/r/global/v0.safetensors") == data
    assert store.cached_global_model("r", 0) is not None and other.cached_global_model("r", 0) is None
    assert isinstance(store, Repository) and other.backend is store.backend


def test_an_unversioned_bucket_names_no_version_and_overwrites() -> None:
    # GIVEN a bucket without versioning
    store = MemoryStore(make_settings(), MemoryBackend(versioned=False))

    # WHEN an object is written twice
    store.put("k", b"one")
    store.put("k", b"two")

    # THEN a read names no version, and only the last bytes are there
    assert store.get_object("k") == (b"two", None)
    assert store.put_once("k", b"three") is False


def test_crash_and_before_fire_on_the_nth_call_of_an_operation() -> None:
    # GIVEN a store armed to crash before its 2nd put_once and after its 1st put, and to run
    # another process's write before its 1st get_object
    store = MemoryStore(make_settings())
    store.crash("put_once", nth=2)
    store.crash("put", after=True)
    store.before("get_object", lambda: store.another_process().put("raced", b"first"))

    # WHEN it is used
    assert store.put_once("a", b"1") is True
    with pytest.raises(Crash):
        store.put_once("b", b"2")
    with pytest.raises(Crash):
        store.put("c", b"3")

    # THEN a crash before a write leaves nothing, one after it leaves the write, and the
    # interleaved write is seen by the call it preceded
    assert store.object_keys() == ["a", "c"]
    assert store.get_bytes("raced") == b"first"
    assert store.calls["put_once"] == 2 and store.calls["put"] == 1
    with pytest.raises(ValueError, match="not a storage operation"):
        store.crash("remember_blob")
