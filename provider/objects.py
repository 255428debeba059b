"""Token objects as the module shows them: attributes, visibility, templates.

Attributes are kept in their exact PKCS#11 byte encoding, so C_FindObjects compares bytes
and C_GetAttributeValue copies bytes; nothing is converted on the hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

from grid_backend.secure_element import ElementObject
from provider.constants import CK_FALSE, CK_TRUE, CKA, CKK, CKO, CKR
from provider.return_values import CKRError

ULONG: Final = struct.Struct("L")  # CK_ULONG is a native unsigned long
ULONG_ATTRIBUTES: Final = frozenset({CKA.CLASS, CKA.KEY_TYPE, CKA.MODULUS_BITS,
                                     CKA.CERTIFICATE_TYPE, CKA.CERTIFICATE_CATEGORY,
                                     CKA.KEY_GEN_MECHANISM})
BOOL_ATTRIBUTES: Final = frozenset({
    CKA.TOKEN, CKA.PRIVATE, CKA.SENSITIVE, CKA.ENCRYPT, CKA.DECRYPT, CKA.WRAP, CKA.UNWRAP,
    CKA.SIGN, CKA.SIGN_RECOVER, CKA.VERIFY, CKA.VERIFY_RECOVER, CKA.DERIVE, CKA.EXTRACTABLE,
    CKA.LOCAL, CKA.NEVER_EXTRACTABLE, CKA.ALWAYS_SENSITIVE, CKA.MODIFIABLE, CKA.COPYABLE,
    CKA.DESTROYABLE, CKA.TRUSTED, CKA.ALWAYS_AUTHENTICATE,
})
# Secret parts of a private key: their type is valid, their value is never given.
SENSITIVE_ATTRIBUTES: Final = frozenset({
    CKA.VALUE, CKA.PRIVATE_EXPONENT, CKA.PRIME_1, CKA.PRIME_2, CKA.EXPONENT_1,
    CKA.EXPONENT_2, CKA.COEFFICIENT,
})
_LOOKUP_ACROSS: Final = (CKA.MODULUS, CKA.PUBLIC_EXPONENT, CKA.EC_PARAMS, CKA.EC_POINT)


def ulong(value: int) -> bytes:
    return ULONG.pack(value)


Template = list[tuple[int, bytes]]


def normalize_template_value(attribute: int, value: bytes) -> bytes:
    """Check a template value's size against its type; CK_BBOOL is compared as 0/1."""
    if attribute in ULONG_ATTRIBUTES and len(value) != ULONG.size:
        raise CKRError(CKR.ATTRIBUTE_VALUE_INVALID,
                       f"attribute 0x{attribute:x} needs a CK_ULONG ({ULONG.size} bytes)")
    if attribute in BOOL_ATTRIBUTES:
        if len(value) != 1:
            raise CKRError(CKR.ATTRIBUTE_VALUE_INVALID,
                           f"attribute 0x{attribute:x} needs a CK_BBOOL (1 byte)")
        return CK_TRUE if value != CK_FALSE else CK_FALSE
    return value


@dataclass(eq=False)
class TokenObject:
    handle: int
    element_object: ElementObject
    attributes: dict[int, bytes]
    object_class: int
    key_type: int | None
    private: bool
    _public_key: Any = field(default=None, repr=False)

    @property
    def modulus_bits(self) -> int:
        modulus = self.attributes.get(CKA.MODULUS, b"")
        return int.from_bytes(modulus, "big").bit_length()

    def matches(self, template: Template) -> bool:
        attributes = self.attributes
        for attribute, value in template:
            if attributes.get(attribute) != value:
                return False
        return True

    def read(self, attribute: int) -> bytes:
        """The value of one attribute, or the CK_RV that C_GetAttributeValue must give."""
        value = self.attributes.get(attribute)
        if value is not None:
            return value
        if self.object_class == CKO.PRIVATE_KEY and attribute in SENSITIVE_ATTRIBUTES:
            raise CKRError(CKR.ATTRIBUTE_SENSITIVE, "private key values never leave the element")
        raise CKRError(CKR.ATTRIBUTE_TYPE_INVALID, f"no attribute 0x{attribute:x}")

    def public_key(self) -> Any:
        """The cryptography public key, for verifying locally."""
        if self._public_key is None:
            from cryptography.hazmat.primitives.asymmetric import ec, rsa

            from provider.mechanisms import curve_of

            if self.key_type == CKK.RSA:
                n = int.from_bytes(self.attributes.get(CKA.MODULUS, b""), "big")
                e = int.from_bytes(self.attributes.get(CKA.PUBLIC_EXPONENT, b""), "big")
                if not n or not e:
                    raise CKRError(CKR.KEY_FUNCTION_NOT_PERMITTED, "no public part known")
                self._public_key = rsa.RSAPublicNumbers(e, n).public_key()
            elif self.key_type == CKK.EC:
                name, size = curve_of(self.attributes.get(CKA.EC_PARAMS, b""))
                point = ec_point(self.attributes.get(CKA.EC_POINT, b""), size)
                curve = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(),
                         "secp521r1": ec.SECP521R1()}[name]
                self._public_key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            else:
                raise CKRError(CKR.KEY_TYPE_INCONSISTENT, "not an RSA or EC key")
        return self._public_key


def ec_point(value: bytes, field_size: int) -> bytes:
    """CKA_EC_POINT as a bare point; PKCS#11 wraps it in a DER OCTET STRING."""
    bare_length = 1 + 2 * field_size
    if len(value) == bare_length and value[0] == 4:
        return value
    if len(value) >= 2 and value[0] == 0x04:
        if value[1] < 0x80:
            return value[2:2 + value[1]]
        size_of_length = value[1] & 0x7F
        length = int.from_bytes(value[2:2 + size_of_length], "big")
        return value[2 + size_of_length:2 + size_of_length + length]
    raise CKRError(CKR.KEY_FUNCTION_NOT_PERMITTED, "no public point known")


def present(element_object: ElementObject, handle: int) -> TokenObject:
    """Build what the module shows for one element object, with its honest defaults."""
    attributes = dict(element_object.attributes)
    object_class = ULONG.unpack(attributes[CKA.CLASS])[0]
    key_type = (ULONG.unpack(attributes[CKA.KEY_TYPE])[0]
                if CKA.KEY_TYPE in attributes else None)
    attributes.setdefault(CKA.TOKEN, CK_TRUE)
    attributes.setdefault(CKA.PRIVATE, CK_FALSE)
    attributes.setdefault(CKA.LABEL, b"")
    # Nothing can be changed, copied or destroyed through this module.
    attributes[CKA.MODIFIABLE] = CK_FALSE
    attributes[CKA.COPYABLE] = CK_FALSE
    attributes[CKA.DESTROYABLE] = CK_FALSE
    if object_class in (CKO.PRIVATE_KEY, CKO.PUBLIC_KEY):
        attributes.setdefault(CKA.ID, b"")
        attributes.setdefault(CKA.DERIVE, CK_FALSE)
        attributes.setdefault(CKA.LOCAL, CK_FALSE)
    if object_class == CKO.PRIVATE_KEY:
        # The module's promise whatever the element says: private values never leave.
        attributes[CKA.SENSITIVE] = CK_TRUE
        attributes[CKA.EXTRACTABLE] = CK_FALSE
        attributes.setdefault(CKA.ALWAYS_AUTHENTICATE, CK_FALSE)
        attributes.setdefault(CKA.SIGN_RECOVER, CK_FALSE)
        attributes.setdefault(CKA.UNWRAP, CK_FALSE)
    private = attributes[CKA.PRIVATE] == CK_TRUE
    token_object = TokenObject(handle, element_object, attributes, object_class, key_type,
                               private)
    if key_type == CKK.RSA and CKA.MODULUS in attributes:
        attributes.setdefault(CKA.MODULUS_BITS, ulong(token_object.modulus_bits))
    return token_object


def complete_private_keys(objects: list[TokenObject]) -> None:
    """Give private keys the public parts held by their public key or certificate twin.

    Hosts such as libp11 look for CKA_EC_POINT on the private key; SoftHSM2 keeps it on
    the public key only.
    """
    publics = {o.attributes.get(CKA.ID): o for o in objects
               if o.object_class == CKO.PUBLIC_KEY and o.attributes.get(CKA.ID)}
    for o in objects:
        if o.object_class != CKO.PRIVATE_KEY:
            continue
        twin = publics.get(o.attributes.get(CKA.ID))
        if twin is None or twin.key_type != o.key_type:
            continue
        for attribute in _LOOKUP_ACROSS:
            if attribute in twin.attributes and attribute not in o.attributes:
                o.attributes[attribute] = twin.attributes[attribute]
        if o.key_type == CKK.RSA and CKA.MODULUS_BITS not in o.attributes:
            o.attributes[CKA.MODULUS_BITS] = ulong(o.modulus_bits)

