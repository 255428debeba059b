"""Does a certificate chain reach the IAM root, unrevoked, and whom does it name?

Path building and signature, validity and extension checks are cryptography's X.509
verification (`cryptography.x509.verification`, RFC 5280 with the web PKI's profile);
revocation is checked here against the root's CRL, which that API does not read. The
checks that have their own reason (expired, not yet valid, revoked, another trust domain)
are made first, so that the refusal says which one failed.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from idm.authority import AuthorityError, trust_domain_of
from idm.identity import Identity, IdentityError, identity_of


class ChainRefused(Exception):
    """The chain does not prove an identity; the message says which check failed."""


@dataclass(frozen=True)
class TrustAnchor:
    """The IAM root and its revocation list."""

    root: x509.Certificate
    crl: x509.CertificateRevocationList | None
    trust_domain: str

    @classmethod
    def load(cls, root_pem: Path, crl_pem: Path | None = None) -> TrustAnchor:
        root = x509.load_pem_x509_certificate(root_pem.read_bytes())
        crl = x509.load_pem_x509_crl(crl_pem.read_bytes()) if crl_pem is not None else None
        try:
            domain = trust_domain_of(root)
        except AuthorityError as exc:
            raise ChainRefused(str(exc)) from None
        return cls(root, crl, domain)


def _describe(certificate: x509.Certificate) -> str:
    try:
        return str(identity_of(certificate))
    except IdentityError:
        return certificate.subject.rfc4514_string() or f"serial {certificate.serial_number:x}"


def verify_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                 anchor: TrustAnchor, at: datetime.datetime | None = None) -> Identity:
    """The identity `leaf` proves, or ChainRefused naming the check that failed."""
    at = at or datetime.datetime.now(datetime.UTC)
    who = _describe(leaf)
    if at > leaf.not_valid_after_utc:
        raise ChainRefused(f"the certificate of {who} expired at "
                           f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if at < leaf.not_valid_before_utc:
        raise ChainRefused(f"the certificate of {who} is not valid before "
                           f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    try:
        identity = identity_of(leaf)
    except IdentityError as exc:
        raise ChainRefused(f"the certificate of {who}: {exc}") from None
    if identity.trust_domain != anchor.trust_domain:
        raise ChainRefused(f"{identity} is not in the trust domain {anchor.trust_domain}")
    verifier = PolicyBuilder().store(Store([anchor.root])).time(at).build_client_verifier()
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise ChainRefused(f"the certificate of {who} does not chain to the IAM root: "
                           f"{exc}") from None
    _check_revocation(verified.chain, anchor, at)
    return identity


def _check_revocation(chain: Sequence[x509.Certificate], anchor: TrustAnchor,
                      at: datetime.datetime) -> None:
    crl = anchor.crl
    if crl is None:
        return
    if not crl.is_signature_valid(anchor.root.public_key()):  # type: ignore[arg-type]
        raise ChainRefused("the revocation list is not signed by the IAM root")
    if crl.next_update_utc is not None and at > crl.next_update_utc:
        # Fail closed: a stale list could miss a revocation.
        expired = f"{crl.next_update_utc:%Y-%m-%d %H:%M:%S}"
        raise ChainRefused(f"the revocation list expired at {expired} UTC; renew it with "
                           "`p11grid ca crl`")
    for certificate in chain:
        if certificate == anchor.root:
            continue
        revoked = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        if revoked is not None:
            raise ChainRefused(f"the certificate of {_describe(certificate)} (serial "
                               f"{certificate.serial_number:x}) was revoked on "
                               f"{revoked.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC")
