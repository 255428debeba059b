"""One class per PKCS#11 operation. A session holds at most one of each kind.

Signing and decrypting reach the secure element once per operation, with the mechanism
the element can do; everything else (hashing, PSS/OAEP encodings, verifying) is local.
"""

from __future__ import annotations

from typing import Any

from grid_backend.secure_element import (
    InputRefused,
    OaepParameters,
    PssParameters,
    SecureElement,
)
from provider.constants import CK_TRUE, CKA, CKG, CKK, CKM, CKO, CKR
from provider.mechanisms import (
    HASH_BY_SIZE,
    HASHES,
    MGF1_HASH,
    OfferedMechanism,
    Scheme,
    curve_of,
    new_hash,
)
from provider.objects import TokenObject
from provider.padding import emsa_pkcs1_v15, emsa_pss, oaep_decode, pkcs1_v15_decode
from provider.return_values import CKRError

MAX_BUFFERED = 1 << 20  # raw (unhashed) multi-part input is bounded


def _check_key(key: TokenObject, row: OfferedMechanism, classes: tuple[int, ...],
               usage: int) -> None:
    if key.object_class not in classes:
        raise CKRError(CKR.KEY_TYPE_INCONSISTENT, "wrong object class for this operation")
    if row.key_type is not None and key.key_type != row.key_type:
        raise CKRError(CKR.KEY_TYPE_INCONSISTENT, "key type does not fit the mechanism")
    if key.attributes.get(usage, CK_TRUE) != CK_TRUE:
        raise CKRError(CKR.KEY_FUNCTION_NOT_PERMITTED, f"the key does not allow 0x{usage:x}")


def _check_pss(row: OfferedMechanism, parameters: Any) -> PssParameters | None:
    if row.scheme != Scheme.PSS:
        return None
    if not isinstance(parameters, PssParameters):
        raise CKRError(CKR.MECHANISM_PARAM_INVALID, "RSA-PSS needs CK_RSA_PKCS_PSS_PARAMS")
    if parameters.hash_mechanism not in HASHES or parameters.mgf not in MGF1_HASH:
        raise CKRError(CKR.MECHANISM_PARAM_INVALID, "unsupported PSS hash or MGF")
    if row.digest is not None and parameters.hash_mechanism != row.digest:
        raise CKRError(CKR.MECHANISM_PARAM_INVALID, "PSS hashAlg differs from the mechanism")
    return parameters


def signature_length(key: TokenObject) -> int:
    if key.key_type == CKK.RSA:
        return (key.modulus_bits + 7) // 8
    return 2 * curve_of(key.attributes.get(CKA.EC_PARAMS, b""))[1]


class _Accumulating:
    """Input of a multi-part operation: hashed as it comes, or buffered when raw."""

    def __init__(self, digest: int | None) -> None:
        self._hash = new_hash(digest) if digest is not None else None
        self._buffer = bytearray()

    def update(self, part: bytes) -> None:
        if self._hash is not None:
            self._hash.update(part)
        else:
            if len(self._buffer) + len(part) > MAX_BUFFERED:
                raise CKRError(CKR.DATA_LEN_RANGE, "input too long for a raw mechanism")
            self._buffer += part

    def message(self) -> bytes:
        return self._hash.digest() if self._hash is not None else bytes(self._buffer)


class SignOperation:
    def __init__(self, element: SecureElement, mechanisms: frozenset[int], key: TokenObject,
                 row: OfferedMechanism, parameters: Any) -> None:
        _check_key(key, row, (CKO.PRIVATE_KEY,), CKA.SIGN)
        self.element, self.key, self.row = element, key, row
        self.mechanisms = mechanisms  # what the element may be asked for
        self.parameters = _check_pss(row, parameters)
        self.length = signature_length(key)
        self._input = _Accumulating(row.digest)
        self.multi_part = False

    def update(self, part: bytes) -> None:
        self.multi_part = True
        self._input.update(part)

    def final(self) -> bytes:
        message = self._input.message()
        row, key, element = self.row, self.key, self.element
        if row.scheme == Scheme.PKCS1:
            if row.digest is not None:
                message = HASHES[row.digest].digest_info_prefix + message
            if len(message) > self.length - 11:
                raise CKRError(CKR.DATA_LEN_RANGE, "data too long for PKCS#1 v1.5")
            if CKM.RSA_PKCS in self.mechanisms:
                return element.sign(key.element_object, CKM.RSA_PKCS, None, message)
            block = emsa_pkcs1_v15(message, self.length)
            return element.sign(key.element_object, CKM.RSA_X_509, None, block)
        if row.scheme == Scheme.PSS:
            p = self.parameters
            assert p is not None
            if len(message) != HASHES[p.hash_mechanism].size:
                raise CKRError(CKR.DATA_LEN_RANGE, "RSA-PSS signs a hash of hashAlg's size")
            if CKM.RSA_PKCS_PSS in self.mechanisms:
                return element.sign(key.element_object, CKM.RSA_PKCS_PSS, p, message)
            block = emsa_pss(message, key.modulus_bits, p.hash_mechanism, MGF1_HASH[p.mgf],
                             p.salt_length)
            return element.sign(key.element_object, CKM.RSA_X_509, None, block)
        if not message:
            raise CKRError(CKR.DATA_LEN_RANGE, "nothing to sign")
        return element.sign(key.element_object, CKM.ECDSA, None, message)


class VerifyOperation:
    """Verification needs only public values, so it never reaches the element."""

    def __init__(self, key: TokenObject, row: OfferedMechanism, parameters: Any) -> None:
        _check_key(key, row, (CKO.PUBLIC_KEY, CKO.PRIVATE_KEY), CKA.VERIFY)
        self.key, self.row = key, row
        self.parameters = _check_pss(row, parameters)
        self.length = signature_length(key)
        self._public = key.public_key()
        self._input = _Accumulating(row.digest)

    def update(self, part: bytes) -> None:
        self._input.update(part)

    def final(self, signature: bytes) -> None:
        if len(signature) != self.length:
            raise CKRError(CKR.SIGNATURE_LEN_RANGE, f"signature must be {self.length} bytes")
        from cryptography.exceptions import InvalidSignature

        try:
            self._verify(self._input.message(), signature)
        except InvalidSignature:
            raise CKRError(CKR.SIGNATURE_INVALID, "signature does not verify") from None
        except ValueError as exc:  # e.g. a hash of the wrong size for the chosen scheme
            raise CKRError(CKR.SIGNATURE_INVALID, f"signature does not verify: {exc}") from None

    def _verify(self, message: bytes, signature: bytes) -> None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        def prehashed(mechanism: int) -> utils.Prehashed:
            return utils.Prehashed(getattr(hashes, HASHES[mechanism].name.upper())())

        row = self.row
        if row.scheme == Scheme.PKCS1:
            if row.digest is not None:
                self._public.verify(signature, message, padding.PKCS1v15(),
                                    prehashed(row.digest))
                return
            recovered = self._public.recover_data_from_signature(
                signature, padding.PKCS1v15(), None)
            import hmac

            if not hmac.compare_digest(recovered, message):
                raise InvalidSignature()
            return
        if row.scheme == Scheme.PSS:
            p = self.parameters
            assert p is not None
            mgf_hash = getattr(hashes, HASHES[MGF1_HASH[p.mgf]].name.upper())()
            self._public.verify(signature, message,
                                padding.PSS(mgf=padding.MGF1(mgf_hash), salt_length=p.salt_length),
                                prehashed(p.hash_mechanism))
            return
        size = len(signature) // 2
        r = int.from_bytes(signature[:size], "big")
        s = int.from_bytes(signature[size:], "big")
        # Raw ECDSA input: the leftmost field-size bytes, as the integer they spell.
        digest = message[:size].rjust(size, b"\x00")
        hash_algorithm = HASH_BY_SIZE.get(size)
        if hash_algorithm is None:
            raise CKRError(CKR.KEY_TYPE_INCONSISTENT, "curve not supported for verification")
        self._public.verify(utils.encode_dss_signature(r, s), digest,
                            ec.ECDSA(prehashed(hash_algorithm.mechanism)))


def _oaep_in_element(parameters: OaepParameters) -> bool:
    # What every PKCS#11 element does: SHA-1, MGF1-SHA1, no label. The rest is composed.
    return (parameters.hash_mechanism == CKM.SHA_1 and parameters.mgf == CKG.MGF1_SHA1
            and not parameters.label)


class DecryptOperation:
    def __init__(self, element: SecureElement, mechanisms: frozenset[int], key: TokenObject,
                 row: OfferedMechanism, parameters: Any) -> None:
        _check_key(key, row, (CKO.PRIVATE_KEY,), CKA.DECRYPT)
        if row.scheme == Scheme.OAEP:
            if not isinstance(parameters, OaepParameters):
                raise CKRError(CKR.MECHANISM_PARAM_INVALID, "OAEP needs CK_RSA_PKCS_OAEP_PARAMS")
            if parameters.hash_mechanism not in HASHES or parameters.mgf not in MGF1_HASH:
                raise CKRError(CKR.MECHANISM_PARAM_INVALID, "unsupported OAEP hash or MGF")
        self.element, self.key, self.row, self.parameters = element, key, row, parameters
        self.mechanisms = mechanisms
        self.length = signature_length(key)
        self.result: bytes | None = None  # kept between a length query and the real call

    def decrypt(self, ciphertext: bytes) -> bytes:
        if self.result is not None:
            return self.result
        if len(ciphertext) != self.length:
            raise CKRError(CKR.ENCRYPTED_DATA_LEN_RANGE,
                           f"ciphertext must be {self.length} bytes")
        element, eo = self.element, self.key.element_object
        mechanisms = self.mechanisms
        try:
            # Raw RSA plus decoding here is preferred to the element's own padding: one
            # constant-time decoder, and the same CK_RV for a bad block on every element
            # (SoftHSM2 answers CKR_GENERAL_ERROR for a bad OAEP block).
            raw = CKM.RSA_X_509 in mechanisms
            if self.row.scheme == Scheme.PKCS1:
                if raw:
                    block = element.decrypt(eo, CKM.RSA_X_509, None, ciphertext)
                    self.result = pkcs1_v15_decode(block, self.length)
                else:
                    self.result = element.decrypt(eo, CKM.RSA_PKCS, None, ciphertext)
            else:
                p = self.parameters
                if raw:
                    block = element.decrypt(eo, CKM.RSA_X_509, None, ciphertext)
                    self.result = oaep_decode(block, self.length, p.hash_mechanism,
                                              MGF1_HASH[p.mgf], p.label)
                elif _oaep_in_element(p):
                    self.result = element.decrypt(eo, CKM.RSA_PKCS_OAEP, p, ciphertext)
                else:
                    raise CKRError(CKR.MECHANISM_PARAM_INVALID,
                                   "the element does only SHA-1 OAEP without a label")
        except InputRefused:
            raise CKRError(CKR.ENCRYPTED_DATA_INVALID, "the element refused the ciphertext") \
                from None
        return self.result


class DigestOperation:
    def __init__(self, row: OfferedMechanism) -> None:
        assert row.digest is not None
        self._hash = new_hash(row.digest)
        self.length = HASHES[row.digest].size
        self.multi_part = False

    def update(self, part: bytes) -> None:
        self.multi_part = True
        self._hash.update(part)

    def final(self) -> bytes:
        return self._hash.digest()


class FindOperation:
    def __init__(self, handles: list[int]) -> None:
        self._handles = handles
        self._next = 0

    def take(self, count: int) -> list[int]:
        chunk = self._handles[self._next:self._next + count]
        self._next += len(chunk)
        return chunk
