"""A blocking RACS client: mutual TLS, one request at a time, replies parsed.

Blocking on purpose: its users (the RACS APDU transport, the terminal client) are
blocking. Every request has a deadline covering the send and the whole reply.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from grid_backend.endpoints import parse_endpoint
from grid_backend.racs.protocol import DEFAULT_PORT, ProtocolViolation, Reply

MAX_REPLY_LINE = 2 * 1024 * 1024  # longest reply line accepted (server caps replies at 1 MiB)


class RacsUnreachable(ConnectionError):
    """No TLS session with the RACS server (refused, handshake failed, dropped, timeout)."""


def parse_address(address: str) -> tuple[str, int]:
    return parse_endpoint(address, DEFAULT_PORT)


def client_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


class RacsClient:
    """One TLS connection to a RACS server (one RACS session)."""

    def __init__(self, host: str, port: int, cert: Path, key: Path, ca: Path, *,
                 timeout: float = 30.0, server_name: str | None = None):
        self.host, self.port, self.timeout = host, port, timeout
        self.server_name = server_name or host
        self.context = client_ssl_context(cert, key, ca)
        self._socket: ssl.SSLSocket | None = None
        self._buffer = bytearray()
        self._io = threading.Lock()  # a terminal reads in one thread and writes in another

    @property
    def connected(self) -> bool:
        return self._socket is not None

    def connect(self) -> None:
        self.close()
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise RacsUnreachable(f"RACS server {self.host}:{self.port}: {exc}") from exc
        try:
            raw.settimeout(self.timeout)
            self._socket = self.context.wrap_socket(raw, server_hostname=self.server_name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise RacsUnreachable(f"TLS with {self.host}:{self.port} failed: {exc}") from exc

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
        self._socket = None
        self._buffer.clear()

    def __enter__(self) -> RacsClient:
        if not self.connected:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def idle_dropped(self) -> bool:
        """Has the server closed this (idle) connection? RACS never speaks unasked, so
        anything readable between requests means the end of the session."""
        if self._socket is None:
            return True
        if self._buffer or self._socket.pending():
            return True
        readable, _, _ = select.select([self._socket], [], [], 0)
        return bool(readable)

    def send_lines(self, lines: Iterable[str]) -> None:
        if self._socket is None:
            raise RacsUnreachable("not connected")
        payload = "".join(f"{line}\n" for line in lines).encode("ascii")
        try:
            with self._io:
                self._socket.sendall(payload)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise RacsUnreachable(f"RACS server {self.host}:{self.port}: {exc}") from exc

    def read_line(self, deadline: float) -> str:
        """One reply line without its line end; RacsUnreachable at EOF or deadline."""
        if self._socket is None:
            raise RacsUnreachable("not connected")
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[:end + 1]
                return line.decode("ascii", errors="replace")
            if len(self._buffer) > MAX_REPLY_LINE:
                self.close()
                raise ProtocolViolation("reply line too long")
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise RacsUnreachable(f"RACS server {self.host}:{self.port}: no reply "
                                      f"within {self.timeout:g} s")
            try:
                self._socket.settimeout(left)
                chunk = self._socket.recv(65536)
            except (OSError, ssl.SSLError) as exc:
                self.close()
                raise RacsUnreachable(f"RACS server {self.host}:{self.port}: {exc}") from exc
            if not chunk:
                self.close()
                raise RacsUnreachable(f"RACS server {self.host}:{self.port} closed the session")
            self._buffer += chunk

    def poll_lines(self, wait: float) -> list[str]:
        """Complete lines that arrive within `wait` seconds (maybe none); safe to call from
        one thread while another calls send_lines."""
        sock = self._socket
        if sock is None:
            raise RacsUnreachable("not connected")
        if not sock.pending():
            readable, _, _ = select.select([sock], [], [], wait)
            if not readable:
                return []
        try:
            with self._io:
                # Non-blocking: readable may mean only a TLS 1.3 session ticket, and a
                # blocking recv would then hold the lock the writer needs.
                sock.settimeout(0.0)
                try:
                    chunk = sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    return []
                finally:
                    sock.settimeout(self.timeout)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise RacsUnreachable(f"RACS server {self.host}:{self.port}: {exc}") from exc
        if not chunk:
            self.close()
            raise RacsUnreachable(f"RACS server {self.host}:{self.port} closed the session")
        self._buffer += chunk
        if len(self._buffer) > MAX_REPLY_LINE:
            self.close()
            raise ProtocolViolation("reply line too long")
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer[:] = rest
        return [line.rstrip(b"\r").decode("ascii", errors="replace") for line in lines]

    def read_reply(self, deadline: float) -> Reply:
        lines = [self.read_line(deadline)]
        if not lines[0].startswith("BEGIN"):
            raise ProtocolViolation(f"reply does not start with BEGIN: {lines[0][:80]!r}")
        while lines[-1] != "END":
            lines.append(self.read_line(deadline))
        return Reply.parse(lines)

    def request(self, commands: Iterable[str], name: str = "") -> Reply:
        """Send `BEGIN name`, the commands, `END`; return the parsed reply."""
        if self._socket is None:
            self.connect()
        deadline = time.monotonic() + self.timeout
        self.send_lines([f"BEGIN {name}".rstrip(), *commands, "END"])
        return self.read_reply(deadline)
