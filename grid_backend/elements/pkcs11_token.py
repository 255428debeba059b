"""A secure element that is a PKCS#11 token, driven through python-pkcs11 (SoftHSM2 in tests).

SoftHSM2 2.6.1 is not thread-safe when C_Initialize gets NULL arguments, and python-pkcs11
passes NULL, so every call into one library is serialized by that library's lock. The
lock is taken with the GIL released (python-pkcs11 drops it around each C call).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pkcs11
import pkcs11._pkcs11
import pkcs11.exceptions as p11x
from pkcs11.attributes import ATTRIBUTE_TYPES
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import MGF, KeyType, Mechanism

from grid_backend.secure_element import (
    ElementAbsent,
    ElementError,
    ElementFailure,
    ElementInfo,
    ElementObject,
    InputRefused,
    KeyRefused,
    MechanismParameters,
    MechanismRefused,
    NotLoggedIn,
    OaepParameters,
    PinIncorrect,
    PinInvalid,
    PinLocked,
    PssParameters,
)

log = logging.getLogger("p11grid.element.pkcs11")

# python-pkcs11's failures, as the element family says them (first match wins).
_FAILURES: tuple[tuple[type[Exception], type[ElementError]], ...] = (
    (p11x.PinIncorrect, PinIncorrect),
    (p11x.PinLocked, PinLocked),
    (p11x.PinLenRange, PinInvalid),
    (p11x.PinInvalid, PinInvalid),
    (p11x.UserNotLoggedIn, NotLoggedIn),
    (p11x.MechanismInvalid, MechanismRefused),
    (p11x.MechanismParamInvalid, MechanismRefused),
    (p11x.DataInvalid, InputRefused),
    (p11x.DataLenRange, InputRefused),
    (p11x.EncryptedDataInvalid, InputRefused),
    (p11x.EncryptedDataLenRange, InputRefused),
    (p11x.KeyHandleInvalid, KeyRefused),
    (p11x.KeyTypeInconsistent, KeyRefused),
    (p11x.ObjectHandleInvalid, KeyRefused),
    (p11x.TokenNotPresent, ElementAbsent),
    (p11x.DeviceRemoved, ElementAbsent),
    (p11x.NoSuchToken, ElementAbsent),
    (p11x.TokenNotRecognised, ElementAbsent),
)

_COMMON = (Attribute.CLASS, Attribute.TOKEN, Attribute.PRIVATE, Attribute.LABEL,
           Attribute.MODIFIABLE, Attribute.ID)
_KEY = (Attribute.KEY_TYPE, Attribute.LOCAL, Attribute.DERIVE, Attribute.KEY_GEN_MECHANISM)
_BY_CLASS: dict[int, tuple[Attribute, ...]] = {
    ObjectClass.PRIVATE_KEY: (*_KEY, Attribute.SUBJECT, Attribute.SENSITIVE,
                              Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                              Attribute.NEVER_EXTRACTABLE, Attribute.SIGN, Attribute.DECRYPT,
                              Attribute.SIGN_RECOVER, Attribute.UNWRAP,
                              Attribute.ALWAYS_AUTHENTICATE),
    ObjectClass.PUBLIC_KEY: (*_KEY, Attribute.SUBJECT, Attribute.VERIFY, Attribute.ENCRYPT,
                             Attribute.VERIFY_RECOVER, Attribute.WRAP, Attribute.TRUSTED),
    ObjectClass.CERTIFICATE: (Attribute.CERTIFICATE_TYPE, Attribute.VALUE, Attribute.SUBJECT,
                              Attribute.ISSUER, Attribute.SERIAL_NUMBER, Attribute.TRUSTED,
                              Attribute.CERTIFICATE_CATEGORY),
}
_BY_KEY_TYPE: dict[int, tuple[Attribute, ...]] = {
    KeyType.RSA: (Attribute.MODULUS, Attribute.PUBLIC_EXPONENT, Attribute.MODULUS_BITS),
    KeyType.EC: (Attribute.EC_PARAMS, Attribute.EC_POINT),
}


class _LenientLib(pkcs11._pkcs11.lib):  # type: ignore[misc]
    """A library someone else in this process already initialized is still usable."""

    def initialize(self) -> None:
        try:
            super().initialize()
        except p11x.PKCS11Error as exc:
            if "already initialized" not in str(exc):
                raise
            log.info("%s was already initialized in this process; sharing it", self.so)


@dataclass
class _LoadedLibrary:
    lib: pkcs11._pkcs11.lib
    lock: threading.Lock


_libraries: dict[tuple[int, str], _LoadedLibrary] = {}
_libraries_lock = threading.Lock()


def _load_library(path: str) -> _LoadedLibrary:
    # Keyed by pid: a forked child must C_Initialize its own copy of the library.
    key = (os.getpid(), path)
    with _libraries_lock:
        loaded = _libraries.get(key)
        if loaded is None:
            if not os.path.exists(path):
                raise ElementAbsent(f"PKCS#11 library {path} does not exist")
            try:
                loaded = _LoadedLibrary(_LenientLib(path), threading.Lock())
            except p11x.PKCS11Error as exc:
                raise ElementFailure(f"loading {path} failed: {type(exc).__name__}") from exc
            _libraries[key] = loaded
        return loaded


def _element_error(exc: Exception) -> ElementError:
    for kind, family in _FAILURES:
        if isinstance(exc, kind):
            return family(type(exc).__name__)
    return ElementFailure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class Pkcs11Token:
    """The token labelled `token_label` inside the PKCS#11 library at `library`."""

    def __init__(self, library: str, token_label: str,
                 environment: dict[str, str] | None = None) -> None:
        self.library = library
        self.token_label = token_label
        self.environment = dict(environment or {})
        self._loaded: _LoadedLibrary | None = None
        self._token: pkcs11.Token | None = None
        self._session: pkcs11.Session | None = None
        self._logged_in = False
        self._mechanisms: frozenset[int] = frozenset()

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """Serialize calls into the library and speak only ElementError."""
        if self._loaded is None or self._session is None:
            raise ElementAbsent(f"token {self.token_label!r} is not open")
        with self._loaded.lock:
            try:
                yield
            except ElementError:
                raise
            except (p11x.PKCS11Error, RuntimeError) as exc:
                raise _element_error(exc) from exc

    def open(self) -> None:
        if self._session is not None:
            return
        # The element's own settings (e.g. SOFTHSM2_CONF) must be set before it loads.
        os.environ.update(self.environment)
        loaded = _load_library(self.library)
        with loaded.lock:
            try:
                token = loaded.lib.get_token(token_label=self.token_label)
                session = token.open(rw=False)
                mechanisms = frozenset(int(m) for m in token.slot.get_mechanisms())
            except p11x.NoSuchToken as exc:
                raise ElementAbsent(
                    f"no token labelled {self.token_label!r} in {self.library}") from exc
            except p11x.MultipleTokensReturned as exc:
                raise ElementFailure(
                    f"several tokens labelled {self.token_label!r} in {self.library}") from exc
            except p11x.PKCS11Error as exc:
                raise _element_error(exc) from exc
        self._loaded, self._token, self._session = loaded, token, session
        self._mechanisms = mechanisms
        self._logged_in = False

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loaded is not None:
            with self._loaded.lock:
                try:
                    session.close()
                except p11x.PKCS11Error as exc:
                    log.info("closing the session on %s: %s", self.token_label,
                             type(exc).__name__)
        self._logged_in = False

    def info(self) -> ElementInfo:
        if self._token is None:
            raise ElementAbsent(f"token {self.token_label!r} is not open")
        token = self._token
        return ElementInfo(
            manufacturer=token.manufacturer_id, model=token.model, serial=token.serial.hex()
            if isinstance(token.serial, bytes) else str(token.serial),
            hardware_version=tuple(token.hardware_version)[:2],  # type: ignore[arg-type]
            firmware_version=tuple(token.firmware_version)[:2],  # type: ignore[arg-type]
        )

    def mechanisms(self) -> frozenset[int]:
        return self._mechanisms

    def _read(self, obj: pkcs11.Object) -> ElementObject:
        attributes: dict[int, bytes] = {}

        def read(attribute: Attribute) -> None:
            try:
                value = obj[attribute]
            except (p11x.AttributeTypeInvalid, p11x.AttributeSensitive, NotImplementedError):
                return
            except ValueError:  # an enum value python-pkcs11 does not know
                return
            pack = ATTRIBUTE_TYPES[attribute][0]
            attributes[int(attribute)] = pack(value)

        for attribute in _COMMON:
            read(attribute)
        object_class = obj.object_class
        for attribute in _BY_CLASS.get(int(object_class), ()):
            read(attribute)
        if Attribute.KEY_TYPE in attributes:
            key_type = int(obj[Attribute.KEY_TYPE])
            for attribute in _BY_KEY_TYPE.get(key_type, ()):
                read(attribute)
        return ElementObject(ref=obj, attributes=attributes)

    def _objects(self) -> list[ElementObject]:
        assert self._session is not None
        return [self._read(obj) for obj in self._session.get_objects()]

    def public_objects(self) -> list[ElementObject]:
        with self._calling():
            return [o for o in self._objects()
                    if o.attributes.get(Attribute.PRIVATE) != b"\x01"]

    def private_objects(self) -> list[ElementObject]:
        with self._calling():
            if not self._logged_in:
                raise NotLoggedIn("log in before listing private objects")
            return [o for o in self._objects()
                    if o.attributes.get(Attribute.PRIVATE) == b"\x01"]

    def login(self, pin: str) -> None:
        with self._calling():
            assert self._token is not None and self._session is not None
            logged_in = self._token.open(rw=False, user_pin=pin)
            # Login state is per application; the public session goes, the user one stays.
            self._session.close()
            self._session = logged_in
            self._logged_in = True

    def logout(self) -> None:
        with self._calling():
            assert self._token is not None and self._session is not None
            if self._logged_in:
                self._session.close()  # C_Logout + C_CloseSession
                self._logged_in = False
                self._session = self._token.open(rw=False)

    @staticmethod
    def _parameter(parameters: MechanismParameters) -> object:
        if parameters is None:
            return None
        if isinstance(parameters, PssParameters):
            return (Mechanism(parameters.hash_mechanism), MGF(parameters.mgf),
                    parameters.salt_length)
        if isinstance(parameters, OaepParameters):
            return (Mechanism(parameters.hash_mechanism), MGF(parameters.mgf),
                    parameters.label or None)
        raise MechanismRefused(f"unknown parameters {type(parameters).__name__}")

    def sign(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
             data: bytes) -> bytes:
        with self._calling():
            return bytes(key.ref.sign(data, mechanism=Mechanism(mechanism),  # type: ignore[attr-defined]
                                      mechanism_param=self._parameter(parameters)))

    def decrypt(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
                data: bytes) -> bytes:
        with self._calling():
            return bytes(key.ref.decrypt(data, mechanism=Mechanism(mechanism),  # type: ignore[attr-defined]
                                         mechanism_param=self._parameter(parameters)))

    def random(self, length: int) -> bytes:
        if length == 0:
            return b""
        with self._calling():
            assert self._session is not None
            return bytes(self._session.generate_random(length * 8))
