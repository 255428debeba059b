"""Prometheus metrics of p11grid's services (the grid service, the OpenID provider):
requests by operation and result (failures by reason), their durations, and gauges the
service reads at scrape time.

The request path only adds to plain counters (one dict update and one bisect per
request: the grid's reactor time is its throughput); prometheus_client turns them into
the exposition format when Prometheus scrapes, from its own HTTP server on the address
the service's config names (127.0.0.1 unless you mean otherwise).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Seconds; an ECDSA signature by SoftHSM2 is ~0.05 ms, an RSA-2048 one ~0.5 ms, a PIV card
# tens of ms, a login with its scrypt verifier ~40 ms.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5)


class ServiceMetrics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # p11grid_grid, p11grid_idp
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        self._buckets: dict[str, list[int]] = {}  # per operation; last slot is +Inf
        self._sums: dict[str, float] = {}
        self.gauges: list[tuple[str, str, Callable[[], int]]] = []  # name, help, read

    def gauge(self, name: str, help_text: str, read: Callable[[], int]) -> None:
        self.gauges.append((f"{self.prefix}_{name}", help_text, read))

    def observe(self, operation: str, result: str, seconds: float) -> None:
        with self._lock:
            key = (operation, result)
            self._requests[key] = self._requests.get(key, 0) + 1
            counts = self._buckets.get(operation)
            if counts is None:
                counts = self._buckets[operation] = [0] * (len(BUCKETS) + 1)
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[operation] = self._sums.get(operation, 0.0) + seconds

    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: the families, read at scrape time."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        with self._lock:
            requests = dict(self._requests)
            buckets = {op: list(counts) for op, counts in self._buckets.items()}
            sums = dict(self._sums)
        family = CounterMetricFamily(f"{self.prefix}_requests", "Requests by operation "
                                     "and result (ok, or the failure kind)",
                                     labels=["operation", "result"])
        for (operation, result), count in sorted(requests.items()):
            family.add_metric([operation, result], count)
        yield family
        histogram = HistogramMetricFamily(f"{self.prefix}_request_seconds", "Time from a "
                                          "decoded request to its answer", labels=["operation"])
        for operation, counts in sorted(buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric([operation], cumulative, sums[operation])
        yield histogram
        for name, help_text, read in self.gauges:
            yield GaugeMetricFamily(name, help_text, value=read())


def serve_metrics(metrics: ServiceMetrics, host: str, port: int) -> Any:
    """Prometheus's HTTP endpoint for `metrics` (its own registry: nothing else leaks in)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    return start_http_server(port, addr=host, registry=registry)
