"""`p11grid ca init|issue|revoke|crl|list`: the IAM root CA at a terminal;
`p11grid token issue vm|app` and `p11grid token verify`: VM-/APP-Auth-Tokens."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from idm.authority import Authority, AuthorityError, write_file
from idm.identity import KINDS, Identity, IdentityError

DEFAULT_CA_DIR = "/var/lib/p11grid/ca"


class CommandError(Exception):
    """A mistake on the command line; the message says what to give instead."""


def _ca_dir(arguments: argparse.Namespace) -> Path:
    return Path(arguments.ca_dir or os.environ.get("P11GRID_CA_DIR") or DEFAULT_CA_DIR)


def _environment(pairs: list[str] | None) -> dict[str, str]:
    environment = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CommandError(f"--env {pair!r}: expected NAME=VALUE")
        environment[name] = value
    return environment


def init(arguments: argparse.Namespace) -> int:
    authority = Authority.init(_ca_dir(arguments), arguments.trust_domain)
    print(f"IAM root CA for spiffe://{authority.trust_domain} in {authority.directory} "
          f"(root certificate {authority.directory / 'ca.pem'})")
    return 0


def _request_from_element(arguments: argparse.Namespace, identity: Identity
                          ) -> x509.CertificateSigningRequest:
    from idm.csr import certificate_request
    from idm.pkcs11_signer import Pkcs11Signer, generate_key_pair
    from idm.pkcs11_uri import parse_pkcs11_uri, resolve_pin

    if not arguments.module:
        raise CommandError("--key-uri needs --module (the PKCS#11 library holding the key)")
    uri = parse_pkcs11_uri(arguments.key_uri)
    pin = resolve_pin(uri, arguments.pin) or os.environ.get("P11GRID_PIN")
    environment = _environment(arguments.env)
    module = Path(arguments.module)
    if arguments.generate:
        if pin is None:
            raise CommandError("generating a key needs the token's PIN (--pin, pin-source in "
                               "the URI, or $P11GRID_PIN)")
        generate_key_pair(module, uri, pin, arguments.generate, environment)
        print(f"generated a {arguments.generate} key pair inside the token "
              f"({uri.token or '?'}/{uri.object or '?'})")
    with Pkcs11Signer(module, uri, pin, environment) as signer:
        return certificate_request(signer, identity)


def _store_next_to_key(arguments: argparse.Namespace, certificate: x509.Certificate) -> None:
    """The new certificate also goes into the token, next to its key, replacing the one
    before: `p11grid token issue` takes the certificate from there. A token that keeps no
    objects (a key behind libp11grid.so, say) only gets a note."""
    from idm.pkcs11_signer import Pkcs11Signer, SignerError
    from idm.pkcs11_uri import parse_pkcs11_uri, resolve_pin

    uri = parse_pkcs11_uri(arguments.key_uri)
    pin = resolve_pin(uri, arguments.pin) or os.environ.get("P11GRID_PIN")
    try:
        with Pkcs11Signer(Path(arguments.module), uri, pin,
                          _environment(arguments.env)) as signer:
            signer.store_certificate(certificate)
            where = signer.token_label
    except SignerError as exc:
        print(f"note: the certificate was not stored in the token ({exc}); give it by file "
              "where it is needed (--hv-cert, --vm-cert)", file=sys.stderr)
        return
    print(f"stored the certificate next to the key in token {where!r}", file=sys.stderr)


def issue(arguments: argparse.Namespace) -> int:
    authority = Authority.open(_ca_dir(arguments))
    identity = Identity(authority.trust_domain, arguments.kind, arguments.name)
    sources = [s for s in (arguments.key_uri, arguments.csr, arguments.key_out) if s]
    if len(sources) != 1:
        raise CommandError("give the key as exactly one of --key-uri (in a secure element), "
                           "--csr (a request made elsewhere) or --key-out (a new key file)")
    validity = datetime.timedelta(days=arguments.days)
    dns, ips = arguments.dns or [], arguments.ip or []
    if arguments.key_uri:
        request = _request_from_element(arguments, identity)
        certificate = authority.issue_for_request(identity, request, validity, dns, ips)
        _store_next_to_key(arguments, certificate)
    elif arguments.csr:
        try:
            request = x509.load_pem_x509_csr(Path(arguments.csr).read_bytes())
        except (OSError, ValueError) as exc:
            raise CommandError(f"--csr {arguments.csr}: {exc}") from None
        certificate = authority.issue_for_request(identity, request, validity, dns, ips)
    else:
        key_path = Path(arguments.key_out)
        if key_path.exists():
            raise CommandError(f"--key-out {key_path} exists; refusing to overwrite a key")
        key = ec.generate_private_key(ec.SECP256R1())
        write_file(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o600)
        certificate = authority.issue(identity, key.public_key(), validity, dns, ips)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    if arguments.out:
        write_file(Path(arguments.out), pem)
    else:
        sys.stdout.write(pem.decode())
    print(f"issued {identity} (serial {certificate.serial_number:x}, valid until "
          f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)", file=sys.stderr)
    return 0


def revoke(arguments: argparse.Namespace) -> int:
    authority = Authority.open(_ca_dir(arguments))
    if arguments.serial:
        try:
            serial = int(arguments.serial, 16)
        except ValueError:
            raise CommandError(f"--serial {arguments.serial!r} is not hexadecimal") from None
        revoked = authority.revoke(serial=serial, reason=arguments.reason)
    elif arguments.kind and arguments.name:
        identity = Identity(authority.trust_domain, arguments.kind, arguments.name)
        revoked = authority.revoke(identity=identity, reason=arguments.reason)
    else:
        raise CommandError("give --serial, or --kind and --name")
    for record in revoked:
        print(f"revoked {record.identity} serial {record.serial}")
    print(f"revocation list renewed: {authority.directory / 'crl.pem'}")
    return 0


def crl(arguments: argparse.Namespace) -> int:
    authority = Authority.open(_ca_dir(arguments))
    renewed = authority.renew_crl()
    print(f"{authority.directory / 'crl.pem'} renewed, valid until "
          f"{renewed.next_update_utc:%Y-%m-%d %H:%M} UTC")
    return 0


def list_issued(arguments: argparse.Namespace) -> int:
    authority = Authority.open(_ca_dir(arguments))
    for record in authority.issued():
        state = f"revoked {record.revoked_at} ({record.reason})" if record.revoked_at \
            else f"valid until {record.not_after}"
        print(f"{record.serial}\t{record.identity}\t{state}")
    return 0


# --- tokens -------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """`90s`, `10m`, `1h`, `2d` (a bare number is seconds)."""
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        value = float(number)
    except ValueError:
        raise CommandError(f"{text!r} is not a duration such as 90s, 10m, 1h or 2d") from None
    if value <= 0:
        raise CommandError(f"{text!r}: a duration must be positive")
    return datetime.timedelta(seconds=value * _UNITS[unit])


def _certificates(path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CommandError(f"{path}: {exc}") from None


def issue_token_command(arguments: argparse.Namespace) -> int:
    from idm.pkcs11_signer import Pkcs11Signer
    from idm.pkcs11_uri import parse_pkcs11_uri, resolve_pin
    from idm.tokens import TokenReport, issue_token

    kind = arguments.token_kind
    key_uri = arguments.hv_key if kind == "vm" else arguments.vm_key
    signer_certificate = arguments.hv_cert if kind == "vm" else arguments.vm_signing_cert
    chain = _certificates(signer_certificate) if signer_certificate else []
    subject = _certificates(arguments.vm_cert if kind == "vm" else arguments.app_cert)[0]
    not_after = None
    if kind == "app":
        vm_token = Path(arguments.vm_token).read_text().strip()
        import jwt

        try:
            claims = jwt.decode(vm_token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise CommandError(f"--vm-token {arguments.vm_token}: {exc}") from None
        # Read only to cap the lifetime; the grid verifies the VM token itself.
        not_after = TokenReport("vm", claims={"exp": claims.get("exp", 0)}).expires
    uri = parse_pkcs11_uri(key_uri)
    pin = resolve_pin(uri, arguments.pin) or os.environ.get("P11GRID_PIN")
    module = arguments.module or uri.module_path
    if not module:
        raise CommandError("give --module, or module-path in the key's URI (the PKCS#11 "
                           "library that holds the key)")
    with Pkcs11Signer(Path(module), uri, pin, _environment(arguments.env)) as signer:
        if not chain:  # no certificate file: the one stored next to the key
            stored = signer.certificate()
            if stored is None:
                raise CommandError("the token holds no certificate next to the key: give "
                                   "the signer's certificate file")
            chain = [stored]
        for extra in arguments.chain or ():
            chain += _certificates(extra)
        if signer.public_key().public_numbers() != chain[0].public_key().public_numbers():
            raise CommandError("the key behind the PKCS#11 URI is not the key of the "
                               "signer's certificate")
        token = issue_token(kind, signer, chain, subject, arguments.audience,
                            parse_duration(arguments.ttl), not_after=not_after)
    if arguments.out:
        write_file(Path(arguments.out), (token + "\n").encode(), mode=0o600)
        print(f"{kind} token written to {arguments.out}", file=sys.stderr)
    else:
        print(token)
    return 0


def verify_token_command(arguments: argparse.Namespace) -> int:
    import jwt

    from idm.chain import TrustAnchor
    from idm.tokens import TOKEN_TYPES, Expectations, verify_token

    token = Path(arguments.file).read_text().strip()
    kind = arguments.kind
    if kind is None:
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except jwt.PyJWTError:
            typ = None
        kind = next((k for k, t in TOKEN_TYPES.items() if t == typ), "vm")
    if arguments.ca_dir or not arguments.root:
        directory = _ca_dir(arguments)
        anchor = TrustAnchor.load(directory / "ca.pem", directory / "crl.pem")
    else:
        anchor = TrustAnchor.load(Path(arguments.root),
                                  Path(arguments.crl) if arguments.crl else None)
    audience = arguments.audience
    if audience is None:  # nothing to compare with: say so rather than pretend
        try:
            named = jwt.decode(token, options={"verify_signature": False}).get("aud")
        except jwt.PyJWTError:
            named = None
        audience = named if isinstance(named, str) else ""
        print("note: the audience is not checked (give --audience, the grid SP's identity)")
    arguments.audience = audience
    vm_report = None
    if kind == "app" and arguments.vm_token:
        vm_report = verify_token(Path(arguments.vm_token).read_text().strip(), "vm",
                                 Expectations(anchor=anchor, audience=arguments.audience,
                                              max_lifetime=parse_duration(arguments.max_lifetime)))
    expect = Expectations(
        anchor=anchor, audience=arguments.audience,
        max_lifetime=parse_duration(arguments.max_lifetime),
        presented_certificate=_certificates(arguments.cert)[0] if arguments.cert else None,
        authenticated_issuer=Identity.parse(arguments.issuer) if arguments.issuer else None,
        vm_token=vm_report)
    report = verify_token(token, kind, expect)
    if vm_report is not None:
        print(f"VM token {arguments.vm_token}: {'valid' if vm_report.ok else 'REFUSED'}")
    print(f"{kind} token {arguments.file}:")
    for check in report.checks:
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    print("verdict: " + ("valid" if report.ok else f"REFUSED ({report.refusal()})"))
    return 0 if report.ok else 1


def _guarded(action: Any) -> Any:
    def run(arguments: argparse.Namespace) -> int:
        from idm.chain import ChainRefused
        from idm.csr import RequestRefused
        from idm.tokens import TokenRefused

        refused: tuple[type[BaseException], ...] = (
            AuthorityError, CommandError, IdentityError, RequestRefused, OSError,
            ChainRefused, TokenRefused)
        try:
            from idm.pkcs11_signer import SignerError
            from idm.pkcs11_uri import UriError

            refused += (SignerError, UriError)
        except ImportError:
            pass
        try:
            return int(action(arguments))
        except refused as exc:
            print(f"p11grid {arguments.command}: {exc}", file=sys.stderr)
            return 1

    return run


def register(commands: Any) -> None:
    ca = commands.add_parser("ca", help="the IAM root CA: identities' certificates")
    actions = ca.add_subparsers(dest="ca_action", required=True)

    def with_dir(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--ca-dir", help=f"the CA's directory (default $P11GRID_CA_DIR, "
                                              f"else {DEFAULT_CA_DIR})")
        return parser

    start = with_dir(actions.add_parser("init", help="create the root CA"))
    start.add_argument("--trust-domain", required=True,
                       help="identities will be spiffe://TRUST-DOMAIN/<kind>/<name>")
    start.set_defaults(func=_guarded(init))

    give = with_dir(actions.add_parser(
        "issue", help="certify an identity's key (in a secure element, a CSR, or a new file)"))
    give.add_argument("--kind", required=True, choices=KINDS)
    give.add_argument("--name", required=True)
    give.add_argument("--key-uri", help="PKCS#11 URI of the key in its secure element")
    give.add_argument("--module", help="the PKCS#11 library holding --key-uri")
    give.add_argument("--pin", help="the token's user PIN (else pin-source in the URI, "
                                    "else $P11GRID_PIN)")
    give.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="environment for the library (e.g. SOFTHSM2_CONF=...)")
    give.add_argument("--generate", choices=("ec256", "ec384", "rsa2048"),
                      help="first generate the key pair inside the token")
    give.add_argument("--csr", help="a PEM certificate request made elsewhere")
    give.add_argument("--key-out", help="make a new EC P-256 key in this file (mode 0600): "
                                        "for entities without a secure element")
    give.add_argument("--out", help="write the certificate here (default: stdout)")
    give.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    give.add_argument("--dns", action="append", help="a DNS name SAN (TLS servers)")
    give.add_argument("--ip", action="append", help="an IP address SAN (TLS servers)")
    give.set_defaults(func=_guarded(issue))

    withdraw = with_dir(actions.add_parser("revoke", help="revoke certificates"))
    withdraw.add_argument("--kind", choices=KINDS)
    withdraw.add_argument("--name")
    withdraw.add_argument("--serial", help="one certificate, by its hex serial")
    withdraw.add_argument("--reason", default="unspecified")
    withdraw.set_defaults(func=_guarded(revoke))

    renew = with_dir(actions.add_parser("crl", help="renew the revocation list"))
    renew.set_defaults(func=_guarded(crl))

    listing = with_dir(actions.add_parser("list", help="what was issued, and revoked"))
    listing.set_defaults(func=_guarded(list_issued))


def register_tokens(commands: Any) -> None:
    tokens = commands.add_parser("token", help="VM-/APP-Auth-Tokens: issue and verify")
    actions = tokens.add_subparsers(dest="token_action", required=True)
    issuing = actions.add_parser("issue", help="sign a token with a key in a secure element")
    kinds = issuing.add_subparsers(dest="token_kind", required=True)
    for kind, signer in (("vm", "hv"), ("app", "vm")):
        parser = kinds.add_parser(kind, help=f"a {kind.upper()}-Auth-Token, signed with the "
                                             f"{signer.upper()} key")
        parser.add_argument(f"--{signer}-key", required=True,
                            help=f"PKCS#11 URI of the {signer.upper()} key")
        parser.add_argument("--module", help="the PKCS#11 library holding it (default: "
                                              "module-path in the URI)")
        parser.add_argument("--pin", help="the token's user PIN (else pin-source in the URI, "
                                          "else $P11GRID_PIN)")
        parser.add_argument("--env", action="append", metavar="NAME=VALUE",
                            help="environment for the library (e.g. SOFTHSM2_CONF=...)")
        certificate_option = "--hv-cert" if kind == "vm" else "--vm-signing-cert"
        parser.add_argument(certificate_option, help=f"the {signer.upper()} key's certificate "
                            "(goes into x5c; default: the one stored next to the key)")
        parser.add_argument("--chain", action="append",
                            help="intermediate certificates for x5c, if any")
        if kind == "vm":
            parser.add_argument("--vm-cert", required=True, help="the VM's certificate (cnf)")
        else:
            parser.add_argument("--vm-cert", dest="vm_signing_cert",
                                help="same as --vm-signing-cert")
            parser.add_argument("--app-cert", required=True, help="the APP's certificate (cnf)")
            parser.add_argument("--vm-token", required=True,
                                help="the VM's token: the APP token never outlives it")
        parser.add_argument("--audience", required=True, help="the grid SP's identity")
        parser.add_argument("--ttl", default="1h", help="lifetime: 90s, 10m, 1h (default 1h)")
        parser.add_argument("--out", help="write the token here (mode 0600; default stdout)")
        parser.set_defaults(func=_guarded(issue_token_command))
    checking = actions.add_parser("verify", help="check a token and print every verdict")
    checking.add_argument("file")
    checking.add_argument("--kind", choices=("vm", "app"), help="default: from its typ")
    checking.add_argument("--ca-dir", help="the IAM CA's directory (ca.pem and crl.pem; "
                                           f"default $P11GRID_CA_DIR, else {DEFAULT_CA_DIR})")
    checking.add_argument("--root", help="the IAM root certificate, instead of --ca-dir")
    checking.add_argument("--crl", help="the revocation list, with --root")
    checking.add_argument("--audience", help="the grid SP's identity (else not checked)")
    checking.add_argument("--cert", help="the subject's certificate, to check cnf")
    checking.add_argument("--issuer", help="the identity that must have signed it")
    checking.add_argument("--vm-token", help="for an APP token: its VM token")
    checking.add_argument("--max-lifetime", default="24h",
                          help="the longest lifetime accepted (default 24h)")
    checking.set_defaults(func=_guarded(verify_token_command))
