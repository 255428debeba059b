"""VM-Auth-Tokens and APP-Auth-Tokens: issued with a key in a secure element, verified
check by check.

A VM-Auth-Token is a compact JWS signed by the hypervisor's key, saying "VM `sub` runs on
hypervisor `iss`, for audience `aud`, until `exp`"; an APP-Auth-Token is the same one layer
up, signed by the VM's key (DESIGN.md section 3). The header carries the signer's
certificate chain (`x5c`); `cnf` pins the subject's certificate by its SHA-256 thumbprint.

Verification evaluates every check it can and reports each with its verdict, so that
`p11grid token verify` can print them and a refusal names the first that failed. PyJWT
parses the JWS and verifies its signature; the claims are compared here, each with its
own message.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from idm.chain import ChainRefused, TrustAnchor, verify_chain
from idm.identity import Identity, IdentityError, identity_of

TOKEN_TYPES = {"vm": "vm-auth+jwt", "app": "app-auth+jwt"}
ISSUER_KINDS = {"vm": "hv", "app": "vm"}  # who signs a token about whom
ALGORITHMS = ("RS256", "ES256", "ES384")
LEEWAY = datetime.timedelta(seconds=60)  # the design's ceiling for clock skew
DEFAULT_MAX_LIFETIME = datetime.timedelta(hours=24)
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "cnf")


class TokenRefused(Exception):
    """A token failed a check; the message names the check and why."""


class JwsSigner(Protocol):
    """A private key in a secure element that makes JWS signatures."""

    @property
    def jws_algorithm(self) -> str: ...

    def sign_jws(self, signing_input: bytes) -> bytes: ...


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(certificate: x509.Certificate) -> str:
    """`x5t#S256` (RFC 8705 section 3.1): base64url SHA-256 of the certificate's DER."""
    return _b64(hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest())


def issue_token(kind: str, signer: JwsSigner, chain: Sequence[x509.Certificate],
                subject_certificate: x509.Certificate, audience: str,
                lifetime: datetime.timedelta, not_after: datetime.datetime | None = None,
                now: datetime.datetime | None = None) -> str:
    """A VM-Auth-Token (kind "vm", signed with the HV key) or an APP-Auth-Token (kind
    "app", signed with the VM key; `not_after` = its VM token's expiry, never exceeded)."""
    if kind not in TOKEN_TYPES:
        raise TokenRefused(f"token kind {kind!r} is not vm or app")
    issuer = identity_of(chain[0])
    subject = identity_of(subject_certificate)
    if issuer.kind != ISSUER_KINDS[kind]:
        raise TokenRefused(f"a {kind} token is signed by a {ISSUER_KINDS[kind]} key, not by "
                           f"{issuer}")
    if subject.kind != kind:
        raise TokenRefused(f"the subject of a {kind} token is a {kind}, not {subject}")
    if signer.jws_algorithm not in ALGORITHMS:
        raise TokenRefused(f"the signing key's algorithm {signer.jws_algorithm} is not one of "
                           f"{', '.join(ALGORITHMS)}")
    now = now or datetime.datetime.now(datetime.UTC)
    expiry = now + lifetime
    if not_after is not None:
        expiry = min(expiry, not_after)
    if expiry <= now:
        raise TokenRefused("the token would already be expired (its VM token has expired)")
    header = {"alg": signer.jws_algorithm, "typ": TOKEN_TYPES[kind],
              "x5c": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                      for c in chain]}
    claims = {"iss": issuer.uri, "sub": subject.uri, "aud": audience,
              "iat": int(now.timestamp()), "nbf": int(now.timestamp()),
              "exp": int(expiry.timestamp()), "jti": secrets.token_urlsafe(16),
              "cnf": {"x5t#S256": thumbprint(subject_certificate)}}
    signing_input = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64(json.dumps(claims, separators=(",", ":")).encode()))
    signature = signer.sign_jws(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class TokenReport:
    """Every check made on one token, in order; `ok` when none failed."""

    kind: str
    checks: list[Check] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)
    claims: dict[str, Any] = field(default_factory=dict)
    issuer: Identity | None = None  # proven by the x5c chain
    subject: Identity | None = None
    signer_certificate: x509.Certificate | None = None  # x5c[0], once its chain is checked

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def expires(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(int(self.claims.get("exp", 0)), datetime.UTC)

    def refusal(self) -> str | None:
        for check in self.checks:
            if not check.passed:
                return f"{check.name}: {check.detail}"
        return None

    def require(self) -> TokenReport:
        """This report, or TokenRefused with the first failed check."""
        reason = self.refusal()
        if reason is not None:
            raise TokenRefused(f"{self.kind} token refused: {reason}")
        return self

    def _record(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, passed, detail))
        return passed


class ReplayCache:
    """`jti`s seen until their token expires (plus leeway): a token is accepted once.
    In memory, per process; several grid nodes share one through the registry later."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_use(self, jti: str, expires: float) -> bool:
        now = time.time()
        with self._lock:
            if len(self._seen) > 1024:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            if self._seen.get(jti, 0.0) > now:
                return False
            self._seen[jti] = expires + LEEWAY.total_seconds()
            return True


@dataclass(frozen=True)
class Expectations:
    """What the verifier knows besides the token itself. Checks whose input is None are
    not made (and not reported): `p11grid token verify` without a certificate, say."""

    anchor: TrustAnchor
    audience: str
    max_lifetime: datetime.timedelta = DEFAULT_MAX_LIFETIME
    presented_certificate: x509.Certificate | None = None  # the subject's, for cnf
    authenticated_issuer: Identity | None = None  # whom the OpenID provider authenticated
    bound: Callable[[Identity], bool] | None = None  # is sub bound to the requested element
    replay: ReplayCache | None = None
    vm_token: TokenReport | None = None  # for an APP token: its (verified) VM token
    now: datetime.datetime | None = None


def verify_token(token: str, kind: str, expect: Expectations) -> TokenReport:
    """Check `token` as a `kind` ("vm" or "app") token; the report lists every check."""
    report = TokenReport(kind)
    now = expect.now or datetime.datetime.now(datetime.UTC)
    leeway = LEEWAY.total_seconds()
    # Format and header ---------------------------------------------------------------
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        report._record("format", False, f"not a compact JWS: {exc}")
        return report
    report.header = header
    algorithm = header.get("alg")
    chain_b64 = header.get("x5c")
    if algorithm not in ALGORITHMS or not isinstance(chain_b64, list) or not chain_b64:
        report._record("format", False, f"alg {algorithm!r} (allowed: {', '.join(ALGORITHMS)})"
                                        " and a non-empty x5c are required")
        return report
    try:
        chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                 for c in chain_b64]
    except (ValueError, TypeError) as exc:
        report._record("format", False, f"x5c does not hold certificates: {exc}")
        return report
    report._record("format", True, f"compact JWS, {algorithm}, {len(chain)} certificate(s)")
    report._record("typ", header.get("typ") == TOKEN_TYPES[kind],
                   f"{header.get('typ')!r}, expected {TOKEN_TYPES[kind]!r}")
    # The signer's certificate chain, then the signature -------------------------------
    try:
        signer_identity = verify_chain(chain[0], chain[1:], expect.anchor, now)
        report.issuer = signer_identity
        report.signer_certificate = chain[0]
        report._record("chain", True, f"signed by {signer_identity}, chained to the IAM root "
                                      f"of {expect.anchor.trust_domain}")
    except ChainRefused as exc:
        report._record("chain", False, str(exc))
        return report
    public_key = chain[0].public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        report._record("signature", False, "the signer's key is neither RSA nor EC")
        return report
    try:
        claims = jwt.decode(token, key=public_key, algorithms=[algorithm], options={
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": False, "verify_iss": False})
    except jwt.InvalidSignatureError:
        report._record("signature", False, f"does not verify with the key of {signer_identity}")
        return report
    except jwt.PyJWTError as exc:
        report._record("signature", False, f"{type(exc).__name__}: {exc}")
        return report
    report.claims = claims
    report._record("signature", True, f"{algorithm} signature by {signer_identity}")
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    report._record("claims", not missing, "all of " + ", ".join(REQUIRED_CLAIMS)
                   + (f"; missing: {', '.join(missing)}" if missing else ""))
    # Who ------------------------------------------------------------------------------
    issuer_claim = claims.get("iss")
    report._record("issuer", issuer_claim == signer_identity.uri
                   and signer_identity.kind == ISSUER_KINDS[kind],
                   f"iss {issuer_claim!r}; the signer is {signer_identity} and must be a "
                   f"{ISSUER_KINDS[kind]}")
    if expect.authenticated_issuer is not None:
        report._record("authenticated issuer", issuer_claim == expect.authenticated_issuer.uri,
                       f"iss {issuer_claim!r}; the OpenID provider authenticated "
                       f"{expect.authenticated_issuer}")
    try:
        subject = Identity.parse(str(claims.get("sub")))
        subject_ok = subject.kind == kind and subject.trust_domain == expect.anchor.trust_domain
        report.subject = subject
        report._record("subject", subject_ok, f"sub {subject} must be a {kind} of "
                                              f"{expect.anchor.trust_domain}")
    except IdentityError as exc:
        report._record("subject", False, f"sub {claims.get('sub')!r}: {exc}")
        subject = None
    if expect.bound is not None and subject is not None:
        report._record("binding", expect.bound(subject),
                       f"{subject} must be bound to the requested secure element")
    audience = claims.get("aud")
    single = audience if isinstance(audience, str) else (
        audience[0] if isinstance(audience, list) and len(audience) == 1 else None)
    report._record("audience", single == expect.audience,
                   f"aud {audience!r}; expected the single audience {expect.audience!r}")
    # When -----------------------------------------------------------------------------
    times = {name: claims.get(name) for name in ("iat", "nbf", "exp")}
    if not all(isinstance(v, int | float) for v in times.values()):
        report._record("times", False, f"iat, nbf and exp must be numbers: {times}")
    else:
        iat, nbf, exp = (float(times[n]) for n in ("iat", "nbf", "exp"))  # type: ignore[arg-type]
        moment = now.timestamp()
        report._record("expiry", moment <= exp + leeway,
                       f"exp {_utc(exp)}; now {_utc(moment)} (leeway {leeway:.0f} s)")
        report._record("not before", moment >= nbf - leeway and moment >= iat - leeway,
                       f"nbf {_utc(nbf)}, iat {_utc(iat)}; now {_utc(moment)}")
        cap = expect.max_lifetime.total_seconds()
        report._record("lifetime", 0 < exp - iat <= cap,
                       f"{exp - iat:.0f} s from iat to exp; at most {cap:.0f} s")
    # The certificate the token is bound to ------------------------------------------------
    confirmation = claims.get("cnf")
    pinned = confirmation.get("x5t#S256") if isinstance(confirmation, dict) else None
    if expect.presented_certificate is not None:
        presented = thumbprint(expect.presented_certificate)
        report._record("confirmation", pinned == presented,
                       f"cnf x5t#S256 {pinned!r}; the presented certificate's is {presented!r}")
    elif not isinstance(pinned, str):
        report._record("confirmation", False, "cnf must carry x5t#S256")
    # An APP token lives inside its VM token -------------------------------------------------
    if kind == "app" and expect.vm_token is not None:
        vm = expect.vm_token
        report._record("vm token", vm.ok and vm.subject is not None
                       and issuer_claim == vm.subject.uri,
                       f"iss {issuer_claim!r} must be the subject of a valid VM token "
                       f"({vm.subject})")
        report._record("within vm token", isinstance(claims.get("exp"), int | float)
                       and float(claims["exp"]) <= vm.expires.timestamp(),
                       f"exp {claims.get('exp')} must not pass the VM token's "
                       f"{int(vm.expires.timestamp())}")
    # Once only (last: a refused token must not use up its jti) -------------------------
    if expect.replay is not None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            report._record("replay", False, "jti is missing")
        elif report.ok:
            report._record("replay", expect.replay.first_use(jti, float(claims["exp"])),
                           f"jti {jti} must not have been presented before")
    return report


def _utc(moment: float) -> str:
    return f"{datetime.datetime.fromtimestamp(moment, datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"
