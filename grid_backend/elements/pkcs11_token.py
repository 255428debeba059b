"""A secure element that is a PKCS#11 token, driven through python-pkcs11 (SoftHSM2 in tests).

SoftHSM2 2.6.1 is not thread-safe when C_Initialize gets NULL arguments, which is what
python-pkcs11 passes. So the library is initialized here first, with CKF_OS_LOCKING_OK;
python-pkcs11's own C_Initialize then finds it initialized. Only when that fails (someone
else in this process initialized the library first, with unknown arguments) is every call
into the library serialized by one lock. Concurrent operations each take a session of
their own from a small pool: a PKCS#11 session runs one operation at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

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


CKF_OS_LOCKING_OK = 0x2
CKR_OK = 0x0


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _FunctionListHead(ctypes.Structure):
    # Only the first entry of CK_FUNCTION_LIST is needed.
    _fields_ = (("version", _Version),
                ("C_Initialize", ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)))


class _InitializeArgs(ctypes.Structure):
    _fields_ = (("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p),
                ("LockMutex", ctypes.c_void_p), ("UnlockMutex", ctypes.c_void_p),
                ("flags", ctypes.c_ulong), ("pReserved", ctypes.c_void_p))


def _initialize_with_os_locking(path: str) -> bool:
    """C_Initialize(CKF_OS_LOCKING_OK) on the library; True if that made it thread-safe."""
    try:
        library = ctypes.CDLL(path)
        get_list = library.C_GetFunctionList
    except (OSError, AttributeError) as exc:
        raise ElementAbsent(f"cannot load the PKCS#11 library {path}: {exc}") from exc
    get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionListHead)),)
    get_list.restype = ctypes.c_ulong
    functions = ctypes.POINTER(_FunctionListHead)()
    if get_list(ctypes.byref(functions)) != CKR_OK or not functions:
        raise ElementFailure(f"{path}: C_GetFunctionList failed")
    arguments = _InitializeArgs(flags=CKF_OS_LOCKING_OK)
    rv = functions.contents.C_Initialize(ctypes.cast(ctypes.pointer(arguments), ctypes.c_void_p))
    if rv != CKR_OK:
        log.info("%s: C_Initialize with OS locking answered 0x%x; calls will be serialized",
                 path, rv)
    return bool(rv == CKR_OK)


@dataclass
class _LoadedLibrary:
    lib: pkcs11._pkcs11.lib
    thread_safe: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serialized(self) -> threading.Lock | nullcontext[None]:
        return nullcontext() if self.thread_safe else self.lock


_libraries: dict[tuple[int, str], _LoadedLibrary] = {}
_libraries_lock = threading.Lock()


def _load_library(path: str) -> _LoadedLibrary:
    # Keyed by pid: a forked child must C_Initialize its own copy of the library. The
    # library stays initialized for the life of the process; tokens come and go.
    key = (os.getpid(), path)
    with _libraries_lock:
        loaded = _libraries.get(key)
        if loaded is None:
            if not os.path.exists(path):
                raise ElementAbsent(f"PKCS#11 library {path} does not exist")
            thread_safe = _initialize_with_os_locking(path)
            try:
                loaded = _LoadedLibrary(_LenientLib(path), thread_safe)
            except p11x.PKCS11Error as exc:
                raise ElementFailure(f"loading {path} failed: {type(exc).__name__}") from exc
            _libraries[key] = loaded
        return loaded


@dataclass
class _Worker:
    """One session on the token and its objects by handle, for one operation at a time."""

    session: pkcs11.Session
    objects: dict[int, pkcs11.Object]
    generation: int


def _element_error(exc: Exception) -> ElementError:
    for kind, family in _FAILURES:
        if isinstance(exc, kind):
            return family(type(exc).__name__)
    return ElementFailure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class Pkcs11Token:
    """The token labelled `token_label` inside the PKCS#11 library at `library`."""

    MAX_IDLE_SESSIONS = 8

    def __init__(self, library: str, token_label: str,
                 environment: dict[str, str] | None = None) -> None:
        self.library = library
        self.token_label = token_label
        self.environment = dict(environment or {})
        self._loaded: _LoadedLibrary | None = None
        self._token: pkcs11.Token | None = None
        self._session: pkcs11.Session | None = None  # holds the login; lists objects
        self._logged_in = False
        self._mechanisms: frozenset[int] = frozenset()
        self._idle: list[_Worker] = []
        self._generation = 0  # bumped at login/logout/close: older workers are dropped

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """Serialize where the library needs it, and speak only ElementError."""
        if self._loaded is None or self._session is None:
            raise ElementAbsent(f"token {self.token_label!r} is not open")
        with self._loaded.serialized():
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
        with loaded.serialized():
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

    def _drop_workers(self) -> None:
        self._generation += 1
        idle, self._idle = self._idle, []
        for worker in idle:
            try:
                worker.session.close()
            except p11x.PKCS11Error:
                pass  # the session may already be gone with the login

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loaded is not None:
            with self._loaded.serialized():
                self._drop_workers()
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
        for attribute in _BY_CLASS.get(int(obj.object_class), ()):
            read(attribute)
        if Attribute.KEY_TYPE in attributes:
            for attribute in _BY_KEY_TYPE.get(int(obj[Attribute.KEY_TYPE]), ()):
                read(attribute)
        # Token objects keep their handle across sessions: the handle names the object.
        return ElementObject(ref=int(obj.handle), attributes=attributes)

    def _objects(self, private: bool) -> list[ElementObject]:
        assert self._session is not None
        wanted = b"\x01" if private else b"\x00"
        return [o for o in (self._read(obj) for obj in self._session.get_objects())
                if o.attributes.get(Attribute.PRIVATE, b"\x00") == wanted]

    def public_objects(self) -> list[ElementObject]:
        with self._calling():
            return self._objects(private=False)

    def private_objects(self) -> list[ElementObject]:
        with self._calling():
            if not self._logged_in:
                raise NotLoggedIn("log in before listing private objects")
            return self._objects(private=True)

    def login(self, pin: str) -> None:
        with self._calling():
            assert self._token is not None and self._session is not None
            logged_in = self._token.open(rw=False, user_pin=pin)
            # Login state is per application; the public session goes, the user one stays.
            self._drop_workers()
            self._session.close()
            self._session = logged_in
            self._logged_in = True

    def logout(self) -> None:
        with self._calling():
            assert self._token is not None and self._session is not None
            if self._logged_in:
                self._drop_workers()
                self._session.close()  # C_Logout + C_CloseSession
                self._logged_in = False
                self._session = self._token.open(rw=False)

    @contextmanager
    def _worker(self) -> Iterator[_Worker]:
        """A session of our own for one operation; returned to the pool afterwards."""
        try:
            worker = self._idle.pop()  # atomic under the GIL
        except IndexError:
            assert self._token is not None
            session = self._token.open(rw=False)
            worker = _Worker(session, {int(o.handle): o for o in session.get_objects()},
                             self._generation)
        try:
            yield worker
        finally:
            if worker.generation == self._generation and \
                    len(self._idle) < self.MAX_IDLE_SESSIONS:
                self._idle.append(worker)
            else:
                try:
                    worker.session.close()
                except p11x.PKCS11Error:
                    pass

    def _key(self, worker: _Worker, key: ElementObject) -> pkcs11.Object:
        obj = worker.objects.get(key.ref)  # type: ignore[call-overload]
        if obj is None:
            raise KeyRefused("the key is not visible to this session (logged out?)")
        return obj

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
        with self._calling(), self._worker() as worker:
            return bytes(self._key(worker, key).sign(
                data, mechanism=Mechanism(mechanism),
                mechanism_param=self._parameter(parameters)))

    def decrypt(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
                data: bytes) -> bytes:
        with self._calling(), self._worker() as worker:
            return bytes(self._key(worker, key).decrypt(
                data, mechanism=Mechanism(mechanism),
                mechanism_param=self._parameter(parameters)))

    def random(self, length: int) -> bytes:
        if length == 0:
            return b""
        with self._calling(), self._worker() as worker:
            return bytes(worker.session.generate_random(length * 8))
