"""The RACS server: asyncio, TLS 1.2+ with mandatory client certificates, one session per
connection (grammar and state in grid_backend/racs/session.py).

Configuration (`p11grid racs-serve --config FILE`, TOML; see docs/racs.md):

    [server]
    host = "127.0.0.1"          # default; the author's server binds all addresses
    port = 7777                 # the de-facto RACS port
    cert = "server.pem"         # server certificate chain (PEM)
    key = "server.key"          # its private key (PEM, unencrypted)
    ca = "ca.pem"               # CA(s) that sign client certificates
    idle_timeout = 600          # seconds without a line before a session ends
    card_deadline = 30          # seconds one card operation may take

    [elements.SE1]              # one exposed secure element: SEID = SE1
    factory = "package.module:Callable"   # returns an ApduTransport
    args = { reader = "Virtual PCD 00 00" }   # keyword arguments for the factory

    [users]                     # client-certificate CN -> SEIDs it may use
    alice = ["SE1"]
    admin = "all"

    [[filters]]                 # per CN, per SEID APDU policy ("*" matches any)
    cn = "alice"
    seid = "SE1"
    aids = ["A000000308"]       # AIDs alice may SELECT (absent: any)
    deny = [{ mask = "FFFF0000", value = "00200000" }]   # e.g. no VERIFY

Relative paths are taken from the config file's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid_backend.apdu import ApduTransport
from grid_backend.racs.authorization import Authorizer, TableAuthorizer
from grid_backend.racs.elements import ElementHub
from grid_backend.racs.protocol import DEFAULT_PORT, MAX_LINE
from grid_backend.racs.session import RacsSession

log = logging.getLogger("p11grid.racs.server")

IDLE_TIMEOUT = 600.0  # ten minutes, as the author's server
HANDSHAKE_TIMEOUT = 10.0


@dataclass(slots=True)
class RacsServerConfig:
    cert: Path
    key: Path
    ca: Path
    elements: dict[str, ApduTransport]
    authorizer: Authorizer
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    idle_timeout: float = IDLE_TIMEOUT
    card_deadline: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)


def _factory(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"element factory {spec!r} is not \"package.module:Callable\"")
    return getattr(importlib.import_module(module), name)


def load_config(path: Path) -> RacsServerConfig:
    """Read a racs-serve TOML config (format in this module's docstring)."""
    with path.open("rb") as handle:
        document = tomllib.load(handle)
    base = path.resolve().parent
    server = document.get("server", {})

    def file(key: str) -> Path:
        if key not in server:
            raise ValueError(f"{path}: [server] {key} is required")
        return base / str(server[key])

    elements: dict[str, ApduTransport] = {}
    for seid, spec in document.get("elements", {}).items():
        if not isinstance(spec, Mapping) or "factory" not in spec:
            raise ValueError(f"{path}: [elements.{seid}] needs factory = \"module:Callable\"")
        elements[str(seid)] = _factory(str(spec["factory"]))(**dict(spec.get("args", {})))
    authorizer = TableAuthorizer.from_mapping(document.get("users", {}),
                                              document.get("filters", []))
    return RacsServerConfig(
        cert=file("cert"), key=file("key"), ca=file("ca"), elements=elements,
        authorizer=authorizer, host=str(server.get("host", "127.0.0.1")),
        port=int(server.get("port", DEFAULT_PORT)),
        idle_timeout=float(server.get("idle_timeout", IDLE_TIMEOUT)),
        card_deadline=float(server.get("card_deadline", 30.0)))


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED  # RACS: no client certificate, no session
    context.load_cert_chain(str(cert), str(key))
    return context


def peer_cn(writer: asyncio.StreamWriter) -> str | None:
    certificate = writer.get_extra_info("peercert")
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _Oversize:
    """Marker: the line was longer than MAX_LINE and has been dropped."""


OVERSIZE = _Oversize()


async def read_line(reader: asyncio.StreamReader) -> bytes | _Oversize | None:
    """One line (LF included), OVERSIZE, or None at end of stream. Memory stays bounded by
    the reader's limit: an oversize line is consumed in pieces and forgotten."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None  # a last line without LF is not a line
    except asyncio.LimitOverrunError as overrun:
        await reader.readexactly(overrun.consumed)
    while True:
        try:
            await reader.readuntil(b"\n")
            return OVERSIZE
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as overrun:
            await reader.readexactly(overrun.consumed)


class RacsServer:
    """Serve `config.elements` over RACS until `close()`."""

    def __init__(self, config: RacsServerConfig):
        self.config = config
        self.hub = ElementHub(config.elements, deadline=config.card_deadline)
        self.ssl_context = server_ssl_context(config.cert, config.key, config.ca)
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self.port = config.port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.config.host, self.config.port, ssl=self.ssl_context,
            limit=MAX_LINE, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("RACS server on %s:%d, %d elements", self.config.host, self.port,
                 len(self.hub.elements))

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._sessions.items()):
            writer.transport.abort()  # a pending read ends even if a cancel gets lost
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions[task] = writer
        cn = peer_cn(writer) or ""
        session = RacsSession(cn, self.config.authorizer, self.hub)
        peer = writer.get_extra_info("peername")
        log.info("RACS session opened for CN %r from %s", cn, peer)
        try:
            await self._converse(session, reader, writer)
        except (ConnectionError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("RACS session for CN %r failed", cn)
        finally:
            released = await asyncio.shield(session.close())
            log.info("RACS session closed for CN %r, %d elements powered off", cn, released)
            if self._closing:
                writer.transport.abort()  # shutting down: no waiting for close_notify
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):  # the peer's close_notify
                        await writer.wait_closed()
            self._sessions.pop(task, None)

    async def _converse(self, session: RacsSession, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        idle = self.config.idle_timeout
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            try:
                async with asyncio.timeout(idle):
                    line = await read_line(reader)
            except TimeoutError:
                log.info("RACS session for CN %r idle for %g s: closing", session.cn, idle)
                return
            if line is None:
                return
            if isinstance(line, _Oversize):
                step = session.oversize_line()
            else:
                step = await session.handle_line(line)
            if step.reply:
                writer.write(step.reply)
                async with asyncio.timeout(idle):
                    await writer.drain()
            if step.end_session:
                return
