"""A slot and its token: one configured secure element, its objects and its login state.

The element is reached lazily, at the first session, never in C_Initialize: an OpenSSL
engine calls C_Initialize while OpenSSL is still loading its configuration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from grid_backend.secure_element import ElementObject, SecureElement
from provider.config import SecureElementConfig
from provider.constants import CKA, CKR
from provider.objects import TokenObject, complete_private_keys, present
from provider.return_values import CKRError

log = logging.getLogger("p11grid.token")

ElementFactory = Callable[[SecureElementConfig], SecureElement]


class Token:
    def __init__(self, slot_id: int, config: SecureElementConfig, factory: ElementFactory,
                 allocate_handle: Callable[[], int]) -> None:
        self.slot_id = slot_id
        self.config = config
        self.lock = threading.RLock()
        self.objects: dict[int, TokenObject] = {}
        self.logged_in = False
        self.session_count = 0
        self.rw_session_count = 0
        self._factory = factory
        self._allocate_handle = allocate_handle
        self._element: SecureElement | None = None
        self._reaching = False  # inside the first element() call, on the thread holding lock
        # What the element does and the config lets us ask of it.
        self.element_mechanisms: frozenset[int] = frozenset()
        # (class, id, label, n) -> handle: a handle names the same object for the
        # module's lifetime, across logins and reloads.
        self._handles: dict[tuple[bytes, bytes, bytes, int], int] = {}

    @property
    def label(self) -> str:
        return self.config.label

    def element(self) -> SecureElement:
        """The open element, reaching it on first use."""
        element = self._element
        if element is not None:
            return element
        with self.lock:
            if self._element is None:
                if self._reaching:
                    # Reaching the element runs TLS and the identity gate; the host's
                    # OpenSSL (pkcs11-provider) can call back into the module from there,
                    # on this very thread: refuse that call instead of deadlocking on it.
                    raise CKRError(CKR.FUNCTION_FAILED, f"token {self.label!r}: called again "
                                   "while its element is being reached, from inside that "
                                   "call (the host's OpenSSL called back into the module)")
                self._reaching = True
                try:
                    candidate = self._factory(self.config)
                    candidate.open()
                finally:
                    self._reaching = False
                objects = candidate.public_objects()
                mechanisms = candidate.mechanisms()
                if self.config.mechanisms is not None:
                    mechanisms &= self.config.mechanisms
                self.element_mechanisms = mechanisms
                self._element = candidate
                self._replace(objects)
                log.info("token %r: secure element reached, %d public objects",
                         self.label, len(objects))
            return self._element

    def _replace(self, element_objects: list[ElementObject]) -> None:
        seen: dict[tuple[bytes, bytes, bytes], int] = {}
        fresh: dict[int, TokenObject] = {}
        for eo in element_objects:
            base = (eo.attributes.get(CKA.CLASS, b""), eo.attributes.get(CKA.ID, b""),
                    eo.attributes.get(CKA.LABEL, b""))
            n = seen.get(base, 0)
            seen[base] = n + 1
            identity = (*base, n)
            handle = self._handles.get(identity)
            if handle is None:
                handle = self._handles[identity] = self._allocate_handle()
            fresh[handle] = present(eo, handle)
        complete_private_keys(list(fresh.values()))
        self.objects = fresh

    def visible(self, obj: TokenObject) -> bool:
        return not obj.private or self.logged_in

    def login(self, pin: str) -> None:
        with self.lock:
            element = self.element()
            element.login(pin)
            self.logged_in = True
            self._replace(element.public_objects() + element.private_objects())
            log.info("token %r: user logged in, %d objects", self.label, len(self.objects))

    def logout(self) -> None:
        with self.lock:
            self.logged_in = False
            element = self._element
            if element is not None:
                element.logout()
                self._replace(element.public_objects())
            log.info("token %r: user logged out", self.label)

    def close(self) -> None:
        with self.lock:
            element, self._element = self._element, None
            self.logged_in = False
            self.objects = {}
            if element is not None:
                element.close()
