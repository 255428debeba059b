"""Audit rows to the registry, off the signing path.

The audit file (or syslog) line stays the primary record, written before the caller's
next request. The same facts go to the registry's `audit` table from one background
thread, in batches (every `interval` seconds, or sooner once `batch` rows wait), through
a bounded queue. `add` never waits: when the queue is full (the database is slow or
down) the row is dropped and counted, and a batch the database refuses is dropped and
counted too; a warning says how many, at most every REPORT_SECONDS.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from grid_backend.registry.core import AuditRow, Registry, RegistryError

log = logging.getLogger("p11grid.grid")
BATCH = 500
INTERVAL = 1.0  # s
CAPACITY = 10_000  # rows waiting at most; beyond, dropped
REPORT_SECONDS = 10.0  # at most one warning about drops this often

_Pending = tuple[float, str, str, str | None, int | None, str, str, float]


class AuditWriter:
    """`open_registry` is called in the writer's thread (again after a failure), so a
    database that is down never delays the caller that builds this."""

    def __init__(self, open_registry: Callable[[], Registry], node: str, display: str,
                 batch: int = BATCH, interval: float = INTERVAL,
                 capacity: int = CAPACITY) -> None:
        self._open = open_registry
        self.node = node
        self.display = display
        self._batch = batch
        self._interval = interval
        self._capacity = capacity
        # deque.append and popleft are atomic: no lock on the path of every signature.
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._count_lock = threading.Lock()
        self.written = 0
        self.dropped = 0  # since start
        self._unreported = 0
        self._last_error = ""
        self._reported = 0.0
        self._second = -1  # the second _prefix spells
        self._prefix = ""
        self._thread = threading.Thread(target=self._run, name="grid-audit-db", daemon=True)
        self._thread.start()

    def add(self, who: str, operation: str, seid: str, result: str, ms: float,
            key: str | None = None, mechanism: int | None = None) -> None:
        pending = self._pending
        if len(pending) >= self._capacity:
            self._drop(1, "the queue is full")
            return
        pending.append((time.time(), who, seid, key, mechanism, operation, result, ms))
        if len(pending) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _drop(self, rows: int, why: str) -> None:
        with self._count_lock:
            self.dropped += rows
            self._unreported += rows
            self._last_error = why

    def _rows(self) -> list[AuditRow]:
        taken = []
        while len(taken) < self._batch:
            try:
                at, who, seid, key, mechanism, operation, result, ms = self._pending.popleft()
            except IndexError:
                break
            # One datetime per second of rows, not per row: this thread shares the
            # interpreter with the service's reactor.
            second = int(at)
            if second != self._second:
                self._second = second
                self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%S")
            stamp = f"{self._prefix}.{int((at - second) * 1000):03d}+00:00"
            taken.append(AuditRow(stamp, self.node, who, seid, key, mechanism, operation,
                                  result, ms))
        return taken

    def _run(self) -> None:
        registry: Registry | None = None
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping.is_set()
            while self._pending:
                rows = self._rows()
                try:
                    if registry is None:
                        registry = self._open()
                    registry.add_audit(rows)
                    self.written += len(rows)
                except Exception as exc:
                    if not isinstance(exc, RegistryError | OSError):
                        log.exception("audit: writing rows to the registry failed")
                    self._drop(len(rows), str(exc) or type(exc).__name__)
                    if registry is not None:
                        registry.close()
                        registry = None
                    break  # the next try after the interval, not in a tight loop
            self._report()
            if stopping:
                break
        if registry is not None:
            registry.close()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._count_lock:
            if not self._unreported or (not force and now - self._reported < REPORT_SECONDS):
                return
            unreported, self._unreported = self._unreported, 0
            why, total = self._last_error, self.dropped
            self._reported = now
        log.warning("audit: %d row(s) not written to the registry %s (%s); %d since start. "
                    "The audit log has every line.", unreported, self.display, why, total)

    def close(self, timeout: float = 3.0) -> None:
        """Write what waits, within `timeout`; what cannot be written is counted."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        left = len(self._pending)
        if left:
            self._pending.clear()
            self._drop(left, "the service stopped before the registry took them")
        self._report(force=True)
