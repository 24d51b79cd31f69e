"""The hooks a fedstream plugin may implement (pluggy project name ``fedstream``)."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "fedstream"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_aggregators(register: Callable[..., None]) -> None:
    """Register aggregators: ``register(name, factory, params=Model, modes=..., description=...)``."""
