"""A secure element behind the grid, as the PKCS#11 module sees it.

Public objects and mechanisms are fetched once when the element is opened and served from
here afterwards: C_FindObjects, C_GetAttributeValue and length queries cost no round
trip. The PIN stays in this process's memory after login so that, when the grid has lost
the session (it restarted), the element logs in again by itself and the operation that
found the session gone (which the grid refused before touching the element) is repeated.

With an `authorizer` (the identity gate, idm/gate.py) every request carries the
authorization the grid gave for this element's tokens: obtained before the first request
(so before the first session opens), renewed shortly before it ends, and obtained again
(then the request repeated once) when the grid says it is missing or over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from grid_backend.client.pool import GridPool
from grid_backend.protocol import AuthorizationNeeded, SessionUnknown
from grid_backend.secure_element import (
    ElementAbsent,
    ElementFailure,
    ElementInfo,
    ElementObject,
    MechanismParameters,
    NotLoggedIn,
    OaepParameters,
    PssParameters,
)


def _objects(listed: Any) -> list[ElementObject]:
    return [ElementObject(ref=ref, attributes={int(k): bytes(v) for k, v in attributes.items()})
            for ref, attributes in listed]


def _parameters(parameters: MechanismParameters) -> Any:
    if isinstance(parameters, PssParameters):
        return ["pss", parameters.hash_mechanism, parameters.mgf, parameters.salt_length]
    if isinstance(parameters, OaepParameters):
        return ["oaep", parameters.hash_mechanism, parameters.mgf, parameters.label]
    return None


RENEW_MARGIN = 30.0  # seconds before an authorization ends that a new one is fetched, at most


class RemoteElement:
    def __init__(self, pool: GridPool, seid: str,
                 authorizer: Callable[[], dict[str, str]] | None = None,
                 opener: Callable[[str, str, bytes, bytes], bytes] | None = None) -> None:
        self.pool = pool
        self.seid = seid
        self._authorizer = authorizer
        # With an opener, results come sealed in containers (idm/container.py), opened
        # with (authorization, operation, data, container) before anyone sees them.
        self._opener = opener
        self._authorization: str | None = None
        self._renew_at = 0.0
        self._authorizing = threading.Lock()
        self._public: list[ElementObject] | None = None
        self._private: list[ElementObject] = []
        self._mechanisms: frozenset[int] = frozenset()
        self._session: str | None = None
        self._pin: str | None = None
        self._lock = threading.Lock()

    def _authorize(self) -> str:
        assert self._authorizer is not None
        tokens: dict[str, Any] = dict(self._authorizer())
        if self._opener is not None:
            tokens["container"] = True
        reply = self.pool.call("authorize", {"seid": self.seid, **tokens}, idempotent=False)
        self._authorization = str(reply["authorization"])
        expires = float(reply.get("expires", 0))
        # Renew ahead of the end, by a quarter of the lifetime at most (short-lived
        # access tokens must not make every request an authorization).
        self._renew_at = expires - min(RENEW_MARGIN, max(expires - time.time(), 0) / 4)
        return self._authorization

    def _call(self, operation: str, arguments: dict[str, Any], *, idempotent: bool,
              timeout: float | None = None) -> dict[str, Any]:
        return self._call_authorized(operation, arguments, idempotent=idempotent,
                                     timeout=timeout)[0]

    def _call_authorized(self, operation: str, arguments: dict[str, Any], *, idempotent: bool,
                         timeout: float | None = None) -> tuple[dict[str, Any], str | None]:
        """A request on this element, with its authorization when the grid wants one; the
        reply and the authorization it was made under."""
        for attempt in (1, 2):
            handle = None
            if self._authorizer is not None:
                with self._authorizing:
                    handle = self._authorization
                    if handle is None or time.time() > self._renew_at:
                        handle = self._authorize()
                arguments = {**arguments, "authorization": handle}
            try:
                return self.pool.call(operation, {"seid": self.seid, **arguments},
                                      idempotent=idempotent, timeout=timeout), handle
            except AuthorizationNeeded:
                # Refused before the element was asked: new tokens, then once more.
                if attempt == 2 or self._authorizer is None:
                    raise
                with self._authorizing:
                    if self._authorization == handle:
                        self._authorization = None
        raise AssertionError("unreachable")

    def open(self) -> None:
        if self._public is not None:
            return
        reply = self._call("objects", {}, idempotent=True)
        self._mechanisms = frozenset(int(m) for m in reply.get("mechanisms", ()))
        self._public = _objects(reply.get("objects", ()))

    def close(self) -> None:
        if self._session is not None:
            try:
                self._call("logout", {"session": self._session}, idempotent=True,
                           timeout=1.0)
            except Exception:  # closing must not fail; the grid forgets it at restart
                pass
        self._session, self._pin, self._public = None, None, None
        self._authorization = None

    def info(self) -> ElementInfo:
        return ElementInfo(manufacturer="p11grid", model="grid element", serial=self.seid)

    def mechanisms(self) -> frozenset[int]:
        return self._mechanisms

    def public_objects(self) -> list[ElementObject]:
        if self._public is None:
            raise ElementAbsent(f"element {self.seid} is not open")
        return list(self._public)

    def _login(self, pin: str) -> None:
        # Not idempotent: a wrong PIN sent twice counts twice at the element.
        reply = self._call("login", {"pin": pin}, idempotent=False)
        self._session = str(reply["session"])
        self._private = _objects(reply.get("objects", ()))

    def login(self, pin: str) -> None:
        with self._lock:
            self._login(pin)
            self._pin = pin

    def logout(self) -> None:
        with self._lock:
            session, self._session, self._pin = self._session, None, None
            self._private = []
        if session is not None:
            self._call("logout", {"session": session}, idempotent=True)

    def private_objects(self) -> list[ElementObject]:
        if self._session is None:
            raise NotLoggedIn("log in before listing private objects")
        return list(self._private)

    def _operate(self, operation: str, key: ElementObject, mechanism: int,
                 parameters: MechanismParameters, data: bytes) -> bytes:
        for attempt in (1, 2):
            session = self._session
            if session is None:
                raise NotLoggedIn("log in first")
            try:
                reply, handle = self._call_authorized(operation, {
                    "session": session, "ref": key.ref, "mechanism": mechanism,
                    "parameters": _parameters(parameters), "data": data}, idempotent=False)
                if self._opener is None:
                    return bytes(reply["result"])
                if "container" not in reply or handle is None:
                    # Never accept an unsealed result once containers were asked for.
                    raise ElementFailure(f"{operation}: the grid answered without a result "
                                         "container")
                return self._opener(handle, operation, data, bytes(reply["container"]))
            except AuthorizationNeeded:
                raise  # _call already presented fresh tokens once
            except SessionUnknown:
                # The grid refused before asking the element: log in again, repeat once.
                with self._lock:
                    if attempt == 2 or self._pin is None:
                        raise
                    if self._session == session:
                        self._login(self._pin)
        raise AssertionError("unreachable")

    def sign(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
             data: bytes) -> bytes:
        return self._operate("sign", key, mechanism, parameters, data)

    def decrypt(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
                data: bytes) -> bytes:
        return self._operate("decrypt", key, mechanism, parameters, data)

    def random(self, length: int) -> bytes:
        reply = self._call("random", {"length": length}, idempotent=True)
        return bytes(reply["result"])
