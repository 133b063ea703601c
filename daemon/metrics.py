"""
The daemon's metrics: Prometheus collectors and the figures of the ``stats`` op.

The collectors are served on an optional HTTP endpoint ([metrics].listen).

One `Metrics` per daemon with its own registry, so that tests running several
daemons in one process never share counters. Labels carry no personal data: no
user or item ids, only operation names and error codes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

#: Rank latency buckets (seconds): the target is about a millisecond.
_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_WINDOW = 10_000  # recent rank latencies kept for the stats op's percentiles


class Metrics:
    """Counters, gauges and histograms of one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rerankd_requests", "Requests answered, by op", ["op"], registry=r)
        self.errors = Counter("rerankd_errors", "Error answers, by code", ["code"], registry=r)
        self.events = Counter(
            "rerankd_events", "Ingested events, by outcome", ["outcome"], registry=r
        )
        self.rank_seconds = Histogram(
            "rerankd_rank_seconds", "Rank latency in the daemon (queue + kernels + policies)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "rerankd_rank_batch_size", "Rank requests per kernel call",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.impressions_dropped = Counter(
            "rerankd_impressions_dropped", "Impressions not logged under overload", registry=r
        )
        self.feed_events = Counter(
            "rerankd_feed_events", "Events from feeds, by feed (mqtt, kafka) and outcome",
            ["feed", "outcome"], registry=r,
        )  # fmt: skip
        self.feed_connects = Counter(
            "rerankd_feed_connects", "Successful (re)connections of a feed to its broker",
            ["feed"], registry=r,
        )  # fmt: skip
        self.feed_connected = Gauge(
            "rerankd_feed_connected", "1 while a feed is connected to its broker", ["feed"],
            registry=r,
        )  # fmt: skip
        self.retention_deleted = Counter(
            "rerankd_retention_deleted", "Events deleted from the log by retention sweeps",
            registry=r,
        )  # fmt: skip
        self.retention_failures = Counter(
            "rerankd_retention_failures", "Retention sweeps that failed (retried at the next)",
            registry=r,
        )  # fmt: skip
        self._recent = np.zeros(_WINDOW, np.float64)
        self._recent_n = 0
        self._lock = threading.Lock()
        self._server: Any = None

    def total(self, name: str, **labels: str) -> int:
        """The current value of sample ``name`` (e.g. ``rerankd_events_total``), 0 if none yet."""
        return int(self.registry.get_sample_value(name, labels) or 0)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped (queue depths, snapshot age, …)."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def observe_rank(self, seconds: float) -> None:
        """Record one rank request's latency."""
        self.rank_seconds.observe(seconds)
        with self._lock:
            self._recent[self._recent_n % _WINDOW] = seconds
            self._recent_n += 1

    def rank_percentiles_ms(self) -> dict[str, float | int]:
        """p50/p99/p99.9 of the last (up to) 10,000 rank latencies, in milliseconds."""
        with self._lock:
            n = min(self._recent_n, _WINDOW)
            window = self._recent[:n].copy()
        if not n:
            return {"count": 0}
        p50, p99, p999 = np.percentile(window, [50, 99, 99.9]) * 1e3
        return {"count": n, "p50": round(float(p50), 3), "p99": round(float(p99), 3),
                "p999": round(float(p999), 3)}  # fmt: skip

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (a thread); returns the bound address."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        self._server = server
        return server.server_address[:2]

    def close(self) -> None:
        """Stop the HTTP endpoint, if serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
