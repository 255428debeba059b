"""The grid SP's side of the identity checks: may this connection open a session on that
secure element?

DESIGN.md section 3: the SP authorizes an operation on the element bound to `sub` only
with all three of (1) a successful OpenID authentication of the token's issuer (the
access token from the OpenID provider, whose `act` names the HV, or for an APP the VM),
(2) the subject identity (the caller's TLS certificate), (3) a valid VM-/APP-Auth-Token
whose chain reaches the IAM root, whose `iss` is the authenticated identity and whose
`sub` is bound to the element. Every check has its own refusal message; the access
token's `jti` is accepted once.

Two checks can be given by whoever runs the relying party (the grid service passes its
registry, so that every grid node sharing it agrees at once): the `replay` store of
access-token jtis (in memory by default) and `revoked`, which says whether a certificate
serial has been revoked. With `revoked`, the caller's certificate and the certificate
that signed each VM-/APP-Auth-Token are refused as soon as their serial is revoked,
before the CA's next revocation list. Both fail closed: if they cannot answer, the
authorization is refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography import x509

from idm.chain import ChainRefused, TrustAnchor, verify_chain
from idm.identity import Identity, IdentityError, identity_of
from idm.idp_client import ACCESS_TOKEN_TYP
from idm.tokens import (
    DEFAULT_MAX_LIFETIME,
    LEEWAY,
    Expectations,
    ReplayCache,
    TokenReport,
    thumbprint,
    verify_token,
)

# RFC 9068 section 2.1 allows the media type's full form too.
ACCESS_TOKEN_TYPES = (ACCESS_TOKEN_TYP, f"application/{ACCESS_TOKEN_TYP}")
ACCESS_ALGORITHMS = ("ES256", "ES384", "RS256")
log = logging.getLogger("p11grid.identity")


class ReplayStore(Protocol):
    """Where seen jtis are kept: True the first time `jti` is seen before `expires`
    (epoch seconds; kept a leeway longer). idm.tokens.ReplayCache keeps them in memory."""

    def first_use(self, jti: str, expires: float) -> bool: ...


class AuthorizationRefused(Exception):
    """The connection may not open the session; `check` names what failed."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check


@dataclass(frozen=True)
class Authorization:
    subject: Identity  # the VM (or APP) the session belongs to
    actors: tuple[Identity, ...]  # who vouched for it, nearest first (HV; or VM, HV)
    expires: datetime.datetime  # the session ends with the first token that does
    # The hypervisor's certificate (from the VM token): result containers are sealed to it.
    hypervisor_certificate: x509.Certificate | None = None


class _Jwks:
    """The OpenID provider's signing keys from a JWKS file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, Any] = {}
        self._lock = threading.Lock()

    def key(self, kid: str | None) -> Any:
        with self._lock:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                loaded = jwt.PyJWKSet.from_dict(json.loads(self.path.read_text()))
                self._keys = {k.key_id or "": k for k in loaded.keys}
                self._stamp = (stat.st_mtime_ns, stat.st_size)
            if kid is None and len(self._keys) == 1:
                return next(iter(self._keys.values()))
            found = self._keys.get(kid or "")
            if found is None:
                raise AuthorizationRefused("access token", f"signed with key {kid!r}, which the "
                                           "OpenID provider's JWKS does not hold")
            return found


class RelyingParty:
    def __init__(self, anchor: Callable[[], TrustAnchor], sp: Identity, idp_issuer: str,
                 jwks: Path, max_token_lifetime: datetime.timedelta = DEFAULT_MAX_LIFETIME,
                 replay: ReplayStore | None = None,
                 revoked: Callable[[int], bool] | None = None) -> None:
        self._anchor = anchor  # called each time: the CRL file may have been renewed
        self.sp = sp
        self.idp_issuer = idp_issuer
        self._jwks = _Jwks(jwks)
        self.max_token_lifetime = max_token_lifetime
        self.replay: ReplayStore = replay if replay is not None else ReplayCache()
        self.revoked = revoked  # certificate serial -> revoked? (None: the CRL only)

    def _check_revoked(self, certificate: x509.Certificate | None, whose: str) -> None:
        if self.revoked is None or certificate is None:
            return
        serial = certificate.serial_number
        try:
            refused = self.revoked(serial)
        except Exception as exc:  # the store is someone else's: any failure fails closed
            # The reason (where the store lives) is for the log; the caller learns only
            # that the check could not be made.
            log.warning("revocation check of %s certificate (serial %x) failed: %s", whose,
                        serial, exc)
            raise AuthorizationRefused("revocation", f"cannot check {whose} certificate "
                                       f"(serial {serial:x}) now; refused until it can be"
                                       ) from None
        if refused:
            raise AuthorizationRefused("revocation", f"{whose} certificate (serial "
                                       f"{serial:x}, {_name(certificate)}) is revoked")

    def authorize(self, peer: x509.Certificate, access_token: object, vm_token: object,
                  bound: Callable[[Identity], bool], app_token: object = None,
                  now: datetime.datetime | None = None) -> Authorization:
        """Check the three elements for the TLS peer `peer`; AuthorizationRefused if any fails."""
        now = now or datetime.datetime.now(datetime.UTC)
        try:
            caller = identity_of(peer)
        except IdentityError as exc:
            raise AuthorizationRefused("caller", str(exc)) from None
        self._check_revoked(peer, "the caller's")
        anchor = self._anchor()
        try:
            # TLS checked the chain; this adds the IAM CA's revocation list, which the
            # handshake does not read, and the trust domain.
            verify_chain(peer, [], anchor, now)
        except ChainRefused as exc:
            raise AuthorizationRefused("caller", str(exc)) from None
        if not isinstance(access_token, str) or not isinstance(vm_token, str):
            raise AuthorizationRefused("tokens", "an access token from the OpenID provider and "
                                       "a VM-Auth-Token are required to open a session")
        access = self._access_claims(access_token, now)
        actors = _actors(access)
        if access.get("sub") != caller.uri:
            raise AuthorizationRefused("access token", f"sub {access.get('sub')!r} is not the "
                                       f"caller {caller}")
        confirmation = access.get("cnf")
        pinned = confirmation.get("x5t#S256") if isinstance(confirmation, dict) else None
        if pinned != thumbprint(peer):
            raise AuthorizationRefused("access token", "cnf does not match the caller's TLS "
                                       "certificate: the token was issued for another one")
        if caller.kind == "vm":
            if app_token is not None:
                raise AuthorizationRefused("tokens", "a VM presents no APP token")
            report = self._token(vm_token, "vm", anchor, now, peer, actors[0], bound)
            hypervisor = report.signer_certificate
            self._check_revoked(hypervisor, "the vm token's signer")
        elif caller.kind == "app":
            if not isinstance(app_token, str) or len(actors) < 2:
                raise AuthorizationRefused("tokens", "an APP needs its APP-Auth-Token and an "
                                           "access token whose act nests VM and HV")
            vm_report = self._token(vm_token, "vm", anchor, now, None, actors[1], None)
            self._check_revoked(vm_report.signer_certificate, "the vm token's signer")
            if vm_report.subject != actors[0]:
                raise AuthorizationRefused("vm token", f"sub {vm_report.subject} is not the "
                                           f"VM that vouched for the APP ({actors[0]})")
            # Its "within vm token" check keeps the APP token inside the VM token's life.
            report = self._token(app_token, "app", anchor, now, peer, actors[0], bound,
                                 vm_report)
            hypervisor = vm_report.signer_certificate
            self._check_revoked(report.signer_certificate, "the app token's signer")
        else:
            raise AuthorizationRefused("caller", f"{caller} is neither a vm nor an app")
        if report.subject != caller:
            raise AuthorizationRefused("token", f"sub {report.subject} is not the caller "
                                       f"{caller}")
        jti = access.get("jti")
        if not isinstance(jti, str):
            raise AuthorizationRefused("access token", f"jti {jti!r} is not a string")
        try:
            first = self.replay.first_use(jti, float(access["exp"]))
        except Exception as exc:  # the store is someone else's: any failure fails closed
            log.warning("replay check of jti %r failed: %s", jti, exc)
            raise AuthorizationRefused("access token", f"cannot check whether jti {jti!r} "
                                       "was presented before; refused until it can be"
                                       ) from None
        if not first:
            raise AuthorizationRefused("access token", f"jti {jti!r} was presented before: "
                                       "an access token opens one session")
        expires = min(report.expires, datetime.datetime.fromtimestamp(access["exp"],
                                                                       datetime.UTC))
        return Authorization(caller, actors, expires, hypervisor)

    def _access_claims(self, token: str, now: datetime.datetime) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthorizationRefused("access token", f"not a JWT: {exc}") from None
        if header.get("typ") not in ACCESS_TOKEN_TYPES or header.get("alg") not in \
                ACCESS_ALGORITHMS:
            raise AuthorizationRefused("access token", f"typ {header.get('typ')!r} / alg "
                                       f"{header.get('alg')!r} is not an access token of the "
                                       "OpenID provider")
        key = self._jwks.key(header.get("kid"))
        try:
            return dict(jwt.decode(
                token, key=key, algorithms=[header["alg"]], audience=self.sp.uri,
                issuer=self.idp_issuer, leeway=LEEWAY,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "act", "cnf"]}))
        except jwt.ExpiredSignatureError:
            raise AuthorizationRefused("access token", "expired; the module fetches a new "
                                       "one by itself") from None
        except jwt.InvalidAudienceError:
            raise AuthorizationRefused("access token", f"not issued for this SP ({self.sp})"
                                       ) from None
        except jwt.InvalidIssuerError:
            raise AuthorizationRefused("access token", "not issued by the configured OpenID "
                                       f"provider {self.idp_issuer}") from None
        except jwt.PyJWTError as exc:
            raise AuthorizationRefused("access token", f"{type(exc).__name__}: {exc}") from None

    def _token(self, token: str, kind: str, anchor: TrustAnchor, now: datetime.datetime,
               peer: x509.Certificate | None, issuer: Identity,
               bound: Callable[[Identity], bool] | None,
               vm_report: TokenReport | None = None) -> TokenReport:
        report = verify_token(token, kind, Expectations(
            anchor=anchor, audience=self.sp.uri, max_lifetime=self.max_token_lifetime,
            presented_certificate=peer, authenticated_issuer=issuer, bound=bound,
            vm_token=vm_report, now=now))
        reason = report.refusal()
        if reason is not None:
            check = reason.split(":", 1)[0]
            raise AuthorizationRefused(f"{kind} token {check}", reason.split(":", 1)[1].strip())
        return report


def _name(certificate: x509.Certificate) -> str:
    try:
        return str(identity_of(certificate))
    except IdentityError:
        return certificate.subject.rfc4514_string()


def _actors(access: dict[str, Any]) -> tuple[Identity, ...]:
    """The `act` chain of an access token, nearest actor first (RFC 8693 section 4.1)."""
    actors = []
    act = access.get("act")
    while isinstance(act, dict) and len(actors) < 4:
        try:
            actors.append(Identity.parse(str(act.get("sub"))))
        except IdentityError as exc:
            raise AuthorizationRefused("access token", f"act: {exc}") from None
        act = act.get("act")
    if not actors:
        raise AuthorizationRefused("access token", "act names no actor: the OpenID provider "
                                   "did not authenticate an issuer")
    return tuple(actors)

