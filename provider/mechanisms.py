"""The mechanisms the module offers, and how each is built from what an element does.

Each offered mechanism is one row of `OFFERED`. A hash-and-sign mechanism is hashed here
and sent to the element as one prehashed signature, so multi-part signing never costs an
element round trip per part, and an element without the combined mechanism (SoftHSM2 has
no CKM_ECDSA_SHA256; a PIV card does raw RSA only) still serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from provider.constants import (
    CKF_DECRYPT,
    CKF_DIGEST,
    CKF_EC_F_P,
    CKF_EC_NAMEDCURVE,
    CKF_EC_UNCOMPRESS,
    CKF_SIGN,
    CKF_VERIFY,
    CKG,
    CKK,
    CKM,
    CKR,
)
from provider.return_values import CKRError

if TYPE_CHECKING:
    import hashlib


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    mechanism: CKM
    name: str  # hashlib's and cryptography's name
    size: int
    digest_info_prefix: bytes  # DER DigestInfo up to the digest, for PKCS#1 v1.5


HASHES: Final[dict[int, HashAlgorithm]] = {
    h.mechanism: h for h in (
        HashAlgorithm(CKM.SHA_1, "sha1", 20, bytes.fromhex("3021300906052b0e03021a05000414")),
        HashAlgorithm(CKM.SHA224, "sha224", 28,
                      bytes.fromhex("302d300d06096086480165030402040500041c")),
        HashAlgorithm(CKM.SHA256, "sha256", 32,
                      bytes.fromhex("3031300d060960864801650304020105000420")),
        HashAlgorithm(CKM.SHA384, "sha384", 48,
                      bytes.fromhex("3041300d060960864801650304020205000430")),
        HashAlgorithm(CKM.SHA512, "sha512", 64,
                      bytes.fromhex("3051300d060960864801650304020305000440")),
    )
}
HASH_BY_SIZE: Final[dict[int, HashAlgorithm]] = {h.size: h for h in HASHES.values()}
MGF1_HASH: Final[dict[int, int]] = {
    CKG.MGF1_SHA1: CKM.SHA_1, CKG.MGF1_SHA224: CKM.SHA224, CKG.MGF1_SHA256: CKM.SHA256,
    CKG.MGF1_SHA384: CKM.SHA384, CKG.MGF1_SHA512: CKM.SHA512,
}
DIGEST_MECHANISMS: Final = (CKM.SHA256, CKM.SHA384, CKM.SHA512)


def new_hash(mechanism: int) -> hashlib._Hash:
    # hashlib is imported on first use, never while an engine runs C_Initialize.
    import hashlib

    return hashlib.new(HASHES[mechanism].name)


class Scheme:
    PKCS1 = "pkcs1"  # RSA PKCS#1 v1.5 signature
    PSS = "pss"  # RSA-PSS signature
    ECDSA = "ecdsa"
    PKCS1_DECRYPT = "pkcs1-decrypt"
    OAEP = "oaep"
    DIGEST = "digest"


@dataclass(frozen=True, slots=True)
class OfferedMechanism:
    mechanism: CKM
    key_type: CKK | None
    scheme: str
    digest: CKM | None  # hashed in the module before the element signs
    flags: int
    min_bits: int
    max_bits: int


_RSA = (2048, 4096)
_EC = (256, 521)
_EC_FLAGS = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS


def _sign(m: CKM, key_type: CKK, scheme: str, digest: CKM | None) -> OfferedMechanism:
    low, high = _RSA if key_type == CKK.RSA else _EC
    flags = CKF_SIGN | CKF_VERIFY | (_EC_FLAGS if key_type == CKK.EC else 0)
    return OfferedMechanism(m, key_type, scheme, digest, flags, low, high)


OFFERED: Final[dict[int, OfferedMechanism]] = {
    o.mechanism: o for o in (
        _sign(CKM.RSA_PKCS, CKK.RSA, Scheme.PKCS1, None),
        _sign(CKM.SHA256_RSA_PKCS, CKK.RSA, Scheme.PKCS1, CKM.SHA256),
        _sign(CKM.SHA384_RSA_PKCS, CKK.RSA, Scheme.PKCS1, CKM.SHA384),
        _sign(CKM.SHA512_RSA_PKCS, CKK.RSA, Scheme.PKCS1, CKM.SHA512),
        _sign(CKM.RSA_PKCS_PSS, CKK.RSA, Scheme.PSS, None),
        _sign(CKM.SHA256_RSA_PKCS_PSS, CKK.RSA, Scheme.PSS, CKM.SHA256),
        _sign(CKM.SHA384_RSA_PKCS_PSS, CKK.RSA, Scheme.PSS, CKM.SHA384),
        _sign(CKM.SHA512_RSA_PKCS_PSS, CKK.RSA, Scheme.PSS, CKM.SHA512),
        _sign(CKM.ECDSA, CKK.EC, Scheme.ECDSA, None),
        _sign(CKM.ECDSA_SHA256, CKK.EC, Scheme.ECDSA, CKM.SHA256),
        _sign(CKM.ECDSA_SHA384, CKK.EC, Scheme.ECDSA, CKM.SHA384),
        # RSA_PKCS decrypts as well as signs: one row, both flags.
        OfferedMechanism(CKM.RSA_PKCS_OAEP, CKK.RSA, Scheme.OAEP, None, CKF_DECRYPT, *_RSA),
        *(OfferedMechanism(d, None, Scheme.DIGEST, d, CKF_DIGEST, 0, 0)
          for d in DIGEST_MECHANISMS),
    )
}
OFFERED[CKM.RSA_PKCS] = OfferedMechanism(
    CKM.RSA_PKCS, CKK.RSA, Scheme.PKCS1, None, CKF_SIGN | CKF_VERIFY | CKF_DECRYPT, *_RSA)
MECHANISM_LIST: Final = tuple(sorted(OFFERED))


def offered(mechanism: int, purpose: int) -> OfferedMechanism:
    """The row for `mechanism` if it serves `purpose` (a CKF_ flag), else MECHANISM_INVALID."""
    row = OFFERED.get(mechanism)
    if row is None or not row.flags & purpose:
        raise CKRError(CKR.MECHANISM_INVALID, f"mechanism 0x{mechanism:x} is not offered "
                                              "for this operation")
    return row


# Named curves by the DER of their OID in CKA_EC_PARAMS: (name, field size in bytes).
CURVES: Final[dict[bytes, tuple[str, int]]] = {
    bytes.fromhex("06082a8648ce3d030107"): ("secp256r1", 32),
    bytes.fromhex("06052b81040022"): ("secp384r1", 48),
    bytes.fromhex("06052b81040023"): ("secp521r1", 66),
}


def curve_of(ec_params: bytes) -> tuple[str, int]:
    try:
        return CURVES[ec_params]
    except KeyError:
        raise CKRError(CKR.KEY_TYPE_INCONSISTENT, "the key's curve is not supported") from None

