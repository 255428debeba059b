"""The result container: an operation's result, encrypted to the HV key and signed by a
trusted authority (DESIGN.md section 4).

The grid service packs; the PKCS#11 module unpacks. Both private-key operations are
pluggable (`Signer`, `Unwrapper`) because the keys live in secure elements; the
`Software*` classes hold a key object in memory, for keys kept in files and for tests.

Format, version 1 (all integers big-endian, no padding between fields):

    offset  size  field
    0       4     magic  b"P11C"
    4       1     version  0x01
    5       1     header algorithm id  1 = rsa-oaep-sha256 (MGF1-SHA256, empty label)
                                       2 = rsa-pkcs1v15 (compatibility mode only)
                                       3 = rsa-oaep-sha1 (MGF1-SHA1, empty label: for HV
                                           elements whose OAEP is SHA-1 only, as SoftHSM2's)
    6       2     H = header length, 256..1024 (RSA 2048..8192 bits)
    8       H     header: a fresh 32-byte AES-256 key, encrypted to the HV public key
    8+H     16    IV, random
    24+H    4     B = body length, a multiple of 16, 16..MAX_RESULT_LEN + 16
    28+H    B     body: the result under AES-256-CBC with PKCS#7 padding
    28+H+B  1     trailer algorithm id  1 = ecdsa-p256-sha256 (DER Ecdsa-Sig-Value)
                                        2 = rsa-pss-sha256 (MGF1-SHA256, salt 32 bytes)
    29+H+B  2     S = signature length (ECDSA 8..72, RSA-PSS 256..1024)
    31+H+B  S     signature, over the signed input below
    end           nothing may follow

Signed input = SIGNED_LABEL || u16 len(context) || context || container[0 : 29+H+B],
i.e. everything up to and including the trailer algorithm id. Covering the version and
both algorithm ids means nobody can relabel a header as PKCS#1 v1.5 (a downgrade to the
padding that has oracles) or swap the trailer scheme without breaking the signature.
`context` (1..MAX_CONTEXT_LEN bytes, e.g. request id + operation + session identity) is
not transmitted: both ends derive it, so a container cannot be replayed for another
request. The label keeps a container signature from meaning anything in another
protocol the authority key signs for.

Unpacking parses strictly, verifies the signature before any decryption (so no padding
or unwrap oracle is reachable with forged input), and only then unwraps and decrypts.
Every failure is `ContainerRefused(reason)`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HeaderAlgorithm = Literal["rsa-oaep-sha256", "rsa-pkcs1v15", "rsa-oaep-sha1"]
TrailerAlgorithm = Literal["ecdsa-p256-sha256", "rsa-pss-sha256"]
AuthorityPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
AuthorityPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MAGIC: Final = b"P11C"
VERSION: Final = 1
SIGNED_LABEL: Final = b"p11grid result container\x00"

MAX_RESULT_LEN: Final = 1 << 20  # results are signatures, plaintexts, values: 1 MiB is ample
MAX_BODY_LEN: Final = MAX_RESULT_LEN + 16  # PKCS#7 always adds 1..16 bytes
MAX_CONTEXT_LEN: Final = 4096
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
HEADER_LEN_RANGE: Final = (MIN_RSA_BITS // 8, MAX_RSA_BITS // 8)
AES_KEY_LEN: Final = 32
IV_LEN: Final = 16
BLOCK_LEN: Final = 16

_HEADER_IDS: Final[dict[str, int]] = {"rsa-oaep-sha256": 1, "rsa-pkcs1v15": 2,
                                      "rsa-oaep-sha1": 3}
_HEADER_NAMES: Final = {v: k for k, v in _HEADER_IDS.items()}
_TRAILER_IDS: Final[dict[str, int]] = {"ecdsa-p256-sha256": 1, "rsa-pss-sha256": 2}
_TRAILER_NAMES: Final = {v: k for k, v in _TRAILER_IDS.items()}
# An ECDSA P-256 DER signature is 8 bytes at the very least (tiny r and s), 72 at most.
_SIGNATURE_LEN_RANGE: Final[dict[str, tuple[int, int]]] = {
    "ecdsa-p256-sha256": (8, 72),
    "rsa-pss-sha256": HEADER_LEN_RANGE,
}


class ContainerRefused(Exception):
    """The container is not accepted; `reason` says why (never which padding byte)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Signer(Protocol):
    """The authority's signing key: in a file now, in a secure element later.

    `sign` returns a DER Ecdsa-Sig-Value for ECDSA (an element answering raw r||s, as
    PKCS#11 CKM_ECDSA does, must convert), or the RSA-PSS signature for RSA-PSS.
    """

    @property
    def algorithm(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class Unwrapper(Protocol):
    """The HV key's RSA private operation; raises anything on failure."""

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes: ...


def _pss() -> asym_padding.PSS:
    # Salt = digest length, the choice most secure elements make; verification insists.
    return asym_padding.PSS(mgf=asym_padding.MGF1(hashes.SHA256()),
                            salt_length=asym_padding.PSS.DIGEST_LENGTH)


def _header_padding(header_algorithm: str) -> asym_padding.AsymmetricPadding:
    if header_algorithm == "rsa-oaep-sha256":
        return asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()),
                                 algorithm=hashes.SHA256(), label=None)
    if header_algorithm == "rsa-oaep-sha1":
        return asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA1()),
                                 algorithm=hashes.SHA1(), label=None)
    if header_algorithm == "rsa-pkcs1v15":
        return asym_padding.PKCS1v15()
    raise ValueError(f"unknown header algorithm {header_algorithm!r}")


def _check_rsa_size(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, what: str) -> None:
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ValueError(f"{what} is {key.key_size} bits, want {MIN_RSA_BITS}..{MAX_RSA_BITS}")


def _trailer_algorithm_for(key: AuthorityPublicKey) -> str | None:
    """The one trailer algorithm this authority key may be used with, or None."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ecdsa-p256-sha256" if isinstance(key.curve, ec.SECP256R1) else None
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa-pss-sha256" if MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS else None
    return None


def _is_canonical_ecdsa_der(signature: bytes) -> bool:
    # Re-encoding must give the same bytes: no BER leniency, one encoding per (r, s).
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        return False
    return r > 0 and s > 0 and encode_dss_signature(r, s) == signature


def _signed_input(context: bytes, signed_prefix: bytes) -> bytes:
    return SIGNED_LABEL + struct.pack(">H", len(context)) + context + signed_prefix


class SoftwareAuthority:
    """A `Signer` over a private key in memory (the grid authority's key file)."""

    def __init__(self, private_key: AuthorityPrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ValueError(f"authority EC key is on {private_key.curve.name}, want P-256")
            self._algorithm: TrailerAlgorithm = "ecdsa-p256-sha256"
        elif isinstance(private_key, rsa.RSAPrivateKey):
            _check_rsa_size(private_key, "authority RSA key")
            self._algorithm = "rsa-pss-sha256"
        else:
            raise TypeError("authority key must be EC P-256 or RSA")
        self._key = private_key

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
        return self._key.sign(data, _pss(), hashes.SHA256())


class SoftwareUnwrapper:
    """An `Unwrapper` over an RSA private key in memory (files and tests)."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        _check_rsa_size(private_key, "HV RSA key")
        self._key = private_key

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes:
        return self._key.decrypt(wrapped_key, _header_padding(header_algorithm))


def pack(result: bytes, hv_public_key: rsa.RSAPublicKey, authority: Signer, context: bytes,
         header_algorithm: HeaderAlgorithm = "rsa-oaep-sha256") -> bytes:
    """Encrypt `result` to `hv_public_key` and sign it, bound to `context`.

    Bad arguments (and a signer that answers nonsense) raise ValueError: the caller is at
    fault, not the peer, and no malformed container is ever emitted.
    """
    if header_algorithm not in _HEADER_IDS:
        raise ValueError(f"unknown header algorithm {header_algorithm!r}")
    if authority.algorithm not in _TRAILER_IDS:
        raise ValueError(f"unknown trailer algorithm {authority.algorithm!r}")
    if not isinstance(hv_public_key, rsa.RSAPublicKey):
        raise TypeError("the HV public key must be RSA")
    _check_rsa_size(hv_public_key, "HV RSA key")
    if len(result) > MAX_RESULT_LEN:
        raise ValueError(f"result is {len(result)} bytes, at most {MAX_RESULT_LEN}")
    if not 1 <= len(context) <= MAX_CONTEXT_LEN:
        raise ValueError(f"context is {len(context)} bytes, want 1..{MAX_CONTEXT_LEN}")

    key = os.urandom(AES_KEY_LEN)
    iv = os.urandom(IV_LEN)
    header = hv_public_key.encrypt(key, _header_padding(header_algorithm))
    padder = padding.PKCS7(BLOCK_LEN * 8).padder()
    padded = padder.update(result) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = encryptor.update(padded) + encryptor.finalize()

    prefix = b"".join((
        MAGIC, bytes((VERSION, _HEADER_IDS[header_algorithm])),
        struct.pack(">H", len(header)), header, iv,
        struct.pack(">I", len(body)), body,
        bytes((_TRAILER_IDS[authority.algorithm],)),
    ))
    signature = authority.sign(_signed_input(context, prefix))
    low, high = _SIGNATURE_LEN_RANGE[authority.algorithm]
    if not low <= len(signature) <= high:
        raise ValueError(f"signer returned {len(signature)} bytes, want {low}..{high}")
    if authority.algorithm == "ecdsa-p256-sha256" and not _is_canonical_ecdsa_der(signature):
        raise ValueError("signer returned an ECDSA signature that is not canonical DER")
    return prefix + struct.pack(">H", len(signature)) + signature


@dataclass(frozen=True)
class _Parsed:
    header_algorithm: str
    header: bytes
    iv: bytes
    body: bytes
    trailer_algorithm: str
    signed_prefix: bytes
    signature: bytes


class _Reader:
    """Walks the container; any shortfall is a refusal naming the field."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.offset = 0

    def take(self, n: int, field: str) -> bytes:
        if len(self._data) - self.offset < n:
            raise ContainerRefused(f"truncated: {field}")
        chunk = self._data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")


def _parse(container: bytes) -> _Parsed:
    reader = _Reader(container)
    if reader.take(len(MAGIC), "magic") != MAGIC:
        raise ContainerRefused("not a result container (bad magic)")
    version = reader.uint(1, "version")
    if version != VERSION:
        raise ContainerRefused(f"unsupported version {version}")
    header_id = reader.uint(1, "header algorithm")
    if header_id not in _HEADER_NAMES:
        raise ContainerRefused(f"unknown header algorithm id {header_id}")
    header_len = reader.uint(2, "header length")
    if not HEADER_LEN_RANGE[0] <= header_len <= HEADER_LEN_RANGE[1]:
        raise ContainerRefused(f"header length {header_len} outside "
                               f"{HEADER_LEN_RANGE[0]}..{HEADER_LEN_RANGE[1]}")
    header = reader.take(header_len, "header")
    iv = reader.take(IV_LEN, "IV")
    body_len = reader.uint(4, "body length")
    if body_len == 0 or body_len % BLOCK_LEN or body_len > MAX_BODY_LEN:
        raise ContainerRefused(f"body length {body_len} is not a multiple of {BLOCK_LEN} "
                               f"in {BLOCK_LEN}..{MAX_BODY_LEN}")
    body = reader.take(body_len, "body")
    trailer_id = reader.uint(1, "trailer algorithm")
    if trailer_id not in _TRAILER_NAMES:
        raise ContainerRefused(f"unknown trailer algorithm id {trailer_id}")
    trailer_algorithm = _TRAILER_NAMES[trailer_id]
    signed_end = reader.offset
    signature_len = reader.uint(2, "signature length")
    low, high = _SIGNATURE_LEN_RANGE[trailer_algorithm]
    if not low <= signature_len <= high:
        raise ContainerRefused(f"signature length {signature_len} outside {low}..{high} "
                               f"for {trailer_algorithm}")
    signature = reader.take(signature_len, "signature")
    if reader.offset != len(container):
        raise ContainerRefused(f"{len(container) - reader.offset} trailing bytes")
    if trailer_algorithm == "ecdsa-p256-sha256" and not _is_canonical_ecdsa_der(signature):
        raise ContainerRefused("signature is not canonical DER")
    return _Parsed(_HEADER_NAMES[header_id], header, iv, body, trailer_algorithm,
                   container[:signed_end], signature)


def _verify(parsed: _Parsed, authority_public_key: AuthorityPublicKey, context: bytes) -> None:
    expected = _trailer_algorithm_for(authority_public_key)
    if expected is None:
        raise ContainerRefused("authority key is neither EC P-256 nor RSA 2048..8192")
    if parsed.trailer_algorithm != expected:
        raise ContainerRefused(f"trailer algorithm {parsed.trailer_algorithm} does not match "
                               f"the authority key ({expected})")
    data = _signed_input(context, parsed.signed_prefix)
    try:
        if isinstance(authority_public_key, ec.EllipticCurvePublicKey):
            authority_public_key.verify(parsed.signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            authority_public_key.verify(parsed.signature, data, _pss(), hashes.SHA256())
    except InvalidSignature:
        raise ContainerRefused("signature does not verify") from None


def unpack(container: bytes, hv: Unwrapper, authority_public_key: AuthorityPublicKey,
           context: bytes, allow_pkcs1v15: bool = False) -> bytes:
    """The result inside `container`, or ContainerRefused.

    Order matters: strict parse, then the signature (nothing is decrypted for a container
    the authority did not sign for this context), then the header policy, then the key.
    """
    if not 1 <= len(context) <= MAX_CONTEXT_LEN:
        raise ContainerRefused(f"context is {len(context)} bytes, want 1..{MAX_CONTEXT_LEN}")
    parsed = _parse(container)
    _verify(parsed, authority_public_key, context)
    if parsed.header_algorithm == "rsa-pkcs1v15" and not allow_pkcs1v15:
        raise ContainerRefused("PKCS#1 v1.5 header refused: compatibility mode not enabled")

    try:
        key = hv.decrypt(parsed.header_algorithm, parsed.header)
    except Exception as exc:  # an element fails in its own ways; the reason stays generic
        raise ContainerRefused("HV key could not unwrap the header") from exc
    if len(key) != AES_KEY_LEN:
        raise ContainerRefused(f"unwrapped key is {len(key)} bytes, want {AES_KEY_LEN}")

    decryptor = Cipher(algorithms.AES(key), modes.CBC(parsed.iv)).decryptor()
    padded = decryptor.update(parsed.body) + decryptor.finalize()
    # cryptography checks the last block's PKCS#7 padding in constant time (Rust, masked
    # compares) and fails with one message whatever byte is wrong. What stays variable in
    # Python is only success vs failure, and the signature already rules out forged input.
    unpadder = padding.PKCS7(BLOCK_LEN * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ContainerRefused("body padding is invalid") from None


def result_context(authorization: str, operation: str, data: bytes) -> bytes:
    """What a grid result container is bound to (both ends compute it the same way): the
    authorization it was made under, the operation, and a digest of that request's input,
    so that a container cannot answer another request."""
    import hashlib

    return b"|".join([b"p11grid-result", authorization.encode(), operation.encode(),
                      hashlib.sha256(data).digest()])
