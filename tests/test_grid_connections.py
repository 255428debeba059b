"""How the grid service handles its connections, seen from a raw TLS socket: requests sent
before the previous reply are answered in order, malformed frames get an answer or a
closed connection (never a dead service), and an idle connection is closed."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from grid_backend.protocol import HEADER, decode, encode, frame_length
from grid_backend.registry import SqliteRegistry
from grid_backend.service.config import Endpoint, load
from grid_backend.service.server import GridServer, GridService
from tests.conftest import grid_tokens


@contextmanager
def _connection(sandbox: dict[str, str], address: tuple[str, int] | None = None
                ) -> Iterator[ssl.SSLSocket]:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    if address is None:
        host, port = sandbox["P11GRID_GRID_ADDR"].rsplit(":", 1)
        address = (host, int(port))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=sandbox["P11GRID_CA"])
    context.load_cert_chain(str(grid / "vm.pem"), str(grid / "vm.key"))
    with socket.create_connection(address, timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=address[0]) as tls:
        yield tls


class _Replies:
    """Reply frames as they come off a raw connection (several may share one read)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.data = b""

    def next(self) -> list[Any] | None:
        """The next reply, or None if the service closed the connection."""
        while len(self.data) < 4 or len(self.data) < 4 + frame_length(self.data):
            chunk = self.tls.recv(65536)
            if not chunk:
                return None
            self.data += chunk
        end = 4 + frame_length(self.data)
        frame, self.data = self.data[4:end], self.data[end:]
        return decode(frame)


def test_requests_sent_ahead_are_answered_in_order(sandbox: dict[str, str],
                                                   sandbox_environ: dict[str, str]) -> None:
    with _connection(sandbox) as tls:
        reader = _Replies(tls)
        tls.sendall(encode([0, "authorize", 5000, {"seid": "vm-se",
                                                    **grid_tokens(sandbox_environ)}]))
        granted = reader.next()
        assert granted is not None and granted[1] is True, granted
        handle = {"seid": "vm-se", "authorization": granted[2]["authorization"]}
        # A listing (answered by a worker thread) then quick ones, all in one write.
        burst = b"".join([
            encode([1, "objects", 5000, handle]),
            encode([2, "random", 5000, {**handle, "length": 16}]),
            encode([3, "hello", 5000, {}]),
            encode([4, "random", 5000, {**handle, "length": 8}]),
        ])
        tls.sendall(burst)
        replies = [reader.next() for _ in range(4)]
    assert all(r is not None for r in replies)
    assert [r[0] for r in replies] == [1, 2, 3, 4]  # type: ignore[index]
    assert all(r[1] is True for r in replies)
    assert replies[0][2]["objects"], "the listing is not empty"
    assert len(replies[1][2]["result"]) == 16 and len(replies[3][2]["result"]) == 8
    assert replies[2][2]["identity"] == "spiffe://p11grid.sandbox/vm/vm-1"


def test_malformed_request_is_answered_and_the_connection_lives_on(
        sandbox: dict[str, str]) -> None:
    with _connection(sandbox) as tls:
        reader = _Replies(tls)
        tls.sendall(HEADER.pack(3) + b"\xc1\xc1\xc1")  # not msgpack
        reply = reader.next()
        assert reply is not None and reply[1] is False and reply[2]["error"] == "protocol"
        tls.sendall(encode([7, "no-such-operation", 5000, {}]))
        reply = reader.next()
        assert reply is not None and reply[0] == 7 and reply[2]["error"] == "protocol"
        tls.sendall(encode([8, "hello", 5000, {}]))
        reply = reader.next()
        assert reply is not None and reply[0] == 8 and reply[1] is True


def test_oversize_frame_closes_only_that_connection(sandbox: dict[str, str]) -> None:
    with _connection(sandbox) as tls:
        reader = _Replies(tls)
        tls.sendall(HEADER.pack(0xFFFFFFFF) + b"x" * 16)
        assert reader.next() is None
    with _connection(sandbox) as tls:  # the service itself is fine
        reader = _Replies(tls)
        tls.sendall(encode([1, "hello", 5000, {}]))
        reply = reader.next()
        assert reply is not None and reply[1] is True


def test_idle_connection_is_closed(sandbox: dict[str, str]) -> None:
    config = load(Path(sandbox["P11GRID_GRID_CONF"]))
    config = dataclasses.replace(config, listen=Endpoint("127.0.0.1", 0), idle_timeout=0.5,
                                 racs=None, audit_log=None)
    server = GridServer(config, GridService(SqliteRegistry(config.registry)))
    server.start()
    try:
        with _connection(sandbox, ("127.0.0.1", server.port)) as tls:
            reader = _Replies(tls)
            tls.sendall(encode([1, "hello", 5000, {}]))
            reply = reader.next()
            assert reply is not None and reply[1] is True
            started = time.monotonic()
            assert reader.next() is None  # closed by the service, not by us
            waited = time.monotonic() - started
        assert 0.4 < waited < 5.0, f"closed after {waited:.1f} s; idle_timeout is 0.5 s"
    finally:
        server.stop()
