"""Logger, Tracer and Metrics shared by every handler (namespace ``fedstream``).

Logs are one JSON object per line with ``run_id``, ``round``, ``client_id`` and ``version``
appended as correlation keys; metrics are CloudWatch EMF lines in the same stream.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import IO

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric

NAMESPACE = "fedstream"
# A batch that only registered reports has no metric to flush; that is not worth a warning.
warnings.filterwarnings("ignore", message="No application metrics to publish")
os.environ.setdefault("POWERTOOLS_METRICS_NAMESPACE", NAMESPACE)


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is now, so an embedding runtime can route the log stream."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


_stream: IO[str] = _CurrentStdout()  # type: ignore[assignment]
logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "fedstream"), stream=_stream)
tracer = Tracer(service="fedstream")
metrics = Metrics(namespace=NAMESPACE, service="fedstream")


def count_rejection(reason: str, message: str = "update rejected", **context: object) -> None:
    """One rejected input: a structured warning and an ``UpdatesRejected{reason}`` metric."""
    with single_metric(name="UpdatesRejected", unit=MetricUnit.Count, value=1, namespace=NAMESPACE) as metric:
        metric.add_dimension(name="reason", value=reason)
    logger.warning(message, extra={"reason": reason, **context})


__all__ = ["MetricUnit", "count_rejection", "logger", "metrics", "tracer"]
