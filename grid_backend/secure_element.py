"""What a secure element is to the rest of p11grid: objects, login, sign, decrypt, random.

Every driver (a PKCS#11 token, a PIV card over APDUs, a remote element behind the grid)
implements `SecureElement`. Drivers raise only the `ElementError` family below; the
provider maps those to CK_RV in one table (provider/return_values.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ElementError(Exception):
    """A secure element refused or failed an operation. The message is safe to log."""


class PinIncorrect(ElementError):
    """The element rejected the PIN."""


class PinLocked(ElementError):
    """The element's PIN is blocked after too many wrong attempts."""


class PinInvalid(ElementError):
    """The PIN is malformed for this element (length, characters)."""


class NotLoggedIn(ElementError):
    """The operation needs a login the element does not have."""


class ElementAbsent(ElementError):
    """The element is not there: token missing, library absent, card removed."""


class ElementFailure(ElementError):
    """The element or its transport failed while it was there."""


class MechanismRefused(ElementError):
    """The element does not do this mechanism or these mechanism parameters."""


class InputRefused(ElementError):
    """The element refused the data: wrong length or not valid for the key."""


class KeyRefused(ElementError):
    """The key cannot be used for this operation."""


@dataclass(frozen=True, slots=True)
class PssParameters:
    """CK_RSA_PKCS_PSS_PARAMS: hash mechanism, MGF and salt length."""

    hash_mechanism: int
    mgf: int
    salt_length: int


@dataclass(frozen=True, slots=True)
class OaepParameters:
    """CK_RSA_PKCS_OAEP_PARAMS with the label (source data) inlined."""

    hash_mechanism: int
    mgf: int
    label: bytes = b""


MechanismParameters = PssParameters | OaepParameters | None


@dataclass(slots=True)
class ElementObject:
    """One object of an element: its attributes as PKCS#11 encodes them.

    `attributes` maps CKA_* to the attribute's exact byte encoding (CK_ULONG in native
    byte order, CK_BBOOL as one byte, byte strings as they are). Sensitive values are
    never read from the element, so they are never here. `ref` is the driver's own
    reference used to name the object in sign/decrypt calls.
    """

    ref: object
    attributes: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ElementInfo:
    """What a token's CK_TOKEN_INFO can honestly say about the element."""

    manufacturer: str
    model: str
    serial: str
    hardware_version: tuple[int, int] = (0, 0)
    firmware_version: tuple[int, int] = (0, 0)
    min_pin_length: int = 4
    max_pin_length: int = 255


class SecureElement(Protocol):
    """A secure element holding keys that never leave it."""

    def open(self) -> None:
        """Reach the element (load the library, connect). Idempotent."""

    def close(self) -> None:
        """Release the element; a later open() starts over."""

    def info(self) -> ElementInfo: ...

    def mechanisms(self) -> frozenset[int]:
        """The CKM_* the element performs itself."""

    def public_objects(self) -> list[ElementObject]:
        """Objects readable without login (public keys, certificates)."""

    def login(self, pin: str) -> None: ...

    def logout(self) -> None: ...

    def private_objects(self) -> list[ElementObject]:
        """Objects visible after login (private keys). Requires login."""

    def sign(
        self, key: ElementObject, mechanism: int, parameters: MechanismParameters, data: bytes
    ) -> bytes: ...

    def decrypt(
        self, key: ElementObject, mechanism: int, parameters: MechanismParameters, data: bytes
    ) -> bytes: ...

    def random(self, length: int) -> bytes: ...
