"""The OpenID provider (`p11grid idp serve`) and its client, with real peers on 127.0.0.1.

One provider runs in this process (a thread) for the module, with a CA made in a
temporary directory; `p11grid idp serve` and `p11grid idp record` also run as commands.
Peers: our own `idm.idp_client` (with a software `JwsSigner`), authlib's OAuth 2.0 client
on requests, PyJWT's JWKS client, and plain `http.client` for the malformed requests.
Each refusal is produced by one defect in an otherwise good request, and the same request
without the defect is accepted.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import http.client
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from authlib.integrations.base_client import OAuthError as AuthlibOAuthError
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey

from idm import idp_client
from idm.authority import Authority
from idm.identity import Identity
from idm.idp import (
    ASSERTION_TYPE,
    GRANT_TOKEN_EXCHANGE,
    TYPE_ACCESS_TOKEN,
    TYPE_APP_AUTH,
    TYPE_VM_AUTH,
    IdpConfig,
    IdpConfigError,
    IdpServer,
    load_config,
)
from idm.idp_client import (
    IdpConnection,
    IdpRefused,
    IdpUnreachable,
    JwtClientAuth,
    TlsClientAuth,
)
from idm.tokens import issue_token

DOMAIN = "p11grid.test"
SP = f"spiffe://{DOMAIN}/sp/grid-sp"
OTHER_SP = f"spiffe://{DOMAIN}/sp/other-sp"  # a real SP identity this provider does not serve
HOUR = datetime.timedelta(hours=1)
VENV_BIN = Path(sys.executable).parent


# --- the world ------------------------------------------------------------------------------

class SoftSigner:
    """A software key standing where a secure element's key stands in production."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        self.key = key

    @property
    def jws_algorithm(self) -> str:
        return "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"

    def sign_jws(self, signing_input: bytes) -> bytes:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclasses.dataclass
class Entity:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    certificate: x509.Certificate
    cert_file: Path
    key_file: Path

    @property
    def uri(self) -> str:
        return next(iter(self.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)))

    @property
    def signer(self) -> SoftSigner:
        return SoftSigner(self.key)

    def jwt_auth(self) -> JwtClientAuth:
        return JwtClientAuth.from_certificates(self.signer, [self.certificate])

    def tls_auth(self) -> TlsClientAuth:
        return TlsClientAuth.from_files(self.cert_file, self.key_file)

    def x5c(self) -> list[str]:
        return [base64.b64encode(self.certificate.public_bytes(
            serialization.Encoding.DER)).decode()]


def _entity(ca: Authority, directory: Path, kind: str, name: str, rsa_key: bool = False,
            **issue: Any) -> Entity:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(
            ec.SECP256R1()))
    certificate = ca.issue(Identity(DOMAIN, kind, name), key.public_key(), **issue)
    cert_file = directory / f"{kind}-{name}.pem"
    key_file = directory / f"{kind}-{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return Entity(key, certificate, cert_file, key_file)


@dataclasses.dataclass
class World:
    directory: Path
    ca: Authority
    hv: Entity
    hv2: Entity
    vm: Entity
    vm2: Entity
    app: Entity
    stranger_hv: Entity  # certified by another CA of the same trust domain
    config_file: Path
    config: IdpConfig

    @property
    def ca_file(self) -> Path:
        return self.ca.directory / "ca.pem"

    @property
    def issuer(self) -> str:
        return self.config.issuer

    @property
    def token_endpoint(self) -> str:
        return self.config.token_endpoint

    @property
    def idp(self) -> IdpConnection:
        return IdpConnection(self.token_endpoint, self.ca_file, timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_config(world_dir: Path, ca_dir: Path, port: int, name: str = "idp.toml",
                  **extra: str) -> Path:
    lines = [
        "[idp]",
        f'listen = "127.0.0.1:{port}"',
        f'issuer = "https://127.0.0.1:{port}"',
        f'certificate = "{world_dir}/idp-idp.pem"',
        f'key = "{world_dir}/idp-idp.key"',
        f'ca_dir = "{ca_dir}"',
        f'signing_key = "{world_dir}/signing.pem"',
        f'audiences = ["{SP}"]',
        "access_token_lifetime = 300",
        "token_max_lifetime = 7200",
        f'recorded_tokens = "{world_dir}/recorded"',
    ] + [f'{key} = "{value}"' for key, value in extra.items()]
    path = world_dir / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("idp")
    ca = Authority.init(directory / "ca", DOMAIN)
    stranger_ca = Authority.init(directory / "stranger-ca", DOMAIN)
    _entity(ca, directory, "idp", "idp", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    config_file = _write_config(directory, ca.directory, _free_port())
    config = load_config(config_file)
    server = IdpServer(config)
    server.start()
    try:
        yield World(directory, ca, _entity(ca, directory, "hv", "hv-1"),
                    _entity(ca, directory, "hv", "hv-2"), _entity(ca, directory, "vm", "vm-1"),
                    _entity(ca, directory, "vm", "vm-2"), _entity(ca, directory, "app", "web"),
                    _entity(stranger_ca, directory, "hv", "hv-1-stranger"), config_file,
                    config)
    finally:
        server.stop()


def _vm_token(world: World, hv: Entity | None = None, vm: Entity | None = None,
              audience: str = SP, lifetime: datetime.timedelta = HOUR) -> str:
    hv = hv or world.hv
    return issue_token("vm", hv.signer, [hv.certificate], (vm or world.vm).certificate,
                       audience, lifetime)


def _app_token(world: World, vm: Entity | None = None, audience: str = SP) -> str:
    vm = vm or world.vm
    return issue_token("app", vm.signer, [vm.certificate], world.app.certificate, audience,
                       HOUR)


def _assertion(world: World, client: Entity, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": client.uri, "sub": client.uri, "aud": world.token_endpoint, "iat": now,
            "exp": now + 60, "jti": secrets.token_urlsafe(16), **claims}
    algorithm = "RS256" if isinstance(client.key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(body, client.key, algorithm=algorithm, headers={"x5c": client.x5c()})


def _client_context(world: World, cert: Entity | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(world.ca_file))
    if cert is not None:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


def _raw(world: World, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, cert: Entity | None = None
         ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    connection = http.client.HTTPSConnection("127.0.0.1", world.config.port, timeout=10,
                                             context=_client_context(world, cert))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    assert b"Traceback" not in data
    return response.status, json.loads(data), response


@dataclasses.dataclass
class Request:
    """One token request: a form, maybe over TLS with a client certificate."""

    form: dict[str, str]
    cert: Entity | None = None


def _post(world: World, request: Request) -> tuple[int, dict[str, Any]]:
    body = urllib.parse.urlencode(request.form)
    status, answer, _ = _raw(world, "POST", "/token", body.encode(),
                             {"Content-Type": "application/x-www-form-urlencoded"},
                             request.cert)
    return status, answer


def _exchange(world: World, client: Entity, subject_token: str, subject_type: str = TYPE_VM_AUTH,
              audience: str = SP, tls: bool = False, **extra: str) -> Request:
    """A good token-exchange request authenticated as `client` (fresh assertion)."""
    form = {"grant_type": GRANT_TOKEN_EXCHANGE, "subject_token": subject_token,
            "subject_token_type": subject_type, "audience": audience, **extra}
    if tls:
        return Request({"client_id": client.uri, **form}, cert=client)
    return Request({"client_assertion_type": ASSERTION_TYPE,
                    "client_assertion": _assertion(world, client), **form})


def _claims(world: World, token: str) -> dict[str, Any]:
    _, keys, _ = _raw(world, "GET", "/jwks")
    key = jwt.PyJWK(keys["keys"][0]).key
    return dict(jwt.decode(token, key, algorithms=["ES256"], audience=SP, issuer=world.issuer))


# --- discovery and keys ---------------------------------------------------------------------

def test_discovery_is_well_formed(world: World) -> None:
    metadata = idp_client.fetch_discovery(world.issuer, world.ca_file, timeout=5)
    assert metadata["issuer"] == world.issuer
    assert metadata["token_endpoint"] == world.issuer + "/token"
    assert metadata["jwks_uri"] == world.issuer + "/jwks"
    assert metadata["grant_types_supported"] == [GRANT_TOKEN_EXCHANGE]
    assert metadata["token_endpoint_auth_methods_supported"] == ["private_key_jwt",
                                                                 "tls_client_auth"]
    assert metadata["token_endpoint_auth_signing_alg_values_supported"] == [
        "RS256", "ES256", "ES384"]
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    assert "authorization_endpoint" not in metadata  # no end-user login
    # authlib's RFC 8414 checks of each member we publish.
    checked = AuthorizationServerMetadata(metadata)
    for member in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri",
                   "grant_types_supported", "token_endpoint_auth_methods_supported",
                   "token_endpoint_auth_signing_alg_values_supported"):
        getattr(checked, f"validate_{member}")()
    # The RFC 8414 location says the same.
    status, same, _ = _raw(world, "GET", "/.well-known/oauth-authorization-server")
    assert status == 200 and same == metadata
    assert IdpConnection.discover(world.issuer, world.ca_file, 5).token_endpoint == \
        world.token_endpoint


def test_jwks_holds_the_signing_key_with_its_thumbprint(world: World) -> None:
    status, keys, response = _raw(world, "GET", "/jwks")
    assert status == 200 and response.getheader("Content-Type") == "application/json"
    (key,) = keys["keys"]
    assert key["kty"] == "EC" and key["crv"] == "P-256" and key["alg"] == "ES256"
    assert key["use"] == "sig" and "d" not in key
    assert key["kid"] == ECKey.import_key(key).thumbprint()  # RFC 7638, by joserfc
    mode = (world.directory / "signing.pem").stat().st_mode & 0o777
    assert mode == 0o600  # created at the first start


def test_access_token_verifies_against_the_jwks(world: World) -> None:
    vm_token = _vm_token(world)
    issued = idp_client.exchange_vm_token(world.idp, world.hv.jwt_auth(), vm_token, SP)
    client = jwt.PyJWKClient(world.config.jwks_uri, ssl_context=_client_context(world),
                             timeout=5)
    signing_key = client.get_signing_key_from_jwt(issued.access_token)
    claims = jwt.decode(issued.access_token, signing_key.key, algorithms=["ES256"],
                        audience=SP, issuer=world.issuer)
    header = jwt.get_unverified_header(issued.access_token)
    vm_claims = jwt.decode(vm_token, options={"verify_signature": False})
    assert header["typ"] == "at+jwt" and header["kid"] == signing_key.key_id
    assert claims["sub"] == world.vm.uri and claims["aud"] == SP
    assert claims["act"] == {"sub": world.hv.uri}
    assert claims["client_id"] == world.hv.uri
    assert claims["cnf"] == vm_claims["cnf"]
    assert set(claims) >= {"iss", "sub", "aud", "iat", "exp", "jti", "client_id", "act", "cnf"}
    assert claims["exp"] - claims["iat"] == 300
    assert abs(issued.expires_at - claims["exp"]) <= 2


# --- interoperability: authlib's OAuth 2.0 client ------------------------------------------

def test_authlib_private_key_jwt(world: World) -> None:
    key = ECKey.import_key(world.hv.key_file.read_bytes())

    def session(token_endpoint: str) -> OAuth2Session:
        oauth = OAuth2Session(client_id=world.hv.uri, client_secret=key,
                              token_endpoint_auth_method="private_key_jwt")
        # authlib's header hook puts the IAM chain into the assertion; its default exp
        # (one hour) is past what the provider accepts, hence the claim.
        oauth.register_client_auth_method(PrivateKeyJWT(
            token_endpoint, headers={"x5c": world.hv.x5c()}, alg="ES256",
            claims={"exp": int(time.time()) + 120}))
        return oauth

    arguments: dict[str, Any] = {
        "grant_type": GRANT_TOKEN_EXCHANGE, "subject_token": _vm_token(world),
        "subject_token_type": TYPE_VM_AUTH, "audience": SP, "verify": str(world.ca_file),
        "timeout": 10}
    with pytest.raises(AuthlibOAuthError) as refused:
        session("https://elsewhere.test/token").fetch_token(world.token_endpoint, **arguments)
    assert refused.value.error == "invalid_client"
    assert "aud" in str(refused.value.description)
    token = session(world.token_endpoint).fetch_token(world.token_endpoint, **arguments)
    assert token["issued_token_type"] == TYPE_ACCESS_TOKEN
    assert token["token_type"] == "Bearer" and token["expires_in"] == 300
    assert _claims(world, token["access_token"])["sub"] == world.vm.uri


def test_authlib_tls_client_auth(world: World) -> None:
    # "none" puts client_id in the body; the certificate authenticates (RFC 8705).
    oauth = OAuth2Session(client_id=world.hv.uri, token_endpoint_auth_method="none")
    token = oauth.fetch_token(world.token_endpoint, grant_type=GRANT_TOKEN_EXCHANGE,
                              subject_token=_vm_token(world), subject_token_type=TYPE_VM_AUTH,
                              audience=SP, verify=str(world.ca_file),
                              cert=(str(world.hv.cert_file), str(world.hv.key_file)),
                              timeout=10)
    claims = _claims(world, token["access_token"])
    assert claims["sub"] == world.vm.uri and claims["act"] == {"sub": world.hv.uri}
    # Without the certificate, nothing authenticates the client.
    bare = OAuth2Session(client_id=world.hv.uri, token_endpoint_auth_method="none")
    with pytest.raises(AuthlibOAuthError) as refused:
        bare.fetch_token(world.token_endpoint, grant_type=GRANT_TOKEN_EXCHANGE,
                         subject_token=_vm_token(world), subject_token_type=TYPE_VM_AUTH,
                         audience=SP, verify=str(world.ca_file), timeout=10)
    assert refused.value.error == "invalid_client"


# --- our own client --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["private_key_jwt ES256", "private_key_jwt RS256",
                                    "tls_client_auth"])
def test_vm_level_with_our_client(world: World, method: str) -> None:
    hv = world.hv
    if "RS256" in method:
        hv = _entity(world.ca, world.directory, "hv", "hv-rsa", rsa_key=True)
    auth = hv.tls_auth() if method == "tls_client_auth" else hv.jwt_auth()
    # A VM token shorter than the access token lifetime caps the access token.
    vm_token = _vm_token(world, hv=hv, lifetime=datetime.timedelta(seconds=120))
    before = time.time()
    issued = idp_client.exchange_vm_token(world.idp, auth, vm_token, SP)
    claims = _claims(world, issued.access_token)
    assert claims["sub"] == world.vm.uri and claims["act"] == {"sub": hv.uri}
    assert claims["exp"] == jwt.decode(vm_token, options={"verify_signature": False})["exp"]
    assert before + 100 < issued.expires_at <= before + 122
    assert issued.vm_auth_token is None


def test_app_level_nests_act(world: World) -> None:
    vm_token = _vm_token(world)
    vm_access = idp_client.exchange_vm_token(world.idp, world.hv.jwt_auth(), vm_token, SP)
    app_token = _app_token(world)
    issued = idp_client.exchange_app_token(world.idp, world.vm.jwt_auth(), app_token,
                                           vm_access.access_token, vm_token, SP)
    claims = _claims(world, issued.access_token)
    assert claims["sub"] == world.app.uri
    assert claims["act"] == {"sub": world.vm.uri, "act": {"sub": world.hv.uri}}
    assert claims["client_id"] == world.vm.uri
    assert claims["cnf"] == jwt.decode(app_token, options={"verify_signature": False})["cnf"]
    # An APP's access token is no actor for another APP exchange.
    with pytest.raises(IdpRefused, match="actor_token sub"):
        idp_client.exchange_app_token(world.idp, world.vm.jwt_auth(), app_token,
                                      issued.access_token, vm_token, SP)


def test_option_1_record_then_fetch(world: World) -> None:
    p11grid = str(VENV_BIN / "p11grid")
    token_file = world.directory / "vm-2.jwt.in"
    token_file.write_text(_vm_token(world, vm=world.vm2) + "\n")
    # Nothing recorded yet: the provider says so.
    with pytest.raises(IdpRefused, match="no VM-Auth-Token is recorded") as refused:
        idp_client.fetch_recorded(world.idp, world.hv.jwt_auth(), world.vm2.uri, SP)
    assert refused.value.error == "invalid_request" and refused.value.status == 400
    # A token for an audience the provider does not serve is not recorded.
    stray = world.directory / "stray.jwt"
    stray.write_text(_vm_token(world, vm=world.vm2, audience=OTHER_SP))
    done = subprocess.run([p11grid, "idp", "record", "--config", str(world.config_file),
                           "--token", str(stray)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "not one of the configured audiences" in done.stderr
    done = subprocess.run([p11grid, "idp", "record", "--config", str(world.config_file),
                           "--token", str(token_file)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert f"recorded the VM-Auth-Token of {world.vm2.uri}" in done.stdout
    stored = world.directory / "recorded" / "vm-2.jwt"
    assert stored.stat().st_mode & 0o777 == 0o600
    issued = idp_client.fetch_recorded(world.idp, world.hv.tls_auth(), world.vm2.uri, SP)
    assert issued.vm_auth_token == token_file.read_text().strip()
    claims = _claims(world, issued.access_token)
    assert claims["sub"] == world.vm2.uri and claims["act"] == {"sub": world.hv.uri}
    # Another HV cannot have it: the recorded token was not issued by it.
    with pytest.raises(IdpRefused, match="authenticated issuer"):
        idp_client.fetch_recorded(world.idp, world.hv2.jwt_auth(), world.vm2.uri, SP)


# --- refusals, each with one defect; the same request without it is accepted ------------

Case = Callable[[World], tuple[Request, Request]]


def _untrusted_x5c(world: World) -> tuple[Request, Request]:
    token = _vm_token(world)
    bad = _exchange(world, world.hv, token)
    bad.form["client_assertion"] = _assertion(world, world.stranger_hv, iss=world.hv.uri,
                                              sub=world.hv.uri)
    return bad, _exchange(world, world.hv, token)


def _assertion_with(world: World, **claims: Any) -> tuple[Request, Request]:
    token = _vm_token(world)
    bad = _exchange(world, world.hv, token)
    bad.form["client_assertion"] = _assertion(world, world.hv, **claims)
    return bad, _exchange(world, world.hv, token)


def _client_id_mismatch(world: World, tls: bool) -> tuple[Request, Request]:
    token = _vm_token(world)
    bad = _exchange(world, world.hv, token, tls=tls)
    bad.form["client_id"] = world.hv2.uri
    good = _exchange(world, world.hv, token, tls=tls)
    good.form["client_id"] = world.hv.uri
    return bad, good


def _app_level(world: World, signer: Entity) -> Request:
    vm_token = _vm_token(world)
    actor = _post(world, _exchange(world, world.hv, vm_token))[1]["access_token"]
    return _exchange(world, world.vm, _app_token(world, vm=signer), TYPE_APP_AUTH,
                     actor_token=actor, actor_token_type=TYPE_ACCESS_TOKEN,
                     vm_auth_token=vm_token)


def _tampered(world: World) -> tuple[Request, Request]:
    token = _vm_token(world)
    head, body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sub"] = world.vm2.uri
    forged_body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return (_exchange(world, world.hv, f"{head}.{forged_body}.{signature}"),
            _exchange(world, world.hv, token))


def _client_credentials(world: World) -> tuple[Request, Request]:
    bad = _exchange(world, world.hv, _vm_token(world))
    bad.form["grant_type"] = "client_credentials"
    return bad, _exchange(world, world.hv, _vm_token(world))


CASES: dict[str, tuple[Case, int, str, str]] = {
    "assertion from an untrusted CA": (
        _untrusted_x5c, 401, "invalid_client", "does not chain to the IAM root"),
    "assertion with the wrong aud": (
        lambda w: _assertion_with(w, aud="https://elsewhere.test/token"), 401,
        "invalid_client", "aud"),
    "expired assertion": (
        lambda w: _assertion_with(w, iat=int(time.time()) - 600, exp=int(time.time()) - 300),
        401, "invalid_client", "expired"),
    "assertion living too long": (
        lambda w: _assertion_with(w, exp=int(time.time()) + 3600), 401, "invalid_client",
        "more than 300 s ahead"),
    "client_id not the assertion's": (
        lambda w: _client_id_mismatch(w, tls=False), 401, "invalid_client", "does not match"),
    "client_id not the TLS certificate's": (
        lambda w: _client_id_mismatch(w, tls=True), 401, "invalid_client", "does not match"),
    "VM token not issued by the authenticated HV": (
        lambda w: (_exchange(w, w.hv2, _vm_token(w)),
                   _exchange(w, w.hv2, _vm_token(w, hv=w.hv2))),
        400, "invalid_request", "authenticated issuer"),
    "VM token for another audience": (
        lambda w: (_exchange(w, w.hv, _vm_token(w, audience=OTHER_SP)),
                   _exchange(w, w.hv, _vm_token(w))),
        400, "invalid_request", "subject_token: audience"),
    "audience the provider does not serve": (
        lambda w: (_exchange(w, w.hv, _vm_token(w, audience=OTHER_SP), audience=OTHER_SP),
                   _exchange(w, w.hv, _vm_token(w))),
        400, "invalid_target", "not one this provider issues tokens for"),
    "unsupported grant type": (
        _client_credentials, 400, "unsupported_grant_type", "client_credentials"),
    "tampered VM token": (_tampered, 400, "invalid_request", "signature"),
    "VM token exchanged by a VM": (
        lambda w: (_exchange(w, w.vm, _vm_token(w)), _exchange(w, w.hv, _vm_token(w))),
        400, "unauthorized_client", "exchanged by its hv"),
    "APP token from another VM than the actor's subject": (
        lambda w: (_app_level(w, w.vm2), _app_level(w, w.vm)),
        400, "invalid_request", "authenticated issuer"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refusal_and_acceptance(world: World, name: str) -> None:
    make, status, error, reason = CASES[name]
    bad, good = make(world)
    got_status, answer = _post(world, bad)
    assert (got_status, answer.get("error")) == (status, error), answer
    assert reason in answer["error_description"], answer
    got_status, answer = _post(world, good)
    assert got_status == 200, answer
    assert answer["issued_token_type"] == TYPE_ACCESS_TOKEN


def test_replayed_assertion(world: World) -> None:
    first = _exchange(world, world.hv, _vm_token(world))
    assert _post(world, first)[0] == 200
    status, answer = _post(world, first)
    assert (status, answer["error"]) == (401, "invalid_client")
    assert "already used" in answer["error_description"]
    assert _post(world, _exchange(world, world.hv, _vm_token(world)))[0] == 200


def test_untrusted_tls_client_certificate(world: World) -> None:
    # OpenSSL checks a presented certificate against the IAM root in the handshake.
    with pytest.raises(IdpUnreachable):
        idp_client.exchange_vm_token(world.idp, world.stranger_hv.tls_auth(),
                                     _vm_token(world), SP)
    assert idp_client.exchange_vm_token(world.idp, world.hv.tls_auth(), _vm_token(world),
                                        SP).access_token


def test_revocation_is_seen_without_a_restart(world: World) -> None:
    hv = _entity(world.ca, world.directory, "hv", "hv-doomed")
    token = _vm_token(world, hv=hv)
    for auth in (hv.tls_auth(), hv.jwt_auth()):
        assert idp_client.exchange_vm_token(world.idp, auth, token, SP).access_token
    time.sleep(0.01)  # a distinct mtime for the new CRL
    world.ca.revoke(identity=Identity(DOMAIN, "hv", "hv-doomed"))
    for auth in (hv.tls_auth(), hv.jwt_auth()):
        with pytest.raises(IdpRefused, match="was revoked") as refused:
            idp_client.exchange_vm_token(world.idp, auth, token, SP)
        assert (refused.value.status, refused.value.error) == (401, "invalid_client")


def test_refusals_are_logged_once_without_the_token(world: World,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p11grid.idp")
    bad, _ = _tampered(world)
    status, _answer = _post(world, bad)
    assert status == 400
    lines = [r.getMessage() for r in caplog.records if r.name == "p11grid.idp"]
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == 1 and "signature" in refusals[0]
    secret_parts = [*bad.form["subject_token"].split("."), bad.form["client_assertion"]]
    assert not any(part in line for part in secret_parts for line in lines)


# --- bad input ---------------------------------------------------------------------------------

def _still_up(world: World) -> None:
    assert _raw(world, "GET", "/.well-known/openid-configuration")[0] == 200


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(("body", "headers", "status", "reason"), [
    (b"", FORM, 400, "empty"),
    (b'{"grant_type": "x"}', {"Content-Type": "application/json"}, 400, "Content-Type"),
    (b"grant_type=a&grant_type=b", FORM, 400, "more than once"),
    (b"%zz&&&==junk", FORM, 400, "not a form"),
    (b"\xff\xfe\x00junk", FORM, 400, "not a form"),
    (b"grant_type=" + GRANT_TOKEN_EXCHANGE.encode(), FORM, 401, "no client authentication"),
    (b"audience=x", FORM, 400, "grant_type is missing"),
])
def test_bad_bodies_get_clean_errors(world: World, body: bytes, headers: dict[str, str],
                                     status: int, reason: str) -> None:
    got, answer, _ = _raw(world, "POST", "/token", body, headers)
    assert got == status and reason in answer["error_description"], answer
    assert answer["error"] in ("invalid_request", "invalid_client")
    _still_up(world)


def _headers_only(world: World, lines: list[str]) -> tuple[int, dict[str, Any]]:
    """A request written by hand: a header says what no client library lets one send."""
    with socket.create_connection(("127.0.0.1", world.config.port), timeout=10) as raw, \
            _client_context(world).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert b"Traceback" not in data
    if not data.startswith(b"HTTP/"):
        return 0, json.loads(data)  # an HTTP/0.9 answer: the body alone
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_huge_missing_and_chunked_bodies(world: World) -> None:
    status, answer = _headers_only(world, [
        "POST /token HTTP/1.1", "Host: 127.0.0.1",
        "Content-Type: application/x-www-form-urlencoded", "Content-Length: 10000000"])
    assert status == 413 and "over the limit" in answer["error_description"]
    status, answer = _headers_only(world, ["POST /token HTTP/1.1", "Host: 127.0.0.1"])
    assert status == 411 and answer["error"] == "invalid_request"
    status, answer = _headers_only(world, [
        "POST /token HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked"])
    assert status == 411
    status, answer = _headers_only(world, ["BREW /token HTTP/1.1", "Host: 127.0.0.1"])
    assert status == 501 and answer["error"] == "invalid_request"
    status, answer = _headers_only(world, ["this is not HTTP"])
    assert status in (0, 400) and answer["error"] == "invalid_request"
    _still_up(world)


def test_wrong_methods_and_paths(world: World) -> None:
    status, answer, response = _raw(world, "GET", "/token")
    assert status == 405 and response.getheader("Allow") == "POST"
    status, answer, _ = _raw(world, "GET", "/nowhere")
    assert status == 404 and answer["error"] == "not_found"
    status, _, _ = _raw(world, "POST", "/jwks", b"a=b", FORM)
    assert status == 405
    status, answer, response = _raw(world, "POST", "/token",
                                    b"grant_type=" + GRANT_TOKEN_EXCHANGE.encode(), {
                                        **FORM, "Authorization": "Basic aGk6dGhlcmU="})
    assert status == 401 and answer["error"] == "invalid_client"
    assert response.getheader("WWW-Authenticate", "").startswith("Basic")
    _still_up(world)


def test_plain_tcp_and_silent_clients_do_not_stop_the_server(world: World) -> None:
    with socket.create_connection(("127.0.0.1", world.config.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert plain.recv(100) is not None  # an alert or nothing, then the close
        except ConnectionResetError:
            pass
    # A connection that never speaks holds only its own thread, never accept().
    silent = socket.create_connection(("127.0.0.1", world.config.port), timeout=10)
    try:
        started = time.monotonic()
        _still_up(world)
        assert time.monotonic() - started < 2
    finally:
        silent.close()


def test_client_deadline_on_a_silent_provider(world: World) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts in the kernel, never answers
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(IdpUnreachable, match=r"timed out|within"):
            idp_client.fetch_discovery(f"https://127.0.0.1:{port}", world.ca_file,
                                       timeout=0.5)
        assert time.monotonic() - started < 3
    with pytest.raises(IdpUnreachable):
        idp_client.fetch_discovery(f"https://127.0.0.1:{port}", world.ca_file, timeout=2)


# --- configuration and the commands --------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ("colour = \"blue\"", "unknown key(s) colour"),
    ("[other]", "unknown table(s) other"),
])
def test_config_unknown_keys_are_named(world: World, change: str, message: str) -> None:
    path = world.directory / "bad.toml"
    path.write_text(world.config_file.read_text() + change + "\n")
    with pytest.raises(IdpConfigError, match=re.escape(message)) as error:
        load_config(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(("old", "new", "message"), [
    ('issuer = "https://', 'issuer = "http://', "issuer"),
    ('signing_key = "/', 'signing_key = "', "signing_key must be an absolute path"),
    (f'audiences = ["{SP}"]', "audiences = []", "audiences"),
    (f'audiences = ["{SP}"]', 'audiences = ["https://sp.example"]', "audiences"),
    ("access_token_lifetime = 300", "access_token_lifetime = -1", "access_token_lifetime"),
    ('listen = "127.0.0.1:', 'listen = "127.0.0.1:x', "listen"),
])
def test_config_errors_name_the_key(world: World, old: str, new: str, message: str) -> None:
    path = world.directory / "bad.toml"
    text = world.config_file.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(IdpConfigError, match=message):
        load_config(path)


def test_serve_command_runs_and_stops_on_sigterm(world: World) -> None:
    port = _free_port()
    config = _write_config(world.directory, world.ca.directory, port, name="serve.toml",
                           log_file=str(world.directory / "serve.log"))
    pid_file = world.directory / "idp.pid"
    process = subprocess.Popen(
        [str(VENV_BIN / "p11grid"), "idp", "serve", "--config", str(config), "--pid-file",
         str(pid_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert ready and "serving https://127.0.0.1" in ready[0], process.stderr
        assert pid_file.read_text().strip() == str(process.pid)
        issuer = f"https://127.0.0.1:{port}"
        assert idp_client.fetch_discovery(issuer, world.ca_file, 5)["issuer"] == issuer
        idp = IdpConnection(issuer + "/token", world.ca_file, 5)
        assert idp_client.exchange_vm_token(idp, world.hv.jwt_auth(), _vm_token(world),
                                            SP).access_token
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert not pid_file.exists()
        log = (world.directory / "serve.log").read_text()
        assert "issued access token" in log and "OpenID provider stopped" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]


def test_serve_command_refuses_a_bad_config(world: World) -> None:
    path = world.directory / "broken.toml"
    path.write_text("[idp]\nissuer = 3\n")
    done = subprocess.run([str(VENV_BIN / "p11grid"), "idp", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and str(path) in done.stderr and "issuer" in done.stderr
