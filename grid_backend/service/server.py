"""The grid service: TLS 1.3 on 127.0.0.1, callers authenticated by certificate, one thread
per connection, each connection carrying requests one after another.

Threads, not an event loop: every request ends in a blocking element call, and a thread
per pooled client connection is the shortest path from socket to element.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grid_backend.elements import open_element
from grid_backend.openssl_errors import clear_thread_errors
from grid_backend.protocol import (
    VERSION,
    DeadlineExceeded,
    ElementRefused,
    ProtocolViolation,
    decode,
    encode,
    failure_kind,
    frame_length,
)
from grid_backend.registry import Registry, RegistryError
from grid_backend.secure_element import (
    ElementError,
    ElementFailure,
    ElementObject,
    MechanismParameters,
    OaepParameters,
    PssParameters,
)
from grid_backend.service.config import GridConfig
from grid_backend.service.hosting import HostedElement, check_pin_shape

log = logging.getLogger("p11grid.grid")
audit = logging.getLogger("p11grid.audit")
HANDSHAKE_TIMEOUT = 10.0
ALLOWED_CACHE_SECONDS = 2.0  # registry changes reach live connections this fast


def identities_of(certificate: dict[str, Any]) -> list[str]:
    """SPIFFE URIs of the peer certificate first, then its CN."""
    uris = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    return uris + names


def _parameters(value: Any) -> MechanismParameters:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 4 and value[0] == "pss":
        return PssParameters(int(value[1]), int(value[2]), int(value[3]))
    if isinstance(value, list) and len(value) == 4 and value[0] == "oaep":
        return OaepParameters(int(value[1]), int(value[2]), bytes(value[3]))
    raise ProtocolViolation("unknown mechanism parameters")


def _objects(objects: dict[str, ElementObject]) -> list[list[Any]]:
    return [[ref, o.attributes] for ref, o in objects.items()]


class GridService:
    """The operations of the protocol, independent of sockets (tested directly too)."""

    def __init__(self, registry: Registry,
                 element_factory: Callable[[str, dict[str, Any]], Any] = open_element) -> None:
        self.registry = registry
        self._factory = element_factory
        self._hosted: dict[str, HostedElement] = {}
        self._lock = threading.Lock()
        self._operations: dict[str, Callable[[Caller, dict[str, Any]], dict[str, Any]]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}

    def hosted(self, seid: str) -> HostedElement:
        element = self._hosted.get(seid)
        if element is not None:
            return element
        with self._lock:
            if seid not in self._hosted:
                try:
                    record = self.registry.element(seid)
                except RegistryError as exc:
                    raise ElementRefused(f"no element {seid}") from exc
                settings = dict(record.settings)
                mechanisms = settings.pop("mechanisms", None)
                self._hosted[seid] = HostedElement(
                    seid, record.label, self._factory(record.driver, settings),
                    frozenset(mechanisms) if mechanisms is not None else None)
            return self._hosted[seid]

    def close(self) -> None:
        with self._lock:
            for element in self._hosted.values():
                try:
                    element.close()
                except ElementError as exc:
                    log.warning("closing element %s: %s", element.seid, exc)
            self._hosted.clear()

    def handle(self, caller: Caller, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
        method = self._operations.get(operation)
        if method is None:
            raise ProtocolViolation(f"unknown operation {operation!r}")
        return method(caller, arguments)

    def _element(self, caller: Caller, arguments: dict[str, Any]) -> HostedElement:
        seid = arguments.get("seid")
        if not isinstance(seid, str) or seid not in caller.allowed(self.registry):
            raise ElementRefused(f"element {seid!r} is not bound to {caller.identity}")
        return self.hosted(seid)

    def op_hello(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"version": VERSION, "identity": caller.identity}

    def op_list(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        listed = []
        for seid in sorted(caller.allowed(self.registry, fresh=True)):
            try:
                listed.append({"seid": seid, "label": self.hosted(seid).label})
            except ElementError:
                continue
        return {"elements": listed}

    def op_objects(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        element = self._element(caller, arguments)
        return {"objects": _objects(element.public_objects()),
                "mechanisms": sorted(element.mechanisms())}

    def op_login(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        element = self._element(caller, arguments)
        session = element.login(caller.identity, check_pin_shape(arguments.get("pin")))
        return {"session": session.token,
                "objects": _objects(element.private_objects(session.token, caller.identity))}

    def op_logout(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        self._element(caller, arguments).logout(str(arguments.get("session")))
        return {}

    def _crypto(self, caller: Caller, arguments: dict[str, Any], decrypt: bool) -> bytes:
        element = self._element(caller, arguments)
        call = element.decrypt if decrypt else element.sign
        data = arguments.get("data")
        if not isinstance(data, bytes):
            raise ProtocolViolation("data must be bytes")
        return call(str(arguments.get("session")), caller.identity, arguments.get("ref"),
                    int(arguments.get("mechanism", -1)), _parameters(arguments.get("parameters")),
                    data)

    def op_sign(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"result": self._crypto(caller, arguments, decrypt=False)}

    def op_decrypt(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"result": self._crypto(caller, arguments, decrypt=True)}

    def op_random(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        length = arguments.get("length")
        if not isinstance(length, int) or not 0 <= length <= 1 << 16:
            raise ProtocolViolation("length must be 0..65536")
        return {"result": self._element(caller, arguments).random(length)}

    def key_label(self, seid: str, ref: object) -> str:
        element = self._hosted.get(seid)
        return element.key_label(ref) if element is not None else ""


class Caller:
    """Who is on the other end of a connection, and what the registry lets them use."""

    def __init__(self, identities: list[str]) -> None:
        self.identities = identities
        self.identity = identities[0] if identities else "?"
        self._allowed: set[str] = set()
        self._checked = 0.0

    def allowed(self, registry: Registry, fresh: bool = False) -> set[str]:
        now = time.monotonic()
        if fresh or now - self._checked > ALLOWED_CACHE_SECONDS:
            self._allowed = registry.allowed(self.identities)
            self._checked = now
        return self._allowed


AUDITED = {"login", "logout", "sign", "decrypt", "random"}


class AuditTrail:
    """One JSON line per operation, appended to a file with one write() each.

    Written directly rather than through `logging`: it is on every signature's path, and
    a formatted f-string plus one O_APPEND write costs a fraction of a log record.
    Without a file the lines go to the `p11grid.audit` logger (syslog, else stderr).
    """

    def __init__(self, path: Path | None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) \
            if path is not None else None

    def record(self, caller: str, operation: str, seid: str, result: str, ms: float,
               key: str | None = None, mechanism: int | None = None) -> None:
        fields = [f'"caller": {json.dumps(caller)}']
        if key is not None:
            fields.append(f'"key": {json.dumps(key)}')
        if mechanism is not None:
            fields.append(f'"mechanism": "0x{mechanism:x}"')
        fields += [f'"ms": {ms:.3f}', f'"op": "{operation}"', f'"result": {json.dumps(result)}',
                   f'"seid": {json.dumps(seid)}']
        line = "{" + ", ".join(fields) + "}"
        if self._fd is None:
            audit.info(line)
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.write(self._fd, f"{stamp} {line}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GridServer:
    def __init__(self, config: GridConfig, service: GridService) -> None:
        self.config = config
        self.service = service
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._context = self._tls_context()
        self.audit = AuditTrail(config.audit_log)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(str(self.config.tls.certificate), str(self.config.tls.key))
        context.load_verify_locations(cafile=str(self.config.tls.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        listen = self.config.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((listen.host, listen.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, name="grid-accept", daemon=True).start()
        log.info("grid service listening on %s:%d (TLS 1.3, client certificates required)",
                 listen.host, self.port)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        self.service.close()
        self.audit.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                raw, address = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("refusing %s: %d connections already", address,
                            self.config.max_connections)
                raw.close()
                continue
            threading.Thread(target=self._serve, args=(raw, address), daemon=True,
                             name=f"grid-{address[1]}").start()

    def _serve(self, raw: socket.socket, address: Any) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            try:
                clear_thread_errors()
                connection = self._context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s failed: %s", address, exc)
                return
            caller = Caller(identities_of(connection.getpeercert() or {}))
            connection.settimeout(self.config.idle_timeout)
            with connection:
                self._requests(connection, caller)
        finally:
            raw.close()
            self._slots.release()

    def _requests(self, connection: ssl.SSLSocket, caller: Caller) -> None:
        buffer = bytearray(64 * 1024)
        view = memoryview(buffer)
        filled = 0  # bytes of buffer holding data not yet answered
        while not self._stopping.is_set():
            try:
                while filled < 4 or filled < 4 + frame_length(view[:4]):
                    if filled == len(buffer):  # a frame bigger than the buffer: grow it
                        buffer.extend(bytes(len(buffer)))
                        view = memoryview(buffer)
                    clear_thread_errors()
                    received = connection.recv_into(view[filled:])
                    if not received:
                        return
                    filled += received
            except ProtocolViolation as exc:
                log.info("closing the connection of %s: %s", caller.identity, exc)
                return
            except OSError as exc:
                log.debug("connection of %s ended: %s", caller.identity, exc)
                return
            end = 4 + frame_length(view[:4])
            reply, audited = self._answer(caller, bytes(view[4:end]))
            # Requests come one at a time per connection; keep whatever follows.
            buffer[:filled - end] = buffer[end:filled]
            filled -= end
            try:
                clear_thread_errors()
                connection.sendall(reply)
            except OSError:
                return
            finally:
                # The reply goes first: the audit write is not on the caller's clock.
                if audited is not None:
                    self._audit(caller, *audited)

    def _answer(self, caller: Caller, payload: bytes) -> tuple[bytes, tuple[Any, ...] | None]:
        """The encoded reply, and what the audit line must say (None: not audited)."""
        received = time.monotonic()
        request_id: Any = None
        operation = "?"
        arguments: dict[str, Any] = {}
        try:
            message = decode(payload)
            if len(message) != 4 or not isinstance(message[3], dict):
                raise ProtocolViolation("a request is [id, operation, deadline_ms, arguments]")
            request_id, operation, deadline_ms, arguments = message
            if not isinstance(operation, str) or not isinstance(deadline_ms, int):
                raise ProtocolViolation("bad operation or deadline")
            if time.monotonic() - received > deadline_ms / 1000:
                raise DeadlineExceeded("the deadline passed before the element was asked")
            body, ok = self.service.handle(caller, operation, arguments), True
        except ElementError as failure:
            body, ok = {"error": failure_kind(failure), "message": str(failure)}, False
        except Exception as failure:  # a bug must not take the connection's thread down
            log.exception("operation %s failed unexpectedly", operation)
            body = {"error": "failure", "message": f"{type(failure).__name__}"}
            ok = False
        audited = (operation, arguments, ok, body, time.monotonic() - received) \
            if operation in AUDITED else None
        try:
            return encode([request_id, ok, body]), audited
        except (ElementFailure, TypeError, ValueError):
            return encode([None, False, {"error": "protocol", "message": "unencodable reply"}]), \
                audited

    def _audit(self, caller: Caller, operation: str, arguments: dict[str, Any], ok: bool,
               body: dict[str, Any], took: float) -> None:
        seid = str(arguments.get("seid", ""))
        result = "ok" if ok else str(body.get("error"))
        ms = took * 1000
        if operation in ("sign", "decrypt"):
            mechanism = arguments.get("mechanism", 0)
            self.audit.record(caller.identity, operation, seid, result, ms,
                              key=self.service.key_label(seid, arguments.get("ref")),
                              mechanism=mechanism if isinstance(mechanism, int) else 0)
        else:
            self.audit.record(caller.identity, operation, seid, result, ms)
