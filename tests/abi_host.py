"""A PKCS#11 host that calls libp11grid.so's C entry points directly (cffi ABI mode).

python-pkcs11 never passes a NULL pointer or calls out of order; this host does. Each
scenario runs in a fresh process (`python tests/abi_host.py SCENARIO`), exits 0 when every
assertion held, and prints what failed otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cffi

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from build import CDEF_TYPES  # noqa: E402  # the same struct layouts the module uses

ffi = cffi.FFI()
ffi.cdef(CDEF_TYPES.split("int p11grid_native_owns_interpreter")[0])
ffi.cdef("""
typedef struct { CK_VERSION version; void *functions[68]; } CK_FUNCTION_LIST;
typedef struct { CK_UTF8CHAR *pInterfaceName; void *pFunctionList; CK_FLAGS flags; } CK_INTERFACE;
typedef struct { CK_VERSION version; void *functions[92]; } CK_FUNCTION_LIST_3_0;
CK_RV C_GetFunctionList(CK_FUNCTION_LIST **);
CK_RV C_GetInterfaceList(CK_INTERFACE *, CK_ULONG *);
CK_RV C_GetInterface(CK_UTF8CHAR *, CK_VERSION *, CK_INTERFACE **, CK_FLAGS);
CK_RV C_Initialize(void *);
CK_RV C_Finalize(void *);
CK_RV C_GetInfo(CK_INFO *);
CK_RV C_GetSlotList(CK_BBOOL, CK_SLOT_ID *, CK_ULONG *);
CK_RV C_GetSlotInfo(CK_SLOT_ID, CK_SLOT_INFO *);
CK_RV C_GetTokenInfo(CK_SLOT_ID, CK_TOKEN_INFO *);
CK_RV C_GetMechanismList(CK_SLOT_ID, CK_MECHANISM_TYPE *, CK_ULONG *);
CK_RV C_GetMechanismInfo(CK_SLOT_ID, CK_MECHANISM_TYPE, CK_MECHANISM_INFO *);
CK_RV C_OpenSession(CK_SLOT_ID, CK_FLAGS, void *, void *, CK_SESSION_HANDLE *);
CK_RV C_CloseSession(CK_SESSION_HANDLE);
CK_RV C_GetSessionInfo(CK_SESSION_HANDLE, CK_SESSION_INFO *);
CK_RV C_Login(CK_SESSION_HANDLE, CK_USER_TYPE, CK_UTF8CHAR *, CK_ULONG);
CK_RV C_Logout(CK_SESSION_HANDLE);
CK_RV C_CreateObject(CK_SESSION_HANDLE, CK_ATTRIBUTE *, CK_ULONG, CK_OBJECT_HANDLE *);
CK_RV C_GetAttributeValue(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ATTRIBUTE *, CK_ULONG);
CK_RV C_FindObjectsInit(CK_SESSION_HANDLE, CK_ATTRIBUTE *, CK_ULONG);
CK_RV C_FindObjects(CK_SESSION_HANDLE, CK_OBJECT_HANDLE *, CK_ULONG, CK_ULONG *);
CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE);
CK_RV C_SignInit(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE);
CK_RV C_Sign(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
CK_RV C_SignUpdate(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
CK_RV C_SignFinal(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG *);
CK_RV C_VerifyInit(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE);
CK_RV C_Verify(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG);
CK_RV C_VerifyFinal(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
CK_RV C_DecryptInit(CK_SESSION_HANDLE, CK_MECHANISM *, CK_OBJECT_HANDLE);
CK_RV C_Decrypt(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
CK_RV C_DigestInit(CK_SESSION_HANDLE, CK_MECHANISM *);
CK_RV C_Digest(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
CK_RV C_DigestUpdate(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
CK_RV C_SeedRandom(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
CK_RV C_GenerateRandom(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG);
CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE);
""")

OK, ARGUMENTS_BAD, GENERAL_ERROR = 0x0, 0x7, 0x5
NOT_INITIALIZED, ALREADY_INITIALIZED = 0x190, 0x191
UNAVAILABLE = (1 << 64) - 1
CKF_SERIAL, CKF_RW = 0x4, 0x2
CKA_CLASS, CKA_LABEL, CKA_MODULUS, CKA_PRIVATE_EXPONENT = 0x0, 0x3, 0x120, 0x123
CKA_SIGN = 0x108
CKO_PUBLIC_KEY, CKO_PRIVATE_KEY = 2, 3
CKM_SHA256_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_ECDSA_SHA256, CKM_SHA256 = 0x40, 0xD, 0x1044, 0x250
CKM_RSA_PKCS_OAEP = 0x9

lib: Any = None  # opened in __main__, so that importing this file loads nothing
failures: list[str] = []


def expect(what: str, got: int, wanted: int) -> None:
    if got != wanted:
        failures.append(f"{what}: got 0x{got:x}, wanted 0x{wanted:x}")


def check(what: str, condition: bool) -> None:
    if not condition:
        failures.append(what)


def ulong(value: int) -> Any:
    return ffi.new("CK_ULONG *", value)


def attribute_template(*pairs: tuple[int, bytes]) -> tuple[Any, list[Any]]:
    template = ffi.new("CK_ATTRIBUTE[]", len(pairs))
    keep = []
    for i, (kind, value) in enumerate(pairs):
        buffer = ffi.new("char[]", value)
        keep.append(buffer)
        template[i].type, template[i].pValue, template[i].ulValueLen = kind, buffer, len(value)
    return template, keep


def ul_bytes(value: int) -> bytes:
    return bytes(ffi.buffer(ffi.new("CK_ULONG *", value)))


def open_session(flags: int = CKF_SERIAL) -> int:
    handle = ffi.new("CK_SESSION_HANDLE *")
    expect("C_OpenSession", lib.C_OpenSession(0, flags, ffi.NULL, ffi.NULL, handle), OK)
    return int(handle[0])


def login(session: int, pin: str | None = None) -> int:
    raw = (pin if pin is not None else os.environ["P11GRID_PIN"]).encode()
    return lib.C_Login(session, 1, ffi.new("char[]", raw), len(raw))


def find(session: int, *pairs: tuple[int, bytes]) -> list[int]:
    template, _keep = attribute_template(*pairs)
    expect("C_FindObjectsInit", lib.C_FindObjectsInit(session, template, len(pairs)), OK)
    handles = ffi.new("CK_OBJECT_HANDLE[16]")
    count = ulong(0)
    expect("C_FindObjects", lib.C_FindObjects(session, handles, 16, count), OK)
    expect("C_FindObjectsFinal", lib.C_FindObjectsFinal(session), OK)
    return [int(handles[i]) for i in range(count[0])]


def private_key(session: int, label: bytes) -> int:
    found = find(session, (CKA_CLASS, ul_bytes(CKO_PRIVATE_KEY)), (CKA_LABEL, label))
    check(f"one private key {label!r}", len(found) == 1)
    return found[0] if found else 0


def mechanism(kind: int, parameter: Any = None) -> Any:
    m = ffi.new("CK_MECHANISM *")
    m.mechanism = kind
    if parameter is not None:
        m.pParameter, m.ulParameterLen = parameter, ffi.sizeof(parameter[0])
    return m


# --- scenarios ----------------------------------------------------------------


def before_initialize() -> None:
    info = ffi.new("CK_INFO *")
    expect("C_GetInfo before init", lib.C_GetInfo(info), NOT_INITIALIZED)
    expect("C_GetSlotList before init", lib.C_GetSlotList(0, ffi.NULL, ulong(0)), NOT_INITIALIZED)
    expect("C_OpenSession before init",
           lib.C_OpenSession(0, CKF_SERIAL, ffi.NULL, ffi.NULL, ffi.new("CK_ULONG *")),
           NOT_INITIALIZED)
    expect("C_Sign before init", lib.C_Sign(1, ffi.NULL, 0, ffi.NULL, ulong(0)), NOT_INITIALIZED)
    expect("C_CreateObject before init", lib.C_CreateObject(1, ffi.NULL, 0, ffi.NULL),
           NOT_INITIALIZED)
    expect("C_Finalize before init", lib.C_Finalize(ffi.NULL), NOT_INITIALIZED)
    functions = ffi.new("CK_FUNCTION_LIST **")
    expect("C_GetFunctionList before init", lib.C_GetFunctionList(functions), OK)


def double_initialize() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    expect("C_Initialize again", lib.C_Initialize(ffi.NULL), ALREADY_INITIALIZED)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)
    expect("C_Finalize again", lib.C_Finalize(ffi.NULL), NOT_INITIALIZED)
    expect("C_GetInfo after finalize", lib.C_GetInfo(ffi.new("CK_INFO *")), NOT_INITIALIZED)
    expect("C_Initialize after finalize", lib.C_Initialize(ffi.NULL), OK)
    session = open_session()
    expect("login after re-initialize", login(session), OK)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def initialize_arguments() -> None:
    args = ffi.new("CK_C_INITIALIZE_ARGS *")
    args.pReserved = ffi.cast("void *", 1)
    expect("pReserved set", lib.C_Initialize(args), ARGUMENTS_BAD)
    args.pReserved = ffi.NULL
    args.LockMutex = ffi.cast("CK_RV (*)(void *)", 1)
    expect("one mutex function only", lib.C_Initialize(args), ARGUMENTS_BAD)
    args.LockMutex = ffi.NULL
    args.flags = 0x2  # CKF_OS_LOCKING_OK
    expect("OS locking", lib.C_Initialize(args), OK)
    expect("C_Finalize(non-NULL)", lib.C_Finalize(ffi.cast("void *", 1)), ARGUMENTS_BAD)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def null_pointers() -> None:
    expect("C_GetFunctionList(NULL)", lib.C_GetFunctionList(ffi.NULL), ARGUMENTS_BAD)
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    expect("C_GetInfo(NULL)", lib.C_GetInfo(ffi.NULL), ARGUMENTS_BAD)
    expect("C_GetSlotList count NULL", lib.C_GetSlotList(0, ffi.NULL, ffi.NULL), ARGUMENTS_BAD)
    expect("C_GetTokenInfo(NULL)", lib.C_GetTokenInfo(0, ffi.NULL), ARGUMENTS_BAD)
    expect("C_OpenSession phSession NULL",
           lib.C_OpenSession(0, CKF_SERIAL, ffi.NULL, ffi.NULL, ffi.NULL), ARGUMENTS_BAD)
    session = open_session()
    expect("C_Login pin NULL", lib.C_Login(session, 1, ffi.NULL, 4), ARGUMENTS_BAD)
    expect("C_Login", login(session), OK)
    expect("C_FindObjectsInit NULL template", lib.C_FindObjectsInit(session, ffi.NULL, 3),
           ARGUMENTS_BAD)
    expect("C_SignInit NULL mechanism", lib.C_SignInit(session, ffi.NULL, 1), ARGUMENTS_BAD)
    key = private_key(session, b"vm-rsa")
    expect("C_SignInit", lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), key), OK)
    expect("C_Sign NULL length", lib.C_Sign(session, ffi.new("char[]", b"x"), 1, ffi.NULL,
                                            ffi.NULL), ARGUMENTS_BAD)
    expect("C_Sign NULL data", lib.C_Sign(session, ffi.NULL, 5, ffi.new("CK_BYTE[512]"),
                                          ulong(512)), ARGUMENTS_BAD)
    expect("C_GenerateRandom NULL", lib.C_GenerateRandom(session, ffi.NULL, 8), ARGUMENTS_BAD)
    expect("C_GetSessionInfo NULL", lib.C_GetSessionInfo(session, ffi.NULL), ARGUMENTS_BAD)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def invalid_handles() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    expect("C_GetSlotInfo(99)", lib.C_GetSlotInfo(99, ffi.new("CK_SLOT_INFO *")), 0x3)
    expect("C_OpenSession(99)",
           lib.C_OpenSession(99, CKF_SERIAL, ffi.NULL, ffi.NULL, ffi.new("CK_ULONG *")), 0x3)
    expect("C_CloseSession(12345)", lib.C_CloseSession(12345), 0xB3)
    expect("C_Login(12345)", login(12345), 0xB3)
    session = open_session()
    expect("C_Login", login(session), OK)
    template, _keep = attribute_template((CKA_LABEL, b"\0" * 32))
    expect("C_GetAttributeValue(bad object)",
           lib.C_GetAttributeValue(session, 99999, template, 1), 0x82)
    expect("C_SignInit(bad key)",
           lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), 99999), 0x60)
    expect("C_CloseSession", lib.C_CloseSession(session), OK)
    expect("C_CloseSession twice", lib.C_CloseSession(session), 0xB3)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def sessions_and_login() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    handle = ffi.new("CK_SESSION_HANDLE *")
    expect("no CKF_SERIAL_SESSION", lib.C_OpenSession(0, 0, ffi.NULL, ffi.NULL, handle), 0xB4)
    ro, rw = open_session(), open_session(CKF_SERIAL | CKF_RW)
    info = ffi.new("CK_SESSION_INFO *")
    expect("C_GetSessionInfo", lib.C_GetSessionInfo(rw, info), OK)
    check("RW public session state", info.state == 2 and info.flags == CKF_SERIAL | CKF_RW)
    check("no private key before login", find(ro, (CKA_CLASS, ul_bytes(CKO_PRIVATE_KEY))) == [])
    check("public keys before login", len(find(ro, (CKA_CLASS, ul_bytes(CKO_PUBLIC_KEY)))) >= 2)
    expect("wrong PIN", login(ro, "000000000000"), 0xA0)
    expect("SO login", lib.C_Login(ro, 0, ffi.new("char[]", b"1234"), 4), 0x103)
    expect("C_Logout before login", lib.C_Logout(ro), 0x101)
    expect("C_Login", login(ro), OK)
    expect("C_Login again (other session)", login(rw), 0x100)
    expect("C_GetSessionInfo", lib.C_GetSessionInfo(ro, info), OK)
    check("RO user session state", info.state == 1)
    key = private_key(ro, b"vm-rsa")
    expect("C_Logout", lib.C_Logout(rw), OK)
    expect("C_Logout again", lib.C_Logout(ro), 0x101)
    check("private key hidden after logout",
          find(ro, (CKA_CLASS, ul_bytes(CKO_PRIVATE_KEY))) == [])
    expect("sign with a hidden key", lib.C_SignInit(ro, mechanism(CKM_SHA256_RSA_PKCS), key),
           0x60)
    expect("C_Login", login(ro), OK)
    check("same handle after login again", private_key(ro, b"vm-rsa") == key)
    expect("close RO", lib.C_CloseSession(ro), OK)
    expect("close RW", lib.C_CloseSession(rw), OK)
    last = open_session()
    check("last session closed means logged out",
          find(last, (CKA_CLASS, ul_bytes(CKO_PRIVATE_KEY))) == [])
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def templates_and_attributes() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    session = open_session()
    expect("C_Login", login(session), OK)
    template, _keep = attribute_template((CKA_CLASS, b"\x03\x00\x00\x00"))
    expect("CK_ULONG of 4 bytes", lib.C_FindObjectsInit(session, template, 1), 0x13)
    template, _keep = attribute_template((CKA_SIGN, b"\x01\x00"))
    expect("CK_BBOOL of 2 bytes", lib.C_FindObjectsInit(session, template, 1), 0x13)
    key = private_key(session, b"vm-rsa")
    query = ffi.new("CK_ATTRIBUTE[4]")
    for i, kind in enumerate((CKA_LABEL, CKA_MODULUS, CKA_PRIVATE_EXPONENT, 0x7FFF0000)):
        query[i].type, query[i].pValue, query[i].ulValueLen = kind, ffi.NULL, 0
    rv = lib.C_GetAttributeValue(session, key, query, 4)
    check(f"size query answers sensitive or invalid (0x{rv:x})", rv in (0x11, 0x12))
    check("label length", query[0].ulValueLen == len(b"vm-rsa"))
    check("modulus length", query[1].ulValueLen == 256)
    check("private exponent unavailable", query[2].ulValueLen == UNAVAILABLE)
    check("unknown attribute unavailable", query[3].ulValueLen == UNAVAILABLE)
    small = ffi.new("char[3]")
    one = ffi.new("CK_ATTRIBUTE *")
    one.type, one.pValue, one.ulValueLen = CKA_LABEL, small, 3
    expect("short buffer", lib.C_GetAttributeValue(session, key, one, 1), 0x150)
    check("short buffer leaves unavailable", one.ulValueLen == UNAVAILABLE)
    big = ffi.new("char[64]")
    one.pValue, one.ulValueLen = big, 64
    expect("full buffer", lib.C_GetAttributeValue(session, key, one, 1), OK)
    check("label value", ffi.buffer(big, one.ulValueLen)[:] == b"vm-rsa")
    one.type, one.pValue, one.ulValueLen = CKA_PRIVATE_EXPONENT, big, 64
    expect("sensitive value", lib.C_GetAttributeValue(session, key, one, 1), 0x11)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def operation_state() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    session = open_session()
    expect("C_Login", login(session), OK)
    key = private_key(session, b"vm-rsa")
    data = ffi.new("char[]", b"hello")
    out = ffi.new("CK_BYTE[512]")
    length = ulong(0)
    expect("C_Sign uninitialized", lib.C_Sign(session, data, 5, out, ulong(512)), 0x91)
    expect("C_SignFinal uninitialized", lib.C_SignFinal(session, out, ulong(512)), 0x91)
    expect("C_FindObjects uninitialized",
           lib.C_FindObjects(session, ffi.new("CK_OBJECT_HANDLE[1]"), 1, length), 0x91)
    expect("C_SignInit", lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), key), OK)
    expect("C_SignInit again", lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), key), 0x90)
    expect("length query", lib.C_Sign(session, data, 5, ffi.NULL, length), OK)
    check("length is 256", length[0] == 256)
    length[0] = 10
    expect("short buffer", lib.C_Sign(session, data, 5, out, length), 0x150)
    check("short buffer says 256", length[0] == 256)
    length[0] = 512
    expect("C_Sign", lib.C_Sign(session, data, 5, out, length), OK)
    check("signature of 256 bytes", length[0] == 256)
    expect("C_Sign after the end", lib.C_Sign(session, data, 5, out, length), 0x91)
    # Multi-part, then a wrong-length verification.
    expect("C_SignInit", lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), key), OK)
    expect("C_SignUpdate", lib.C_SignUpdate(session, data, 5), OK)
    length[0] = 512
    expect("C_SignFinal", lib.C_SignFinal(session, out, length), OK)
    public = find(session, (CKA_CLASS, ul_bytes(CKO_PUBLIC_KEY)), (CKA_LABEL, b"vm-rsa"))[0]
    expect("C_VerifyInit", lib.C_VerifyInit(session, mechanism(CKM_SHA256_RSA_PKCS), public), OK)
    expect("C_Verify", lib.C_Verify(session, data, 5, out, 256), OK)
    expect("C_VerifyInit", lib.C_VerifyInit(session, mechanism(CKM_SHA256_RSA_PKCS), public), OK)
    expect("C_Verify short signature", lib.C_Verify(session, data, 5, out, 100), 0xC1)
    expect("C_VerifyFinal uninitialized", lib.C_VerifyFinal(session, out, 256), 0x91)
    # Mechanisms and their parameters.
    expect("PSS without parameters", lib.C_SignInit(session, mechanism(CKM_RSA_PKCS_PSS), key),
           0x71)
    expect("OAEP without parameters",
           lib.C_DecryptInit(session, mechanism(CKM_RSA_PKCS_OAEP), key), 0x71)
    expect("digest mechanism for signing", lib.C_SignInit(session, mechanism(CKM_SHA256), key),
           0x70)
    ec_key = private_key(session, b"vm-ec")
    expect("RSA mechanism on an EC key",
           lib.C_SignInit(session, mechanism(CKM_SHA256_RSA_PKCS), ec_key), 0x63)
    expect("C_SignInit ECDSA", lib.C_SignInit(session, mechanism(CKM_ECDSA_SHA256), ec_key), OK)
    expect("length query", lib.C_Sign(session, data, 5, ffi.NULL, length), OK)
    check("ECDSA P-256 length is 64", length[0] == 64)
    length[0] = 64
    expect("C_Sign ECDSA", lib.C_Sign(session, data, 5, out, length), OK)
    expect("C_DigestInit", lib.C_DigestInit(session, mechanism(CKM_SHA256)), OK)
    expect("C_DigestInit again", lib.C_DigestInit(session, mechanism(CKM_SHA256)), 0x90)
    expect("C_DigestUpdate", lib.C_DigestUpdate(session, data, 5), OK)
    length[0] = 64
    expect("C_Digest after an update", lib.C_Digest(session, data, 5, out, length), 0x90)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def refused_functions() -> None:
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    session = open_session()
    expect("C_CreateObject", lib.C_CreateObject(session, ffi.NULL, 0, ffi.NULL), 0x54)
    expect("C_SeedRandom", lib.C_SeedRandom(session, ffi.new("char[]", b"x"), 1), 0x120)
    expect("C_GetFunctionStatus", lib.C_GetFunctionStatus(session), 0x51)
    expect("C_GetMechanismInfo(unknown)",
           lib.C_GetMechanismInfo(0, 0x4, ffi.new("CK_MECHANISM_INFO *")), 0x70)
    count = ulong(0)
    expect("C_GetMechanismList", lib.C_GetMechanismList(0, ffi.NULL, count), OK)
    check("at least 14 mechanisms", count[0] >= 14)
    small = ulong(1)
    expect("mechanism list too small",
           lib.C_GetMechanismList(0, ffi.new("CK_MECHANISM_TYPE[1]"), small), 0x150)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def interfaces() -> None:
    functions = ffi.new("CK_FUNCTION_LIST **")
    expect("C_GetFunctionList", lib.C_GetFunctionList(functions), OK)
    check("2.40 list", (functions[0].version.major, functions[0].version.minor) == (2, 40))
    check("68 entry points", all(functions[0].functions[i] != ffi.NULL for i in range(68)))
    count = ulong(0)
    expect("C_GetInterfaceList count", lib.C_GetInterfaceList(ffi.NULL, count), OK)
    check("two interfaces", count[0] == 2)
    listed = ffi.new("CK_INTERFACE[2]")
    expect("C_GetInterfaceList", lib.C_GetInterfaceList(listed, count), OK)
    check("named PKCS 11", all(ffi.string(listed[i].pInterfaceName) == b"PKCS 11"
                               for i in range(2)))
    interface = ffi.new("CK_INTERFACE **")
    version = ffi.new("CK_VERSION *")
    version.major, version.minor = 3, 0
    expect("C_GetInterface 3.0", lib.C_GetInterface(ffi.new("char[]", b"PKCS 11"), version,
                                                    interface, 0), OK)
    list_3_0 = ffi.cast("CK_FUNCTION_LIST_3_0 *", interface[0].pFunctionList)
    check("3.0 list", (list_3_0.version.major, list_3_0.version.minor) == (3, 0))
    check("92 entry points", all(list_3_0.functions[i] != ffi.NULL for i in range(92)))
    expect("C_GetInterface default", lib.C_GetInterface(ffi.NULL, ffi.NULL, interface, 0), OK)
    expect("C_GetInterface unknown name",
           lib.C_GetInterface(ffi.new("char[]", b"Vendor"), ffi.NULL, interface, 0), 0x7)
    # A 3.0-only function through the 3.0 list: refused, not crashing.
    login_user = ffi.cast("CK_RV (*)(CK_ULONG, CK_ULONG, void *, CK_ULONG, void *, CK_ULONG)",
                          list_3_0.functions[68 + 2])
    expect("C_LoginUser before init", login_user(1, 1, ffi.NULL, 0, ffi.NULL, 0), NOT_INITIALIZED)
    initialize = ffi.cast("CK_RV (*)(void *)", list_3_0.functions[0])
    expect("C_Initialize via 3.0 list", initialize(ffi.NULL), OK)
    expect("C_LoginUser", login_user(1, 1, ffi.NULL, 0, ffi.NULL, 0), 0x54)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def broken_config() -> None:
    """P11GRID_CONF points at a broken file: a clear refusal, and recovery once fixed."""
    path = Path(os.environ["BROKEN_CONF"])
    good = Path(os.environ["P11GRID_CONF"]).read_text()
    os.environ["P11GRID_CONF"] = str(path)
    for text in ("[module\nbackend=", "[module]\nbackend = \"cloud\"\n",
                 good.replace("[module]", "[module]\ncolour = \"blue\"")):
        path.write_text(text)
        expect(f"C_Initialize with {text[:20]!r}", lib.C_Initialize(ffi.NULL), GENERAL_ERROR)
        expect("still not initialized", lib.C_GetInfo(ffi.new("CK_INFO *")), NOT_INITIALIZED)
    path.unlink()
    expect("C_Initialize without the file", lib.C_Initialize(ffi.NULL), GENERAL_ERROR)
    os.environ["P11GRID_CONF"] = "relative/p11grid.toml"
    expect("C_Initialize with a relative path", lib.C_Initialize(ffi.NULL), GENERAL_ERROR)
    path.write_text(good)
    os.environ["P11GRID_CONF"] = str(path)
    expect("C_Initialize once fixed", lib.C_Initialize(ffi.NULL), OK)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def fork_child() -> None:
    """A forked child starts uninitialized, initializes on its own and signs; so does the parent."""
    expect("C_Initialize", lib.C_Initialize(ffi.NULL), OK)
    session = open_session()
    expect("C_Login", login(session), OK)
    key = private_key(session, b"vm-ec")

    def sign(s: int, k: int) -> int:
        out, length = ffi.new("CK_BYTE[128]"), ulong(128)
        rv = lib.C_SignInit(s, mechanism(CKM_ECDSA_SHA256), k)
        return rv or lib.C_Sign(s, ffi.new("char[]", b"abc"), 3, out, length)

    expect("parent signs", sign(session, key), OK)
    pid = os.fork()
    if pid == 0:
        codes = [lib.C_GetInfo(ffi.new("CK_INFO *")), sign(session, key),
                 lib.C_Initialize(ffi.NULL)]
        child = open_session()
        codes += [login(child), sign(child, private_key(child, b"vm-ec")),
                  lib.C_CloseSession(session), lib.C_Finalize(ffi.NULL)]
        wanted = [NOT_INITIALIZED, NOT_INITIALIZED, OK, OK, OK, 0xB3, OK]
        os._exit(0 if codes == wanted and not failures else 1)
    _, status = os.waitpid(pid, 0)
    check("child behaved", os.waitstatus_to_exitcode(status) == 0)
    expect("parent still signs", sign(session, key), OK)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


def old_dependency_in_host() -> None:
    """A Python host that already imported a cryptography we cannot use.

    A fake: sys.modules gets a stand-in module with an old version, because installing
    an old cryptography next to the real one is not something a test can do cleanly.
    """
    import types

    fake = types.ModuleType("cryptography")
    fake.__version__ = "3.4.8"  # type: ignore[attr-defined]
    real = sys.modules.get("cryptography")
    sys.modules["cryptography"] = fake
    expect("C_Initialize with an old cryptography", lib.C_Initialize(ffi.NULL), GENERAL_ERROR)
    if real is not None:
        sys.modules["cryptography"] = real
    else:
        del sys.modules["cryptography"]
    expect("C_Initialize once it is gone", lib.C_Initialize(ffi.NULL), OK)
    expect("C_Finalize", lib.C_Finalize(ffi.NULL), OK)


SCENARIOS: dict[str, Callable[[], None]] = {f.__name__: f for f in (
    before_initialize, double_initialize, initialize_arguments, null_pointers,
    invalid_handles, sessions_and_login, templates_and_attributes, operation_state,
    refused_functions, interfaces, broken_config, fork_child, old_dependency_in_host)}


if __name__ == "__main__":
    lib = ffi.dlopen(os.environ["P11GRID_MODULE"])
    SCENARIOS[sys.argv[1]]()
    for failure in failures:
        print(f"FAILED: {failure}")
    sys.exit(1 if failures else 0)
