"""The cffi callbacks behind native/p11grid.c: C arguments in, CK_RV out.

Nothing raises across this boundary: every callback catches everything and turns it into
a CK_RV through provider.return_values, logging the reason once. cffi's own `error=`
value (CKR_GENERAL_ERROR) covers a failure inside that handling itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from grid_backend.secure_element import OaepParameters, PssParameters
from provider.constants import (
    CK_UNAVAILABLE_INFORMATION,
    CKF_OS_LOCKING_OK,
    CKR,
    CKZ_DATA_SPECIFIED,
)
from provider.mechanisms import OFFERED, Scheme
from provider.module import Module, Output
from provider.objects import normalize_template_value
from provider.return_values import CKRError, ConfigError, classify

log = logging.getLogger("p11grid.entry")

ALIVE_MAGIC = 0x70313167  # native/p11grid.c checks this to know Python runs our code
MINIMUM_VERSIONS = {"cryptography": (42,)}


def _check_host_imports() -> None:
    """In a Python host, a dependency may already be imported at a version we cannot use."""
    for name, minimum in MINIMUM_VERSIONS.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        version = getattr(module, "__version__", "0")
        parts = tuple(int(p) for p in version.split(".")[:len(minimum)] if p.isdigit())
        if parts < minimum:
            raise ConfigError(f"the host already imported {name} {version}; p11grid needs "
                              f">= {'.'.join(map(str, minimum))}")


def install(ffi: Any, lib: Any) -> Module:
    """Register every p11grid_py_* callback on `ffi`; returns the module they serve."""
    NULL = ffi.NULL
    module = Module(on_initialized=lambda on: lib.p11grid_native_set_initialized(int(on)),
                    await_readable=lib.p11grid_native_await_readable)

    def served(name: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
        def register(body: Callable[..., int]) -> Callable[..., int]:
            def callback(*args: Any) -> int:
                try:
                    return body(*args)
                except BaseException as failure:
                    rv, reason, expected = classify(failure)
                    try:
                        if expected:
                            log.info("%s -> CKR_%s: %s", name, rv.name, reason)
                        else:
                            log.error("%s -> CKR_%s: %s", name, rv.name, reason,
                                      exc_info=failure)
                    except Exception:
                        pass
                    return int(rv)

            ffi.def_extern(name=f"p11grid_py_{name}", error=int(CKR.GENERAL_ERROR))(callback)
            return body

        return register

    # --- marshalling ----------------------------------------------------------

    def data_in(pointer: Any, length: int) -> bytes:
        if length == 0:
            return b""
        if pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL data pointer with a non-zero length")
        return ffi.buffer(pointer, length)[:]

    def capacity_of(buffer: Any, length_pointer: Any) -> int | None:
        if length_pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL length pointer")
        return None if buffer == NULL else int(length_pointer[0])

    def data_out(out: Output, buffer: Any, length_pointer: Any) -> int:
        if isinstance(out, int):
            length_pointer[0] = out
            return CKR.OK if buffer == NULL else CKR.BUFFER_TOO_SMALL
        ffi.memmove(buffer, out, len(out))
        length_pointer[0] = len(out)
        return CKR.OK

    def padded(field: Any, text: str, size: int) -> None:
        raw = text.encode("utf-8")[:size]
        ffi.memmove(field, raw.ljust(size, b" "), size)

    def mechanism_in(pointer: Any) -> tuple[int, Any]:
        if pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL mechanism")
        mechanism = pointer.mechanism
        row = OFFERED.get(mechanism)
        scheme = row.scheme if row is not None else None
        if scheme == Scheme.PSS:
            p = struct_in(pointer, "CK_RSA_PKCS_PSS_PARAMS")
            return mechanism, PssParameters(p.hashAlg, p.mgf, p.sLen)
        if scheme == Scheme.OAEP:
            p = struct_in(pointer, "CK_RSA_PKCS_OAEP_PARAMS")
            if p.source not in (0, CKZ_DATA_SPECIFIED):
                raise CKRError(CKR.MECHANISM_PARAM_INVALID, "unknown OAEP label source")
            label = data_in(p.pSourceData, p.ulSourceDataLen) if p.source else b""
            return mechanism, OaepParameters(p.hashAlg, p.mgf, label)
        return mechanism, None

    def struct_in(mechanism: Any, ctype: str) -> Any:
        if mechanism.pParameter == NULL or mechanism.ulParameterLen != ffi.sizeof(ctype):
            raise CKRError(CKR.MECHANISM_PARAM_INVALID, f"expected a {ctype} parameter")
        return ffi.cast(ctype + " *", mechanism.pParameter)[0]

    def template_in(pointer: Any, count: int) -> list[tuple[int, bytes]]:
        if count and pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL template with a non-zero count")
        template = []
        for i in range(count):
            attribute = pointer[i]
            value = data_in(attribute.pValue, attribute.ulValueLen)
            template.append((attribute.type, normalize_template_value(attribute.type, value)))
        return template

    def handle_out(pointer: Any, name: str) -> None:
        if pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, f"NULL {name}")

    # --- general purpose ------------------------------------------------------

    @ffi.def_extern(name="p11grid_py_alive", error=0)
    def alive() -> int:
        return ALIVE_MAGIC

    @served("C_Initialize")
    def C_Initialize(pInitArgs: Any) -> int:
        if pInitArgs != NULL:
            args = ffi.cast("CK_C_INITIALIZE_ARGS *", pInitArgs)[0]
            if args.pReserved != NULL:
                raise CKRError(CKR.ARGUMENTS_BAD, "pReserved must be NULL")
            given = [args.CreateMutex != NULL, args.DestroyMutex != NULL,
                     args.LockMutex != NULL, args.UnlockMutex != NULL]
            if any(given) and not all(given):
                raise CKRError(CKR.ARGUMENTS_BAD, "mutex functions must be all given or none")
            if all(given) and not args.flags & CKF_OS_LOCKING_OK:
                # We lock with the operating system's primitives, which the spec allows
                # only when the application says they are fine.
                raise CKRError(CKR.CANT_LOCK, "only OS locking is supported")
        _check_host_imports()
        module.initialize()
        return CKR.OK

    @served("C_Finalize")
    def C_Finalize(pReserved: Any) -> int:
        if pReserved != NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "pReserved must be NULL")
        module.finalize()
        return CKR.OK

    @served("C_GetInfo")
    def C_GetInfo(pInfo: Any) -> int:
        handle_out(pInfo, "CK_INFO")
        info = module.info()
        pInfo.cryptokiVersion.major, pInfo.cryptokiVersion.minor = 2, 40
        padded(pInfo.manufacturerID, info["manufacturer"], 32)
        pInfo.flags = 0
        padded(pInfo.libraryDescription, info["description"], 32)
        pInfo.libraryVersion.major, pInfo.libraryVersion.minor = info["version"]
        return CKR.OK

    # --- slots and tokens -----------------------------------------------------

    def list_out(values: tuple[int, ...] | list[int], buffer: Any, count_pointer: Any) -> int:
        if count_pointer == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL count pointer")
        if buffer == NULL:
            count_pointer[0] = len(values)
            return CKR.OK
        if count_pointer[0] < len(values):
            count_pointer[0] = len(values)
            return CKR.BUFFER_TOO_SMALL
        for i, value in enumerate(values):
            buffer[i] = value
        count_pointer[0] = len(values)
        return CKR.OK

    @served("C_GetSlotList")
    def C_GetSlotList(tokenPresent: int, pSlotList: Any, pulCount: Any) -> int:
        return list_out(module.slot_list(), pSlotList, pulCount)

    @served("C_GetSlotInfo")
    def C_GetSlotInfo(slotID: int, pInfo: Any) -> int:
        info = module.slot_info(slotID)
        handle_out(pInfo, "CK_SLOT_INFO")
        padded(pInfo.slotDescription, info["description"], 64)
        padded(pInfo.manufacturerID, info["manufacturer"], 32)
        pInfo.flags = info["flags"]
        pInfo.hardwareVersion.major = pInfo.hardwareVersion.minor = 0
        pInfo.firmwareVersion.major = pInfo.firmwareVersion.minor = 0
        return CKR.OK

    @served("C_GetTokenInfo")
    def C_GetTokenInfo(slotID: int, pInfo: Any) -> int:
        info = module.token_info(slotID)
        handle_out(pInfo, "CK_TOKEN_INFO")
        padded(pInfo.label, info["label"], 32)
        padded(pInfo.manufacturerID, info["manufacturer"], 32)
        padded(pInfo.model, info["model"], 16)
        padded(pInfo.serialNumber, info["serial"], 16)
        pInfo.flags = info["flags"]
        pInfo.ulMaxSessionCount = pInfo.ulMaxRwSessionCount = 0  # CK_EFFECTIVELY_INFINITE
        pInfo.ulSessionCount = info["sessions"]
        pInfo.ulRwSessionCount = info["rw_sessions"]
        pInfo.ulMaxPinLen, pInfo.ulMinPinLen = 255, 4
        for name in ("ulTotalPublicMemory", "ulFreePublicMemory", "ulTotalPrivateMemory",
                     "ulFreePrivateMemory"):
            setattr(pInfo, name, CK_UNAVAILABLE_INFORMATION)
        pInfo.hardwareVersion.major = pInfo.hardwareVersion.minor = 0
        pInfo.firmwareVersion.major = pInfo.firmwareVersion.minor = 0
        padded(pInfo.utcTime, "", 16)
        return CKR.OK

    @served("C_GetMechanismList")
    def C_GetMechanismList(slotID: int, pMechanismList: Any, pulCount: Any) -> int:
        return list_out(module.mechanism_list(slotID), pMechanismList, pulCount)

    @served("C_GetMechanismInfo")
    def C_GetMechanismInfo(slotID: int, type_: int, pInfo: Any) -> int:
        row = module.mechanism_info(slotID, type_)
        handle_out(pInfo, "CK_MECHANISM_INFO")
        pInfo.ulMinKeySize, pInfo.ulMaxKeySize, pInfo.flags = row.min_bits, row.max_bits, \
            row.flags
        return CKR.OK

    # --- sessions -------------------------------------------------------------

    @served("C_OpenSession")
    def C_OpenSession(slotID: int, flags: int, pApplication: Any, Notify: Any,
                      phSession: Any) -> int:
        handle_out(phSession, "session handle pointer")
        phSession[0] = module.open_session(slotID, flags)
        return CKR.OK

    @served("C_CloseSession")
    def C_CloseSession(hSession: int) -> int:
        module.close_session(hSession)
        return CKR.OK

    @served("C_CloseAllSessions")
    def C_CloseAllSessions(slotID: int) -> int:
        module.close_all_sessions(slotID)
        return CKR.OK

    @served("C_GetSessionInfo")
    def C_GetSessionInfo(hSession: int, pInfo: Any) -> int:
        session = module.session(hSession)
        handle_out(pInfo, "CK_SESSION_INFO")
        pInfo.slotID = session.token.slot_id
        pInfo.state = session.state
        pInfo.flags = session.flags
        pInfo.ulDeviceError = 0
        return CKR.OK

    @served("C_Login")
    def C_Login(hSession: int, userType: int, pPin: Any, ulPinLen: int) -> int:
        pin = None if pPin == NULL else ffi.buffer(pPin, ulPinLen)[:]
        module.login(hSession, userType, pin)
        return CKR.OK

    @served("C_Logout")
    def C_Logout(hSession: int) -> int:
        module.logout(hSession)
        return CKR.OK

    # --- objects --------------------------------------------------------------

    @served("C_GetAttributeValue")
    def C_GetAttributeValue(hSession: int, hObject: int, pTemplate: Any, ulCount: int) -> int:
        session = module.session(hSession)
        obj = module.object(session, hObject)
        if ulCount and pTemplate == NULL:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL template with a non-zero count")
        rv = CKR.OK
        for i in range(ulCount):
            attribute = pTemplate[i]
            try:
                value = obj.read(attribute.type)
            except CKRError as refusal:
                attribute.ulValueLen = CK_UNAVAILABLE_INFORMATION
                rv = refusal.rv
                continue
            if attribute.pValue == NULL:
                attribute.ulValueLen = len(value)
            elif attribute.ulValueLen >= len(value):
                ffi.memmove(attribute.pValue, value, len(value))
                attribute.ulValueLen = len(value)
            else:
                attribute.ulValueLen = CK_UNAVAILABLE_INFORMATION
                rv = CKR.BUFFER_TOO_SMALL
        return rv

    @served("C_FindObjectsInit")
    def C_FindObjectsInit(hSession: int, pTemplate: Any, ulCount: int) -> int:
        module.session(hSession)
        module.find_init(hSession, template_in(pTemplate, ulCount))
        return CKR.OK

    @served("C_FindObjects")
    def C_FindObjects(hSession: int, phObject: Any, ulMaxObjectCount: int,
                      pulObjectCount: Any) -> int:
        if pulObjectCount == NULL or (phObject == NULL and ulMaxObjectCount):
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL object list or count pointer")
        found = module.find(hSession, ulMaxObjectCount)
        for i, handle in enumerate(found):
            phObject[i] = handle
        pulObjectCount[0] = len(found)
        return CKR.OK

    @served("C_FindObjectsFinal")
    def C_FindObjectsFinal(hSession: int) -> int:
        module.find_final(hSession)
        return CKR.OK

    # --- crypto ---------------------------------------------------------------

    @served("C_SignInit")
    def C_SignInit(hSession: int, pMechanism: Any, hKey: int) -> int:
        module.session(hSession)
        mechanism, parameters = mechanism_in(pMechanism)
        module.sign_init(hSession, mechanism, parameters, hKey)
        return CKR.OK

    @served("C_Sign")
    def C_Sign(hSession: int, pData: Any, ulDataLen: int, pSignature: Any,
               pulSignatureLen: Any) -> int:
        capacity = capacity_of(pSignature, pulSignatureLen)
        out = module.sign(hSession, data_in(pData, ulDataLen) if capacity else b"", capacity)
        return data_out(out, pSignature, pulSignatureLen)

    @served("C_SignUpdate")
    def C_SignUpdate(hSession: int, pPart: Any, ulPartLen: int) -> int:
        module.sign_update(hSession, data_in(pPart, ulPartLen))
        return CKR.OK

    @served("C_SignFinal")
    def C_SignFinal(hSession: int, pSignature: Any, pulSignatureLen: Any) -> int:
        out = module.sign_final(hSession, capacity_of(pSignature, pulSignatureLen))
        return data_out(out, pSignature, pulSignatureLen)

    @served("C_VerifyInit")
    def C_VerifyInit(hSession: int, pMechanism: Any, hKey: int) -> int:
        module.session(hSession)
        mechanism, parameters = mechanism_in(pMechanism)
        module.verify_init(hSession, mechanism, parameters, hKey)
        return CKR.OK

    @served("C_Verify")
    def C_Verify(hSession: int, pData: Any, ulDataLen: int, pSignature: Any,
                 ulSignatureLen: int) -> int:
        module.verify(hSession, data_in(pData, ulDataLen), data_in(pSignature, ulSignatureLen))
        return CKR.OK

    @served("C_VerifyUpdate")
    def C_VerifyUpdate(hSession: int, pPart: Any, ulPartLen: int) -> int:
        module.verify_update(hSession, data_in(pPart, ulPartLen))
        return CKR.OK

    @served("C_VerifyFinal")
    def C_VerifyFinal(hSession: int, pSignature: Any, ulSignatureLen: int) -> int:
        module.verify_final(hSession, data_in(pSignature, ulSignatureLen))
        return CKR.OK

    @served("C_DecryptInit")
    def C_DecryptInit(hSession: int, pMechanism: Any, hKey: int) -> int:
        module.session(hSession)
        mechanism, parameters = mechanism_in(pMechanism)
        module.decrypt_init(hSession, mechanism, parameters, hKey)
        return CKR.OK

    @served("C_Decrypt")
    def C_Decrypt(hSession: int, pEncryptedData: Any, ulEncryptedDataLen: int, pData: Any,
                  pulDataLen: Any) -> int:
        capacity = capacity_of(pData, pulDataLen)
        out = module.decrypt(hSession, data_in(pEncryptedData, ulEncryptedDataLen), capacity)
        return data_out(out, pData, pulDataLen)

    @served("C_DigestInit")
    def C_DigestInit(hSession: int, pMechanism: Any) -> int:
        module.session(hSession)
        mechanism, _ = mechanism_in(pMechanism)
        module.digest_init(hSession, mechanism)
        return CKR.OK

    @served("C_Digest")
    def C_Digest(hSession: int, pData: Any, ulDataLen: int, pDigest: Any,
                 pulDigestLen: Any) -> int:
        capacity = capacity_of(pDigest, pulDigestLen)
        out = module.digest(hSession, data_in(pData, ulDataLen) if capacity else b"", capacity)
        return data_out(out, pDigest, pulDigestLen)

    @served("C_DigestUpdate")
    def C_DigestUpdate(hSession: int, pPart: Any, ulPartLen: int) -> int:
        module.digest_update(hSession, data_in(pPart, ulPartLen))
        return CKR.OK

    @served("C_DigestFinal")
    def C_DigestFinal(hSession: int, pDigest: Any, pulDigestLen: Any) -> int:
        out = module.digest_final(hSession, capacity_of(pDigest, pulDigestLen))
        return data_out(out, pDigest, pulDigestLen)

    @served("C_GenerateRandom")
    def C_GenerateRandom(hSession: int, RandomData: Any, ulRandomLen: int) -> int:
        if RandomData == NULL and ulRandomLen:
            raise CKRError(CKR.ARGUMENTS_BAD, "NULL random buffer")
        random = module.generate_random(hSession, ulRandomLen)
        ffi.memmove(RandomData, random, len(random))
        return CKR.OK

    return module
