"""A generated corpus of hostile and broken inputs, each sent the way a real sender would send it.

A case is a small function that, given a :class:`CaseContext` (a world on the embedded AWS, the
mode, and the good updates already uploaded), produces one hostile input on one channel:

- ``updates``: the bytes go to S3 (or nowhere) and the function returns the updates-table item a
  client puts; the item is already in DynamoDB, and the test sends it to the stream handler in one
  batch with good updates (``tests/handlers/test_corpus.py``);
- ``finalize``: a body for the finalize queue (only the state machine may send there);
- ``client_queue``: a body for a client's own queue (only the topic delivers there), which the
  client parses with ``fedstream.client.runner._MESSAGE`` and, for "global model ready", follows.

Each case names what must happen, per mode (a mode it does not apply to is absent): the rejection
``reason`` (the ``UpdatesRejected`` metric's dimension and the log's ``reason``) and a fragment of
the logged ``detail`` that tells it apart from other cases with the same reason. ``known_bug``
marks the modes where the server does not do that yet (the test is a strict xfail); see
``docs/security.md`` for the list.

Finite updates that are well-formed but steer the model (a huge delta, an inflated example count,
a replayed object) need a round or a run history to be judged against; ``test_corpus.py`` and
``tests/handlers/test_influence.py`` send them through the handlers one by one.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save as raw_safetensors

from fedstream import keys
from fedstream.schemas import ModelReady, update_sort_key
from fedstream.weights import Weights, encode, sha256_hex
from tests.handlers.conftest import SyncWorld

Channel = Literal["updates", "finalize", "client_queue"]
# Where the hostile record goes in the batch relative to the good ones; "after_round_closed" sends it
# in a second batch, after the sync round closed at its deadline.
Position = Literal["first", "after_first_good", "last", "after_round_closed"]

SYNC_TOKEN = "token-round-1"  # the token the good sync records carry (the round's own)
BAD_CLIENT = "site-1"  # a registered client that sends garbage; site-2 and site-3 behave
PICKLE_SENTINEL = "PICKLE PAYLOAD EXECUTED"  # printed if anything ever unpickles the payload
DELETE = object()  # an override that removes a field from the record


@dataclass
class CaseContext:
    world: SyncWorld
    mode: str
    good: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.world.run_id


Expected = tuple[str, str]  # (reason, a fragment of the logged detail)


@dataclass(frozen=True)
class Case:
    name: str
    summary: str
    channel: Channel
    build: Callable[[CaseContext], Any]
    expect: Mapping[str, Expected]  # "sync" / "async" for updates; "sync" for finalize; "client"
    position: Position = "first"
    env: Mapping[str, str] = field(default_factory=dict)
    async_aggregator: tuple[str, dict[str, Any]] | None = None
    known_bug: Mapping[str, str] = field(default_factory=dict)  # mode -> what is wrong


def both(reason: str, detail: str) -> dict[str, Expected]:
    return {"sync": (reason, detail), "async": (reason, detail)}


# ---- how a client sends things ------------------------------------------------------------------


def shifted(world: SyncWorld, by: float) -> Weights:
    """The global model moved by ``by`` everywhere: a well-formed update."""
    return {name: (array + by).astype(array.dtype) for name, array in world.base.items()}


def client_record(
    ctx: CaseContext,
    client_id: str,
    payload: bytes | Weights | None,
    *,
    version: int = 0,
    run_id: str | None = None,
    object_key: str | None = None,
    num_examples: Any = 10,
    store: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Upload ``payload`` (None: upload nothing) and put the record, as ``fedstream.client.runner`` does.

    ``version`` is the base version the key, update id and record are made for; ``overrides``
    replace record fields after that (``DELETE`` drops one).
    """
    run_id = run_id or ctx.run_id
    data = payload if isinstance(payload, bytes) or payload is None else encode(payload)
    key = object_key or keys.update_key(run_id, client_id, version, uuid.uuid4().hex[:12])
    if data is not None:
        ctx.world.put_object(key, data)
    item: dict[str, Any] = {
        "client_id": client_id,
        "update_id": update_sort_key(run_id, version),
        "run_id": run_id,
        "base_version": version,
        "object_key": key,
        "sha256": sha256_hex(data if data is not None else b""),
        "num_examples": num_examples,
        "metrics": {"train_loss": 1.0, "eval_accuracy": 0.5},
        "created_at": datetime.now(UTC).isoformat(),
    }
    if ctx.mode == "sync":
        item.update(round=1, task_token=SYNC_TOKEN)
    for name, value in overrides.items():
        if value is DELETE:
            item.pop(name, None)
        else:
            item[name] = value
    if store:
        ctx.world.store_record(item)
    return item


def bad_update(payload: Callable[[CaseContext], bytes | Weights | None], **fields: Any) -> Callable:
    """A case whose only fault is its payload (or one record field), sent by ``BAD_CLIENT``."""

    def build(ctx: CaseContext) -> dict[str, Any]:
        return client_record(ctx, BAD_CLIENT, payload(ctx), **fields)

    return build


def good_payload(ctx: CaseContext) -> Weights:
    return shifted(ctx.world, 1.0)


# ---- payloads -----------------------------------------------------------------------------------


def _envelope(header: bytes, body: bytes = b"") -> bytes:
    """A safetensors-shaped envelope: u64 little-endian header length, header, data."""
    return struct.pack("<Q", len(header)) + header + body


def _tensor_header(**tensors: dict[str, Any]) -> bytes:
    return json.dumps(tensors).encode()


class _PrintsWhenLoaded:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return print, (PICKLE_SENTINEL,)


def pickle_payload(_: CaseContext) -> bytes:
    return pickle.dumps(_PrintsWhenLoaded(), protocol=4)


def npy_object_array(_: CaseContext) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"dense/kernel": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def zip_bomb(_: CaseContext) -> bytes:
    """16 MiB of zeros deflated to a few KiB: expands only if something unzips it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("dense_kernel.npy", bytes(16 << 20))
    return buffer.getvalue()


def hdf5_file(_: CaseContext) -> bytes:
    return b"\x89HDF\r\n\x1a\n" + bytes(120)  # a Keras .h5 starts like this


def truncated_header(ctx: CaseContext) -> bytes:
    return encode(good_payload(ctx))[:18]


def truncated_data(ctx: CaseContext) -> bytes:
    return encode(good_payload(ctx))[:-7]


def header_length_lie(_: CaseContext) -> bytes:
    return struct.pack("<Q", 2**63) + b'{"dense/kernel":{}}'


def header_not_json(_: CaseContext) -> bytes:
    return _envelope(b"{this is not json}", bytes(60))


def header_nesting_bomb(_: CaseContext) -> bytes:
    """A 100 KB header nested 50,000 deep: well under the header limit, deeper than any parser's stack."""
    return _envelope(b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", bytes(60))


def header_too_large(ctx: CaseContext) -> bytes:
    """A well-formed update with 2 MiB of metadata: over the header budget of a two-tensor model."""
    return encode(good_payload(ctx), {"padding": "x" * (2 << 20)})


def shape_overflow(_: CaseContext) -> bytes:
    header = _tensor_header(
        **{
            "dense/kernel": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 48]},
            "dense/bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]},
        }
    )
    return _envelope(header, bytes(60))


def overlapping_offsets(_: CaseContext) -> bytes:
    header = _tensor_header(
        **{
            "dense/kernel": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
            "dense/bias": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        }
    )
    return _envelope(header, bytes(60))


def oversized(ctx: CaseContext) -> bytes:
    """A well-formed update padded with 64 KiB of metadata (the test sets a 4 KiB limit)."""
    return encode(good_payload(ctx), {"padding": "x" * (64 << 10)})


OVERSIZE_LIMIT = "4096"


def with_tensors(change: Callable[[Weights], Weights], *, raw: bool = False) -> Callable:
    def payload(ctx: CaseContext) -> bytes:
        weights = change(good_payload(ctx))
        return raw_safetensors(weights) if raw else encode(weights)

    return payload


def _missing(w: Weights) -> Weights:
    return {"dense/kernel": w["dense/kernel"]}


def _extra(w: Weights) -> Weights:
    return {**w, "dense/extra": np.zeros(2, np.float32)}


def _renamed(w: Weights) -> Weights:
    return {"dense/kernel": w["dense/kernel"], "dense/b": w["dense/bias"]}


def _reshaped(w: Weights) -> Weights:
    return {**w, "dense/kernel": w["dense/kernel"].reshape(3, 4)}


def _empty(_: Weights) -> Weights:
    return {}


def _float64(w: Weights) -> Weights:
    return {**w, "dense/kernel": w["dense/kernel"].astype(np.float64)}


def _int32(w: Weights) -> Weights:
    return {**w, "dense/kernel": w["dense/kernel"].astype(np.int32)}


def _nan(w: Weights) -> Weights:
    bias = w["dense/bias"].copy()
    bias[1] = np.nan
    return {**w, "dense/bias": bias}


def _inf(w: Weights) -> Weights:
    kernel = w["dense/kernel"].copy()
    kernel[2, 0] = -np.inf
    return {**w, "dense/kernel": kernel}


# ---- records ------------------------------------------------------------------------------------


def foreign_key_case(key_for: Callable[[CaseContext], str]) -> Callable:
    """``BAD_CLIENT``'s record pointing at an object it does not own (the object exists)."""

    def build(ctx: CaseContext) -> dict[str, Any]:
        return client_record(ctx, BAD_CLIENT, good_payload(ctx), object_key=key_for(ctx))

    return build


def global_model_as_update(ctx: CaseContext) -> dict[str, Any]:
    """site-1 names the current global model (which it may read) as its update."""
    key = keys.global_key(ctx.run_id, 0)
    sha256 = sha256_hex(ctx.world.store.get_bytes(key))
    return client_record(ctx, BAD_CLIENT, None, object_key=key, sha256=sha256)


def inconsistent_update_id(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx), update_id=update_sort_key(ctx.run_id, 5))


def unknown_client(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, "site-9", good_payload(ctx))


def wrong_run(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx), run_id="run-zz")


def future_base_version(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx), version=99)


def closed_round(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx))  # sent after round 1 closed


def unknown_round(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx), round=42)


def replayed_token(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx), task_token="token-round-0-replayed")


def duplicate(ctx: CaseContext) -> dict[str, Any]:
    return dict(ctx.good[0])  # the stream delivers the first good record again


def stale(ctx: CaseContext) -> dict[str, Any]:
    return client_record(ctx, BAD_CLIENT, good_payload(ctx))  # base 0, sent after two new versions


# ---- queue messages -----------------------------------------------------------------------------


def finalize_not_json(_: CaseContext) -> str:
    return "not json at all {"


def finalize_wrong_shape(ctx: CaseContext) -> str:
    return json.dumps({"type": "finalize", "run_id": ctx.run_id, "round": "first"})


def client_not_json(_: CaseContext) -> str:
    return "<xml>not json</xml>"


def client_unknown_type(ctx: CaseContext) -> str:
    return json.dumps({"type": "run_shell", "run_id": ctx.run_id, "command": "rm -rf /"})


def client_extra_field(ctx: CaseContext) -> str:
    body = json.loads(_model_ready(ctx, keys.global_key(ctx.run_id, 0), "0" * 64))
    return json.dumps({**body, "exec": "import os"})


def client_model_bad_sha(ctx: CaseContext) -> str:
    return _model_ready(ctx, keys.global_key(ctx.run_id, 0), "0" * 64)


def client_model_is_pickle(ctx: CaseContext) -> str:
    data = pickle_payload(ctx)
    key = keys.global_key(ctx.run_id, 99)
    ctx.world.put_object(key, data)
    return _model_ready(ctx, key, sha256_hex(data))


def _model_ready(ctx: CaseContext, key: str, sha256: str) -> str:
    return ModelReady(run_id=ctx.run_id, version=0, round=1, object_key=key, sha256=sha256).model_dump_json()


# ---- the corpus ---------------------------------------------------------------------------------


def _payload_case(name: str, summary: str, payload: Callable, reason: str, detail: str, **kw: Any) -> Case:
    return Case(name, summary, "updates", bad_update(payload), both(reason, detail), **kw)


def _record_case(name: str, summary: str, reason: str, detail: str, **fields: Any) -> Case:
    return Case(name, summary, "updates", bad_update(good_payload, **fields), both(reason, detail))


CASES: list[Case] = [
    # -- payloads that are not safetensors, or not well-formed ones
    _payload_case(
        "truncated_header",
        "safetensors cut inside its header",
        truncated_header,
        "truncated",
        "but the payload has 18",
    ),
    _payload_case(
        "truncated_data",
        "safetensors cut inside its tensor data",
        truncated_data,
        "malformed",
        "file not fully covered",
    ),
    _payload_case(
        "header_length_lie",
        "header length field claims 2**63 bytes",
        header_length_lie,
        "truncated",
        "claims 9223372036854775808 bytes",
    ),
    _payload_case(
        "oversized",
        "a well-formed update over FEDSTREAM_MAX_MODEL_BYTES (4 KiB here)",
        oversized,
        "too_large",
        "> 4096",
        env={"FEDSTREAM_MAX_MODEL_BYTES": OVERSIZE_LIMIT},
    ),
    _payload_case(
        "empty_object", "a zero-byte object", lambda _: b"", "not_safetensors", "payload of 0 bytes"
    ),
    _payload_case(
        "pickle", "a Python pickle whose __reduce__ calls print", pickle_payload, "not_safetensors", "pickle"
    ),
    _payload_case(
        "npy_object_array",
        "an .npy object array (needs allow_pickle to load)",
        npy_object_array,
        "not_safetensors",
        "a .npy array",
    ),
    _payload_case(
        "zip_bomb",
        "a zip whose member inflates 16 MiB of zeros (an .npz/.keras look-alike)",
        zip_bomb,
        "not_safetensors",
        "a zip archive",
    ),
    _payload_case(
        "hdf5_file",
        "a Keras HDF5 file",
        hdf5_file,
        "not_safetensors",
        "payload of 128 bytes is not safetensors",
    ),
    _payload_case(
        "header_not_json",
        "a header that starts with '{' but is not JSON",
        header_not_json,
        "malformed",
        "Expecting property name",
    ),
    _payload_case(
        "header_nesting_bomb",
        "a JSON header nested 50,000 levels deep",
        header_nesting_bomb,
        "malformed",
        "not valid safetensors",
    ),
    _payload_case(
        "header_too_large",
        "a header of 2 MiB (metadata padding) for a two-tensor model",
        header_too_large,
        "header_too_large",
        "exceeds the limit of",
    ),
    _payload_case(
        "shape_overflow",
        "a tensor shape of 2**31 x 2**31 over 48 bytes",
        shape_overflow,
        "malformed",
        "overflow computing buffer size",
    ),
    _payload_case(
        "overlapping_offsets",
        "two tensors over the same bytes",
        overlapping_offsets,
        "malformed",
        "invalid offset",
    ),
    # -- well-formed safetensors that is not this model
    _payload_case(
        "missing_tensor",
        "dense/bias left out",
        with_tensors(_missing),
        "tensor_names",
        "missing ['dense/bias'], unexpected []",
    ),
    _payload_case(
        "extra_tensor",
        "an extra tensor dense/extra",
        with_tensors(_extra),
        "tensor_names",
        "missing [], unexpected ['dense/extra']",
    ),
    _payload_case(
        "renamed_tensor",
        "dense/bias renamed dense/b",
        with_tensors(_renamed),
        "tensor_names",
        "missing ['dense/bias'], unexpected ['dense/b']",
    ),
    _payload_case(
        "no_tensors",
        "a valid safetensors file with no tensor",
        with_tensors(_empty, raw=True),
        "tensor_names",
        "missing ['dense/kernel', 'dense/bias']",
    ),
    _payload_case(
        "reshaped_tensor",
        "dense/kernel as 3x4 instead of 4x3",
        with_tensors(_reshaped),
        "tensor_shape",
        "has shape (3, 4), expected (4, 3)",
    ),
    _payload_case(
        "float64_tensor",
        "dense/kernel as float64 in a float32 model",
        with_tensors(_float64),
        "tensor_dtype",
        "has dtype float64, expected float32",
    ),
    _payload_case(
        "int32_tensor",
        "dense/kernel as int32",
        with_tensors(_int32, raw=True),
        "tensor_dtype",
        "has dtype int32; allowed",
    ),
    _payload_case(
        "nan_weights",
        "a NaN in dense/bias",
        with_tensors(_nan, raw=True),
        "non_finite",
        "'dense/bias' contains NaN or Inf",
    ),
    _payload_case(
        "inf_weights",
        "-Inf in dense/kernel",
        with_tensors(_inf, raw=True),
        "non_finite",
        "'dense/kernel' contains NaN or Inf",
    ),
    # -- records that lie about the object, or are not records
    _record_case(
        "sha256_mismatch",
        "the record's sha256 is another payload's",
        "sha256_mismatch",
        "sha256 does not match",
        sha256=sha256_hex(b"some other payload"),
    ),
    Case(
        "missing_object",
        "the record names an object that was never uploaded",
        "updates",
        bad_update(lambda _: None),
        both("missing_object", "does not exist"),
    ),
    _record_case("num_examples_zero", "num_examples 0", "malformed_record", "(num_examples)", num_examples=0),
    _record_case(
        "num_examples_negative", "num_examples -5", "malformed_record", "(num_examples)", num_examples=-5
    ),
    _record_case(
        "num_examples_absurd",
        "num_examples 10**12 (FedAvg weight ~1)",
        "malformed_record",
        "(num_examples)",
        num_examples=10**12,
    ),
    _record_case(
        "num_examples_mistyped",
        "num_examples 'ten'",
        "malformed_record",
        "(num_examples)",
        num_examples="ten",
    ),
    _record_case(
        "num_examples_string",
        "num_examples '1000' (a string, not coerced)",
        "malformed_record",
        "(num_examples)",
        num_examples="1000",
    ),
    _record_case(
        "num_examples_bool",
        "num_examples true (not coerced to 1)",
        "malformed_record",
        "(num_examples)",
        num_examples=True,
    ),
    _record_case(
        "accuracy_out_of_range",
        "metrics eval_accuracy 1e100 (would end a run at its target)",
        "malformed_record",
        "(metrics.eval_accuracy)",
        metrics={"train_loss": 1.0, "eval_accuracy": 1e100},
    ),
    _record_case(
        "negative_loss",
        "metrics train_loss -3",
        "malformed_record",
        "(metrics.train_loss)",
        metrics={"train_loss": -3.0, "eval_accuracy": 0.5},
    ),
    _record_case("missing_field", "the record has no sha256", "malformed_record", "(sha256)", sha256=DELETE),
    _record_case(
        "extra_field", "the record adds is_admin: true", "malformed_record", "(is_admin)", is_admin=True
    ),
    _record_case(
        "mistyped_base_version",
        "base_version 'latest'",
        "malformed_record",
        "(base_version)",
        base_version="latest",
    ),
    Case(
        "inconsistent_update_id",
        "update_id names version 5, base_version is 0",
        "updates",
        inconsistent_update_id,
        both("malformed_record", "update_id does not match"),
    ),
    Case(
        "non_finite_metrics",
        "metrics eval_accuracy 'NaN', train_loss 'Infinity' (strings: DynamoDB has no NaN number)",
        "updates",
        bad_update(good_payload, metrics={"eval_accuracy": "NaN", "train_loss": "Infinity"}),
        both("malformed_record", "(metrics."),
    ),
    Case(
        "sync_record_without_round",
        "a sync record with no round",
        "updates",
        bad_update(good_payload, round=DELETE),
        {"sync": ("malformed_record", "must name its round")},
    ),
    # -- finite and well-formed, but steering
    Case(
        "copy_of_global",
        "a byte-identical copy of the global model with 10**9 examples (free-riding, freezes FedAvg)",
        "updates",
        bad_update(lambda ctx: dict(ctx.world.base), num_examples=10**9),
        both("no_change", "identical to the model it was trained from"),
    ),
    # -- identity: whose object, which client, which run
    Case(
        "foreign_object_key",
        "site-1's record names an object under site-2's prefix",
        "updates",
        foreign_key_case(lambda ctx: keys.update_key(ctx.run_id, "site-2", 0, "theirs")),
        both("foreign_object_key", "updates/site-2/000000-theirs"),
    ),
    Case(
        "traversal_key",
        "site-1's object key climbs out with '..' into site-2's prefix",
        "updates",
        foreign_key_case(lambda ctx: f"runs/{ctx.run_id}/updates/site-1/../site-2/x.safetensors"),
        both("foreign_object_key", "site-1/../site-2"),
    ),
    Case(
        "nested_key",
        "runs/r/updates/site-2/x/updates/site-1/y: site-1's IAM wildcard matches it",
        "updates",
        foreign_key_case(lambda ctx: f"runs/{ctx.run_id}/updates/site-2/x/updates/site-1/y.safetensors"),
        both("foreign_object_key", "site-2/x/updates/site-1"),
    ),
    Case(
        "key_trailing_newline",
        "site-1's own update key with a newline after '.safetensors'",
        "updates",
        # refused before any download, so no object is needed (S3 would not take that key anyway)
        lambda ctx: client_record(
            ctx, BAD_CLIENT, None, object_key=keys.update_key(ctx.run_id, BAD_CLIENT, 0, "own") + "\n"
        ),
        both("foreign_object_key", "000000-own.safetensors\\n"),
    ),
    Case(
        "global_model_key",
        "site-1 submits the current global model's key as its update",
        "updates",
        global_model_as_update,
        both("foreign_object_key", "/global/000000"),
    ),
    Case(
        "other_run_key",
        "site-1's record in run-1 names its own object of run-0",
        "updates",
        foreign_key_case(lambda ctx: keys.update_key("run-0", BAD_CLIENT, 0, "old")),
        both("foreign_object_key", "runs/run-0/"),
    ),
    Case(
        "unknown_client",
        "a client id the deployment does not know",
        "updates",
        unknown_client,
        both("unknown_client", "'site-9' is not registered"),
    ),
    Case(
        "wrong_run_id",
        "a run id that does not exist",
        "updates",
        wrong_run,
        {
            "sync": ("unknown_run", "run 'run-zz' does not exist"),
            "async": ("unknown_run", "run 'run-zz' is not an async run"),
        },
    ),
    # -- lifecycle: rounds, versions, replays
    Case(
        "closed_round",
        "a late report for round 1 after it closed",
        "updates",
        closed_round,
        {"sync": ("round_closed", "round 1 is already closed")},
        position="after_round_closed",
    ),
    Case(
        "unknown_round",
        "a report for round 42, never opened",
        "updates",
        unknown_round,
        {"sync": ("unknown_round", "round 42 of run 'run-1' was never opened")},
    ),
    Case(
        "future_base_version",
        "base version 99 while the model is at 0",
        "updates",
        future_base_version,
        {
            "sync": ("wrong_base_version", "the update is from version 99"),
            "async": ("future_base_version", "base version 99 > current"),
        },
    ),
    Case(
        "stale_base_version",
        "base version 0 after two newer versions (max_staleness 1)",
        "updates",
        stale,
        {"async": ("stale", "2 versions stale (max 1)")},
        position="last",
        async_aggregator=("fedasync", {"max_staleness": 1}),
    ),
    Case(
        "duplicate",
        "the stream delivers a good record twice",
        "updates",
        duplicate,
        {
            "sync": ("duplicate", "'site-2' already reported for round 1"),
            "async": ("duplicate", "site-2#0 was already processed"),
        },
        position="after_first_good",
    ),
    Case(
        "replayed_task_token",
        "a record carrying an old round's task token",
        "updates",
        replayed_token,
        {"sync": ("task_token_mismatch", "not the round's token")},
        position="after_first_good",
    ),
    # -- queues
    Case(
        "finalize_not_json",
        "a finalize-queue body that is not JSON",
        "finalize",
        finalize_not_json,
        {"sync": ("malformed_request", "finalize request rejected: not a valid request")},
    ),
    Case(
        "finalize_wrong_shape",
        "a finalize request with a non-integer round and no version or token",
        "finalize",
        finalize_wrong_shape,
        {"sync": ("malformed_request", "finalize request rejected: not a valid request")},
    ),
    Case(
        "client_not_json",
        "a client-queue body that is not JSON",
        "client_queue",
        client_not_json,
        {"client": ("invalid_message", "message rejected: not a fedstream message")},
    ),
    Case(
        "client_unknown_type",
        "a client-queue message of a type the client does not know",
        "client_queue",
        client_unknown_type,
        {"client": ("invalid_message", "message rejected: not a fedstream message")},
    ),
    Case(
        "client_extra_field",
        "a model_ready message with an extra field",
        "client_queue",
        client_extra_field,
        {"client": ("invalid_message", "message rejected: not a fedstream message")},
    ),
    Case(
        "client_model_bad_sha",
        "model_ready whose sha256 does not match the global model",
        "client_queue",
        client_model_bad_sha,
        {"client": ("sha256_mismatch", "(sha256_mismatch)")},
    ),
    Case(
        "client_model_is_pickle",
        "model_ready pointing at a pickle (with its true sha256)",
        "client_queue",
        client_model_is_pickle,
        {"client": ("not_safetensors", "(not_safetensors)")},
    ),
]

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}


def cases_for(channel: Channel) -> list[Case]:
    return [case for case in CASES if case.channel == channel]
