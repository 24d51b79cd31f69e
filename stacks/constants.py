"""Names, paths and sizes of the deployable stack, in one place."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from aws_cdk import aws_lambda as lambda_

# The sync state machine's definition, package data of fedstream.stacks (read, never executed).
STATE_MACHINE_DEFINITION = files("fedstream.stacks") / "state_machine.asl.json"
# The project file the Lambda asset takes its requirements from: deploys run from a checkout.
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

DEFAULT_STACK_NAME = "Fedstream"
PROJECT_TAG = "fedstream"

# --- Lambda -------------------------------------------------------------------------------------
# x86_64: the asset test imports the exact wheels that ship with a local CPython on the (x86_64)
# developer and CI machines. Graviton (ARM_64, pip platform "aarch64") is ~20% cheaper per GB-s;
# switching is these two constants, and the asset test then has to run on an arm64 machine.
LAMBDA_ARCHITECTURE = lambda_.Architecture.X86_64
LAMBDA_PIP_MACHINE = "x86_64"
# Python 3.13 is the newest CPython this project can install here to import-test the asset with;
# the cdk-nag "latest runtime" finding (3.14 exists) is acknowledged with that reason.
LAMBDA_RUNTIME = lambda_.Runtime.PYTHON_3_13
LAMBDA_PYTHON_VERSION = "3.13"
# Amazon Linux 2023 (the python3.12+ runtimes) ships glibc 2.34: any manylinux wheel up to that runs.
LAMBDA_GLIBC_MAX = (2, 34)
# The asset's code: where each package goes under the asset root, and which package it is. The
# core's client, stack and local runtime stay out (the functions never import them).
LAMBDA_PACKAGES = {
    "fedstream": "fedstream",
    "fedstream/handlers": "fedstream.handlers",
    "fedstream/plugins": "fedstream.plugins",
}
LAMBDA_LEFT_OUT = {"fedstream": ("client", "stacks", "local")}
# Requirements of the asset come from pyproject.toml ([project].dependencies + the "server" extra);
# dp-accounting (and the scipy it pulls: ~150 MB of the 250 MB unzipped limit) ships only when the
# chosen aggregator needs it. fedstream.plugins.dp_noise imports it lazily, so nothing else does.
LAMBDA_REQUIREMENTS_EXTRA = "server"
OPTIONAL_REQUIREMENTS = {"dp-accounting": frozenset({"dp-noise"})}
LAMBDA_UNZIPPED_LIMIT_BYTES = 250 * 1024 * 1024

HANDLER_AGGREGATE = "fedstream.handlers.aggregate.lambda_handler"
HANDLER_FINALIZE = "fedstream.handlers.finalize.lambda_handler"
HANDLER_ASYNC_UPDATE = "fedstream.handlers.async_update.lambda_handler"

# Memory: the global model (1x), the float32 running sum (1x), the mean (1x) and the encoded new
# version (1x), plus one update per download thread in flight, on top of the interpreter with numpy
# and Powertools loaded. (A float64 sum, which a plugin may ask for, takes 2x instead of 1x.)
LAMBDA_BASE_MEMORY_MB = 512
LAMBDA_MIN_MEMORY_MB = 1024
LAMBDA_MAX_MEMORY_MB = 10240
MODEL_COPIES_IN_MEMORY = 4
# Aggregators that keep every update of a round (sync: one per client) or every delta of their
# buffer (async: K = buffer_size) until they combine them: memory O(K * model) on top of the above.
# Per held update, in model-file sizes: sync keeps the downloaded payload (1x); async keeps a float64
# delta (2x a float32 file), and the host's commit also holds the new state blob and the previous
# one it caches (2x each), so 6x.
AGGREGATORS_HOLDING_UPDATES = frozenset({"median", "trimmed-mean", "krum"})
HELD_UPDATE_COPIES = {"sync": 1, "async": 6}
# Aggregators that keep model-sized state between steps, in float32-model sizes on top of the above:
# the server optimizers' float64 m and v (4x), the float64 sum or buffer (2x) and the state blob the
# host writes and caches (2x); FedAvgM keeps m only (2x less).
STATE_MODEL_COPIES = {"fedadam": 8, "fedyogi": 8, "fedadagrad": 8, "fedavgm": 6}
# Lambda allows 4 KB of environment in all; the client list and aggregator params get this much of it.
LAMBDA_ENV_BUDGET_BYTES = 3000
AGGREGATE_TIMEOUT_MINUTES = 15
ASYNC_UPDATE_TIMEOUT_MINUTES = 10

SYNC_STREAM_BATCH_SIZE = 10
ASYNC_STREAM_BATCH_SIZE = 10  # a batch is one step and one commit (at most 98 records a commit)
STREAM_RETRY_ATTEMPTS = 3
# Records older than this are given up on (to the stream-failure queue): well inside the stream's
# 24 h retention, so nothing expires unseen.
STREAM_MAX_RECORD_AGE_HOURS = 6
# IteratorAge (how old the newest record a stream function took was) above this for
# ITERATOR_AGE_PERIODS periods of a minute means the function does not keep up, or has stopped.
ITERATOR_AGE_ALARM_SECONDS = 300
ITERATOR_AGE_PERIODS = 5
ASYNC_PARALLELIZATION_FACTOR = 1

# --- Queues -------------------------------------------------------------------------------------
CLIENT_QUEUE_RETENTION_DAYS = 4
CLIENT_QUEUE_VISIBILITY_SECONDS = 300
CLIENT_MAX_RECEIVE_COUNT = 5
FINALIZE_MAX_RECEIVE_COUNT = 3
DLQ_RETENTION_DAYS = 14
# Lambda's advice for SQS event sources: visibility timeout at least 6x the function timeout.
SQS_VISIBILITY_PER_FUNCTION_TIMEOUT = 6

# --- Storage ------------------------------------------------------------------------------------
RUNS_PREFIX = "runs/"
# S3 lifecycle filters take a literal prefix, not runs/*/updates/: clients tag their uploads.
UPDATE_OBJECT_TAG = ("fedstream:object", "update")
NONCURRENT_VERSION_DAYS = 30
INCOMPLETE_UPLOAD_DAYS = 1
UPDATES_TABLE_PARTITION_KEY = "client_id"
UPDATES_TABLE_SORT_KEY = "update_id"
RUN_TABLE_PARTITION_KEY = "run_id"
RUN_TABLE_SORT_KEY = "sk"

# --- Clients ------------------------------------------------------------------------------------
# Each client costs 4 CloudFormation resources (queue, queue policy, subscription, role) and
# 2 outputs; CloudFormation allows 500 resources and 200 outputs per stack.
MAX_CLIENTS = 90

# --- Observability ------------------------------------------------------------------------------
METRIC_NAMESPACE = "fedstream"
POWERTOOLS_SERVICE_NAME = "fedstream"
SYNC_METRICS = (
    "RoundCompleted",
    "RoundDurationSeconds",
    "ClientsReported",
    "AggregationSeconds",
    "ModelBytes",
    "Epsilon",
)
ASYNC_METRICS = (
    "UpdateApplied",
    "Staleness",
    "StreamWaitSeconds",
    "BatchSize",
    "BufferFill",
    "ConflictRetries",
)
REJECTED_METRIC = "UpdatesRejected"
REJECTED_DIMENSION = "reason"
DASHBOARD_PERIOD_MINUTES = 5
DEFAULT_STALL_MINUTES = 30
DEFAULT_LOG_RETENTION_DAYS = 30
