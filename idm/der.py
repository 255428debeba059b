"""The few DER pieces needed to wrap a signature made outside `cryptography`.

`cryptography` builds certificates and requests only with keys it holds. When the key is
in a secure element, we let it (or these helpers) produce the to-be-signed bytes, have the
element sign them, and assemble `SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING }`
here; the result is then loaded and verified by `cryptography` again.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, rsa

# AlgorithmIdentifier DER (RFC 4055 sha256WithRSAEncryption with NULL parameters;
# RFC 5758 ecdsa-with-SHA256 / -SHA384 without parameters).
SHA256_WITH_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")
ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")
ECDSA_WITH_SHA384 = bytes.fromhex("300a06082a8648ce3d040303")
# The DER DigestInfo prefix of a SHA-256 digest (RFC 8017 section 9.2 note 1), for
# EMSA-PKCS1-v1_5 blocks an element signs with raw RSA or CKM_RSA_PKCS.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def length(size: int) -> bytes:
    if size < 0x80:
        return bytes([size])
    octets = (size.bit_length() + 7) // 8
    return bytes([0x80 | octets]) + size.to_bytes(octets, "big")


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + length(len(value)) + value


def sequence(*items: bytes) -> bytes:
    return tlv(0x30, b"".join(items))


def signature_algorithm(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    """The AlgorithmIdentifier a key signs X.509 structures with here: SHA-256, or SHA-384
    for P-384 (the hash that matches the curve)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return SHA256_WITH_RSA
    if isinstance(public_key.curve, ec.SECP384R1):
        return ECDSA_WITH_SHA384
    return ECDSA_WITH_SHA256


def signed(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """`SEQUENCE { tbs, algorithm, BIT STRING signature }`: a certificate, CRL or CSR."""
    return sequence(tbs, algorithm, tlv(0x03, b"\x00" + signature))
