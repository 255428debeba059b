"""Who an entity is: `spiffe://<trust-domain>/<kind>/<name>`, carried as a certificate's URI
SAN, with the name as its CN (RACS authorizes by CN)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

KINDS = ("user", "admin", "hv", "vm", "app", "idp", "sp", "grid")
# A conservative subset of SPIFFE's rules: lower-case trust domain, one path segment each.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9.\-_]{0,253}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{0,63}$")


class IdentityError(ValueError):
    """Not a p11grid identity; the message says which part is wrong."""


@dataclass(frozen=True, order=True)
class Identity:
    trust_domain: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise IdentityError(f"trust domain {self.trust_domain!r}: lower-case letters, "
                                "digits, '.', '-', '_'")
        if self.kind not in KINDS:
            raise IdentityError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not _NAME.match(self.name):
            raise IdentityError(f"name {self.name!r}: 1-64 letters, digits, '.', '-', '_'")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise IdentityError(f"{uri!r} is not a spiffe:// URI")
        parts = uri[len(prefix):].split("/")
        if len(parts) != 3:
            raise IdentityError(f"{uri!r} is not spiffe://<trust-domain>/<kind>/<name>")
        return cls(*parts)


def identities_in(certificate: x509.Certificate) -> list[Identity]:
    """The p11grid identities among the certificate's URI SANs (others are ignored)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    found = []
    for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            found.append(Identity.parse(uri))
        except IdentityError:
            continue
    return found


def identity_of(certificate: x509.Certificate) -> Identity:
    """The certificate's one p11grid identity; IdentityError if it has none or several."""
    found = identities_in(certificate)
    if len(found) != 1:
        raise IdentityError(f"the certificate carries {len(found)} spiffe:// identities, "
                            "not exactly one")
    return found[0]
