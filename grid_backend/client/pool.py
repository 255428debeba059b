"""Persistent TLS connections to the grid service, with deadlines, failover and fork safety.

Nothing here connects, or even imports `ssl`, until the first request: the PKCS#11 module
builds a pool in C_Initialize, which an OpenSSL engine calls while OpenSSL is still
loading its configuration, and which nginx calls in its master before forking.

Retries: a request is sent again only when it is idempotent, or when it provably never
left this process (the connection failed before the request was written to it: refused,
TLS handshake failed, or an idle pooled connection found closed by the grid).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid_backend.openssl_errors import clear_thread_errors
from grid_backend.protocol import (
    DeadlineExceeded,
    ProtocolViolation,
    decode,
    encode,
    failure_from,
    frame_length,
)
from grid_backend.secure_element import ElementAbsent, ElementFailure

log = logging.getLogger("p11grid.grid.client")


class GridUnreachable(ElementAbsent):
    """No grid endpoint answered: the grid is gone (or the network to it)."""


class GridClientMisconfigured(ElementFailure):
    """This host's own [grid] TLS files cannot be used (missing, unreadable, mismatched)."""


class GridImpostor(ElementFailure):
    """An endpoint answered with a certificate that does not name a grid."""


class GridRefusedClient(ElementFailure):
    """The grid ended the TLS handshake: it does not accept this client's certificate."""


# TLS alerts that mean "your certificate", sent by the server once TLS 1.3 has let the
# client think the handshake was done; reconnecting cannot help.
_CLIENT_REFUSED_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                          "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
                          "UNSUPPORTED_CERTIFICATE", "CERTIFICATE_UNKNOWN")


@dataclass(frozen=True)
class GridSettings:
    endpoints: tuple[tuple[str, int], ...]
    ca: Path
    certificate: Path
    key: Path
    timeout: float = 5.0  # seconds: the deadline of one request, retries included
    spin: float = 0.001  # seconds a request polls for its reply before sleeping
    idle_connections: int = 8


# (socket fd, microseconds) -> 1: readable, 0: not within the time, -1: failed. The module
# passes native/p11grid.c's p11grid_native_await_readable, which polls without the GIL and
# yields its CPU between polls instead of sleeping.
AwaitReadable = Callable[[int, int], int]


class _Connection:
    FIRST_BUFFER = 16 * 1024  # a reply is a signature, or an object list that grows it
    def __init__(self, tls: Any, endpoint: tuple[str, int]) -> None:
        self.tls = tls
        self.endpoint = endpoint
        self.answered = False  # a reply came on it: the grid accepted this host
        self._buffer = bytearray(self.FIRST_BUFFER)

    def alive(self) -> bool:
        """An idle connection has nothing to read but TLS housekeeping (session tickets);
        end of stream or any data means the grid closed it or lost track of it."""
        try:
            readable, _, _ = select.select([self.tls], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        import ssl

        try:
            self.tls.setblocking(False)
            self.tls.recv(1)
        except ssl.SSLWantReadError:
            return True  # only a TLS record without application data was waiting
        except OSError:
            return False
        return False

    def exchange(self, message: bytes, deadline: float, spin_us: int = 0,
                 await_readable: AwaitReadable | None = None) -> list[Any]:
        clear_thread_errors()
        self._timeout(deadline)
        self.tls.sendall(message)
        if spin_us > 0 and await_readable is not None and not self.tls.pending():
            # Without the GIL, so that the process's other threads run meanwhile; the
            # read below takes whatever came, or sleeps for the rest as before.
            await_readable(self.tls.fileno(), spin_us)
        # One read usually brings the whole reply (one TLS record); read more only if not.
        buffer = self._buffer
        view = memoryview(buffer)
        self._timeout(deadline)
        filled = self.tls.recv_into(view)
        while filled < 4 or filled < 4 + frame_length(view[:4]):
            if not filled:
                raise ConnectionResetError("the grid closed the connection")
            if filled == len(buffer):  # a long reply (an object list): grow the buffer
                view.release()
                buffer.extend(bytes(len(buffer)))
                view = memoryview(buffer)
            self._timeout(deadline)
            received = self.tls.recv_into(view[filled:])
            if not received:
                raise ConnectionResetError("the grid closed the connection")
            filled += received
        end = 4 + frame_length(view[:4])
        if filled != end:
            raise ProtocolViolation("bytes after the reply")
        return decode(bytes(view[4:end]))

    def _timeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the grid did not answer within the deadline")
        self.tls.settimeout(remaining)

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass


class _Contention:
    """Whether this machine's CPUs have more runnable threads than CPUs, from the
    instantaneous runnable count in /proc/loadavg, read at most every 0.1 s. Polling for a
    reply saves cross-core wake-ups when cores are idle, but on a busy machine (nginx
    workers, the grid and clients sharing cores) it takes CPU that others need: measured,
    it cost nginx a fifth of its handshakes per second with an RSA key in the grid."""

    PERIOD = 0.1
    LOADAVG = Path("/proc/loadavg")

    def __init__(self) -> None:
        self._checked = 0.0
        self._busy = False
        try:
            self._cpus = len(os.sched_getaffinity(0))
        except OSError:
            self._cpus = os.cpu_count() or 1

    def busy(self, polling: int = 0) -> bool:
        """`polling`: this process's other threads polling for a reply now, which the
        count includes: they give way to any other thread, so they are not load."""
        now = time.monotonic()
        if now - self._checked >= self.PERIOD:
            self._checked = now
            try:
                with open(self.LOADAVG, "rb") as loadavg:
                    runnable = int(loadavg.read().split()[3].split(b"/")[0])
            except (OSError, ValueError, IndexError):
                runnable = 0  # unknown: as before, poll
            self._busy = runnable - polling > self._cpus  # this thread is one of them
        return self._busy


class GridPool:
    def __init__(self, settings: GridSettings, await_readable: AwaitReadable | None = None
                 ) -> None:
        if not settings.endpoints:
            raise ElementFailure("no grid endpoint configured")
        self.settings = settings
        self._pid = os.getpid()
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._context: Any = None
        self._ids = itertools.count(1)
        self._preferred = 0  # index of the endpoint that answered last
        self._polling = 0  # this process's threads in an exchange that polls for its reply
        self._contention = _Contention()
        # Without it (a Python program using the pool directly) replies are waited for
        # asleep: polling in Python would hold the GIL that the other threads need.
        self._await_readable = await_readable
        self._reply_seconds: dict[tuple[Any, ...], float] = {}  # smoothed, per kind

    def _spin_us(self, kind: tuple[Any, ...]) -> int:
        """How long the next request may poll for its reply: not at all for a kind whose
        replies come later than the poll would last (RSA under load: the poll would only
        take CPU from the grid), nor while the machine's CPUs are all busy."""
        spin = self.settings.spin
        if self._await_readable is None or spin <= 0 \
                or self._reply_seconds.get(kind, 0.0) > spin \
                or self._contention.busy(polling=self._polling):
            return 0
        return int(spin * 1_000_000)

    def _replied(self, kind: tuple[Any, ...], seconds: float) -> None:
        before = self._reply_seconds.get(kind)
        self._reply_seconds[kind] = seconds if before is None else 0.8 * before + 0.2 * seconds

    def _forked(self) -> None:
        # A child must not touch its parent's TLS connections: drop, never close or use.
        if self._pid != os.getpid():
            self._pid, self._idle, self._context = os.getpid(), [], None
            self._polling = 0
            self._lock = threading.Lock()

    def _tls_context(self) -> Any:
        if self._context is None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            # A file that cannot be read is this host's configuration, not the grid
            # being gone: say which file, once, and do not look like an outage.
            setting = "ca"
            try:
                context.load_verify_locations(cafile=str(self.settings.ca))
                setting = "certificate/key"
                context.load_cert_chain(str(self.settings.certificate), str(self.settings.key))
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                files = (str(self.settings.ca) if setting == "ca" else
                         f"{self.settings.certificate} / {self.settings.key}")
                raise GridClientMisconfigured(
                    f"the module's [grid] {setting} ({files}) cannot be used: "
                    f"{getattr(exc, 'strerror', None) or exc}") from None
            self._context = context
        return self._context

    @staticmethod
    def _check_grid_identity(tls: Any, endpoint: tuple[str, int]) -> None:
        """The server's certificate must name a grid (spiffe://…/grid/…): any other
        certificate of the same CA (a VM's, an IdP's) must never receive tokens or PINs."""
        from cryptography import x509

        from idm.identity import IdentityError, identity_of

        der = tls.getpeercert(binary_form=True)
        try:
            identity = identity_of(x509.load_der_x509_certificate(der))
        except (IdentityError, ValueError) as exc:
            raise GridImpostor(f"{endpoint[0]}:{endpoint[1]} presented a certificate with no "
                               f"grid identity ({exc})") from None
        if identity.kind != "grid":
            raise GridImpostor(f"{endpoint[0]}:{endpoint[1]} is {identity.uri}, not a grid "
                               "(its certificate must name spiffe://…/grid/…)")

    def _connect(self, deadline: float) -> _Connection:
        """A new connection, to the first endpoint that answers, starting with the last good one."""
        endpoints = self.settings.endpoints
        order = [endpoints[(self._preferred + i) % len(endpoints)] for i in range(len(endpoints))]
        reasons: list[str] = []
        impostors: list[str] = []
        stalled = False
        for endpoint in order:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            raw = None
            try:
                raw = socket.create_connection(endpoint, timeout=remaining)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.settimeout(max(deadline - time.monotonic(), 0.001))
                context = self._tls_context()
                clear_thread_errors()
                tls = context.wrap_socket(raw, server_hostname=endpoint[0])
            except OSError as exc:  # ssl.SSLError is an OSError
                if raw is not None:
                    raw.close()
                # Accepted but silent (a stalled grid) is not the same as gone.
                stalled = stalled or isinstance(exc, TimeoutError)
                reasons.append(f"{endpoint[0]}:{endpoint[1]}: {exc}")
                continue
            try:
                self._check_grid_identity(tls, endpoint)
            except GridImpostor as exc:
                tls.close()
                log.warning("refusing %s", exc)
                impostors.append(str(exc))
                continue
            self._preferred = endpoints.index(endpoint)
            return _Connection(tls, endpoint)
        if impostors:
            raise GridImpostor("; ".join(impostors + reasons))
        detail = "; ".join(reasons or ["deadline"])
        if stalled or not reasons:
            raise DeadlineExceeded(f"no grid endpoint completed a TLS handshake in time: {detail}")
        raise GridUnreachable(f"no grid endpoint answered: {detail}")

    def _take(self, deadline: float) -> _Connection:
        with self._lock:
            self._forked()
            while self._idle:
                connection = self._idle.pop()
                if connection.alive():
                    return connection
                connection.close()  # closed by the grid while idle: never used, nothing lost
        return self._connect(deadline)

    def _drop_idle(self, endpoint: tuple[str, int]) -> None:
        with self._lock:
            dropped = [c for c in self._idle if c.endpoint == endpoint]
            self._idle = [c for c in self._idle if c.endpoint != endpoint]
        for connection in dropped:
            connection.close()

    def _give(self, connection: _Connection) -> None:
        with self._lock:
            if self._pid == os.getpid() and len(self._idle) < self.settings.idle_connections:
                self._idle.append(connection)
                return
        connection.close()

    def call(self, operation: str, arguments: dict[str, Any], *, idempotent: bool,
             timeout: float | None = None) -> dict[str, Any]:
        """One request; its reply body, or the ElementError the grid (or the wire) gave."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.timeout)
        refusals = 0  # new connections closed before any reply, this call
        while True:
            connection = self._take(deadline)
            request_id = next(self._ids)
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            message = encode([request_id, operation, remaining_ms, arguments])
            kind = (operation, arguments.get("seid"), arguments.get("mechanism"))
            spin_us = self._spin_us(kind)
            if spin_us:
                with self._lock:
                    self._polling += 1
            sent = time.monotonic()
            try:
                reply = connection.exchange(message, deadline, spin_us, self._await_readable)
            except (DeadlineExceeded, TimeoutError) as exc:
                connection.close()  # a late reply must never be read as another's
                raise DeadlineExceeded(f"{operation}: no reply from the grid at "
                                       f"{connection.endpoint[0]}:{connection.endpoint[1]} "
                                       "within the deadline") from exc
            except (OSError, ProtocolViolation) as exc:
                connection.close()
                # The others idle to that endpoint are suspect (a node that died takes all
                # its connections with it): the next requests connect anew, which fails
                # over before anything is sent, instead of losing one request each.
                self._drop_idle(connection.endpoint)
                reason = str(getattr(exc, "reason", "") or "")
                # A TLS 1.3 server refuses a client certificate after the client has
                # finished its handshake: the alert (or, if it is lost, a bare close) comes
                # at the first read of a new connection. Twice in one call is a refusal,
                # not a flaky network: reconnecting in a loop would only hammer the grid.
                if not connection.answered:
                    refusals += 1
                if any(alert in reason for alert in _CLIENT_REFUSED_ALERTS) or refusals >= 2:
                    raise GridRefusedClient(
                        f"{operation}: the grid at {connection.endpoint[0]}:"
                        f"{connection.endpoint[1]} refused this host's TLS certificate "
                        f"({reason or exc}); check the module's [grid] certificate against "
                        "the grid's client_ca and revocations") from None
                if idempotent and time.monotonic() < deadline:
                    log.info("%s: connection to the grid lost (%s); retrying", operation, exc)
                    continue
                if not connection.answered:
                    raise ElementFailure(
                        f"{operation}: the grid at {connection.endpoint[0]}:"
                        f"{connection.endpoint[1]} closed a new connection before answering "
                        f"({exc}): it may refuse this host's TLS certificate (check the "
                        "module's [grid] certificate against the grid's client_ca and "
                        "revocations), or it failed; not retried, the element may have acted"
                    ) from exc
                raise ElementFailure(f"{operation}: connection to the grid lost ({exc}); "
                                     "not retried, the element may have acted") from exc
            finally:
                if spin_us:
                    with self._lock:
                        self._polling -= 1
            if len(reply) != 3 or reply[0] != request_id or not isinstance(reply[2], dict):
                connection.close()
                raise ProtocolViolation(f"{operation}: a reply that is not ours")
            if connection.answered:  # a new connection's first reply waits for its set-up
                self._replied(kind, time.monotonic() - sent)
            connection.answered = True
            self._give(connection)
            if reply[1] is True:
                return reply[2]
            raise failure_from(reply[2])

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for connection in idle:
                connection.close()
