"""Certificate requests signed inside a secure element (PKCS#10, RFC 2986).

`cryptography` signs a request only with a key it holds, and takes the public key from
that signing key; so the CertificationRequestInfo is assembled here from the element's
public key, signed by the element, and handed back to `cryptography` to load and check.
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from idm import der
from idm.identity import Identity


class X509Signer(Protocol):
    """A private key somewhere (a secure element) that signs X.509 structures."""

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey: ...

    def sign_x509(self, tbs: bytes) -> bytes:
        """The signature as X.509 carries it (DER ECDSA-Sig-Value, or PKCS#1 v1.5)."""
        ...


class RequestRefused(Exception):
    """The element's signature over the request did not verify."""


def certificate_request(signer: X509Signer, identity: Identity) -> x509.CertificateSigningRequest:
    """A CSR for `identity` (CN = its name; the CA adds the SANs) signed by `signer`."""
    public_key = signer.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)])
    info = der.sequence(
        der.tlv(0x02, b"\x00"),  # version v1
        subject.public_bytes(),
        public_key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo),
        b"\xa0\x00",  # attributes [0]: none
    )
    request = x509.load_der_x509_csr(
        der.signed(info, der.signature_algorithm(public_key), signer.sign_x509(info)))
    if not request.is_signature_valid:
        raise RequestRefused("the secure element's signature over the certificate request "
                             "does not verify with its own public key")
    return request
