"""Kafka-protocol brokers the project can start by itself (the embedded default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from khala_stream.broker.local_broker import LocalBroker, start_local_broker

__all__ = ["LocalBroker", "start_local_broker"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m khala_stream.broker.local_broker` does not find the
    # module already imported by its package (runpy warns about that).
    if name in __all__:
        from khala_stream.broker import local_broker

        return getattr(local_broker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
