"""Work inside a sandbox's SoftHSM2 token through python-pkcs11 (never through our module).

SoftHSM2 reads SOFTHSM2_CONF once, at C_Initialize, and python-pkcs11 keeps one loaded
instance per library path for the life of a process. So every token operation runs in a
fresh spawned worker whose environment names this sandbox's config: a second sandbox in
the same Python process (a test session, the demo) never lands in the first one's token.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, Literal, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType, KeyType, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

KeyKind = Literal["rsa", "ec"]
T = TypeVar("T")


@dataclass(frozen=True)
class KeySpec:
    """One key the sandbox generates inside the token."""

    label: str
    key_id: bytes
    kind: KeyKind


SANDBOX_KEYS: tuple[KeySpec, ...] = (
    KeySpec("vm-rsa", b"\x01", "rsa"),
    KeySpec("vm-ec", b"\x02", "ec"),
)
RSA_BITS = 2048
EC_CURVE_NAME = "secp256r1"


def _open_token(library: str, token_label: str) -> pkcs11.Token:
    return pkcs11.lib(library).get_token(token_label=token_label)


def _public_key_der(public: pkcs11.PublicKey, kind: KeyKind) -> bytes:
    """SubjectPublicKeyInfo DER of a token public key, rebuilt from its attributes."""
    if kind == "rsa":
        modulus = int.from_bytes(public[Attribute.MODULUS], "big")
        exponent = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
        key: Any = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    else:
        key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), ec_point_octets(public[Attribute.EC_POINT])
        )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ec_point_octets(ec_point: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING (PKCS#11 2.40); some tokens give the raw point."""
    if ec_point[:1] == b"\x04" and len(ec_point) >= 2:
        length = ec_point[1]
        header = 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(ec_point[2 : 2 + size], "big")
            header = 2 + size
        if header + length == len(ec_point):
            return ec_point[header:]
    return ec_point


def generate_keys(library: str, token_label: str, pin: str) -> dict[str, bytes]:
    """Generate the sandbox keys inside the token; return label -> public key (SPKI DER)."""
    token = _open_token(library, token_label)
    publics: dict[str, bytes] = {}
    with token.open(rw=True, user_pin=pin) as session:
        for spec in SANDBOX_KEYS:
            is_rsa = spec.kind == "rsa"
            capabilities = MechanismFlag.SIGN | MechanismFlag.VERIFY
            if is_rsa:
                capabilities |= MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
            public_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: is_rsa,
                Attribute.WRAP: False,
            }
            # The whole point of a secure element: the private half never leaves it.
            private_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: is_rsa,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            if is_rsa:
                public, _private = session.generate_keypair(
                    KeyType.RSA,
                    RSA_BITS,
                    id=spec.key_id,
                    label=spec.label,
                    store=True,
                    capabilities=capabilities,
                    public_template=public_template,
                    private_template=private_template,
                )
            else:
                public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(EC_CURVE_NAME)
                public, _private = session.generate_keypair(
                    KeyType.EC,
                    id=spec.key_id,
                    label=spec.label,
                    store=True,
                    capabilities=capabilities,
                    public_template=public_template,
                    private_template=private_template,
                )
            publics[spec.label] = _public_key_der(public, spec.kind)
    return publics


def der_integer(value: int) -> bytes:
    """DER encoding of an INTEGER, as CKA_SERIAL_NUMBER wants it."""
    length = max(1, (value.bit_length() + 8) // 8)  # room for the sign bit
    body = value.to_bytes(length, "big", signed=True)
    if len(body) < 0x80:
        header = bytes([0x02, len(body)])
    else:
        size = (len(body).bit_length() + 7) // 8
        header = bytes([0x02, 0x80 | size]) + len(body).to_bytes(size, "big")
    return header + body


@dataclass(frozen=True)
class CertificateObject:
    """What a certificate object in the token carries besides its DER value."""

    label: str
    key_id: bytes
    der: bytes
    subject_der: bytes
    issuer_der: bytes
    serial: int


def store_certificates(
    library: str, token_label: str, pin: str, certificates: list[CertificateObject]
) -> None:
    """Store X.509 certificates next to their keys (same CKA_ID and CKA_LABEL)."""
    token = _open_token(library, token_label)
    with token.open(rw=True, user_pin=pin) as session:
        for cert in certificates:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.LABEL: cert.label,
                    Attribute.ID: cert.key_id,
                    Attribute.SUBJECT: cert.subject_der,
                    Attribute.ISSUER: cert.issuer_der,
                    Attribute.SERIAL_NUMBER: der_integer(cert.serial),
                    Attribute.VALUE: cert.der,
                }
            )


# A caller may have sourced some sandbox's env: its OpenSSL config loads an engine on our
# module, which has no business inside the tools that build the token.
FOREIGN_VARIABLES = ("OPENSSL_CONF", "P11GRID_CONF", "SOFTHSM2_CONF")


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FOREIGN_VARIABLES}


def _enter_token_environment(softhsm_conf: str) -> None:
    for name in FOREIGN_VARIABLES:
        os.environ.pop(name, None)
    os.environ["SOFTHSM2_CONF"] = softhsm_conf


class TokenWorker:
    """A spawned process that has this sandbox's SOFTHSM2_CONF before SoftHSM2 loads."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def call(self, function: Callable[..., T], *args: Any) -> T:
        return self._pool.apply(function, args)


@contextmanager
def token_worker(softhsm_conf: Path) -> Iterator[TokenWorker]:
    # spawn, not fork: a forked child would inherit any SoftHSM2 already loaded here.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(1, initializer=_enter_token_environment, initargs=(str(softhsm_conf),))
    try:
        yield TokenWorker(pool)
    finally:
        pool.close()
        pool.join()
