"""The IAM root CA: every entity's certificate, and the list of those revoked.

A directory holds it:

    ca.key        the root's private key (EC P-256, mode 0600)
    ca.pem        the root certificate; its URI SAN `spiffe://<trust-domain>` names the
                  trust domain every identity it certifies belongs to
    crl.pem       the certificate revocation list, signed by the root, renewed on every
                  revocation and by `p11grid ca crl`
    issued.json   what was issued: serial, identity, validity, revocation
    certs/        each issued certificate, `<kind>-<name>-<serial>.pem`

The root key is a file: it signs rarely, offline from the grid, and is the one key the
design keeps outside a secure element for now. Entities' keys are generated wherever the
entity's secure element is; the CA only ever sees their public keys (in a CSR).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from idm.identity import Identity

ROOT_VALIDITY = datetime.timedelta(days=3650)
DEFAULT_VALIDITY = datetime.timedelta(days=30)
CRL_VALIDITY = datetime.timedelta(days=7)
BACKDATE = datetime.timedelta(minutes=5)  # clock skew between the CA and whoever checks
SERVER_KINDS = frozenset({"idp", "sp", "grid"})  # these also serve TLS

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class AuthorityError(Exception):
    """The CA cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class IssuedRecord:
    serial: str  # hex
    identity: str
    not_before: str
    not_after: str
    file: str
    revoked_at: str | None = None
    reason: str | None = None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def write_file(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of it; the mode is set before
    any byte is written (a key must never be readable by others, even briefly)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Authority:
    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey,
                 certificate: x509.Certificate) -> None:
        self.directory = directory
        self.key = key
        self.certificate = certificate
        self.trust_domain = trust_domain_of(certificate)

    # --- creating and opening -----------------------------------------------------------

    @classmethod
    def init(cls, directory: Path, trust_domain: str,
             common_name: str = "p11grid IAM root CA") -> Authority:
        Identity(trust_domain, "admin", "check")  # validates the trust domain's spelling
        if (directory / "ca.key").exists():
            raise AuthorityError(f"{directory} already holds a CA")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "certs").mkdir(exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_file(directory / "ca.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
        write_file(directory / "ca.pem",
                          certificate.public_bytes(serialization.Encoding.PEM))
        write_file(directory / "issued.json", b"[]\n")
        authority = cls(directory, key, certificate)
        authority.renew_crl()
        return authority

    @classmethod
    def open(cls, directory: Path) -> Authority:
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except FileNotFoundError as exc:
            raise AuthorityError(f"{directory} holds no CA (run `p11grid ca init`): "
                                 f"{exc.filename} is missing") from None
        except ValueError as exc:
            raise AuthorityError(f"{directory}: the CA's files are damaged: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AuthorityError(f"{directory}/ca.key is not an EC key")
        return cls(directory, key, certificate)

    # --- issuing ------------------------------------------------------------------------

    def issue(self, identity: Identity, public_key: PublicKey,
              validity: datetime.timedelta = DEFAULT_VALIDITY,
              dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()
              ) -> x509.Certificate:
        if identity.trust_domain != self.trust_domain:
            raise AuthorityError(f"{identity} is outside this CA's trust domain "
                                 f"{self.trust_domain}")
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise AuthorityError("only RSA and EC keys are certified")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
            raise AuthorityError(f"an RSA key of {public_key.key_size} bits is too small")
        now = _now()
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.kind in SERVER_KINDS or dns_names or ip_addresses:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        names += [x509.DNSName(name) for name in dns_names]
        try:
            names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        except ValueError as exc:
            raise AuthorityError(str(exc)) from None
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(self.certificate.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
                data_encipherment=False, key_agreement=not rsa_key, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        serial = f"{certificate.serial_number:x}"
        file = f"certs/{identity.kind}-{identity.name}-{serial}.pem"
        with self._locked():
            write_file(self.directory / file,
                              certificate.public_bytes(serialization.Encoding.PEM))
            records = self._records()
            records.append(IssuedRecord(
                serial, identity.uri, certificate.not_valid_before_utc.isoformat(),
                certificate.not_valid_after_utc.isoformat(), file))
            self._save(records)
        return certificate

    def issue_for_request(self, identity: Identity, request: x509.CertificateSigningRequest,
                          validity: datetime.timedelta = DEFAULT_VALIDITY,
                          dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()
                          ) -> x509.Certificate:
        """Certify the key of a CSR, after checking that the CSR was signed by that key
        (proof that the requester holds it, e.g. inside its secure element)."""
        if not request.is_signature_valid:
            raise AuthorityError("the certificate request's signature does not verify: "
                                 "it was not signed by the key it asks to certify")
        public_key = request.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise AuthorityError("only RSA and EC keys are certified")
        return self.issue(identity, public_key, validity, dns_names, ip_addresses)

    # --- revoking -----------------------------------------------------------------------

    def revoke(self, identity: Identity | None = None, serial: int | None = None,
               reason: str = "unspecified") -> list[IssuedRecord]:
        """Revoke one certificate by serial, or every live one of an identity."""
        if (identity is None) == (serial is None):
            raise AuthorityError("revoke by identity or by serial, one of them")
        now = _now().isoformat()
        with self._locked():
            records = self._records()
            revoked = []
            for index, record in enumerate(records):
                wanted = (serial is not None and int(record.serial, 16) == serial) or \
                    (identity is not None and record.identity == identity.uri)
                if wanted and record.revoked_at is None:
                    records[index] = IssuedRecord(**{**asdict(record), "revoked_at": now,
                                                     "reason": reason})
                    revoked.append(records[index])
            if not revoked:
                what = identity.uri if identity is not None else f"serial {serial or 0:x}"
                raise AuthorityError(f"no live certificate of {what} to revoke")
            self._save(records)
            self._write_crl(records)
        return revoked

    def renew_crl(self) -> x509.CertificateRevocationList:
        with self._locked():
            return self._write_crl(self._records())

    def _write_crl(self, records: list[IssuedRecord]) -> x509.CertificateRevocationList:
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(now - BACKDATE).next_update(now + CRL_VALIDITY)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        for record in records:
            if record.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(record.serial, 16))
                    .revocation_date(datetime.datetime.fromisoformat(record.revoked_at))
                    .build())
        crl = builder.sign(self.key, hashes.SHA256())
        write_file(self.directory / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        return crl

    # --- the record of what was issued --------------------------------------------------

    def issued(self) -> list[IssuedRecord]:
        with self._locked():
            return self._records()

    def _records(self) -> list[IssuedRecord]:
        try:
            raw = json.loads((self.directory / "issued.json").read_text())
            return [IssuedRecord(**entry) for entry in raw]
        except (OSError, ValueError, TypeError) as exc:
            raise AuthorityError(f"{self.directory}/issued.json is unreadable: {exc}") from None

    def _save(self, records: list[IssuedRecord]) -> None:
        text = json.dumps([asdict(r) for r in records], indent=1) + "\n"
        write_file(self.directory / "issued.json", text.encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `p11grid ca` commands at once must not lose each other's records.
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def trust_domain_of(root: x509.Certificate) -> str:
    """The trust domain a root certifies, from its `spiffe://<trust-domain>` URI SAN."""
    try:
        names = root.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise AuthorityError("the root certificate names no trust domain") from None
    for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://"):]:
            return uri[len("spiffe://"):]
    raise AuthorityError("the root certificate names no trust domain")
