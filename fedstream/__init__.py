"""fedstream: serverless, event-driven federated learning on AWS managed services."""

from fedstream.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
