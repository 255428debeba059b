"""The PKCS#11 module in Python terms: every C_* function, with Python values.

provider/entry.py turns C arguments into these calls and results back into C. Here live
the rules of the standard: initialization, slots, sessions, login, the operation state
machine and the length-query convention.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grid_backend.client import AwaitReadable, GridPool, GridSettings, RemoteElement
from grid_backend.secure_element import ElementError, SecureElement
from provider import config as config_module
from provider import logs
from provider.config import IdentityConfig, ModuleConfig, SecureElementConfig
from provider.constants import (
    CKF_DECRYPT,
    CKF_DIGEST,
    CKF_LOGIN_REQUIRED,
    CKF_RNG,
    CKF_RW_SESSION,
    CKF_SERIAL_SESSION,
    CKF_SIGN,
    CKF_TOKEN_INITIALIZED,
    CKF_TOKEN_PRESENT,
    CKF_USER_PIN_INITIALIZED,
    CKF_VERIFY,
    CKO,
    CKR,
    CKU_CONTEXT_SPECIFIC,
    CKU_SO,
    CKU_USER,
)
from provider.mechanisms import MECHANISM_LIST, OFFERED, OfferedMechanism, offered
from provider.objects import Template, TokenObject
from provider.operations import (
    DecryptOperation,
    DigestOperation,
    FindOperation,
    SignOperation,
    VerifyOperation,
)
from provider.return_values import CKRError
from provider.session import Session
from provider.token import Token

log = logging.getLogger("p11grid.module")

LIBRARY_VERSION = (0, 1)
MANUFACTURER = "p11grid"
MAX_RANDOM = 1 << 20

# What a length-producing call hands back: the bytes, or the length still needed.
Output = bytes | int


def local_element(config: SecureElementConfig) -> SecureElement:
    """backend = "local": the element is driven inside this process."""
    if config.driver == "pkcs11":
        from grid_backend.elements.pkcs11_token import Pkcs11Token

        return Pkcs11Token(config.library, config.token_label, config.environment)
    raise CKRError(CKR.GENERAL_ERROR, f"no driver {config.driver!r}")


@dataclass(frozen=True)
class Backend:
    """How this configuration reaches its elements. Nothing connects when it is built."""

    open_element: Callable[[SecureElementConfig], SecureElement]
    # backend = "grid" without [[secure_element]]: the elements the grid lets us use.
    discover: Callable[[], list[SecureElementConfig]] | None = None


def identity_gate(identity: IdentityConfig, certificate: str) -> Any:
    """The idm.gate.IdentityGate for an `[identity]` table (certificate: `[grid]`'s)."""
    import datetime

    from idm.gate import GateSettings, IdentityGate

    optional = lambda value: Path(value) if value else None  # noqa: E731
    return IdentityGate(GateSettings(
        audience=identity.audience, ca=Path(identity.ca), crl=optional(identity.crl),
        certificate=Path(certificate), idp=identity.idp,
        hv_certificate=Path(identity.hv_certificate), vm_token=optional(identity.vm_token),
        vm=identity.vm, hv_key=identity.hv_key, hv_module=optional(identity.hv_module),
        hv_environment=dict(identity.hv_environment),
        hv_key_file=optional(identity.hv_key_file),
        max_token_lifetime=datetime.timedelta(seconds=identity.max_token_lifetime),
        result_authority=optional(identity.result_authority),
        app_token=optional(identity.app_token),
        vm_certificate=optional(identity.vm_certificate),
        vm_key_file=optional(identity.vm_key_file)))


def _identity_gate(identity: IdentityConfig, certificate: str
                   ) -> tuple[Callable[[], dict[str, str]],
                              Callable[[str, str, bytes, bytes], bytes] | None]:
    """The identity gate's tokens (and, with `result_authority`, its opener of sealed
    results), the gate built at first use: nothing of idm (nor cryptography) is imported
    in C_Initialize, which OpenSSL calls while loading its own configuration."""
    gates: list[Any] = []
    lock = threading.Lock()

    def gate() -> Any:
        with lock:
            if not gates:
                gates.append(identity_gate(identity, certificate))
        return gates[0]

    def credentials() -> dict[str, str]:
        return dict(gate().credentials())

    def opener(authorization: str, operation: str, data: bytes, container: bytes) -> bytes:
        return bytes(gate().open_result(authorization, operation, data, container))

    return credentials, (opener if identity.result_authority is not None else None)


def _authorizer(identity: IdentityConfig, certificate: str) -> Callable[[], dict[str, str]]:
    return _identity_gate(identity, certificate)[0]


def backend_for(config: ModuleConfig, await_readable: AwaitReadable | None = None) -> Backend:
    if config.backend != "grid":
        return Backend(local_element)
    assert config.grid is not None
    grid = config.grid
    pool = GridPool(GridSettings(endpoints=grid.endpoints, ca=Path(grid.ca),
                                 certificate=Path(grid.certificate), key=Path(grid.key),
                                 timeout=grid.timeout, spin=grid.spin_us / 1e6),
                    await_readable)

    authorizer, opener = _identity_gate(config.identity, grid.certificate) \
        if config.identity is not None else (None, None)

    def open_element(element: SecureElementConfig) -> SecureElement:
        return RemoteElement(pool, element.seid or element.label, authorizer, opener)

    if config.secure_elements:
        return Backend(open_element)

    def discover() -> list[SecureElementConfig]:
        found: list[SecureElementConfig] = []
        for entry in pool.call("list", {}, idempotent=True).get("elements", ()):
            label, seid = str(entry.get("label", "")), str(entry.get("seid", ""))
            if not label or len(label.encode()) > 32 or not seid:
                log.warning("grid element %r: label %r cannot be a token label; skipped",
                            seid, label)
            elif any(f.label == label for f in found):
                log.warning("grid element %r: label %r is taken by another; skipped",
                            seid, label)
            else:
                found.append(SecureElementConfig(label=label, driver="grid", library="",
                                                 token_label="", seid=seid))
        return found

    return Backend(open_element, discover)


@dataclass
class _Running:
    """Everything C_Initialize builds and C_Finalize (or a fork) throws away."""

    pid: int
    config: ModuleConfig
    backend: Backend
    allocate: Callable[[], int]  # object handles, unique across this module's tokens
    tokens: list[Token] | None = None  # None: not yet discovered
    sessions: dict[int, Session] = field(default_factory=dict)
    # Numbered from a per-process base, so that a forked child's sessions never carry
    # the numbers of its parent's.
    session_numbers: Any = field(
        default_factory=lambda: itertools.count(((os.getpid() & 0x7FFF) << 16) + 1))


    def make_tokens(self, elements: tuple[SecureElementConfig, ...] | list[SecureElementConfig]
                    ) -> list[Token]:
        return [Token(i, c, self.backend.open_element, self.allocate)
                for i, c in enumerate(elements)]


def _deliver(result: bytes, capacity: int | None) -> Output:
    if capacity is None or capacity < len(result):
        return len(result)
    return result


class Module:
    def __init__(self, on_initialized: Callable[[bool], None] = lambda _: None,
                 await_readable: AwaitReadable | None = None) -> None:
        self._lock = threading.RLock()
        self._running: _Running | None = None
        self._on_initialized = on_initialized
        self._await_readable = await_readable  # native/: the grid client's reply wait

    # --- general purpose --------------------------------------------------

    def initialize(self) -> None:
        with self._lock:
            running = self._running
            if running is not None and running.pid == os.getpid():
                raise CKRError(CKR.CRYPTOKI_ALREADY_INITIALIZED, "C_Initialize called twice")
            # After fork the parent's state is dropped untouched: its locks and sockets
            # belong to the parent.
            self._running = None
            logs.ensure_default()
            config = config_module.load()
            logs.configure(config.log_file, config.log_level)
            object_numbers = itertools.count(1)
            backend = backend_for(config, self._await_readable)
            running = _Running(os.getpid(), config, backend,
                               lambda: next(object_numbers))
            if backend.discover is None:
                running.tokens = running.make_tokens(config.secure_elements)
            self._running = running
            self._on_initialized(True)
            slots = "from the grid at first use" if running.tokens is None \
                else f"{len(running.tokens)} slot(s)"
            log.info("initialized from %s: %s, backend %s", config.path, slots,
                     config.backend)

    def finalize(self) -> None:
        with self._lock:
            running = self._require()
            self._running = None
            self._on_initialized(False)
            for token in running.tokens or ():
                try:
                    token.close()
                except Exception as exc:
                    log.warning("token %r did not close cleanly: %s", token.label, exc)
            log.info("finalized")

    def _require(self) -> _Running:
        running = self._running
        if running is None or running.pid != os.getpid():
            raise CKRError(CKR.CRYPTOKI_NOT_INITIALIZED, "call C_Initialize first")
        return running

    def info(self) -> dict[str, Any]:
        self._require()
        return {"manufacturer": MANUFACTURER, "description": "p11grid PKCS#11 module",
                "version": LIBRARY_VERSION}

    # --- slots and tokens ---------------------------------------------------

    def _tokens(self) -> list[Token]:
        running = self._require()
        if running.tokens is not None:
            return running.tokens
        with self._lock:
            if running.tokens is None:
                assert running.backend.discover is not None
                try:
                    found = running.backend.discover()
                except ElementError as exc:
                    # C_GetSlotList may not answer CKR_DEVICE_*: not cached, asked again.
                    raise CKRError(CKR.FUNCTION_FAILED,
                                   f"cannot ask the grid for its elements: {exc}") from exc
                running.tokens = running.make_tokens(found)
                log.info("the grid lets this caller use %d element(s): %s", len(found),
                         ", ".join(f"{e.label} ({e.seid})" for e in found) or "none")
            return running.tokens

    def slot_list(self) -> list[int]:
        return [t.slot_id for t in self._tokens()]

    def token(self, slot_id: int) -> Token:
        tokens = self._tokens()
        if not 0 <= slot_id < len(tokens):
            raise CKRError(CKR.SLOT_ID_INVALID, f"no slot {slot_id}")
        return tokens[slot_id]

    def slot_info(self, slot_id: int) -> dict[str, Any]:
        token = self.token(slot_id)
        return {"description": f"p11grid secure element {token.label}",
                "manufacturer": MANUFACTURER, "flags": CKF_TOKEN_PRESENT}

    def token_info(self, slot_id: int) -> dict[str, Any]:
        token = self.token(slot_id)
        import zlib

        return {
            "label": token.label, "manufacturer": MANUFACTURER, "model": "secure element",
            # Stable and derived from the label: the element is not reached to answer this.
            "serial": f"{zlib.crc32(token.label.encode()):08x}",
            "flags": (CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED
                      | CKF_TOKEN_INITIALIZED),
            "sessions": token.session_count, "rw_sessions": token.rw_session_count,
        }

    def mechanism_list(self, slot_id: int) -> tuple[int, ...]:
        self.token(slot_id)
        return MECHANISM_LIST

    def mechanism_info(self, slot_id: int, mechanism: int) -> OfferedMechanism:
        self.token(slot_id)
        row = OFFERED.get(mechanism)
        if row is None:
            raise CKRError(CKR.MECHANISM_INVALID, f"mechanism 0x{mechanism:x} is not offered")
        return row

    # --- sessions -----------------------------------------------------------

    def open_session(self, slot_id: int, flags: int) -> int:
        token = self.token(slot_id)
        if not flags & CKF_SERIAL_SESSION:
            raise CKRError(CKR.SESSION_PARALLEL_NOT_SUPPORTED, "CKF_SERIAL_SESSION is required")
        # The element (and the identity gate before it) is reached at the first call that
        # needs it (C_Login, C_FindObjectsInit, ...), not here: Debian 12's libp11 0.4.12
        # (OpenSSL's engine, nginx) waits forever for a session when C_OpenSession fails,
        # while it reports a failed C_Login or C_FindObjectsInit and gives up.
        with self._lock:
            running = self._require()
            handle = next(running.session_numbers)
            read_write = bool(flags & CKF_RW_SESSION)
            running.sessions[handle] = Session(handle, token, read_write)
            with token.lock:
                token.session_count += 1
                token.rw_session_count += int(read_write)
        return handle

    def session(self, handle: int) -> Session:
        session = self._require().sessions.get(handle)
        if session is None:
            raise CKRError(CKR.SESSION_HANDLE_INVALID, f"no session {handle}")
        return session

    def close_session(self, handle: int) -> None:
        with self._lock:
            running = self._require()
            session = running.sessions.pop(handle, None)
            if session is None:
                raise CKRError(CKR.SESSION_HANDLE_INVALID, f"no session {handle}")
            self._forget(session)

    def _forget(self, session: Session) -> None:
        token = session.token
        with token.lock:
            token.session_count -= 1
            token.rw_session_count -= int(session.read_write)
            # PKCS#11: closing the application's last session logs the user out.
            if token.session_count == 0 and token.logged_in:
                token.logout()

    def close_all_sessions(self, slot_id: int) -> None:
        token = self.token(slot_id)
        with self._lock:
            running = self._require()
            for handle in [h for h, s in running.sessions.items() if s.token is token]:
                self._forget(running.sessions.pop(handle))

    def login(self, handle: int, user_type: int, pin: bytes | None) -> None:
        session = self.session(handle)
        token = session.token
        if user_type == CKU_SO:
            raise CKRError(CKR.USER_TYPE_INVALID, "this token has no security officer login")
        if user_type == CKU_CONTEXT_SPECIFIC:
            if not token.logged_in:
                raise CKRError(CKR.USER_NOT_LOGGED_IN, "context-specific login needs a login")
            raise CKRError(CKR.OPERATION_NOT_INITIALIZED, "no key here needs re-authentication")
        if user_type != CKU_USER:
            raise CKRError(CKR.USER_TYPE_INVALID, f"unknown user type {user_type}")
        if pin is None:
            raise CKRError(CKR.ARGUMENTS_BAD, "no PIN given (no protected authentication path)")
        try:
            text = pin.decode("utf-8")
        except UnicodeDecodeError:
            raise CKRError(CKR.PIN_INVALID, "the PIN is not UTF-8") from None
        with token.lock:
            if token.logged_in:
                raise CKRError(CKR.USER_ALREADY_LOGGED_IN, "already logged in")
            token.login(text)

    def logout(self, handle: int) -> None:
        token = self.session(handle).token
        with token.lock:
            if not token.logged_in:
                raise CKRError(CKR.USER_NOT_LOGGED_IN, "not logged in")
            token.logout()

    # --- objects ------------------------------------------------------------

    def object(self, session: Session, handle: int) -> TokenObject:
        obj = session.token.objects.get(handle)
        if obj is None or not session.token.visible(obj):
            raise CKRError(CKR.OBJECT_HANDLE_INVALID, f"no object {handle}")
        return obj

    def key(self, session: Session, handle: int) -> TokenObject:
        obj = session.token.objects.get(handle)
        if obj is None or not session.token.visible(obj):
            raise CKRError(CKR.KEY_HANDLE_INVALID, f"no key {handle}")
        if obj.object_class not in (CKO.PRIVATE_KEY, CKO.PUBLIC_KEY):
            raise CKRError(CKR.KEY_HANDLE_INVALID, f"object {handle} is not a key")
        return obj

    # --- the operation state machine ---------------------------------------

    @contextmanager
    def _starting(self, handle: int, kind: str) -> Iterator[Session]:
        """The session, if it has no `kind` operation active (an *Init call)."""
        session = self.session(handle)
        with session.lock:
            if getattr(session, kind) is not None:
                raise CKRError(CKR.OPERATION_ACTIVE, f"a {kind} operation is already active")
            yield session

    @contextmanager
    def _continuing(self, handle: int, kind: str) -> Iterator[tuple[Session, Any]]:
        """The session and its active `kind` operation; a failure ends the operation.

        PKCS#11 keeps an operation alive only across a length query or a too-small buffer,
        and both are answered by returning the length, never by raising.
        """
        session = self.session(handle)
        with session.lock:
            op = getattr(session, kind)
            if op is None:
                raise CKRError(CKR.OPERATION_NOT_INITIALIZED, f"no {kind} operation is active")
            try:
                yield session, op
            except BaseException:
                setattr(session, kind, None)
                raise

    def _private_key(self, session: Session, key_handle: int) -> TokenObject:
        key = self.key(session, key_handle)
        if key.private and not session.token.logged_in:
            raise CKRError(CKR.USER_NOT_LOGGED_IN, "log in to use the private key")
        return key

    # --- searching ------------------------------------------------------------

    def find_init(self, handle: int, template: Template) -> None:
        with self._starting(handle, "find") as session:
            token = session.token
            token.element()  # the first look at the element's objects may reach it
            found = [h for h, o in token.objects.items()
                     if token.visible(o) and o.matches(template)]
            session.find = FindOperation(sorted(found))

    def find(self, handle: int, count: int) -> list[int]:
        with self._continuing(handle, "find") as (_, op):
            return list(op.take(count))

    def find_final(self, handle: int) -> None:
        with self._continuing(handle, "find") as (session, _):
            session.find = None

    # --- signing and verifying ---------------------------------------------

    def sign_init(self, handle: int, mechanism: int, parameters: Any, key_handle: int) -> None:
        with self._starting(handle, "sign") as session:
            row = offered(mechanism, CKF_SIGN)
            key = self._private_key(session, key_handle)
            token = session.token
            session.sign = SignOperation(token.element(), token.element_mechanisms, key, row,
                                         parameters)

    def sign(self, handle: int, data: bytes, capacity: int | None) -> Output:
        with self._continuing(handle, "sign") as (session, op):
            if capacity is None or capacity < op.length:
                return int(op.length)  # answered without signing
            session.sign = None  # ends here, whatever the outcome
            if op.multi_part:
                raise CKRError(CKR.OPERATION_ACTIVE, "C_Sign cannot finish a multi-part sign")
            op.update(data)
            return bytes(op.final())

    def sign_update(self, handle: int, part: bytes) -> None:
        with self._continuing(handle, "sign") as (_, op):
            op.update(part)

    def sign_final(self, handle: int, capacity: int | None) -> Output:
        with self._continuing(handle, "sign") as (session, op):
            if capacity is None or capacity < op.length:
                return int(op.length)
            session.sign = None
            return bytes(op.final())

    def verify_init(self, handle: int, mechanism: int, parameters: Any,
                    key_handle: int) -> None:
        with self._starting(handle, "verify") as session:
            row = offered(mechanism, CKF_VERIFY)
            session.verify = VerifyOperation(self.key(session, key_handle), row, parameters)

    def verify(self, handle: int, data: bytes, signature: bytes) -> None:
        with self._continuing(handle, "verify") as (session, op):
            session.verify = None
            op.update(data)
            op.final(signature)

    def verify_update(self, handle: int, part: bytes) -> None:
        with self._continuing(handle, "verify") as (_, op):
            op.update(part)

    def verify_final(self, handle: int, signature: bytes) -> None:
        with self._continuing(handle, "verify") as (session, op):
            session.verify = None
            op.final(signature)

    # --- decryption ---------------------------------------------------------

    def decrypt_init(self, handle: int, mechanism: int, parameters: Any,
                     key_handle: int) -> None:
        with self._starting(handle, "decrypt") as session:
            row = offered(mechanism, CKF_DECRYPT)
            key = self._private_key(session, key_handle)
            token = session.token
            session.decrypt = DecryptOperation(token.element(), token.element_mechanisms, key,
                                               row, parameters)

    def decrypt(self, handle: int, ciphertext: bytes, capacity: int | None) -> Output:
        with self._continuing(handle, "decrypt") as (session, op):
            # The plaintext length is known only after decrypting; the result is kept so
            # that the call after a length query does not decrypt again.
            out = _deliver(op.decrypt(ciphertext), capacity)
            if not isinstance(out, int):
                session.decrypt = None
            return out

    # --- digesting and random ---------------------------------------------

    def digest_init(self, handle: int, mechanism: int) -> None:
        with self._starting(handle, "digest") as session:
            session.digest = DigestOperation(offered(mechanism, CKF_DIGEST))

    def digest(self, handle: int, data: bytes, capacity: int | None) -> Output:
        with self._continuing(handle, "digest") as (session, op):
            if capacity is None or capacity < op.length:
                return int(op.length)
            session.digest = None
            if op.multi_part:
                raise CKRError(CKR.OPERATION_ACTIVE, "C_Digest cannot finish a multi-part digest")
            op.update(data)
            return bytes(op.final())

    def digest_update(self, handle: int, part: bytes) -> None:
        with self._continuing(handle, "digest") as (_, op):
            op.update(part)

    def digest_final(self, handle: int, capacity: int | None) -> Output:
        with self._continuing(handle, "digest") as (session, op):
            if capacity is None or capacity < op.length:
                return int(op.length)
            session.digest = None
            return bytes(op.final())

    def generate_random(self, handle: int, length: int) -> bytes:
        session = self.session(handle)
        if length > MAX_RANDOM:
            raise CKRError(CKR.DATA_LEN_RANGE, f"at most {MAX_RANDOM} random bytes per call")
        return session.token.element().random(length)
