"""The OpenID provider (`p11grid idp serve`): it authenticates hypervisors and VMs by
their IAM certificates and exchanges their VM-/APP-Auth-Tokens for access tokens the
grid SP accepts (DESIGN.md section 3).

It has no end-user login and no client registry: a client is whoever proves, with a key
certified by the IAM root CA, the `spiffe://` identity it names as `client_id`, either
by a `private_key_jwt` assertion (RFC 7523; the certificate chain rides in `x5c`) or by
its TLS client certificate (RFC 8705 `tls_client_auth`). The one grant is RFC 8693 token
exchange; the access tokens are JWTs (RFC 9068) signed with an EC P-256 key whose public
half is served as a JWK Set, and bound to the subject's certificate by `cnf`.

Configuration, TOML (docs/idp.md says more):

    [idp]
    listen = "127.0.0.1:8443"                  # host:port
    issuer = "https://127.0.0.1:8443"          # discovery URL base and the tokens' iss
    certificate = "/etc/p11grid/idp.pem"       # TLS: a certificate the IAM CA issued to
    key = "/etc/p11grid/idp.key"               #      an idp identity, and its key
    ca_dir = "/var/lib/p11grid/ca"             # ca.pem + crl.pem (re-read on change)
    signing_key = "/var/lib/p11grid/idp-signing.pem"  # EC P-256; made (0600) if absent
    audiences = ["spiffe://example.org/sp/grid"]      # SPs tokens may be issued for
    access_token_lifetime = 300                # seconds
    token_max_lifetime = 86400                 # longest VM/APP token lifetime accepted
    recorded_tokens = "/var/lib/p11grid/vm-tokens"  # Option 1: <vm-name>.jwt files
    log_file = "/var/log/p11grid/idp.log"      # optional; else stderr
    pid_file = "/run/p11grid/idp.pid"          # optional
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import secrets
import socket
import socketserver
import ssl
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from idm.authority import write_file
from idm.chain import ChainRefused, TrustAnchor, verify_chain
from idm.identity import Identity, IdentityError
from idm.idp_client import (  # the protocol's names, defined once with the client
    ACCESS_TOKEN_TYP,
    ASSERTION_TYPE,
    GRANT_TOKEN_EXCHANGE,
    TYPE_ACCESS_TOKEN,
    TYPE_APP_AUTH,
    TYPE_VM_AUTH,
    TYPE_VM_IDENTITY,
)
from idm.metrics import ServiceMetrics
from idm.tokens import (
    ALGORITHMS,
    LEEWAY,
    Expectations,
    ReplayCache,
    TokenRefused,
    TokenReport,
    verify_token,
)

log = logging.getLogger("p11grid.idp")

SIGNING_ALGORITHM = "ES256"
AUTH_METHODS = ("private_key_jwt", "tls_client_auth")

MAX_BODY = 64 * 1024  # a token request is a few KiB: x5c chains plus two or three JWTs
MAX_FIELDS = 32
ASSERTION_MAX_AHEAD = 300  # a client assertion expires within 5 minutes
HANDSHAKE_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
DEFAULT_LISTEN = "127.0.0.1:8443"


# --- configuration ---------------------------------------------------------------------


class IdpConfigError(Exception):
    """The provider's config is missing or wrong; the message names the file and key."""


@dataclass(frozen=True)
class IdpConfig:
    path: Path
    host: str
    port: int
    issuer: str
    certificate: Path
    key: Path
    ca_dir: Path
    signing_key: Path
    audiences: tuple[str, ...]
    access_token_lifetime: int
    token_max_lifetime: int
    recorded_tokens: Path | None
    log_file: Path | None
    pid_file: Path | None
    metrics: tuple[str, int] | None = None  # Prometheus endpoint (host, port)

    @property
    def token_endpoint(self) -> str:
        return self.issuer + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks"


_KNOWN_KEYS = frozenset({
    "listen", "issuer", "certificate", "key", "ca_dir", "signing_key", "audiences",
    "access_token_lifetime", "token_max_lifetime", "recorded_tokens", "log_file", "pid_file",
    "metrics"})


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from "host:port" (IPv6 in brackets); ValueError if it is not one."""
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def load_config(path: Path) -> IdpConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise IdpConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise IdpConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"idp"}
    if unknown:
        raise IdpConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    table = data.get("idp")
    if not isinstance(table, dict):
        raise IdpConfigError(f"{path}: an [idp] table is needed")
    where = f"{path} [idp]"
    if set(table) - _KNOWN_KEYS:
        raise IdpConfigError(f"{where}: unknown key(s) "
                             f"{', '.join(sorted(set(table) - _KNOWN_KEYS))}")

    def path_of(key: str, required: bool = True) -> Path | None:
        value = table.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise IdpConfigError(f"{where}: {key} must be an absolute path")
        return Path(value)

    def seconds(key: str, default: int) -> int:
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise IdpConfigError(f"{where}: {key} must be a positive whole number of seconds")
        return value

    try:
        host, port = parse_listen(str(table.get("listen", DEFAULT_LISTEN)))
    except ValueError as exc:
        raise IdpConfigError(f"{where}: listen: {exc}") from None
    issuer = table.get("issuer")
    if not isinstance(issuer, str):
        raise IdpConfigError(f"{where}: issuer (the provider's https URL) is required")
    parts = urllib.parse.urlsplit(issuer)
    # OpenID Discovery section 3 and RFC 8414 section 2: https, no query or fragment.
    if parts.scheme != "https" or not parts.netloc or parts.query or parts.fragment \
            or issuer.endswith("/"):
        raise IdpConfigError(f"{where}: issuer {issuer!r} must be an https URL without "
                             "query, fragment or trailing slash")
    audiences = table.get("audiences")
    if not isinstance(audiences, list) or not audiences:
        raise IdpConfigError(f"{where}: audiences must list the grid SP identities")
    for audience in audiences:
        try:
            identity = Identity.parse(str(audience))
        except IdentityError as exc:
            raise IdpConfigError(f"{where}: audiences: {exc}") from None
        if identity.kind not in ("sp", "grid") or not isinstance(audience, str):
            raise IdpConfigError(f"{where}: audiences: {audience!r} is not an sp or grid "
                                 "identity")
    return IdpConfig(
        path=path, host=host, port=port, issuer=issuer,
        certificate=path_of("certificate"),  # type: ignore[arg-type]
        key=path_of("key"),  # type: ignore[arg-type]
        ca_dir=path_of("ca_dir"),  # type: ignore[arg-type]
        signing_key=path_of("signing_key"),  # type: ignore[arg-type]
        audiences=tuple(audiences),
        access_token_lifetime=seconds("access_token_lifetime", 300),
        token_max_lifetime=seconds("token_max_lifetime", 86400),
        recorded_tokens=path_of("recorded_tokens", required=False),
        log_file=path_of("log_file", required=False),
        pid_file=path_of("pid_file", required=False),
        metrics=_metrics_listen(table.get("metrics"), where),
    )


def _metrics_listen(value: object, where: str) -> tuple[str, int] | None:
    if value is None:
        return None
    try:
        return parse_listen(str(value))
    except ValueError as exc:
        raise IdpConfigError(f"{where}: metrics: {exc}") from None


# --- keys and trust ----------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """The key that signs access tokens, published as a JWK."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise IdpConfigError("the access token signing key must be EC P-256")
        self.key = key
        numbers = key.public_key().public_numbers()
        self._public = {"crv": "P-256", "kty": "EC",
                        "x": _b64url(numbers.x.to_bytes(32, "big")),
                        "y": _b64url(numbers.y.to_bytes(32, "big"))}
        # RFC 7638: SHA-256 over the required members, sorted, without whitespace.
        canonical = json.dumps(self._public, sort_keys=True, separators=(",", ":"))
        self.kid = _b64url(hashlib.sha256(canonical.encode()).digest())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            write_file(path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), mode=0o600)
            log.info("created the access token signing key %s", path)
            return cls(key)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise IdpConfigError(f"signing_key {path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdpConfigError(f"signing_key {path}: not an EC key")
        return cls(key)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def jwk(self) -> dict[str, str]:
        return {**self._public, "kid": self.kid, "use": "sig", "alg": SIGNING_ALGORITHM}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.key, algorithm=SIGNING_ALGORITHM,
                          headers={"typ": ACCESS_TOKEN_TYP, "kid": self.kid})


class AnchorSource:
    """The IAM root and its CRL, re-read when either file changes (a revocation takes
    effect at the next request, without a restart)."""

    def __init__(self, ca_dir: Path) -> None:
        self.root = ca_dir / "ca.pem"
        self.crl = ca_dir / "crl.pem"
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._anchor: TrustAnchor | None = None
        self.current()  # a missing or damaged CA stops the start, not the first request

    def _read_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stats = [path.stat() for path in (self.root, self.crl)]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def current(self) -> TrustAnchor:
        with self._lock:
            try:
                stamp = self._read_stamp()
                if stamp != self._stamp or self._anchor is None:
                    self._anchor = TrustAnchor.load(self.root, self.crl)
                    if self._stamp is not None:
                        log.info("re-read the IAM root and CRL from %s", self.root.parent)
                    self._stamp = stamp
            except (OSError, ValueError, ChainRefused) as exc:
                if self._anchor is None:
                    raise IdpConfigError(f"the IAM CA in {self.root.parent}: {exc}") from None
                # Keep the last good pair: verify_chain still fails closed once that CRL
                # passes its nextUpdate.
                log.error("cannot re-read the IAM CA in %s (keeping the previous one): %s",
                          self.root.parent, exc)
            return self._anchor


# --- the protocol, without HTTP -----------------------------------------------------------


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error response."""

    def __init__(self, status: int, error: str, description: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": _ascii(self.description)}


def _ascii(text: str, limit: int = 400) -> str:
    # error_description allows %x20-21 / %x23-5B / %x5D-7E only (RFC 6749 section 5.2).
    cleaned = "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?"
                      for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description)


def _invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


def _refusal(what: str, report: TokenReport) -> OAuthError:
    # RFC 8693 section 2.2.2: an unacceptable subject or actor token is invalid_request.
    return _invalid_request(f"{what}: {report.refusal()}")


def _level(subject_token_type: str | None) -> str:
    """The kind of exchange, for metrics: vm, app or recorded (Option 1)."""
    return {TYPE_VM_AUTH: "vm", TYPE_APP_AUTH: "app", TYPE_VM_IDENTITY: "recorded"}.get(
        subject_token_type or "", "other")


def _short(value: str, limit: int = 80) -> str:
    """A value the client sent, cut short for a message (never a whole token)."""
    return value if len(value) <= limit else value[:limit] + "..."


@dataclass(frozen=True)
class Client:
    identity: Identity
    method: str  # private_key_jwt or tls_client_auth


class Provider:
    """Discovery, JWKS and the token endpoint's decisions; the HTTP server feeds it."""

    def __init__(self, config: IdpConfig, anchors: AnchorSource | None = None,
                 signing_key: SigningKey | None = None, replay: ReplayCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.anchors = anchors or AnchorSource(config.ca_dir)
        self.signing_key = signing_key or SigningKey.load_or_create(config.signing_key)
        self.replay = replay or ReplayCache()
        self.clock = clock
        self._metrics: ServiceMetrics | None = None

    # --- metadata ------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        config = self.config
        # Left out, because this provider has no end-user login and issues no ID tokens:
        # authorization_endpoint (no grant uses it, RFC 8414 section 2), userinfo_endpoint,
        # id_token_signing_alg_values_supported (OpenID Discovery requires it of providers
        # that issue ID tokens), scopes_supported (no scopes), registration_endpoint
        # (identities come from the IAM CA). response_types_supported is required by both
        # specifications, so it is present, and empty: there is no authorization endpoint.
        return {
            "issuer": config.issuer,
            "token_endpoint": config.token_endpoint,
            "jwks_uri": config.jwks_uri,
            "response_types_supported": [],
            "subject_types_supported": ["public"],
            "grant_types_supported": [GRANT_TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
            "tls_client_certificate_bound_access_tokens": True,
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id",
                                 "act", "cnf"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.signing_key.jwk()]}

    # --- the token endpoint --------------------------------------------------------------

    @property
    def metrics(self) -> ServiceMetrics:
        """Token requests by level (vm, app, recorded) and result (ok or the OAuth error);
        a module renewing its tokens is one more request here."""
        if self._metrics is None:
            self._metrics = ServiceMetrics("p11grid_idp")
        return self._metrics

    def token(self, form: Mapping[str, str], tls_certificate: bytes | None,
              authorization: str | None, peer: str) -> dict[str, Any]:
        """The token response for one request, or OAuthError; one log line either way."""
        client: Client | None = None
        started = time.monotonic()
        level = _level(form.get("subject_token_type"))
        try:
            grant = form.get("grant_type")
            if grant is None:
                raise _invalid_request("grant_type is missing")
            if grant != GRANT_TOKEN_EXCHANGE:
                raise OAuthError(400, "unsupported_grant_type",
                                 f"grant_type {_short(grant)!r}: only {GRANT_TOKEN_EXCHANGE} "
                                 "is supported")
            client = self._authenticate(form, tls_certificate, authorization)
            response, summary = self._exchange(client, form)
        except OAuthError as refusal:
            who = client.identity.uri if client is not None else "unauthenticated client"
            log.warning("token request from %s (%s) refused: %s: %s", peer, who,
                        refusal.error, _ascii(refusal.description))
            self.metrics.observe(level, refusal.error, time.monotonic() - started)
            raise
        log.info("token request from %s (%s by %s): %s", peer, client.identity.uri,
                 client.method, summary)
        self.metrics.observe(level, "ok", time.monotonic() - started)
        return response

    def _authenticate(self, form: Mapping[str, str], tls_certificate: bytes | None,
                      authorization: str | None) -> Client:
        if authorization is not None:
            scheme = authorization.split(" ", 1)[0] or "Basic"
            raise OAuthError(401, "invalid_client",
                             f"HTTP {_short(scheme, 20)} authentication is not supported: "
                             "authenticate with private_key_jwt or tls_client_auth",
                             {"WWW-Authenticate": f'{_short(scheme, 20)} realm="p11grid"'})
        if "client_secret" in form:
            raise _invalid_client("client secrets are not used here: authenticate with "
                                  "private_key_jwt or tls_client_auth")
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if assertion_type is not None or assertion is not None:
            if tls_certificate is not None:
                # RFC 6749 section 2.3: one authentication method per request.
                raise _invalid_request("both a client_assertion and a TLS client "
                                       "certificate were presented: use one of "
                                       "private_key_jwt and tls_client_auth")
            if assertion_type != ASSERTION_TYPE:
                raise _invalid_client(f"client_assertion_type must be {ASSERTION_TYPE}")
            if assertion is None:
                raise _invalid_request("client_assertion is missing")
            return Client(self._assertion_identity(assertion, form.get("client_id")),
                          "private_key_jwt")
        if tls_certificate is not None:
            return Client(self._tls_identity(tls_certificate, form.get("client_id")),
                          "tls_client_auth")
        raise _invalid_client("no client authentication: send a private_key_jwt "
                              "client_assertion or a TLS client certificate")

    def _assertion_identity(self, assertion: str, client_id: str | None) -> Identity:
        """RFC 7523 section 3 and OpenID Core section 9, with the key from x5c."""
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _invalid_client(f"client_assertion is not a signed JWT: {exc}") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise _invalid_client(f"client_assertion alg {algorithm!r}: one of "
                                  f"{', '.join(ALGORITHMS)} is required")
        chain_b64 = header.get("x5c")
        if not isinstance(chain_b64, list) or not 0 < len(chain_b64) <= 4 \
                or not all(isinstance(c, str) for c in chain_b64):
            raise _invalid_client("client_assertion must carry the client's IAM certificate "
                                  "chain in its x5c header")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c, validate=True))
                     for c in chain_b64]
        except ValueError as exc:
            raise _invalid_client(f"client_assertion x5c does not hold certificates: {exc}"
                                  ) from None
        try:
            identity = verify_chain(chain[0], chain[1:], self.anchors.current())
        except ChainRefused as exc:
            raise _invalid_client(f"client_assertion x5c: {exc}") from None
        public_key = chain[0].public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise _invalid_client(f"the key of {identity} is neither RSA nor EC")
        audiences = [self.config.token_endpoint, self.config.issuer]
        try:
            claims = jwt.decode(
                assertion, key=public_key, algorithms=[algorithm], audience=audiences,
                leeway=LEEWAY, options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        except jwt.InvalidSignatureError:
            raise _invalid_client(f"client_assertion signature does not verify with the key "
                                  f"of {identity}") from None
        except jwt.ExpiredSignatureError:
            raise _invalid_client(f"client_assertion expired (exp "
                                  f"{unverified.get('exp')}, now {int(self.clock())}, leeway "
                                  f"{LEEWAY.total_seconds():.0f} s)") from None
        except jwt.InvalidAudienceError:
            raise _invalid_client(f"client_assertion aud {unverified.get('aud')!r} must be the "
                                  f"token endpoint {self.config.token_endpoint} or the "
                                  f"issuer {self.config.issuer}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid_client(f"client_assertion lacks the {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            raise _invalid_client(f"client_assertion: {type(exc).__name__}: {exc}") from None
        if claims["iss"] != identity.uri or claims["sub"] != identity.uri:
            raise _invalid_client(f"client_assertion iss {claims['iss']!r} and sub "
                                  f"{claims['sub']!r} must both be {identity}, the identity "
                                  "of its x5c certificate")
        if client_id is not None and client_id != identity.uri:
            raise _invalid_client(f"client_id {_short(client_id)!r} does not match {identity}, "
                                  "the identity of the assertion's certificate")
        exp = claims["exp"]
        now = self.clock()
        if not isinstance(exp, int | float) or exp > now + ASSERTION_MAX_AHEAD \
                + LEEWAY.total_seconds():
            raise _invalid_client(f"client_assertion exp {exp} is more than "
                                  f"{ASSERTION_MAX_AHEAD} s ahead: assertions are short-lived")
        jti = claims["jti"]
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise _invalid_client("client_assertion jti must be a string of 1-256 characters")
        # Last, so that an assertion refused for another reason does not use up its jti.
        if not self.replay.first_use(f"{identity.uri} {jti}", float(exp)):
            raise _invalid_client(f"client_assertion jti {_short(jti)!r} was already used")
        return identity

    def _tls_identity(self, certificate_der: bytes, client_id: str | None) -> Identity:
        """RFC 8705 section 2.1.2, with the IAM root (and its CRL) as the trust anchor."""
        if client_id is None:
            raise _invalid_request("tls_client_auth needs client_id: the identity URI in the "
                                   "TLS client certificate")
        try:
            certificate = x509.load_der_x509_certificate(certificate_der)
            identity = verify_chain(certificate, [], self.anchors.current())
        except (ValueError, ChainRefused) as exc:
            raise _invalid_client(f"TLS client certificate: {exc}") from None
        if client_id != identity.uri:
            raise _invalid_client(f"client_id {_short(client_id)!r} does not match {identity}, "
                                  "the identity of the TLS client certificate")
        return identity

    def _exchange(self, client: Client, form: Mapping[str, str]
                  ) -> tuple[dict[str, Any], str]:
        requested = form.get("requested_token_type")
        if requested is not None and requested != TYPE_ACCESS_TOKEN:
            raise _invalid_request(f"requested_token_type {_short(requested)!r}: only "
                                   f"{TYPE_ACCESS_TOKEN} is issued")
        if "resource" in form:
            raise OAuthError(400, "invalid_target", "resource is not supported: name the grid "
                                                    "SP's identity with audience")
        audience = form.get("audience")
        if audience is None:
            raise _invalid_request("audience is missing: name the grid SP's identity")
        if audience not in self.config.audiences:
            raise OAuthError(400, "invalid_target", f"audience {_short(audience)!r} is not "
                                                    "one this provider issues tokens for")
        subject_token = form.get("subject_token")
        subject_type = form.get("subject_token_type")
        if subject_token is None or subject_type is None:
            raise _invalid_request("subject_token and subject_token_type are required")
        if subject_type == TYPE_VM_AUTH:
            return self._vm_level(client, subject_token, audience)
        if subject_type == TYPE_APP_AUTH:
            return self._app_level(client, subject_token, audience, form)
        if subject_type == TYPE_VM_IDENTITY:
            return self._recorded(client, subject_token, audience)
        raise _invalid_request(f"subject_token_type {_short(subject_type)!r} is not one of "
                               f"{TYPE_VM_AUTH}, {TYPE_APP_AUTH}, {TYPE_VM_IDENTITY}")

    def _expect(self, audience: str, issuer: Identity,
                vm_token: TokenReport | None = None) -> Expectations:
        # cnf is not compared here: the grid checks it against the TLS certificate it sees.
        return Expectations(anchor=self.anchors.current(), audience=audience,
                            max_lifetime=datetime.timedelta(
                                seconds=self.config.token_max_lifetime),
                            authenticated_issuer=issuer, vm_token=vm_token)

    def _require_kind(self, client: Client, kind: str, what: str) -> None:
        if client.identity.kind != kind:
            raise OAuthError(400, "unauthorized_client",
                             f"{what} is exchanged by its {kind}, not by {client.identity}")

    def _vm_level(self, client: Client, token: str, audience: str
                  ) -> tuple[dict[str, Any], str]:
        self._require_kind(client, "hv", "a VM-Auth-Token")
        report = verify_token(token, "vm", self._expect(audience, client.identity))
        if not report.ok:
            raise _refusal("subject_token", report)
        return self._issue(report, audience, client, {"sub": client.identity.uri})

    def _app_level(self, client: Client, token: str, audience: str,
                   form: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        self._require_kind(client, "vm", "an APP-Auth-Token")
        actor = form.get("actor_token")
        if actor is None or form.get("actor_token_type") != TYPE_ACCESS_TOKEN:
            raise _invalid_request("an APP-Auth-Token needs actor_token = the VM's access "
                                   f"token from this provider, actor_token_type = "
                                   f"{TYPE_ACCESS_TOKEN}")
        hypervisor = self._actor_hypervisor(actor, client)
        vm_token = form.get("vm_auth_token")
        if vm_token is None:
            raise _invalid_request("an APP-Auth-Token needs vm_auth_token, the VM's own "
                                   "VM-Auth-Token")
        vm_report = verify_token(vm_token, "vm", self._expect(audience, hypervisor))
        if not vm_report.ok:
            raise _refusal("vm_auth_token", vm_report)
        if vm_report.subject != client.identity:
            raise _invalid_request(f"vm_auth_token is about {vm_report.subject}, not the "
                                   f"authenticated client {client.identity}")
        report = verify_token(token, "app", self._expect(audience, client.identity, vm_report))
        if not report.ok:
            raise _refusal("subject_token", report)
        act = {"sub": client.identity.uri, "act": {"sub": hypervisor.uri}}
        return self._issue(report, audience, client, act)

    def _actor_hypervisor(self, actor: str, client: Client) -> Identity:
        """The HV behind the VM's access token (one this provider signed)."""
        try:
            header = jwt.get_unverified_header(actor)
            claims = jwt.decode(actor, self.signing_key.public_key(),
                                algorithms=[SIGNING_ALGORITHM], issuer=self.config.issuer,
                                leeway=LEEWAY, options={
                                    "verify_aud": False,
                                    "require": ["iss", "sub", "aud", "exp", "iat", "jti"]})
        except jwt.PyJWTError as exc:
            raise _invalid_request(f"actor_token is not a valid access token of this "
                                   f"provider: {type(exc).__name__}: {exc}") from None
        if header.get("typ") != ACCESS_TOKEN_TYP:
            raise _invalid_request(f"actor_token typ {header.get('typ')!r} is not "
                                   f"{ACCESS_TOKEN_TYP}")
        if claims["sub"] != client.identity.uri:
            raise _invalid_request(f"actor_token sub {claims['sub']!r} is not the "
                                   f"authenticated client {client.identity}")
        act = claims.get("act")
        hypervisor: Identity | None = None
        if isinstance(act, dict) and set(act) == {"sub"}:  # one level: the VM's own token
            try:
                hypervisor = Identity.parse(str(act["sub"]))
            except IdentityError:
                hypervisor = None
        if hypervisor is None or hypervisor.kind != "hv":
            raise _invalid_request("actor_token must be a VM's access token (act = its HV)")
        return hypervisor

    def _recorded(self, client: Client, vm_uri: str, audience: str
                  ) -> tuple[dict[str, Any], str]:
        self._require_kind(client, "hv", "a recorded VM-Auth-Token")
        directory = self.config.recorded_tokens
        if directory is None:
            raise _invalid_request("this provider keeps no recorded VM-Auth-Tokens "
                                   "(recorded_tokens is not configured)")
        try:
            vm = Identity.parse(vm_uri)
        except IdentityError as exc:
            raise _invalid_request(f"subject_token: {exc}") from None
        if vm.kind != "vm":
            raise _invalid_request(f"subject_token {vm} is not a vm identity")
        # Identity names are one path segment ([A-Za-z0-9][A-Za-z0-9.-_]*): no traversal.
        try:
            token = (directory / f"{vm.name}.jwt").read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise _invalid_request(f"no VM-Auth-Token is recorded for {vm}") from None
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read the recorded token of %s: %s", vm, exc)
            raise _invalid_request(f"the recorded VM-Auth-Token of {vm} is unreadable"
                                   ) from None
        report = verify_token(token, "vm", self._expect(audience, client.identity))
        if not report.ok:
            raise _refusal(f"the recorded VM-Auth-Token of {vm}", report)
        if report.subject != vm:
            raise _invalid_request(f"the token recorded for {vm} is about {report.subject}")
        response, summary = self._issue(report, audience, client,
                                        {"sub": client.identity.uri})
        response["vm_auth_token"] = token
        return response, summary + " (recorded VM-Auth-Token)"

    def _issue(self, report: TokenReport, audience: str, client: Client,
               act: dict[str, Any]) -> tuple[dict[str, Any], str]:
        now = int(self.clock())
        expires = min(now + self.config.access_token_lifetime, int(report.expires.timestamp()))
        if expires <= now:
            raise _invalid_request(f"subject_token expires now ({report.expires:%H:%M:%S} "
                                   "UTC): renew it")
        jti = secrets.token_urlsafe(16)
        claims = {"iss": self.config.issuer, "sub": report.claims["sub"], "aud": audience,
                  "client_id": client.identity.uri, "iat": now, "exp": expires, "jti": jti,
                  "act": act, "cnf": report.claims["cnf"]}
        response = {"access_token": self.signing_key.sign(claims),
                    "issued_token_type": TYPE_ACCESS_TOKEN, "token_type": "Bearer",
                    "expires_in": expires - now}
        return response, (f"issued access token {jti} for {claims['sub']} to {audience}, "
                          f"act {json.dumps(act, separators=(',', ':'))}, "
                          f"{expires - now} s")


def parse_form(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; OAuthError if it is not a clean one."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                       strict_parsing=True, encoding="utf-8",
                                       errors="strict", max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid_request(f"the body is not a form (application/x-www-form-urlencoded): "
                               f"{type(exc).__name__}") from None
    form: dict[str, str] = {}
    for name, raw in pairs:
        value = raw.strip()  # a token read from a file often keeps its newline
        if not value:
            continue  # RFC 6749 section 3.2: a parameter without a value is omitted
        if name in form:
            raise _invalid_request(f"parameter {_short(name, 40)!r} is sent more than once")
        form[name] = value
    return form


def record_token(config: IdpConfig, token: str) -> tuple[Path, TokenReport]:
    """Option 1: verify a VM-Auth-Token for one of the configured audiences and keep it
    for the provider to hand out; TokenRefused or IdpConfigError if it cannot."""
    if config.recorded_tokens is None:
        raise IdpConfigError(f"{config.path} [idp]: recorded_tokens is not configured")
    token = token.strip()
    try:
        audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
    except jwt.PyJWTError as exc:
        raise TokenRefused(f"not a JWT: {exc}") from None
    if audience not in config.audiences:
        raise TokenRefused(f"aud {audience!r} is not one of the configured audiences "
                           f"({', '.join(config.audiences)})")
    expect = Expectations(anchor=AnchorSource(config.ca_dir).current(), audience=audience,
                          max_lifetime=datetime.timedelta(seconds=config.token_max_lifetime))
    report = verify_token(token, "vm", expect).require()
    assert report.subject is not None  # an ok report has one
    config.recorded_tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = config.recorded_tokens / f"{report.subject.name}.jwt"
    write_file(target, (token + "\n").encode(), mode=0o600)
    return target, report


# --- HTTPS -----------------------------------------------------------------------------------


def server_context(config: IdpConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.certificate, config.key)
        # Client certificates are asked for, not required: private_key_jwt needs none.
        # OpenSSL checks the chain to the IAM root; revocation is checked per request.
        context.load_verify_locations(cafile=config.ca_dir / "ca.pem")
    except (OSError, ssl.SSLError) as exc:
        raise IdpConfigError(f"{config.path} [idp]: TLS files: {exc}") from None
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "p11grid-idp"
    sys_version = ""
    # HTTP/1.1 for "Expect: 100-continue" (curl sends it with bodies over 1 KiB); every
    # answer still closes its connection, so no idle keep-alive holds a thread.
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT  # per socket operation: a silent client is dropped

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the provider writes its own line per request

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s: %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # http.server's own errors (bad request line, unknown method) as JSON, too.
        error = {404: "not_found", 405: "invalid_request", 501: "invalid_request"}.get(
            code, "invalid_request")
        self.close_connection = True
        self._reply(code, {"error": error, "error_description": _ascii(
            message or self.responses.get(code, ("error",))[0])})

    def _reply(self, status: int, body: Mapping[str, Any],
               headers: Mapping[str, str] | None = None, cache: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if cache:
            self.send_header("Cache-Control", "max-age=300")
        else:
            self.send_header("Cache-Control", "no-store")  # RFC 6749 section 5.1
            self.send_header("Pragma", "no-cache")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self) -> str | None:
        path = urllib.parse.urlsplit(self.path).path
        return self.server.routes.get(path)

    def do_GET(self) -> None:
        route = self._route()
        provider = self.server.provider
        if route == "discovery":
            self._reply(200, provider.discovery(), cache=True)
        elif route == "jwks":
            self._reply(200, provider.jwks(), cache=True)
        elif route == "token":
            self._reply(405, {"error": "invalid_request",
                              "error_description": "the token endpoint takes POST"},
                        {"Allow": "POST"})
        else:
            self.send_error(404, "no such endpoint")

    def _discard_body(self) -> None:
        # A small unread body would make the close a TCP reset, losing the answer.
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        self.close_connection = True

    def do_POST(self) -> None:
        route = self._route()
        if route != "token":
            self._discard_body()
            if route is None:
                self.send_error(404, "no such endpoint")
            else:
                self._reply(405, {"error": "invalid_request",
                                  "error_description": "this endpoint takes GET"},
                            {"Allow": "GET"})
            return
        peer = self.address_string()
        try:
            form = self._read_form()
            certificate = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            response = self.server.provider.token(form, certificate,
                                                  self.headers.get("Authorization"), peer)
        except OAuthError as refusal:
            self._reply(refusal.status, refusal.body(), refusal.headers)
            return
        except (TimeoutError, ConnectionError) as exc:
            log.info("%s: the request was not completed: %s", peer, type(exc).__name__)
            self.close_connection = True
            return
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("%s: internal error on the token endpoint", peer)
            self._reply(500, {"error": "server_error",
                              "error_description": "internal error; see the provider's log"})
            return
        self._reply(200, response)

    def _read_form(self) -> dict[str, str]:
        """The body, bounded; refusals are logged here (the provider never sees them)."""
        peer = self.address_string()
        try:
            return self._read_form_or_refuse()
        except OAuthError as refusal:
            log.warning("token request from %s refused: %s: %s", peer, refusal.error,
                        _ascii(refusal.description))
            self.close_connection = True
            raise

    def _read_form_or_refuse(self) -> dict[str, str]:
        if self.headers.get("Transfer-Encoding") is not None:
            raise OAuthError(411, "invalid_request", "send the form with a Content-Length, "
                                                     "not chunked")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise OAuthError(411, "invalid_request", "Content-Length is required")
        if not length_text.strip().isdigit():
            raise _invalid_request("Content-Length is not a number")
        length = int(length_text)
        if length > MAX_BODY:
            raise OAuthError(413, "invalid_request", f"the body of {length} bytes is over the "
                                                     f"limit of {MAX_BODY}")
        if length == 0:
            raise _invalid_request("the body is empty: send the token request as a form")
        body = self.rfile.read(length)  # read before refusing: an unread body resets TCP
        if len(body) != length:
            raise _invalid_request("the body is shorter than its Content-Length")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise _invalid_request(f"Content-Type {_short(content_type, 60)!r}: the token "
                                   "endpoint takes application/x-www-form-urlencoded")
        return parse_form(body)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], provider: Provider,
                 context: ssl.SSLContext, routes: dict[str, str]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.provider = provider
        self.context = context
        self.routes = routes
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN: a DNS call without deadline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), \
            int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("%s: too many connections (%d); dropped", client_address[0],
                        MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the connection's thread, with a deadline: a
        # slow or silent client never holds up accept().
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("%s: TLS handshake failed: %s", client_address[0],
                     getattr(exc, "reason", None) or type(exc).__name__)
            return
        try:
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("%s: connection failed", client_address[0])


class IdpServer:
    """The provider on HTTPS; `start()` serves in a thread, `stop()` ends it."""

    def __init__(self, config: IdpConfig, provider: Provider | None = None) -> None:
        self.config = config
        self.provider = provider or Provider(config)
        base = urllib.parse.urlsplit(config.issuer).path.rstrip("/")
        routes = {f"{base}/.well-known/openid-configuration": "discovery",
                  # RFC 8414 section 3: the well-known part goes before the issuer's path.
                  f"/.well-known/oauth-authorization-server{base}": "discovery",
                  f"{base}/jwks": "jwks", f"{base}/token": "token"}
        self._httpd = _HttpServer((config.host, config.port), self.provider,
                                  server_context(config), routes)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="p11grid-idp", daemon=True)
        self._thread.start()
        log.info("OpenID provider %s listening on %s:%d", self.config.issuer,
                 self.config.host, self.port)

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        log.info("OpenID provider stopped")


__all__ = [
    "ASSERTION_TYPE", "GRANT_TOKEN_EXCHANGE", "TYPE_ACCESS_TOKEN", "TYPE_APP_AUTH",
    "TYPE_VM_AUTH", "TYPE_VM_IDENTITY", "AnchorSource", "IdpConfig", "IdpConfigError",
    "IdpServer", "OAuthError", "Provider", "SigningKey", "load_config", "parse_form",
    "record_token",
]
