"""Async mode: each stream batch moves the global model in memory and is committed once.

One run, one batch of update records (a Lambda invocation of the stream function):

1. Take the run state (``sk='state'``: version, global key, FedBuff's buffer, the version that
   released each client, counters) and the batch's markers (``sk='update#{client}#{base}'``): a
   warm function starts from the state it committed last and assumes no marker (the commit's
   conditions check both, and a wrong guess costs one retry); otherwise one read fetches them.
2. Judge each record in stream order: duplicate (a marker exists, or the same update came earlier
   in this batch), run finished, future base version, ``in_flight`` (the client already has an
   update in this batch, or trained on a version older than the one that released its previous
   update), stale, unknown base version; then verify and decode its download and hand it to the
   aggregator with the weights it was trained from. Downloads run ahead in threads, for records
   that the state and markers alone do not refuse (a run that is over downloads nothing).
   FedAsync mixes it in (one server step); FedBuff adds it to the buffer and steps every K.
   Staleness counts these in-memory steps: the version number is the number of server steps.
3. Write the batch's last version (when it took a step) under a fresh key and the buffer (when it
   changed), then commit in one DynamoDB transaction: the state, conditioned on the version, the
   buffer sequence and the status this invocation read; a marker per record, conditioned on not
   existing; and the version item with its lineage (every update applied since its parent).
   Intermediate versions are not published: nobody could train on one before the next superseded
   it, and each would cost an S3 write and a notification to every client.
4. Publish one "model ready" that names every update the batch consumed (applied, buffered,
   rejected, or a duplicate of one consumed before). A client trains again only once its update
   is named, so it has one update in flight at a time and staleness stays bounded. The batch that
   ends the run publishes "training complete" instead. A crash after the commit loses only that
   message: the redelivered batch finds every marker, changes nothing, and publishes it again.

A commit that loses a race (another invocation moved the run first) recomputes the batch from the
fresh state. Downloads run ahead in ``download_threads`` threads while records are judged in
order, so memory holds that many updates besides the model and the buffer. A transaction holds
the state, one marker per record and one version item: at most ``MAX_RECORDS_PER_COMMIT`` records
each; a larger batch is committed in several, each whole or not at all.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedstream import faults, keys
from fedstream.aggregation import Aggregator, AsyncState, ClientUpdate, MetricsMean
from fedstream.bounds import (
    InfluenceBounds,
    for_run,
)
from fedstream.errors import Refused
from fedstream.host import async_step, check_stale, staleness_of
from fedstream.registry import AggregatorRegistry
from fedstream.schemas import ModelReady, TrainingComplete, UpdateRecord
from fedstream.server.records import Rejected, check_identity, digest_sk, load_update, parse_record, prefetch
from fedstream.server.store import ConditionFailed, GlobalModel, MissingObject, Repository
from fedstream.settings import HandlerSettings
from fedstream.weights import Weights, decode, encode, sha256_hex

MAX_CONFLICT_RETRIES = 8
# DynamoDB takes at most 100 items a transaction: the state, the version item and two markers a
# record (the update's, and its object's: see ``digest_sk``).
MAX_RECORDS_PER_COMMIT = 49
STATE_KEY = "state"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def update_ref(record: UpdateRecord) -> str:
    return f"{record.client_id}#{record.base_version}"


def marker_sk(ref: str) -> str:
    return f"update#{ref}"


@dataclass(frozen=True)
class Arrival:
    """One stream record: its new image and when the stream took it (server clock, epoch s)."""

    image: Mapping[str, Any]
    written_at: float | None = None


@dataclass
class Verdict:
    """What one record did: ``applied`` (in a server step), ``buffered``, or ``rejected`` (``reason``)."""

    arrival: Arrival
    record: UpdateRecord | None
    outcome: str
    reason: str | None = None
    detail: str = ""
    staleness: int | None = None
    version: int | None = None  # the in-memory version it was judged at
    stream_wait: float | None = None  # written to the stream -> committed, seconds
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ref(self) -> str | None:
        return update_ref(self.record) if self.record is not None else None

    @property
    def counted(self) -> bool:
        """Its run's counters include it and a marker is written (not for duplicates or unknown runs)."""
        return self.record is not None and self.reason not in ("duplicate", "unknown_run")


@dataclass
class BatchCommit:
    """One run's part of a batch, as committed."""

    run_id: str
    verdicts: list[Verdict]
    version: int  # the run's version after the commit
    published: bool  # a new version was published
    steps: int
    buffered: int
    finished: str | None = None
    conflict_retries: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    aggregation_seconds: float = 0.0  # judging, downloading and applying the records (the last try)
    committed: bool = True  # False: nothing to write (an unknown run, or only duplicates)
    global_key: str = ""  # the run's global model after the commit, and its sha256
    global_sha256: str = ""


@dataclass
class BatchResult:
    verdicts: list[Verdict]  # one per record, in stream order
    commits: list[BatchCommit]


def start_run(
    store: Repository,
    run_id: str,
    weights_data: bytes,
    *,
    client_settings: Mapping[str, Any] | None = None,
    max_updates: int = 0,
    target_accuracy: float | None = None,
    max_seconds: float = 0.0,
    bounds: InfluenceBounds | None = None,
) -> ModelReady:
    """Publish version 0 of an async run and notify every client.

    ``bounds`` are this run's influence bounds where they differ from the deployment's.
    """
    weights, _ = decode(weights_data, max_bytes=store.settings.max_model_bytes)
    key = keys.global_key(run_id, 0)
    store.put_once(key, weights_data)
    digest = sha256_hex(weights_data)
    state = {
        "run_id": run_id,
        "sk": STATE_KEY,
        "mode": "async",
        "status": "RUNNING",
        "version": 0,
        "global_key": key,
        "global_sha256": digest,
        "buffer_seq": 0,
        "buffer_ids": [],
        "released": {},
        "received": 0,
        "applied": 0,
        "rejected": 0,
        "buffered": 0,
        "max_updates": max_updates,
        "max_seconds": str(max_seconds),
        "target_accuracy": "" if target_accuracy is None else str(target_accuracy),
        "client_settings": json.dumps(dict(client_settings or {})),
        "bounds": "" if bounds is None else bounds.model_dump_json(exclude_unset=True),
        "started_at": _now(),
        "version_at": str(time.time()),
    }
    version = {"run_id": run_id, "sk": "version#0", "key": key, "sha256": digest, "parent": -1, "applied": []}
    # Both or neither: a run id is taken once.
    store.create_items([state, version])
    message = ModelReady(
        run_id=run_id, version=0, object_key=key, sha256=digest, client_settings=dict(client_settings or {})
    )
    store.publish(message.model_dump(exclude_none=True))
    del weights
    return message


def handle_async_batch(
    store: Repository, settings: HandlerSettings, registry: AggregatorRegistry, arrivals: Sequence[Arrival]
) -> BatchResult:
    """Judge, apply and commit a batch of update records; one verdict per record, in order.

    Rejections are verdicts, never exceptions. An exception means the batch must be retried: each
    run's records (98 at most a transaction) are committed whole or not at all, and a retry finds
    the markers of what was committed and changes nothing there.
    """
    verdicts: list[Verdict | None] = [None] * len(arrivals)
    by_run: dict[str, list[tuple[int, UpdateRecord]]] = {}
    for index, arrival in enumerate(arrivals):
        try:
            record = parse_record(arrival.image)
            # Refused before any run is read or counted: it names no caller or object we know.
            check_identity(record, settings)
        except Rejected as rejected:
            verdicts[index] = Verdict(arrival, None, "rejected", rejected.reason, str(rejected))
            continue
        by_run.setdefault(record.run_id, []).append((index, record))
    commits = []
    for run_id, items in by_run.items():
        for start in range(0, len(items), MAX_RECORDS_PER_COMMIT):
            chunk = items[start : start + MAX_RECORDS_PER_COMMIT]
            commit = _RunBatch(store, settings, registry, run_id).process(
                [(arrivals[index], record) for index, record in chunk]
            )
            for (index, _), verdict in zip(chunk, commit.verdicts, strict=True):
                verdicts[index] = verdict
            commits.append(commit)
    return BatchResult([v for v in verdicts if v is not None], commits)


@dataclass
class _Plan:
    """A run as a batch leaves it in memory, before the commit."""

    state: dict[str, Any]
    model: GlobalModel | None  # None when the run is over
    version: int
    weights: Weights
    buffer: AsyncState | None
    buffer_ids: list[str]
    verdicts: list[Verdict] = field(default_factory=list)
    lineage: list[str] = field(default_factory=list)  # updates applied since the published version
    steps: int = 0
    applied: int = 0
    buffer_changed: bool = False
    finished: str | None = None
    step_metrics: dict[str, float] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)
    # what the clients reported with the updates taken since the last server step (a buffer's worth)
    reports: MetricsMean = field(default_factory=MetricsMean)
    norms: list[float] = field(default_factory=list)  # delta norms of the updates taken last

    @property
    def running(self) -> bool:
        return self.state.get("status") == "RUNNING" and self.finished is None


class _RunBatch:
    def __init__(
        self, store: Repository, settings: HandlerSettings, registry: AggregatorRegistry, run_id: str
    ) -> None:
        self.store, self.settings, self.run_id = store, settings, run_id
        self.registry = registry

    def process(self, items: list[tuple[Arrival, UpdateRecord]]) -> BatchCommit:
        """Judge and commit; on a lost race, read everything again and recompute.

        The first try trusts the state this process committed last (a warm function usually is
        the run's only writer) and assumes no marker exists: the transaction's conditions check
        both, so a stale guess costs one retry, never a wrong commit.
        """
        retries = 0
        state, markers = self.store.cached_run_state(self.run_id), {}
        while True:
            if state is None:
                found = self.store.run_items(
                    self.run_id,
                    [
                        STATE_KEY,
                        *(marker_sk(update_ref(r)) for _, r in items),
                        *(digest_sk(r.client_id, r.sha256) for _, r in items),
                    ],
                )
                state = found.pop(STATE_KEY, None)
                markers = found
            if state is None or state.get("mode") != "async":
                detail = f"run {self.run_id!r} is not an async run of this deployment"
                verdicts = [Verdict(a, r, "rejected", "unknown_run", detail) for a, r in items]
                return BatchCommit(self.run_id, verdicts, 0, False, 0, 0, committed=False)
            began = time.perf_counter()
            plan = self._plan(state, items, markers)
            seconds = time.perf_counter() - began
            try:
                commit = self._commit(plan)
            except ConditionFailed:
                self.store.forget_run_state(self.run_id)
                state = None
                retries += 1
                if retries > MAX_CONFLICT_RETRIES:
                    raise
                if retries > 1:  # the first retry only corrects this process's guess
                    time.sleep(random.uniform(0, 0.05 * 2 ** min(retries, 5)))
                continue
            commit.conflict_retries, commit.aggregation_seconds = retries, seconds
            self._notify(plan, commit)
            return commit

    # ---- judging, in memory -------------------------------------------------------------------
    def _plan(
        self,
        state: dict[str, Any],
        items: list[tuple[Arrival, UpdateRecord]],
        markers: Mapping[str, Any],
    ) -> _Plan:
        aggregator = self.registry.create(
            self.settings.aggregator,
            self.settings.aggregator_params,
            seed=self.settings.seed,
            mode="async",
            num_clients=len(self.settings.client_ids) or None,
        )
        version = int(state["version"])
        running = state.get("status") == "RUNNING"
        # A run that is over loads nothing: its records are refused from the state alone.
        model = self.store.global_model(self.run_id, version, str(state["global_key"])) if running else None
        plan = _Plan(
            state=state,
            model=model,
            version=version,
            weights=model.weights if model is not None else {},
            buffer=self._load_buffer(state) if running else None,
            buffer_ids=list(state.get("buffer_ids", [])),
            norms=[float(n) for n in state.get("norms", [])],
            reports=MetricsMean.from_json(state.get("reports_since_step")),
        )
        released = state.get("released", {})
        # What can be refused without it is not downloaded: a duplicate, a future or back-dated base,
        # a client's second record in the batch (a client flooding the stream costs no downloads).
        wanted: dict[str, str] = {}
        for _, record in items:
            if (
                running
                and marker_sk(update_ref(record)) not in markers
                and digest_sk(record.client_id, record.sha256) not in markers
                and released.get(record.client_id, 0) <= record.base_version <= version
            ):
                wanted.setdefault(record.client_id, update_ref(record))

        def download(item: tuple[Arrival, UpdateRecord]) -> Weights | None:
            record = item[1]
            if model is None or wanted.get(record.client_id) != update_ref(record):
                return None
            return load_update(self.store, record, model.spec)[0]

        seen_refs: set[str] = set()
        seen_clients: set[str] = set()
        # Downloads run ahead in threads (memory: the window's updates); judging stays in order.
        window = self.settings.download_threads
        for (arrival, record), downloaded in prefetch(items, download, window):
            ref = update_ref(record)
            verdict = Verdict(arrival, record, "rejected", version=plan.version)
            try:
                if marker_sk(ref) in markers or ref in seen_refs:
                    raise Rejected("duplicate", f"update {ref} was already processed")
                seen_refs.add(ref)
                if digest_sk(record.client_id, record.sha256) in markers:
                    raise Rejected("replay", f"{record.client_id!r} already sent object {record.sha256}")
                self._judge(plan, aggregator, record, verdict, seen_clients, downloaded)
            except Refused as refused:
                verdict.outcome, verdict.reason, verdict.detail = "rejected", refused.reason, str(refused)
            if verdict.reason != "duplicate":
                seen_clients.add(record.client_id)
            plan.verdicts.append(verdict)
        return plan

    def _judge(
        self,
        plan: _Plan,
        aggregator: Aggregator,
        record: UpdateRecord,
        verdict: Verdict,
        seen_clients: set[str],
        downloaded: Weights | BaseException | None,
    ) -> None:
        if not plan.running:
            status = "finished" if plan.finished else plan.state.get("status")
            raise Rejected("run_finished", f"run {self.run_id!r} is {status}")
        staleness = staleness_of(plan.version, record.base_version)
        released = int(plan.state.get("released", {}).get(record.client_id, 0))
        if record.client_id in seen_clients or record.base_version < released:
            raise Rejected(
                "in_flight",
                f"client {record.client_id!r} trained on version {record.base_version} before its previous "
                f"update was consumed (released at version {released})",
            )
        check_stale(aggregator, staleness)  # before the download (async_step judges it too)
        verdict.staleness = staleness
        base = self._version_model(record.base_version)
        if isinstance(downloaded, BaseException):
            raise downloaded  # a Refused (its reason), or an error that fails the batch
        if downloaded is None:
            assert plan.model is not None  # a running run's model is loaded
            downloaded = load_update(self.store, record, plan.model.spec)[0]
        weights = downloaded
        update = ClientUpdate(
            record.client_id,
            weights,
            record.num_examples,
            record.metrics.as_dict(),
            record.base_version,
            base.weights,
        )
        step = async_step(
            aggregator,
            plan.weights,
            update,
            staleness=staleness,
            state=plan.buffer,
            bounds=for_run(self.settings.bounds, plan.state.get("bounds")),
            norms=plan.norms,
            trained_from=base.weights,
        )
        result = step.result
        verdict.metrics = {k: float(v) for k, v in result.metrics.items()}
        plan.norms = step.norms
        plan.buffer_ids.append(update_ref(record))
        plan.reports.add(update.metrics, step.num_examples)
        if result.weights is None:
            verdict.outcome = "buffered"
            plan.buffer, plan.buffer_changed = result.state, True
            return
        verdict.outcome = "applied"
        plan.weights, plan.version, plan.steps = result.weights, plan.version + 1, plan.steps + 1
        plan.lineage += plan.buffer_ids
        plan.applied += len(plan.buffer_ids)
        plan.buffer, plan.buffer_ids, plan.buffer_changed = result.state, [], True
        plan.step_metrics = verdict.metrics
        # The clients' metrics of the step: example-weighted over its updates, whatever the plugin returns.
        plan.reported, plan.reports = plan.reports.result(), MetricsMean()
        plan.finished = self._stop_reason(plan, record, stop=result.stop)

    def _stop_reason(self, plan: _Plan, record: UpdateRecord, *, stop: bool) -> str | None:
        state = plan.state
        max_updates = int(state.get("max_updates") or 0)
        target = state.get("target_accuracy") or ""
        max_seconds = float(state.get("max_seconds") or 0)
        accuracy = plan.reported.get("eval_accuracy")  # the step's example-weighted mean
        if stop:
            return "privacy_budget"
        if max_updates and int(state.get("applied", 0)) + plan.applied >= max_updates:
            return "max_updates"
        if target and accuracy is not None and accuracy >= float(target):
            return "target_accuracy"
        if max_seconds and state.get("started_at"):
            elapsed = (datetime.now(UTC) - datetime.fromisoformat(str(state["started_at"]))).total_seconds()
            return "wall_clock" if elapsed >= max_seconds else None
        return None

    def _version_model(self, version: int) -> GlobalModel:
        if (cached := self.store.cached_global_model(self.run_id, version)) is not None:
            return cached  # versions are write-once: a cached one is still the one
        item = self.store.run_items(self.run_id, [f"version#{version}"]).get(f"version#{version}")
        if item is None:
            raise Rejected(
                "unknown_base_version", f"version {version} of run {self.run_id} was never published"
            )
        try:
            return self.store.global_model(self.run_id, version, str(item["key"]))
        except MissingObject:
            raise Rejected("unknown_base_version", f"version {version} has no model object") from None

    def _load_buffer(self, state: Mapping[str, Any]) -> AsyncState | None:
        """The aggregator state the last commit named (FedBuff's buffer, an optimizer's moments)."""
        return self.store.aggregator_state(state.get("buffer_key") or None)

    # ---- the commit ---------------------------------------------------------------------------
    def _commit(self, plan: _Plan) -> BatchCommit:
        state, run_id = plan.state, self.run_id
        counted = [v for v in plan.verdicts if v.counted]
        commit = BatchCommit(
            run_id,
            plan.verdicts,
            plan.version,
            published=plan.steps > 0,
            steps=plan.steps,
            buffered=len(plan.buffer_ids),
            finished=plan.finished,
            metrics=plan.step_metrics,
            global_key=str(state["global_key"]),
            global_sha256=str(state["global_sha256"]),
        )
        if not counted:
            commit.committed = False  # only duplicates: their markers already say it all
            return commit
        nonce = uuid.uuid4().hex[:10]
        released = {**state.get("released", {}), **{v.record.client_id: plan.version for v in counted}}
        sets: dict[str, Any] = {
            "buffer_seq": int(state.get("buffer_seq", 0)) + 1,
            "buffer_ids": plan.buffer_ids,
            "buffered": len(plan.buffer_ids),
            "released": released,
            "norms": plan.norms,
            "reports_since_step": plan.reports.to_json(),
        }
        items: list[dict[str, Any]] = []
        if plan.buffer_changed and plan.buffer is None:
            sets["buffer_key"] = ""  # the aggregator keeps nothing now
        elif plan.buffer_changed and plan.buffer is not None:
            key = keys.state_key(run_id, f"buffer-{sets['buffer_seq']:08d}-{nonce}")
            # State keys are never rewritten (each has a nonce): the next batch here reads it from memory.
            meta = {"run_id": run_id, "version": str(plan.version)}
            self.store.put_aggregator_state(key, plan.buffer, meta)
            sets["buffer_key"] = key
        data = b""
        if plan.steps:
            key = keys.global_attempt_key(run_id, plan.version, nonce)
            data = encode(
                plan.weights,
                {
                    "run_id": run_id,
                    "version": str(plan.version),
                    "parent_version": str(state["version"]),
                    "aggregator": self.settings.aggregator,
                    "creator": "fedstream.async_update",
                    "created_at": _now(),
                    "applied": json.dumps(plan.lineage),
                    "metrics": json.dumps(plan.step_metrics),
                },
            )
            self.store.put_once(key, data)
            digest = sha256_hex(data)
            sets |= {
                "version": plan.version,
                "global_key": key,
                "global_sha256": digest,
                "version_at": str(time.time()),
                "last_metrics": json.dumps({**plan.step_metrics, **plan.reported}),
            }
            items.append(
                {
                    "run_id": run_id,
                    "sk": f"version#{plan.version}",
                    "key": key,
                    "sha256": digest,
                    "parent": int(state["version"]),
                    "applied": plan.lineage,
                    "steps": plan.steps,
                    "committed_at": time.time(),
                    "metrics": sets["last_metrics"],
                }
            )
        if plan.finished:
            sets |= {"status": "SUCCEEDED", "finish_reason": plan.finished, "finished_at": _now()}
        rejected = sum(v.outcome == "rejected" for v in counted)
        counters = {"received": len(counted), "applied": plan.applied, "rejected": rejected}
        now = time.time()  # the markers' consumed_at: the S3 writes are done, the commit is next
        objects: set[str] = set()
        for verdict in counted:
            verdict.stream_wait = (
                None if verdict.arrival.written_at is None else now - verdict.arrival.written_at
            )
            items.append(self._marker(verdict, plan.version, now))
            assert verdict.record is not None
            record = verdict.record
            # The object is this client's for this update, once (a second record naming it in this
            # batch is refused as in flight, and writes no second marker).
            if verdict.reason != "replay" and digest_sk(record.client_id, record.sha256) not in objects:
                objects.add(digest_sk(record.client_id, record.sha256))
                items.append(
                    {
                        "run_id": run_id,
                        "sk": digest_sk(record.client_id, record.sha256),
                        "used_in": marker_sk(update_ref(record)),
                        "object_key": record.object_key,
                    }
                )
        faults.point("async.before_commit")
        self.store.commit_async_step(
            run_id,
            sets,
            expected=(int(state["version"]), int(state.get("buffer_seq", 0)), state.get("status")),
            counters=counters,
            new_items=items,
        )
        # The state as stored now (the counters too): the next batch here starts from it.
        self.store.remember_run_state(
            run_id, {**state, **sets, **{name: int(state.get(name, 0)) + n for name, n in counters.items()}}
        )
        if plan.steps:
            # The next batch mixes into it; it was just encoded (and so checked) here.
            self.store.remember_global_model(
                run_id, plan.version, sets["global_key"], data, sets["global_sha256"]
            )
            commit.global_key, commit.global_sha256 = sets["global_key"], sets["global_sha256"]
        return commit

    def _marker(self, verdict: Verdict, released_at: int, now: float) -> dict[str, Any]:
        assert verdict.record is not None
        marker: dict[str, Any] = {
            "run_id": self.run_id,
            "sk": marker_sk(update_ref(verdict.record)),
            "client_id": verdict.record.client_id,
            "base_version": verdict.record.base_version,
            "outcome": verdict.outcome if verdict.reason is None else f"rejected:{verdict.reason}",
            "at_version": verdict.version,
            "released_at": released_at,
            "consumed_at": now,
        }
        if verdict.staleness is not None:
            marker["staleness"] = verdict.staleness
        if verdict.arrival.written_at is not None:
            marker["written_at"] = verdict.arrival.written_at
        return marker

    # ---- telling the clients ------------------------------------------------------------------
    def _notify(self, plan: _Plan, commit: BatchCommit) -> None:
        """One "model ready" naming every update the batch consumed, or "training complete" at the end.

        Once the run is over a client told its update was consumed would train once more for
        nothing, so the batch that ends it sends "training complete" instead; so does that batch
        redelivered (after a crash before this message). Later batches of the run send nothing.
        """
        faults.point("async.before_notify")
        state = plan.state
        over = state.get("status") != "RUNNING"
        if commit.finished or (over and not commit.committed and plan.verdicts):
            self.store.publish(
                TrainingComplete(run_id=self.run_id, reason="done", final_version=commit.version).model_dump()
            )
            return
        consumed = [v.ref for v in commit.verdicts if v.ref is not None]
        if over or not consumed:
            return
        self.store.publish(
            ModelReady(
                run_id=self.run_id,
                version=commit.version,
                object_key=commit.global_key,
                sha256=commit.global_sha256,
                client_settings=json.loads(state.get("client_settings") or "{}"),
                consumed=consumed,
            ).model_dump(exclude_none=True)
        )


def end_run(store: Repository, run_id: str, reason: str, version: int) -> bool:
    """Mark the run finished and tell every client; False if it had already ended."""
    try:
        store.finish_run(run_id, reason, _now())
    except ConditionFailed:
        return False
    store.publish(TrainingComplete(run_id=run_id, reason="done", final_version=version).model_dump())
    return True
