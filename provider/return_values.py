"""The one place where a failure becomes a CK_RV.

Code inside the provider raises `CKRError` when PKCS#11 names the answer directly
(CKR_SESSION_HANDLE_INVALID...). Everything else (a secure element's refusal, a broken
config, a bug) is mapped here by `FAILURES`, first match wins. docs/return-values.md
lists what each CK_RV means for an operator.
"""

from __future__ import annotations

from grid_backend.client.pool import GridUnreachable
from grid_backend.protocol import ElementRefused, SessionUnknown
from grid_backend.secure_element import (
    ElementAbsent,
    ElementFailure,
    InputRefused,
    KeyRefused,
    MechanismRefused,
    NotLoggedIn,
    PinIncorrect,
    PinInvalid,
    PinLocked,
)
from provider.constants import CKR


class CKRError(Exception):
    """A PKCS#11 answer other than CKR_OK, with the reason for the log."""

    def __init__(self, rv: CKR, reason: str = "") -> None:
        super().__init__(reason or rv.name)
        self.rv = rv
        self.reason = reason or rv.name


class ConfigError(Exception):
    """The module configuration is missing, unreadable or invalid. Message names the fix."""


# (failure type, CK_RV, expected?) expected failures are logged without a traceback.
FAILURES: tuple[tuple[type[BaseException], CKR, bool], ...] = (
    (PinIncorrect, CKR.PIN_INCORRECT, True),
    (PinLocked, CKR.PIN_LOCKED, True),
    (PinInvalid, CKR.PIN_LEN_RANGE, True),
    (NotLoggedIn, CKR.USER_NOT_LOGGED_IN, True),
    (MechanismRefused, CKR.MECHANISM_INVALID, True),
    (InputRefused, CKR.DATA_INVALID, True),
    (KeyRefused, CKR.KEY_FUNCTION_NOT_PERMITTED, True),
    (GridUnreachable, CKR.DEVICE_REMOVED, True),  # before ElementAbsent, its parent
    (ElementAbsent, CKR.TOKEN_NOT_PRESENT, True),
    (ElementRefused, CKR.TOKEN_NOT_RECOGNIZED, True),
    (SessionUnknown, CKR.DEVICE_ERROR, True),
    (ElementFailure, CKR.DEVICE_ERROR, True),
    (ConfigError, CKR.GENERAL_ERROR, True),
    (MemoryError, CKR.HOST_MEMORY, False),
    (BaseException, CKR.GENERAL_ERROR, False),
)


# The identity gate's failures (idm/), imported only when one happens: C_Initialize must
# not import idm (it pulls in cryptography) while OpenSSL loads its configuration.
IDENTITY_FAILURES: tuple[tuple[str, str, CKR], ...] = (
    # The module's own check of its VM-Auth-Token, the provider's refusal, the HV key:
    # "this token is not for you" to the application, the reason in the log.
    ("idm.gate", "GateRefused", CKR.TOKEN_NOT_RECOGNIZED),
    # A sealed result that does not verify or open: the data is not trusted, not returned.
    ("idm.gate", "ResultRefused", CKR.DEVICE_ERROR),
    ("idm.idp_client", "IdpUnreachable", CKR.DEVICE_ERROR),
    ("idm.idp_client", "IdpClientError", CKR.TOKEN_NOT_RECOGNIZED),
    ("idm.pkcs11_signer", "SignerError", CKR.TOKEN_NOT_RECOGNIZED),
    ("idm.pkcs11_uri", "UriError", CKR.TOKEN_NOT_RECOGNIZED),
)


def _identity_failure(failure: BaseException) -> CKR | None:
    if not type(failure).__module__.startswith("idm."):
        return None
    import importlib

    for module, name, rv in IDENTITY_FAILURES:
        if isinstance(failure, getattr(importlib.import_module(module), name)):
            return rv
    return None


def classify(failure: BaseException) -> tuple[CKR, str, bool]:
    """CK_RV, a loggable reason and whether the failure was expected."""
    if isinstance(failure, CKRError):
        return failure.rv, failure.reason, True
    identity_rv = _identity_failure(failure)
    if identity_rv is not None:
        return identity_rv, f"{type(failure).__name__}: {failure}", True
    for kind, rv, expected in FAILURES:
        if isinstance(failure, kind):
            text = str(failure)
            reason = f"{type(failure).__name__}: {text}" if text else type(failure).__name__
            return rv, reason, expected
    raise AssertionError("unreachable: BaseException matches everything")
