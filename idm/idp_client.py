"""The PKCS#11 module's side of the OpenID provider: discovery and the token exchanges.

Standard library only at import (`http.client`, `ssl`): the module loads this inside
hosts such as nginx and must stay light (DESIGN.md section 7). `cryptography` is touched
only by the helpers that read certificates (`JwtClientAuth.from_certificates`,
`TlsClientAuth.from_files`), whose callers already hold certificate objects or files.

Every call has one deadline (`timeout` seconds, for connect, TLS, request and answer
together). Failures are `IdpUnreachable` (no answer: connection, TLS, timeout) or
`IdpRefused` (the provider answered with an error, or with something that is not a token
response), both `IdpClientError`.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

    from idm.tokens import JwsSigner

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TYPE_VM_AUTH = "urn:p11grid:params:oauth:token-type:vm-auth-token"
TYPE_APP_AUTH = "urn:p11grid:params:oauth:token-type:app-auth-token"
TYPE_VM_IDENTITY = "urn:p11grid:params:oauth:token-type:vm-identity"
ACCESS_TOKEN_TYP = "at+jwt"  # RFC 9068 section 2.1: the JWT header of our access tokens

DEFAULT_TIMEOUT = 10.0
ASSERTION_LIFETIME = 60  # seconds; the provider accepts at most 300
MAX_RESPONSE = 256 * 1024


class IdpClientError(Exception):
    """Getting a token from the OpenID provider failed."""


class IdpUnreachable(IdpClientError):
    """No usable answer: the connection, the TLS handshake or the deadline failed."""


class IdpRefused(IdpClientError):
    """The provider answered with an error (RFC 6749 section 5.2), or not with a token."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"the OpenID provider refused (HTTP {status}): {error}: "
                         f"{description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_at: float  # seconds since the epoch, from this host's clock
    token_type: str = "Bearer"
    vm_auth_token: str | None = None  # Option 1: the recorded VM-Auth-Token


@dataclass(frozen=True)
class JwtClientAuth:
    """`private_key_jwt`: assertions signed by `signer` (a key in a secure element),
    carrying `chain` (DER certificates, the signer's first) in `x5c`."""

    signer: JwsSigner
    chain: tuple[bytes, ...]
    client_id: str  # the spiffe:// identity in chain[0]

    @classmethod
    def from_certificates(cls, signer: JwsSigner, chain: Sequence[x509.Certificate]
                          ) -> JwtClientAuth:
        from cryptography.hazmat.primitives.serialization import Encoding

        from idm.identity import identity_of

        if not chain:
            raise IdpClientError("private_key_jwt needs the signer's certificate")
        return cls(signer, tuple(c.public_bytes(Encoding.DER) for c in chain),
                   identity_of(chain[0]).uri)


@dataclass(frozen=True)
class TlsClientAuth:
    """`tls_client_auth`: the TLS client certificate and its key file."""

    certificate_file: Path
    key_file: Path
    client_id: str  # the spiffe:// identity in the certificate

    @classmethod
    def from_files(cls, certificate_file: Path, key_file: Path) -> TlsClientAuth:
        from cryptography import x509 as x509_module

        from idm.identity import identity_of

        certificate = x509_module.load_pem_x509_certificate(Path(certificate_file).read_bytes())
        return cls(Path(certificate_file), Path(key_file), identity_of(certificate).uri)


ClientAuth = JwtClientAuth | TlsClientAuth


@dataclass(frozen=True)
class IdpConnection:
    """Where the token endpoint is, and how to trust it."""

    token_endpoint: str
    ca_file: Path  # the IAM root: the provider's certificate must chain to it
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def discover(cls, issuer_url: str, ca_file: Path | str,
                 timeout: float = DEFAULT_TIMEOUT) -> IdpConnection:
        metadata = fetch_discovery(issuer_url, ca_file, timeout)
        return cls(str(metadata["token_endpoint"]), Path(ca_file), timeout)


# --- HTTPS with a deadline ----------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float, what: str) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def left(self) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise IdpUnreachable(f"{self.what}: no answer within {self.seconds:g} s")
        return remaining


def _is_provider(certificate: Mapping[str, Any]) -> bool:
    """Does the server's certificate name an `idp` identity (spiffe://<td>/idp/<name>)?"""
    for kind, value in certificate.get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            parts = str(value)[len("spiffe://"):].split("/")
            if len(parts) == 3 and parts[1] == "idp":
                return True
    return False


def _https(method: str, url: str, ca_file: Path | str, timeout: float,
           body: bytes | None = None, tls_auth: TlsClientAuth | None = None
           ) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise IdpClientError(f"{url!r} is not an https URL")
    deadline = _Deadline(timeout, f"{method} {url}")
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls_auth is not None:
            context.load_cert_chain(tls_auth.certificate_file, tls_auth.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise IdpClientError(f"cannot set up TLS for {url}: {exc}") from None
    connection = http.client.HTTPSConnection(parts.hostname, parts.port or 443,
                                             timeout=deadline.left(), context=context)
    target = parts.path or "/"
    headers = {"Accept": "application/json", "Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        connection.connect()
        sock: socket.socket = connection.sock  # type: ignore[assignment]
        peer = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        if not peer or not _is_provider(peer):
            raise IdpUnreachable(f"{url}: the server's certificate names no "
                                 "spiffe://<trust-domain>/idp/<name> identity")
        # A timeout per phase, each the time left: the whole call keeps one deadline.
        sock.settimeout(deadline.left())
        connection.request(method, target, body=body, headers=headers)
        sock.settimeout(deadline.left())
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while not response.isclosed():  # closed once the whole body is read
            sock.settimeout(deadline.left())
            chunk = response.read(16384)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise IdpRefused(response.status, "invalid_response",
                                 f"the answer is over {MAX_RESPONSE} bytes")
            chunks.append(chunk)
        return response.status, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        raise IdpUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def _json_object(status: int, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise IdpRefused(status, "invalid_response", "the answer is not a JSON object")
    return value


def _refused(status: int, data: bytes) -> IdpRefused:
    try:
        body = _json_object(status, data)
    except IdpRefused as exc:
        return exc
    return IdpRefused(status, str(body.get("error", "invalid_response")),
                      str(body.get("error_description", "")))


def fetch_discovery(issuer_url: str, ca_file: Path | str,
                    timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The provider's OpenID configuration, checked to be about `issuer_url`."""
    issuer_url = issuer_url.rstrip("/")
    status, data = _https("GET", issuer_url + "/.well-known/openid-configuration", ca_file,
                          timeout)
    if status != 200:
        raise _refused(status, data)
    metadata = _json_object(status, data)
    # OpenID Discovery section 4.3: the issuer must be exactly the one asked for.
    if metadata.get("issuer") != issuer_url:
        raise IdpRefused(status, "invalid_response", f"the configuration is of issuer "
                                                     f"{metadata.get('issuer')!r}, not "
                                                     f"{issuer_url!r}")
    if not isinstance(metadata.get("token_endpoint"), str):
        raise IdpRefused(status, "invalid_response", "the configuration has no token_endpoint")
    return metadata


# --- the token exchanges ---------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def client_assertion(auth: JwtClientAuth, audience: str, now: float | None = None) -> str:
    """A `private_key_jwt` assertion (RFC 7523 section 3) for `audience`, the token
    endpoint; the signature is made by `auth.signer`, inside its secure element."""
    issued = int(time.time() if now is None else now)
    header = {"alg": auth.signer.jws_algorithm, "typ": "JWT",
              "x5c": [base64.b64encode(der).decode() for der in auth.chain]}
    claims = {"iss": auth.client_id, "sub": auth.client_id, "aud": audience,
              "iat": issued, "exp": issued + ASSERTION_LIFETIME,
              "jti": secrets.token_urlsafe(24)}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    return f"{signing_input}.{_b64url(auth.signer.sign_jws(signing_input.encode()))}"


def _exchange(idp: IdpConnection, auth: ClientAuth, form: dict[str, str]) -> IssuedToken:
    form = {"grant_type": GRANT_TOKEN_EXCHANGE, "client_id": auth.client_id,
            "requested_token_type": TYPE_ACCESS_TOKEN, **form}
    tls_auth = auth if isinstance(auth, TlsClientAuth) else None
    if isinstance(auth, JwtClientAuth):
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = client_assertion(auth, idp.token_endpoint)
    started = time.time()
    status, data = _https("POST", idp.token_endpoint, idp.ca_file, idp.timeout,
                          urllib.parse.urlencode(form).encode(), tls_auth)
    if status != 200:
        raise _refused(status, data)
    body = _json_object(status, data)
    token = body.get("access_token")
    expires_in = body.get("expires_in")
    token_type = body.get("token_type")
    if not isinstance(token, str) or not isinstance(expires_in, int) \
            or not isinstance(token_type, str) or token_type.lower() != "bearer" \
            or body.get("issued_token_type") != TYPE_ACCESS_TOKEN:
        raise IdpRefused(status, "invalid_response", "the answer is not an RFC 8693 "
                                                     "access token response")
    recorded = body.get("vm_auth_token")
    # From the moment the request left: the token expires no later than this says.
    return IssuedToken(token, started + expires_in, token_type,
                       recorded if isinstance(recorded, str) else None)


def exchange_vm_token(idp: IdpConnection, auth: ClientAuth, vm_auth_token: str,
                      audience: str) -> IssuedToken:
    """The HV (authenticated by `auth`) exchanges the VM's VM-Auth-Token for an access
    token to `audience` (the grid SP), whose sub is the VM."""
    return _exchange(idp, auth, {"subject_token": vm_auth_token,
                                 "subject_token_type": TYPE_VM_AUTH, "audience": audience})


def exchange_app_token(idp: IdpConnection, auth: ClientAuth, app_auth_token: str,
                       vm_access_token: str, vm_auth_token: str, audience: str
                       ) -> IssuedToken:
    """The VM (authenticated by `auth`) exchanges an APP-Auth-Token, with its own access
    token as the actor and its VM-Auth-Token, for an access token whose sub is the APP."""
    return _exchange(idp, auth, {"subject_token": app_auth_token,
                                 "subject_token_type": TYPE_APP_AUTH,
                                 "actor_token": vm_access_token,
                                 "actor_token_type": TYPE_ACCESS_TOKEN,
                                 "vm_auth_token": vm_auth_token, "audience": audience})


def fetch_recorded(idp: IdpConnection, auth: ClientAuth, vm_identity: str,
                   audience: str) -> IssuedToken:
    """Option 1: the HV asks for the VM-Auth-Token the administrator recorded for
    `vm_identity`; the answer carries it (`vm_auth_token`) and an access token."""
    issued = _exchange(idp, auth, {"subject_token": vm_identity,
                                   "subject_token_type": TYPE_VM_IDENTITY,
                                   "audience": audience})
    if issued.vm_auth_token is None:
        raise IdpRefused(200, "invalid_response", "the answer carries no vm_auth_token")
    return issued
