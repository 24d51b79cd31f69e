"""The S3 key layout, in one place.

runs/{run_id}/global/{version:06d}.safetensors            write-once global versions (sync, async v0)
runs/{run_id}/global/{version:06d}-{nonce}.safetensors    async versions, one key per commit attempt
runs/{run_id}/updates/{client_id}/{version:06d}-{nonce}.safetensors
                                                       a client writes only its own prefix
runs/{run_id}/state/{name}.safetensors                 aggregator state (FedBuff's buffer)
"""

from __future__ import annotations

import re

_UPDATE_KEY = re.compile(
    r"^runs/(?P<run>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/updates/(?P<client>[A-Za-z0-9][A-Za-z0-9._-]{0,63})/"
    r"[A-Za-z0-9._-]{1,128}\.safetensors\Z"
)


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def global_key(run_id: str, version: int) -> str:
    return f"runs/{run_id}/global/{version:06d}.safetensors"


def global_attempt_key(run_id: str, version: int, nonce: str) -> str:
    """A version written by an async batch: one key per attempt, so a retry never overwrites."""
    return f"runs/{run_id}/global/{version:06d}-{nonce}.safetensors"


def updates_prefix(run_id: str, client_id: str) -> str:
    return f"runs/{run_id}/updates/{client_id}/"


def update_key(run_id: str, client_id: str, base_version: int, nonce: str) -> str:
    return f"{updates_prefix(run_id, client_id)}{base_version:06d}-{nonce}.safetensors"


def state_key(run_id: str, name: str) -> str:
    return f"runs/{run_id}/state/{name}.safetensors"


def update_key_owner(key: str) -> tuple[str, str] | None:
    """(run_id, client_id) of a well-formed update key, or None for anything else."""
    match = _UPDATE_KEY.match(key)
    if match is None or ".." in key:
        return None
    return match["run"], match["client"]
