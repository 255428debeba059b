"""A secure element that is a PKCS#11 token, driven through python-pkcs11 (SoftHSM2 in tests).

SoftHSM2 2.6.1 is not thread-safe when C_Initialize gets NULL arguments, which is what
python-pkcs11 passes. So the library is initialized here first, with CKF_OS_LOCKING_OK;
python-pkcs11's own C_Initialize then finds it initialized. Only when that fails (someone
else in this process initialized the library first, with unknown arguments) is every call
into the library serialized by one lock. Concurrent operations each take a session of
their own from a small pool: a PKCS#11 session runs one operation at a time. Signing and
decrypting, the hot calls, go straight through the library's function list with ctypes
(see _SinglePartCalls for why).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11._pkcs11
import pkcs11.exceptions as p11x
from pkcs11.attributes import ATTRIBUTE_TYPES
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import KeyType

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
    """python-pkcs11 over a library that is already initialized: by this driver itself
    (with CKF_OS_LOCKING_OK, the usual case) or by someone else in this process."""

    def initialize(self) -> None:
        try:
            super().initialize()
        except p11x.PKCS11Error as exc:
            if "already initialized" not in str(exc):
                raise
            log.debug("%s: python-pkcs11 found the library initialized; sharing it", self.so)


CKF_OS_LOCKING_OK = 0x2
CKR_OK = 0x0
CKA_CLASS = 0x0
CKA_TOKEN = 0x1
CKR_BUFFER_TOO_SMALL = 0x150
CKZ_DATA_SPECIFIED = 0x1


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _Mechanism(ctypes.Structure):
    _fields_ = (("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p),
                ("ulParameterLen", ctypes.c_ulong))


class _PssParams(ctypes.Structure):
    _fields_ = (("hashAlg", ctypes.c_ulong), ("mgf", ctypes.c_ulong), ("sLen", ctypes.c_ulong))


class _OaepParams(ctypes.Structure):
    _fields_ = (("hashAlg", ctypes.c_ulong), ("mgf", ctypes.c_ulong), ("source", ctypes.c_ulong),
                ("pSourceData", ctypes.c_void_p), ("ulSourceDataLen", ctypes.c_ulong))


class _Attribute(ctypes.Structure):  # CK_ATTRIBUTE
    _fields_ = (("type", ctypes.c_ulong), ("value", ctypes.c_void_p),
                ("length", ctypes.c_ulong))


# CK_C_SignInit / CK_C_DecryptInit and CK_C_Sign / CK_C_Decrypt share their shapes.
_OperationInit = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_Mechanism),
                                  ctypes.c_ulong)
_SinglePart = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
                               ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))

# CK_FUNCTION_LIST up to C_Sign, in the order PKCS#11 2.40 fixes; unused entries are opaque.
_FUNCTION_LIST_ORDER = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate",
    "C_EncryptFinal", "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal",
    "C_DigestInit", "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal",
    "C_SignInit", "C_Sign",
)
_USED: dict[str, type] = {
    "C_Initialize": ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p),
    "C_DecryptInit": _OperationInit, "C_Decrypt": _SinglePart,
    "C_SignInit": _OperationInit, "C_Sign": _SinglePart,
    "C_CopyObject": ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                     ctypes.POINTER(_Attribute), ctypes.c_ulong,
                                     ctypes.POINTER(ctypes.c_ulong)),
    "C_DestroyObject": ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong),
    "C_GetAttributeValue": ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                            ctypes.POINTER(_Attribute), ctypes.c_ulong),
}


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", _Version),
                *((name, _USED.get(name, ctypes.c_void_p)) for name in _FUNCTION_LIST_ORDER))


class _InitializeArgs(ctypes.Structure):
    _fields_ = (("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p),
                ("LockMutex", ctypes.c_void_p), ("UnlockMutex", ctypes.c_void_p),
                ("flags", ctypes.c_ulong), ("pReserved", ctypes.c_void_p))


def _function_list(path: str) -> ctypes._Pointer[_FunctionList]:
    try:
        library = ctypes.CDLL(path)
        get_list = library.C_GetFunctionList
    except (OSError, AttributeError) as exc:
        raise ElementAbsent(f"cannot load the PKCS#11 library {path}: {exc}") from exc
    get_list.argtypes = (ctypes.POINTER(ctypes.POINTER(_FunctionList)),)
    get_list.restype = ctypes.c_ulong
    functions = ctypes.POINTER(_FunctionList)()
    if get_list(ctypes.byref(functions)) != CKR_OK or not functions:
        raise ElementFailure(f"{path}: C_GetFunctionList failed")
    return functions


def _initialize_with_os_locking(functions: _FunctionList, path: str) -> bool:
    """C_Initialize(CKF_OS_LOCKING_OK) on the library; True if that made it thread-safe."""
    arguments = _InitializeArgs(flags=CKF_OS_LOCKING_OK)
    rv = functions.C_Initialize(ctypes.cast(ctypes.pointer(arguments), ctypes.c_void_p))
    if rv != CKR_OK:
        log.info("%s: C_Initialize with OS locking answered 0x%x; calls will be serialized",
                 path, rv)
    return bool(rv == CKR_OK)


# What a failed C_SignInit/C_Sign/C_DecryptInit/C_Decrypt means to the element family; the
# same meanings _FAILURES gives python-pkcs11's exceptions for these codes.
_RAW_FAILURES: dict[int, type[ElementError]] = {
    0x020: InputRefused,  # CKR_DATA_INVALID
    0x021: InputRefused,  # CKR_DATA_LEN_RANGE
    0x032: ElementAbsent,  # CKR_DEVICE_REMOVED
    0x040: InputRefused,  # CKR_ENCRYPTED_DATA_INVALID
    0x041: InputRefused,  # CKR_ENCRYPTED_DATA_LEN_RANGE
    0x060: KeyRefused,  # CKR_KEY_HANDLE_INVALID
    0x063: KeyRefused,  # CKR_KEY_TYPE_INCONSISTENT
    0x070: MechanismRefused,  # CKR_MECHANISM_INVALID
    0x071: MechanismRefused,  # CKR_MECHANISM_PARAM_INVALID
    0x082: KeyRefused,  # CKR_OBJECT_HANDLE_INVALID
    0x0E0: ElementAbsent,  # CKR_TOKEN_NOT_PRESENT
    0x0E1: ElementAbsent,  # CKR_TOKEN_NOT_RECOGNIZED
    0x101: NotLoggedIn,  # CKR_USER_NOT_LOGGED_IN
}


class _SinglePartCalls:
    """C_SignInit + C_Sign and C_DecryptInit + C_Decrypt, called through ctypes.

    Why not python-pkcs11 for these two hot operations: its extension (0.10.1, built with
    Cython 3) declares the library's function pointers without `noexcept`, so after every
    library call it takes the GIL once to look for a Python error and once more to leave
    its `nogil` block, and one signature is three library calls (init, length query,
    sign): six GIL acquisitions, plus the two of the host's C_SignInit and C_Sign calls
    into our module. With two threads signing, each acquisition is a hand-off between
    cores (a futex sleep and wake-up); measured with perf, 74 % of the threads' sleeps
    were in those error checks, and ECDSA at 2 threads fell to 0.7x of 1 thread. ctypes
    releases and re-takes the GIL once per call, and the output buffer is big enough from
    the start (a too-small one is retried, the operation stays active), so an operation is
    two library calls and two acquisitions here (ECDSA P-256 at 2 threads: 12,300 -> 15,300
    signatures/s). Both calls release the GIL: holding it through them (ctypes.PYFUNCTYPE)
    serializes RSA and starved one of two ECDSA threads for up to 0.6 s. Everything else
    (finding the token, sessions, login, objects, random) stays with python-pkcs11.
    """

    FIRST_CAPACITY = 512  # RSA-4096 or any EC curve in one call

    def __init__(self, functions: _FunctionList) -> None:
        self._sign = (functions.C_SignInit, functions.C_Sign)
        self._decrypt = (functions.C_DecryptInit, functions.C_Decrypt)
        self._copy = functions.C_CopyObject
        self._destroy = functions.C_DestroyObject
        self._attribute = functions.C_GetAttributeValue

    def session_copy(self, session: int, key: int) -> int | None:
        """A session-object copy (CKA_TOKEN false) of token object `key`, made in `session`
        and gone with it; None if the library or the key's CKA_COPYABLE refuses."""
        false = ctypes.c_ubyte(0)
        template = _Attribute(CKA_TOKEN, ctypes.addressof(false), 1)
        copy = ctypes.c_ulong()
        rv = self._copy(session, key, ctypes.byref(template), 1, ctypes.byref(copy))
        return int(copy.value) if rv == CKR_OK else None

    def exists(self, session: int, key: int) -> bool:
        value = ctypes.c_ulong()
        attribute = _Attribute(CKA_CLASS, ctypes.addressof(value), ctypes.sizeof(value))
        return bool(self._attribute(session, key, ctypes.byref(attribute), 1) == CKR_OK)

    def destroy(self, session: int, obj: int) -> None:
        self._destroy(session, obj)  # best effort: it goes with its session anyway

    def sign(self, session: int, key: int, mechanism: int, parameters: MechanismParameters,
             data: bytes) -> bytes:
        return self._run(self._sign, session, key, mechanism, parameters, data)

    def decrypt(self, session: int, key: int, mechanism: int,
                parameters: MechanismParameters, data: bytes) -> bytes:
        return self._run(self._decrypt, session, key, mechanism, parameters, data)

    @staticmethod
    def _run(calls: tuple[Any, Any], session: int, key: int, mechanism: int,
             parameters: MechanismParameters, data: bytes) -> bytes:
        init, single = calls
        # `parameter` and `source` are read by the init call: they live until it returns.
        parameter: ctypes.Structure | None = None
        source: ctypes.Array[ctypes.c_char] | None = None
        if isinstance(parameters, PssParameters):
            parameter = _PssParams(parameters.hash_mechanism, parameters.mgf,
                                   parameters.salt_length)
        elif isinstance(parameters, OaepParameters):
            label = parameters.label or b""
            if label:
                source = ctypes.create_string_buffer(label, len(label))
            parameter = _OaepParams(
                parameters.hash_mechanism, parameters.mgf, CKZ_DATA_SPECIFIED,
                ctypes.addressof(source) if source is not None else None, len(label))
        elif parameters is not None:
            raise MechanismRefused(f"unknown parameters {type(parameters).__name__}")
        if parameter is None:
            raw_mechanism = _Mechanism(mechanism, None, 0)
        else:
            raw_mechanism = _Mechanism(mechanism, ctypes.addressof(parameter),
                                       ctypes.sizeof(parameter))
        rv = init(session, ctypes.byref(raw_mechanism), key)
        if rv != CKR_OK:
            raise _raw_failure(rv)
        length = ctypes.c_ulong(_SinglePartCalls.FIRST_CAPACITY)
        output = ctypes.create_string_buffer(length.value)
        rv = single(session, data, len(data), output, ctypes.byref(length))
        if rv == CKR_BUFFER_TOO_SMALL:  # the operation is still active: ask again
            output = ctypes.create_string_buffer(length.value)
            rv = single(session, data, len(data), output, ctypes.byref(length))
        if rv != CKR_OK:
            raise _raw_failure(rv)
        return output.raw[:length.value]


def _raw_failure(rv: int) -> ElementError:
    family = _RAW_FAILURES.get(rv)
    return family(f"CKR 0x{rv:x}") if family is not None else ElementFailure(f"CKR 0x{rv:x}")


@dataclass
class _LoadedLibrary:
    lib: pkcs11._pkcs11.lib
    thread_safe: bool
    calls: _SinglePartCalls
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
            functions = _function_list(path)
            thread_safe = _initialize_with_os_locking(functions.contents, path)
            try:
                loaded = _LoadedLibrary(_LenientLib(path), thread_safe,
                                        _SinglePartCalls(functions.contents))
            except p11x.PKCS11Error as exc:
                raise ElementFailure(f"loading {path} failed: {type(exc).__name__}") from exc
            _libraries[key] = loaded
        return loaded


@dataclass
class _Worker:
    """One session on the token, for one operation at a time."""

    session: pkcs11.Session
    generation: int


def _element_error(exc: Exception) -> ElementError:
    for kind, family in _FAILURES:
        if isinstance(exc, kind):
            return family(type(exc).__name__)
    return ElementFailure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


COPY_CHECK_SECONDS = 1.0  # how stale a key's session copy may be (see Pkcs11Token._copies)

# Attributes of public and secret keys only: never in a private key's template.
_PUBLIC_ONLY = (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP)

KEY_KINDS = {"rsa2048": (KeyType.RSA, 2048), "rsa3072": (KeyType.RSA, 3072),
             "ec256": (KeyType.EC, "secp256r1"), "ec384": (KeyType.EC, "secp384r1")}


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
        # Token key handle -> (the handle to sign with, when the token key was last seen).
        # SoftHSM2's file store re-reads a token object's file generation under a file
        # lock at every C_SignInit (open, fcntl, read, close): a session-object copy of
        # the key, made in the login session and gone with it, signs without that
        # (ECDSA P-256 at 2 threads through the grid: ~8,500 -> ~9,600 signatures/s).
        self._copies: dict[int, tuple[int, float]] = {}
        self._copying = threading.Lock()

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
        self._copies = {}  # they die with the session that made them, closed next
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
        # Token objects only: the session objects are this driver's own key copies.
        return [o for o in (self._read(obj) for obj in
                            self._session.get_objects({Attribute.TOKEN: True}))
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

    def _new_worker(self) -> _Worker:
        assert self._token is not None
        return _Worker(self._token.open(rw=False), self._generation)

    def _return_worker(self, worker: _Worker) -> None:
        if worker.generation == self._generation and len(self._idle) < self.MAX_IDLE_SESSIONS:
            self._idle.append(worker)
            return
        try:
            worker.session.close()
        except p11x.PKCS11Error:
            pass

    @contextmanager
    def _worker(self) -> Iterator[_Worker]:
        """A session of our own for one operation; returned to the pool afterwards."""
        try:
            worker = self._idle.pop()  # atomic under the GIL
        except IndexError:
            worker = self._new_worker()
        try:
            yield worker
        finally:
            self._return_worker(worker)

    @staticmethod
    def _handle(key: ElementObject) -> int:
        # Token objects keep their handle in every session of the application.
        assert isinstance(key.ref, int)
        return key.ref

    def _signing_handle(self, key: ElementObject, calls: _SinglePartCalls) -> int:
        """The handle to sign or decrypt with: the key's session copy while the key is
        still in the token (looked at again at most every COPY_CHECK_SECONDS, so a key
        destroyed in the token stops being used within that), else the key itself."""
        handle = self._handle(key)
        entry = self._copies.get(handle)
        now = time.monotonic()
        if entry is not None and now - entry[1] < COPY_CHECK_SECONDS:
            return entry[0]
        session = self._session
        if not self._logged_in or session is None:
            return handle
        with self._copying:
            copies = self._copies
            entry = copies.get(handle)
            if entry is not None and now - entry[1] < COPY_CHECK_SECONDS:
                return entry[0]
            if entry is not None and entry[0] != handle:
                if calls.exists(session.handle, handle):
                    copies[handle] = (entry[0], now)
                    return entry[0]
                calls.destroy(session.handle, entry[0])
                del copies[handle]
                return handle  # gone from the token: the operation fails as it should
            copy = calls.session_copy(session.handle, handle)
            if copy is None:
                log.info("token %r: key %d cannot be copied into a session object; signing "
                         "with the token object", self.token_label, handle)
                copies[handle] = (handle, float("inf"))
                return handle
            copies[handle] = (copy, now)
            return copy

    def _single_part(self, decrypt: bool, key: ElementObject, mechanism: int,
                     parameters: MechanismParameters, data: bytes) -> bytes:
        # The hot path of every signature: _calling() and _worker() written out inline,
        # without the generator context managers (a few microseconds each).
        loaded = self._loaded
        if loaded is None or self._session is None:
            raise ElementAbsent(f"token {self.token_label!r} is not open")
        lock = None if loaded.thread_safe else loaded.lock
        if lock is not None:
            lock.acquire()
        try:
            try:
                worker = self._idle.pop()  # atomic under the GIL
            except IndexError:
                worker = self._new_worker()
            try:
                calls = loaded.calls
                run = calls.decrypt if decrypt else calls.sign
                return run(worker.session.handle, self._signing_handle(key, calls), mechanism,
                           parameters, data)
            finally:
                self._return_worker(worker)
        except (p11x.PKCS11Error, RuntimeError) as exc:
            raise _element_error(exc) from exc
        finally:
            if lock is not None:
                lock.release()

    def sign(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
             data: bytes) -> bytes:
        return self._single_part(False, key, mechanism, parameters, data)

    def decrypt(self, key: ElementObject, mechanism: int, parameters: MechanismParameters,
                data: bytes) -> bytes:
        return self._single_part(True, key, mechanism, parameters, data)

    def random(self, length: int) -> bytes:
        if length == 0:
            return b""
        with self._calling(), self._worker() as worker:
            return bytes(worker.session.generate_random(length * 8))

    def generate_key(self, pin: str, label: str, key_id: bytes, kind: str,
                     replicate_to: list[tuple[Pkcs11Token, str]] | None = None) -> None:
        """Generate a key pair inside the token: the private half is born sensitive and
        non-extractable and never leaves it in the clear.

        With `replicate_to` ((token, its user PIN) pairs), the key is born extractable but
        sensitive, copied wrapped into each of those tokens (see `_replicate`), then made
        non-extractable here for good (PKCS#11 lets CKA_EXTRACTABLE go only from true to
        false). If any copy fails, every copy and the new key itself are destroyed."""
        from pkcs11.constants import MechanismFlag
        from pkcs11.util.ec import encode_named_curve_parameters

        if kind not in KEY_KINDS:
            raise KeyRefused(f"unknown key kind {kind!r} (known: {', '.join(KEY_KINDS)})")
        key_type, size = KEY_KINDS[kind]
        rsa_key = key_type == KeyType.RSA
        self.open()
        assert self._token is not None
        public_template = {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True,
                           Attribute.ENCRYPT: rsa_key, Attribute.WRAP: False}
        private_template = {Attribute.TOKEN: True, Attribute.PRIVATE: True,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: bool(replicate_to),
                            Attribute.SIGN: True, Attribute.DECRYPT: rsa_key,
                            Attribute.UNWRAP: False, Attribute.DERIVE: False}
        capabilities = MechanismFlag.SIGN | MechanismFlag.VERIFY
        if rsa_key:
            capabilities |= MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
        try:
            with self._token.open(rw=True, user_pin=pin) as session:
                if rsa_key:
                    session.generate_keypair(KeyType.RSA, size, id=key_id, label=label, store=True,
                                             capabilities=capabilities,
                                             public_template=public_template,
                                             private_template=private_template)
                else:
                    public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(size)
                    session.generate_keypair(KeyType.EC, id=key_id, label=label, store=True,
                                             capabilities=capabilities,
                                             public_template=public_template,
                                             private_template=private_template)
                if replicate_to:
                    self._replicate(session, key_id, key_type, replicate_to)
        except p11x.PKCS11Error as exc:
            raise _element_error(exc) from exc

    def _replicate(self, session: pkcs11.Session, key_id: bytes, key_type: KeyType,
                   targets: list[tuple[Pkcs11Token, str]]) -> None:
        """Copy the new key pair `key_id` into each target token without it ever being in
        the clear outside a token: the target makes an RSA transport key pair (session
        objects), this token wraps a fresh AES-256 key-encryption key to it (RSA-OAEP; SHA-1
        is the only OAEP hash SoftHSM2 does), wraps the private key with that key (AES key
        wrap with padding), and the target unwraps both. Then the key here becomes
        non-extractable. On any failure the copies and the new key are destroyed."""
        from pkcs11.constants import DEFAULT, MechanismFlag
        from pkcs11.mechanisms import MGF, Mechanism

        oaep = (Mechanism.SHA_1, MGF.SHA1, None)
        private = session.get_key(ObjectClass.PRIVATE_KEY, id=key_id)
        public = session.get_key(ObjectClass.PUBLIC_KEY, id=key_id)
        copied: list[tuple[pkcs11.Session, bytes]] = []
        sessions: list[pkcs11.Session] = []
        try:
            for target, target_pin in targets:
                target.open()
                assert target._token is not None
                remote = target._token.open(rw=True, user_pin=target_pin)
                sessions.append(remote)
                transport_public, transport_private = remote.generate_keypair(
                    KeyType.RSA, 2048, store=False,
                    capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                    public_template={Attribute.WRAP: True, Attribute.ENCRYPT: False,
                                     Attribute.VERIFY: False},
                    private_template={Attribute.UNWRAP: True, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.DECRYPT: False,
                                      Attribute.SIGN: False})
                transport_here = session.create_object({
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.TOKEN: False, Attribute.WRAP: True,
                    Attribute.MODULUS: transport_public[Attribute.MODULUS],
                    Attribute.PUBLIC_EXPONENT: transport_public[Attribute.PUBLIC_EXPONENT]})
                encryption_key = session.generate_key(
                    KeyType.AES, 256, store=False,
                    capabilities=MechanismFlag.WRAP,
                    template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True,
                              Attribute.WRAP: True, Attribute.ENCRYPT: False,
                              Attribute.DECRYPT: False})
                wrapped_encryption_key = transport_here.wrap_key(
                    encryption_key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=oaep)
                wrapped_private = encryption_key.wrap_key(
                    private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
                encryption_key_there = transport_private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped_encryption_key,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=oaep, store=False,
                    capabilities=MechanismFlag.UNWRAP,
                    template={Attribute.UNWRAP: True, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False})
                rsa_key = key_type == KeyType.RSA
                encryption_key_there.unwrap_key(
                    ObjectClass.PRIVATE_KEY, key_type, wrapped_private,
                    id=key_id, label=private.label, mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    store=True, capabilities=MechanismFlag.SIGN | (
                        MechanismFlag.DECRYPT if rsa_key else MechanismFlag(0)),
                    template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.SIGN: True, Attribute.DECRYPT: rsa_key,
                              Attribute.SIGN_RECOVER: False, Attribute.UNWRAP: False,
                              Attribute.DERIVE: False,
                              # python-pkcs11 adds these from the capabilities; a
                              # private key has none of them.
                              **dict.fromkeys(_PUBLIC_ONLY, DEFAULT)})
                copied.append((remote, key_id))
                shape = ((Attribute.MODULUS, Attribute.PUBLIC_EXPONENT) if rsa_key
                         else (Attribute.EC_PARAMS, Attribute.EC_POINT))
                remote.create_object({
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: key_type,
                    Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.ID: key_id,
                    Attribute.LABEL: public.label, Attribute.VERIFY: True,
                    Attribute.ENCRYPT: rsa_key, Attribute.WRAP: False,
                    **{attribute: public[attribute] for attribute in shape}})
            private[Attribute.EXTRACTABLE] = False
        except (p11x.PKCS11Error, ElementError):
            for remote, copied_id in copied:
                for obj in remote.get_objects({Attribute.ID: copied_id}):
                    obj.destroy()
            for obj in session.get_objects({Attribute.ID: key_id}):
                obj.destroy()
            raise
        finally:
            for remote in sessions:
                remote.close()
