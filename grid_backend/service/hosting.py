"""One secure element inside the grid service, shared by every caller allowed to use it.

A PKCS#11 token's login belongs to the whole process, so the service logs in to the
element once, with the PIN the element itself verified, and keeps a salted scrypt
verifier of that PIN. A later caller's PIN is compared with the verifier; a PIN that does
not match goes to the element again (log out, log in), so the element's own retry counter
counts every wrong PIN and the verifier cannot be used to guess PINs for free.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from grid_backend.protocol import SessionUnknown
from grid_backend.secure_element import (
    ElementObject,
    MechanismParameters,
    NotLoggedIn,
    PinIncorrect,
    SecureElement,
)

log = logging.getLogger("p11grid.grid.element")
MAX_SESSIONS = 4096
CKA_LABEL = 0x3


def stable_refs(objects: list[ElementObject]) -> dict[str, ElementObject]:
    """Objects by a name that survives a restart of the service (an element's own handles
    need not: SoftHSM2 numbers objects per process). Callers keep these names."""
    named: dict[str, ElementObject] = {}
    for obj in objects:
        a = obj.attributes
        base = "/".join(a.get(t, b"").hex() for t in (0x0, 0x102, 0x3))  # class, id, label
        n = 0
        while f"{base}/{n}" in named:
            n += 1
        named[f"{base}/{n}"] = obj
    return named


def _verifier(pin: str, salt: bytes) -> bytes:
    return hashlib.scrypt(pin.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


@dataclass(frozen=True)
class GridSession:
    """A caller's login to an element through the grid."""

    token: str
    identity: str
    seid: str


class HostedElement:
    def __init__(self, seid: str, label: str, element: SecureElement,
                 mechanisms: frozenset[int] | None = None) -> None:
        self.seid = seid
        self.label = label
        self.element = element
        self._allowed_mechanisms = mechanisms
        self._lock = threading.RLock()
        self._opened = False
        self._salt = os.urandom(16)
        self._verifier: bytes | None = None
        self._sessions: OrderedDict[str, GridSession] = OrderedDict()
        self._private: dict[str, ElementObject] = {}

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def open(self) -> None:
        with self._lock:
            if not self._opened:
                self.element.open()
                self._opened = True

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._verifier = None
            if self._opened:
                self.element.close()
                self._opened = False

    def mechanisms(self) -> frozenset[int]:
        self.open()
        mechanisms = self.element.mechanisms()
        if self._allowed_mechanisms is not None:
            mechanisms &= self._allowed_mechanisms
        return mechanisms

    def public_objects(self) -> dict[str, ElementObject]:
        self.open()
        return stable_refs(self.element.public_objects())

    def login(self, identity: str, pin: str) -> GridSession:
        self.open()
        with self._lock:
            if self._verifier is not None:
                if hmac.compare_digest(self._verifier, _verifier(pin, self._salt)):
                    # Keys may have been generated since the first login.
                    self._private = stable_refs(self.element.private_objects())
                    return self._new_session(identity)
                # Not the PIN the element accepted: let the element judge (and count) it.
                log.info("element %s: a PIN that differs from the logged-in one; asking the "
                         "element", self.seid)
                self._logout()
            self.element.login(pin)  # PinIncorrect / PinLocked come from the element
            self._verifier = _verifier(pin, self._salt)
            self._private = stable_refs(self.element.private_objects())
            return self._new_session(identity)

    def _new_session(self, identity: str) -> GridSession:
        session = GridSession(secrets.token_hex(16), identity, self.seid)
        self._sessions[session.token] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def _logout(self) -> None:
        self._sessions.clear()
        self._verifier = None
        self._private = {}
        try:
            self.element.logout()
        except NotLoggedIn:
            pass

    def logout(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)
            if not self._sessions and self._verifier is not None:
                self._logout()

    def session(self, token: str, identity: str) -> GridSession:
        session = self._sessions.get(token)
        if session is None or session.identity != identity:
            raise SessionUnknown("no such grid session; log in again")
        return session

    def private_objects(self, token: str, identity: str) -> dict[str, ElementObject]:
        self.session(token, identity)
        return dict(self._private)

    def _key(self, ref: object) -> ElementObject:
        key = self._private.get(ref)  # type: ignore[call-overload]
        if key is None:
            raise NotLoggedIn(f"no private key {ref!r} on element {self.seid}")
        return key

    def sign(self, token: str, identity: str, ref: object, mechanism: int,
             parameters: MechanismParameters, data: bytes) -> bytes:
        self.session(token, identity)
        return self.element.sign(self._key(ref), mechanism, parameters, data)

    def decrypt(self, token: str, identity: str, ref: object, mechanism: int,
                parameters: MechanismParameters, data: bytes) -> bytes:
        self.session(token, identity)
        return self.element.decrypt(self._key(ref), mechanism, parameters, data)

    def key_label(self, ref: object) -> str:
        """For the audit line: the label of a private key, if known."""
        key = self._private.get(ref)  # type: ignore[call-overload]
        return key.attributes.get(CKA_LABEL, b"").decode(errors="replace") if key else ""

    def random(self, length: int) -> bytes:
        self.open()
        return self.element.random(length)


def check_pin_shape(pin: object) -> str:
    if not isinstance(pin, str) or not 1 <= len(pin) <= 255:
        raise PinIncorrect("malformed PIN")
    return pin
