"""The one exception type for an input that will never be accepted.

Every refusal carries a short machine-readable ``reason`` besides its message: the handlers log it
and count it as the ``reason`` dimension of the ``UpdatesRejected`` metric, and the offline CLI
prints it. The subclasses say where the refusal was made, for code that must tell them apart:

- ``fedstream.weights.WireFormatError``: a payload that fails the wire format's checks;
- ``fedstream.aggregation.AggregationError``: an aggregator that cannot take an update or close a
  round (``PrivacyBudgetExhausted``: the privacy budget is spent);
- ``fedstream.bounds.OutOfBounds``: an update outside the run's influence bounds;
- ``fedstream.server.sync.Rejected``: a record the server's own checks refuse (``FinalizeRefused``:
  a finalize request that is not the state machine's own).

Code that treats every refusal alike catches ``Refused``; a subclass's ``reason`` and message pass
through unchanged. This module imports nothing from fedstream, so every module can use it.
"""

from __future__ import annotations


class Refused(ValueError):
    """An input that will never be accepted; ``reason`` names why, for logs and metrics (the
    ``UpdatesRejected{reason}`` dimension). ``str(exc)`` is the message alone."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
