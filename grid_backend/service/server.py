"""The grid service: TLS 1.3 on 127.0.0.1, callers authenticated by certificate, each
connection carrying requests one after another.

One reactor thread reads every connection and makes the quick element calls itself; slow
ones (RSA, logins, cards) go to a pool of threads. A thread per connection made the
common case, an ECDSA signature of ~45 us, pay a GIL hand-off between connection threads
at every step once two callers were busy (bench/analysis.md).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from grid_backend.elements import open_element
from grid_backend.openssl_errors import clear_thread_errors
from grid_backend.protocol import (
    VERSION,
    AuthorizationNeeded,
    DeadlineExceeded,
    ElementRefused,
    IdentityRefused,
    ProtocolViolation,
    decode,
    encode,
    failure_kind,
    frame_length,
)
from grid_backend.registry import ElementNotRegistered, Registry, RegistryError, open_registry
from grid_backend.registry.audit import AuditWriter
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
from idm.metrics import ServiceMetrics
from idm.relying_party import AuthorizationRefused, RelyingParty

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
                 element_factory: Callable[[str, dict[str, Any]], Any] = open_element,
                 relying_party: RelyingParty | None = None,
                 sealing: ResultSealing | None = None) -> None:
        self.registry = registry
        self._factory = element_factory
        # With a relying party, every element request needs an authorization that a
        # caller gets by presenting its identity tokens (op_authorize).
        self.relying_party = relying_party
        if relying_party is not None:
            # The registry is the jti replay cache and the revocation list: every grid
            # node sharing it refuses a replayed token or a revoked certificate at once.
            relying_party.replay = registry
            relying_party.revoked = registry.revoked
        self.sealing = sealing
        self._authorizations: OrderedDict[str, _Authorized] = OrderedDict()
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
                except ElementNotRegistered as exc:
                    # A database failure is not this: it reaches handle() as one.
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
        try:
            return method(caller, arguments)
        except RegistryError as exc:
            # The database is down or stalled: a failure to retry, not a refusal. Where
            # it lives is for the log, not for the caller.
            log.warning("%s of %s: %s", operation, caller.identity, exc)
            raise ElementFailure("the grid's registry is unavailable; try again") from None

    def _element(self, caller: Caller, arguments: dict[str, Any]) -> HostedElement:
        seid = self._allowed_seid(caller, arguments)
        if self.relying_party is not None:
            self._check_authorization(caller, seid, arguments.get("authorization"))
        return self.hosted(seid)

    def _allowed_seid(self, caller: Caller, arguments: dict[str, Any]) -> str:
        seid = arguments.get("seid")
        if not isinstance(seid, str) or seid not in caller.allowed(self.registry):
            raise ElementRefused(f"element {seid!r} is not bound to {caller.identity}")
        return seid

    def _check_authorization(self, caller: Caller, seid: str, handle: object) -> None:
        granted = self._authorizations.get(handle) if isinstance(handle, str) else None
        if granted is None or granted.identity != caller.identity or granted.seid != seid:
            raise AuthorizationNeeded(f"element {seid}: present the identity tokens first "
                                      "(authorize)")
        if time.time() >= granted.expires:
            self._authorizations.pop(str(handle), None)
            raise AuthorizationNeeded(f"element {seid}: the authorization ended with its "
                                      "tokens; authorize again with fresh ones")

    def op_authorize(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        """The three elements (DESIGN.md section 3) for one element: access token, the
        caller's certificate, and its VM-/APP-Auth-Token; an authorization handle back."""
        seid = self._allowed_seid(caller, arguments)
        party = self.relying_party
        if party is None:
            return {"authorization": "", "expires": 0}  # nothing to check: not enforced
        if caller.certificate is None:
            raise IdentityRefused("the caller presented no certificate")
        try:
            granted = party.authorize(
                caller.certificate, arguments.get("access_token"), arguments.get("vm_token"),
                bound=lambda subject: seid in self.registry.allowed([subject.uri]),
                app_token=arguments.get("app_token"))
        except AuthorizationRefused as exc:
            # The audit line says "identity"; the log says which check and why.
            log.warning("authorize refused for %s on %s: %s", caller.identity, seid, exc)
            raise IdentityRefused(str(exc)) from None
        seal_to = None
        if arguments.get("container") is True:
            if self.sealing is None:
                raise IdentityRefused("result containers were asked for, but this grid has "
                                      "no result_authority_key in its [identity]")
            hypervisor = granted.hypervisor_certificate
            seal_to = hypervisor.public_key() if hypervisor is not None else None
            from cryptography.hazmat.primitives.asymmetric import rsa

            if not isinstance(seal_to, rsa.RSAPublicKey):
                raise IdentityRefused("a result container is sealed to the hypervisor's RSA "
                                      "key; this hypervisor's key is not RSA")
        handle = secrets.token_hex(16)
        with self._lock:
            self._authorizations[handle] = _Authorized(caller.identity, seid,
                                                       granted.expires.timestamp(), seal_to)
            while len(self._authorizations) > MAX_AUTHORIZATIONS:
                self._authorizations.popitem(last=False)
        return {"authorization": handle, "expires": int(granted.expires.timestamp()),
                "subject": granted.subject.uri, "actors": [a.uri for a in granted.actors]}

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
        return self._deliver(arguments, "sign", self._crypto(caller, arguments, decrypt=False))

    def op_decrypt(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        return self._deliver(arguments, "decrypt",
                             self._crypto(caller, arguments, decrypt=True))

    def _deliver(self, arguments: dict[str, Any], operation: str, result: bytes
                 ) -> dict[str, Any]:
        """The result, or, for a caller that asked for it at authorize, a container sealed
        to its hypervisor's key and signed by the grid's authority key."""
        handle = arguments.get("authorization")
        granted = self._authorizations.get(handle) if isinstance(handle, str) else None
        if granted is None or granted.seal_to is None or self.sealing is None:
            return {"result": result}
        from idm.container import pack, result_context

        context = result_context(str(handle), operation, bytes(arguments.get("data", b"")))
        return {"container": pack(result, granted.seal_to, self.sealing.authority, context,
                                  self.sealing.header)}  # type: ignore[arg-type]

    def op_random(self, caller: Caller, arguments: dict[str, Any]) -> dict[str, Any]:
        length = arguments.get("length")
        if not isinstance(length, int) or not 0 <= length <= 1 << 16:
            raise ProtocolViolation("length must be 0..65536")
        return {"result": self._element(caller, arguments).random(length)}

    def session_count(self) -> int:
        return sum(hosted.session_count for hosted in list(self._hosted.values()))

    def authorization_count(self) -> int:
        return len(self._authorizations)

    def key_label(self, seid: str, ref: object) -> str:
        element = self._hosted.get(seid)
        return element.key_label(ref) if element is not None else ""


@dataclass(frozen=True)
class _Authorized:
    identity: str
    seid: str
    expires: float  # epoch seconds: the first of the caller's tokens to expire
    seal_to: Any = None  # the hypervisor's RSA key when the caller asked for containers


@dataclass(frozen=True)
class ResultSealing:
    """The grid's authority key, which signs result containers (idm/container.py)."""

    authority: Any  # idm.container.Signer
    header: str  # "rsa-oaep-sha256" or "rsa-oaep-sha1"


class Caller:
    """Who is on the other end of a connection, and what the registry lets them use."""

    def __init__(self, identities: list[str],
                 certificate: x509.Certificate | None = None) -> None:
        self.identities = identities
        self.identity = identities[0] if identities else "?"
        self.certificate = certificate  # the TLS client certificate, for cnf checks
        self._allowed: set[str] = set()
        self._checked = 0.0

    def allowed(self, registry: Registry, fresh: bool = False) -> set[str]:
        now = time.monotonic()
        if fresh or now - self._checked > ALLOWED_CACHE_SECONDS:
            self._allowed = registry.allowed(self.identities)
            self._checked = now
        return self._allowed


AUDITED = {"authorize", "login", "logout", "sign", "decrypt", "random"}
MAX_AUTHORIZATIONS = 4096
_quoted = functools.lru_cache(maxsize=4096)(json.dumps)  # the same few names, every line
TIMED = {"sign", "decrypt", "random"}  # answered by the reactor itself once proven quick
QUICK_CALL = 0.0003  # s: element calls faster than this (smoothed) skip the worker pool
SLOW_WORKERS = 32  # element calls in progress at once, besides the reactor's own
SEND_TIMEOUT = 5.0  # s a reply may wait for room in a caller's socket
STICKY_WAIT = 0.005  # s a worker waits for a slow caller's next request before handing back


@dataclass
class _Request:
    received: float
    request_id: Any = None
    operation: str = "?"
    deadline_ms: int = 0
    arguments: dict[str, Any] = field(default_factory=dict)
    failure: ElementError | None = None  # malformed: answered with this
    kind: tuple[Any, ...] | None = None  # what the element-call timing is kept by


class AuditTrail:
    """One JSON line per operation, appended to a file with one write() each.

    Written directly rather than through `logging`: it is on every signature's path, and
    a formatted f-string plus one O_APPEND write costs a fraction of a log record.
    Without a file the lines go to the `p11grid.audit` logger (syslog, else stderr).
    With a `database` writer the same facts also go to the registry's audit table, queued
    for its background thread (never waited for).
    """

    def __init__(self, path: Path | None, database: AuditWriter | None = None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) \
            if path is not None else None
        self._second = -1
        self._stamp = ""
        self.database = database

    def record(self, caller: str, operation: str, seid: str, result: str, ms: float,
               key: str | None = None, mechanism: int | None = None) -> None:
        if self.database is not None:
            self.database.add(caller, operation, seid, result, ms, key, mechanism)
        fields = f'"caller": {_quoted(caller)}'
        if key is not None:
            fields += f', "key": {_quoted(key)}'
        if mechanism is not None:
            fields += f', "mechanism": "0x{mechanism:x}"'
        line = (f'{{{fields}, "ms": {ms:.3f}, "op": "{operation}", '
                f'"result": {_quoted(result)}, "seid": {_quoted(seid)}}}')
        if self._fd is None:
            audit.info(line)
            return
        now = int(time.time())
        if now != self._second:  # one strftime a second, not one a signature
            self._second = now
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        os.write(self._fd, f"{self._stamp} {line}\n".encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.database is not None:
            self.database.close()
            self.database = None


class _Link:
    """One caller's TLS connection as the reactor keeps it: its bytes not yet answered."""

    FIRST_BUFFER = 64 * 1024

    def __init__(self, tls: ssl.SSLSocket, caller: Caller) -> None:
        self.tls = tls
        self.caller = caller
        self.buffer = bytearray(self.FIRST_BUFFER)
        self.view = memoryview(self.buffer)
        self.filled = 0
        self.last_active = time.monotonic()

    def _receive(self) -> None:
        """One TLS read into the free end of the buffer, grown when full."""
        if self.filled == len(self.buffer):  # a frame bigger than the buffer
            self.view.release()
            self.buffer.extend(bytes(len(self.buffer)))
            self.view = memoryview(self.buffer)
        clear_thread_errors()
        received = self.tls.recv_into(self.view[self.filled:])
        if not received:
            raise ConnectionResetError("the caller closed the connection")
        self.filled += received
        self.last_active = time.monotonic()

    def read_available(self) -> bool:
        """Read what the socket and TLS hold now; False: the peer is gone."""
        try:
            while True:
                self._receive()
                if self._frame_end() and not self.tls.pending():
                    return True  # the usual case; more bytes would wake the selector again
        except ssl.SSLWantReadError:
            return True
        except OSError as exc:  # ssl.SSLError included
            log.debug("connection of %s ended: %s", self.caller.identity, exc)
            return False
        except ProtocolViolation as exc:
            log.info("closing the connection of %s: %s", self.caller.identity, exc)
            return False

    def _frame_end(self) -> int:
        """Where the first complete frame ends in the buffer; 0: none yet."""
        if self.filled < 4:
            return 0
        end = 4 + frame_length(self.buffer)
        return end if self.filled >= end else 0

    def next_frame(self) -> bytes | None:
        """The payload of the first complete frame, removed from the buffer (or None)."""
        end = self._frame_end()
        if not end:
            return None
        payload = bytes(self.view[4:end])
        rest = self.filled - end
        if rest:  # a request sent before its predecessor's reply: keep it, copied
            self.buffer[:rest] = bytes(self.view[end:self.filled])
        self.filled = rest
        return payload

    def wait_frame(self, seconds: float) -> bytes | None:
        """In a worker: the next request if it arrives within `seconds`, else None (and
        whatever part of it arrived stays in the buffer). A lost peer raises OSError."""
        payload = self.next_frame()
        if payload is not None:
            return payload
        self.tls.settimeout(seconds)
        try:
            while payload is None:
                self._receive()
                payload = self.next_frame()
        except TimeoutError:
            return None
        finally:
            self.tls.settimeout(0.0)
        return payload

    def send(self, reply: bytes) -> None:
        """Replies normally fit the socket buffer at once; else wait for room, bounded."""
        clear_thread_errors()
        try:
            self.tls.sendall(reply)
        except ssl.SSLWantWriteError:
            self.tls.settimeout(SEND_TIMEOUT)
            try:
                self.tls.sendall(reply)  # OpenSSL wants the same buffer again
            finally:
                self.tls.settimeout(0.0)


class GridServer:
    """Connections are accepted by one thread and handshaken by a short-lived thread each;
    then one reactor thread reads every connection and answers the requests whose element
    call has proven quick (an ECDSA signature by a software token) itself, and hands the
    others (RSA, logins, listings, cards) to a pool of threads. So the common fast request
    costs no thread hand-off, and the GIL is not passed between connection threads."""

    def __init__(self, config: GridConfig, service: GridService) -> None:
        self.config = config
        self.service = service
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._context = self._tls_context()
        registry = service.registry
        # The writer opens a registry of its own: its batches never wait for the lock of
        # the connection that answers callers, nor they for it.
        self.audit = AuditTrail(config.audit_log, AuditWriter(
            lambda: open_registry(registry.location, registry.node), registry.node,
            registry.display) if config.audit_to_registry else None)
        self._incoming: queue.SimpleQueue[_Link] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._workers = ThreadPoolExecutor(max_workers=SLOW_WORKERS,
                                           thread_name_prefix="grid-element")
        self._took: dict[tuple[Any, ...], float] = {}  # smoothed element-call time per kind
        self._connections = 0
        self.metrics = ServiceMetrics("p11grid_grid")
        self.metrics.gauge("connections", "Open caller connections", lambda: self._connections)
        self.metrics.gauge("sessions", "Grid sessions (logins) held", service.session_count)
        self.metrics.gauge("authorizations", "Identity authorizations held",
                           service.authorization_count)
        self.metrics.gauge("audit_rows_dropped", "Audit rows the registry did not take "
                           "(the audit log has them)", self._audit_dropped)

    def _audit_dropped(self) -> int:
        database = self.audit.database
        return database.dropped if database is not None else 0

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
        threading.Thread(target=self._react, name="grid-reactor", daemon=True).start()
        log.info("grid service listening on %s:%d (TLS 1.3, client certificates required)",
                 listen.host, self.port)

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._listener is not None:
            self._listener.close()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.service.close()
        self.audit.close()

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"!")
        except OSError:
            pass  # already full: the reactor will wake anyway

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
            threading.Thread(target=self._handshake, args=(raw, address), daemon=True,
                             name=f"grid-handshake-{address[1]}").start()

    def _handshake(self, raw: socket.socket, address: Any) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            clear_thread_errors()
            tls = self._context.wrap_socket(raw, server_side=True)
            der = tls.getpeercert(binary_form=True)
            caller = Caller(identities_of(tls.getpeercert() or {}),
                            x509.load_der_x509_certificate(der) if der else None)
            tls.settimeout(0.0)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", address, exc)
            raw.close()
            self._slots.release()
            return
        self._connections += 1  # the GIL makes this and the decrement below exact enough
        self._incoming.put(_Link(tls, caller))
        self._wake()

    def _close(self, link: _Link, selector: selectors.BaseSelector | None) -> None:
        if selector is not None:
            try:
                selector.unregister(link.tls)
            except (KeyError, ValueError):
                pass
        try:
            link.tls.close()
        except OSError:
            pass
        self._connections -= 1
        self._slots.release()

    def _react(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        links: set[_Link] = set()
        next_sweep = time.monotonic() + 1.0
        try:
            while not self._stopping.is_set():
                woken = False
                for key, _ in selector.select(timeout=1.0):
                    link = key.data
                    if link is None:
                        woken = True
                        continue
                    try:
                        readable = link.read_available()
                    except Exception:  # a bug must never take the reactor down
                        log.exception("reading from %s failed", link.caller.identity)
                        readable = False
                    if not readable:
                        links.discard(link)
                        self._close(link, selector)
                        continue
                    self._serve(link, selector, links)
                if woken:  # new connections, and those a worker has answered
                    try:
                        while self._wake_read.recv(4096):
                            pass
                    except BlockingIOError:
                        pass
                    while not self._incoming.empty():
                        link = self._incoming.get()
                        try:
                            selector.register(link.tls, selectors.EVENT_READ, link)
                        except (ValueError, OSError) as exc:  # closed meanwhile
                            log.debug("dropping the connection of %s: %s",
                                      link.caller.identity, exc)
                            self._close(link, None)
                            continue
                        links.add(link)
                        self._serve(link, selector, links)  # bytes already read: no event
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + 1.0
                    for link in [k for k in links
                                 if now - k.last_active > self.config.idle_timeout]:
                        log.debug("closing the idle connection of %s", link.caller.identity)
                        links.discard(link)
                        self._close(link, selector)
        finally:
            for link in links:
                self._close(link, selector)
            selector.close()

    def _serve(self, link: _Link, selector: selectors.BaseSelector, links: set[_Link]) -> None:
        """Answer the complete requests `link` holds; a slow one goes to a worker, and the
        link leaves the reactor until its reply is sent (one request at a time per link)."""
        try:
            while (payload := link.next_frame()) is not None:
                request = self._request(payload)
                if self._quick(request):
                    if not self._respond(link, request):
                        links.discard(link)
                        self._close(link, selector)
                        return
                    continue
                selector.unregister(link.tls)
                links.discard(link)
                self._workers.submit(self._respond_later, link, request)
                return
            return  # all answered: wait for the next request
        except ProtocolViolation as exc:
            log.info("closing the connection of %s: %s", link.caller.identity, exc)
        except Exception:  # a bug must never take the reactor down
            log.exception("closing the connection of %s after an unexpected error",
                          link.caller.identity)
        links.discard(link)
        self._close(link, selector)

    def _respond_later(self, link: _Link, request: _Request | None) -> None:
        """In a worker: answer `request`, then the link's next ones while they keep coming
        quickly and stay slow (an RSA caller's next request is usually ~0.1 ms away:
        handing the link back and forth would cost two thread wake-ups per request)."""
        try:
            while request is not None and not self._stopping.is_set():
                if not self._respond(link, request):
                    break
                if self._quick(request):
                    request = None  # back to the reactor, which answers these itself
                    continue
                payload = link.wait_frame(STICKY_WAIT)
                request = self._request(payload) if payload is not None else None
            else:
                if not self._stopping.is_set():
                    self._incoming.put(link)
                    self._wake()
                    return
        except ProtocolViolation as exc:
            log.info("closing the connection of %s: %s", link.caller.identity, exc)
        except OSError as exc:  # ssl.SSLError included
            log.debug("connection of %s ended: %s", link.caller.identity, exc)
        except Exception:
            log.exception("answering %s failed unexpectedly", link.caller.identity)
        self._close(link, None)

    def _quick(self, request: _Request) -> bool:
        kind = request.kind
        return kind is not None and self._took.get(kind, QUICK_CALL) < QUICK_CALL

    def _respond(self, link: _Link, request: _Request) -> bool:
        """Answer one request and send the reply; False: the connection is lost."""
        reply, audited, took = self._answer(link.caller, request)
        if request.kind is not None and took is not None:
            before = self._took.get(request.kind)
            self._took[request.kind] = took if before is None else 0.8 * before + 0.2 * took
        try:
            link.send(reply)
        except OSError:
            return False
        finally:
            # The reply goes first: the audit write is not on the caller's clock.
            if audited is not None:
                self._audit(link.caller, *audited)
        link.last_active = time.monotonic()
        return True

    def _request(self, payload: bytes) -> _Request:
        request = _Request(received=time.monotonic())
        try:
            message = decode(payload)
            if len(message) != 4 or not isinstance(message[3], dict):
                raise ProtocolViolation("a request is [id, operation, deadline_ms, arguments]")
            request.request_id, operation, deadline_ms, request.arguments = message
            if not isinstance(operation, str) or not isinstance(deadline_ms, int):
                raise ProtocolViolation("bad operation or deadline")
            request.operation, request.deadline_ms = operation, deadline_ms
        except ElementError as failure:
            request.failure = failure
            request.kind = ("malformed",)
            return request
        if operation in TIMED:
            arguments = request.arguments
            request.kind = (operation, arguments.get("seid"), arguments.get("mechanism"))
        return request

    def _answer(self, caller: Caller, request: _Request
                ) -> tuple[bytes, tuple[Any, ...] | None, float | None]:
        """The encoded reply, what the audit line must say (None: not audited), and how
        long the element call took (None: it was not made)."""
        operation, arguments = request.operation, request.arguments
        took: float | None = None
        try:
            if request.failure is not None:
                raise request.failure
            if time.monotonic() - request.received > request.deadline_ms / 1000:
                raise DeadlineExceeded("the deadline passed before the element was asked")
            started = time.monotonic()
            body, ok = self.service.handle(caller, operation, arguments), True
            took = time.monotonic() - started
        except ElementError as failure:
            body, ok = {"error": failure_kind(failure), "message": str(failure)}, False
        except Exception as failure:  # a bug must not take the connection down
            log.exception("operation %s failed unexpectedly", operation)
            body = {"error": "failure", "message": f"{type(failure).__name__}"}
            ok = False
        audited = (operation, arguments, ok, body, time.monotonic() - request.received) \
            if operation in AUDITED else None
        try:
            return encode([request.request_id, ok, body]), audited, took
        except (ElementFailure, TypeError, ValueError):
            return encode([None, False, {"error": "protocol", "message": "unencodable reply"}]), \
                audited, took

    def _audit(self, caller: Caller, operation: str, arguments: dict[str, Any], ok: bool,
               body: dict[str, Any], took: float) -> None:
        seid = str(arguments.get("seid", ""))
        result = "ok" if ok else str(body.get("error"))
        self.metrics.observe(operation, result, took)
        ms = took * 1000
        if operation in ("sign", "decrypt"):
            mechanism = arguments.get("mechanism", 0)
            self.audit.record(caller.identity, operation, seid, result, ms,
                              key=self.service.key_label(seid, arguments.get("ref")),
                              mechanism=mechanism if isinstance(mechanism, int) else 0)
        else:
            self.audit.record(caller.identity, operation, seid, result, ms)
