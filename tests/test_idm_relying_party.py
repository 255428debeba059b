"""The grid SP's checks (idm.relying_party): the three elements, each refusal on its own.

Access tokens here are made the way the OpenID provider makes them (RFC 9068 JWTs signed
with its key, published as a JWKS file); the provider itself is tested in test_idp.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import secrets
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from idm.authority import Authority
from idm.chain import TrustAnchor
from idm.identity import Identity, identity_of
from idm.relying_party import Authorization, AuthorizationRefused, RelyingParty
from idm.tokens import issue_token, thumbprint
from tests.test_idm_tokens import DOMAIN, SP, Entity, World, _entity

ISSUER = "https://127.0.0.1:8443"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
HOUR = datetime.timedelta(hours=1)


@dataclasses.dataclass
class Setup:
    world: World
    idp_key: ec.EllipticCurvePrivateKey
    jwks: Path
    party: RelyingParty
    bound: set[str]

    def access(self, subject: Entity, actors: list[Entity], **claims: Any) -> str:
        act: dict[str, Any] | None = None
        for actor in reversed(actors):
            act = {"sub": identity_of(actor.certificate).uri, **({"act": act} if act else {})}
        body: dict[str, Any] = {
            "iss": ISSUER, "sub": identity_of(subject.certificate).uri, "aud": SP,
            "iat": int(NOW.timestamp()), "exp": int((NOW + HOUR / 12).timestamp()),
            "jti": secrets.token_hex(8), "act": act, "client_id": "x",
            "cnf": {"x5t#S256": thumbprint(subject.certificate)}}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.idp_key, algorithm="ES256",
                          headers={"typ": "at+jwt", "kid": "idp-1"})

    def vm_token(self, vm: Entity | None = None, hv: Entity | None = None, **changes: Any) -> str:
        hv = hv or self.world.hv
        arguments: dict[str, Any] = {"kind": "vm", "signer": hv.signer, "chain": [hv.certificate],
                                     "subject_certificate": (vm or self.world.vm).certificate,
                                     "audience": SP, "lifetime": HOUR, "now": NOW}
        arguments.update(changes)
        return issue_token(**arguments)

    def authorize(self, peer: Entity, access: str, vm_token: str, **extra: Any) -> Authorization:
        return self.party.authorize(peer.certificate, access, vm_token,
                                    lambda s: s.uri in self.bound, now=NOW, **extra)


def make_world(directory: Path) -> tuple[World, ec.EllipticCurvePrivateKey, Path]:
    """A CA in `directory` with a hypervisor, two VMs and an app, and an IdP signing key
    with its JWKS file."""
    ca = Authority.init(directory / "ca", DOMAIN)
    world = World(ca, _entity(ca, "hv", "hv-1"), _entity(ca, "vm", "vm-1"),
                  _entity(ca, "vm", "vm-2"), _entity(ca, "app", "web"))
    idp_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(idp_key.public_key()))
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1", "use": "sig"}]}))
    return world, idp_key, jwks


@pytest.fixture()
def setup(tmp_path: Path) -> Setup:
    world, idp_key, jwks = make_world(tmp_path)
    ca = world.ca
    party = RelyingParty(lambda: TrustAnchor.load(ca.directory / "ca.pem",
                                                  ca.directory / "crl.pem"),
                         Identity.parse(SP), ISSUER, jwks)
    return Setup(world, idp_key, jwks, party,
                 {f"spiffe://{DOMAIN}/vm/vm-1", f"spiffe://{DOMAIN}/app/web"})


def _refusal(setup: Setup, peer: Entity, access: str, vm_token: str, **extra: Any) -> str:
    with pytest.raises(AuthorizationRefused) as refused:
        setup.authorize(peer, access, vm_token, **extra)
    return str(refused.value)


def test_vm_with_all_three_elements_is_authorized(setup: Setup) -> None:
    w = setup.world
    granted = setup.authorize(w.vm, setup.access(w.vm, [w.hv]), setup.vm_token())
    assert granted.subject == identity_of(w.vm.certificate)
    assert granted.actors == (identity_of(w.hv.certificate),)
    assert granted.expires == NOW + HOUR / 12  # the access token ends first


def test_app_with_nested_actors_is_authorized(setup: Setup) -> None:
    w = setup.world
    vm_token = setup.vm_token()
    app_token = issue_token("app", w.vm.signer, [w.vm.certificate], w.app.certificate, SP,
                            HOUR / 2, now=NOW)
    granted = setup.authorize(w.app, setup.access(w.app, [w.vm, w.hv]), vm_token,
                              app_token=app_token)
    assert granted.subject == identity_of(w.app.certificate)
    assert [a.kind for a in granted.actors] == ["vm", "hv"]
    # The same APP token vouched for by another VM's token is refused.
    other_vm_token = setup.vm_token(vm=w.other_vm)
    assert "vm token" in _refusal(setup, w.app, setup.access(w.app, [w.vm, w.hv]),
                                  other_vm_token, app_token=app_token)


def test_each_defect_is_refused_by_its_check(setup: Setup, tmp_path: Path) -> None:
    w = setup.world
    good_vm = setup.vm_token()
    cases = {
        "missing tokens": (w.vm, setup.access(w.vm, [w.hv]), None),
        "wrong audience": (w.vm, setup.access(w.vm, [w.hv], aud="spiffe://x/sp/y"), good_vm),
        "wrong issuer": (w.vm, setup.access(w.vm, [w.hv], iss="https://evil"), good_vm),
        "expired": (w.vm, setup.access(w.vm, [w.hv], exp=int((NOW - HOUR).timestamp())),
                    good_vm),
        "no actor": (w.vm, setup.access(w.vm, [], act=None), good_vm),
        "other subject": (w.vm, setup.access(w.other_vm, [w.hv], cnf={
            "x5t#S256": thumbprint(w.vm.certificate)}), good_vm),
        "other certificate": (w.vm, setup.access(w.vm, [w.hv], cnf={
            "x5t#S256": thumbprint(w.other_vm.certificate)}), good_vm),
        "vm token of another vm": (w.vm, setup.access(w.vm, [w.hv]),
                                   setup.vm_token(vm=w.other_vm)),
        "vm token for another sp": (w.vm, setup.access(w.vm, [w.hv]),
                                    setup.vm_token(audience="spiffe://x/sp/y")),
    }
    expected = {
        "missing tokens": "tokens:", "wrong audience": "not issued for this SP",
        "wrong issuer": "not issued by the configured OpenID provider",
        "expired": "expired", "no actor": "act", "other subject": "is not the caller",
        "other certificate": "cnf does not match", "vm token of another vm": "vm token",
        "vm token for another sp": "vm token audience",
    }
    for name, (peer, access, vm_token) in cases.items():
        message = _refusal(setup, peer, access, vm_token)  # type: ignore[arg-type]
        assert expected[name] in message, f"{name}: {message}"
    # iss of the VM token is not the HV the provider authenticated:
    hv2 = _entity(w.ca, "hv", "hv-2")
    assert "authenticated issuer" in _refusal(setup, w.vm, setup.access(w.vm, [hv2]), good_vm)
    # sub not bound to the requested element:
    setup.bound.clear()
    assert "binding" in _refusal(setup, w.vm, setup.access(w.vm, [w.hv]), good_vm)


def test_an_access_token_opens_one_session(setup: Setup) -> None:
    w = setup.world
    access = setup.access(w.vm, [w.hv])
    setup.authorize(w.vm, access, setup.vm_token())
    assert "presented before" in _refusal(setup, w.vm, access, setup.vm_token())
    setup.authorize(w.vm, setup.access(w.vm, [w.hv]), setup.vm_token())  # a new one is fine


def test_unknown_signing_key_and_forged_access_tokens(setup: Setup) -> None:
    w = setup.world
    stranger = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(setup.access(w.vm, [w.hv]), options={"verify_signature": False})
    forged = jwt.encode(claims, stranger, algorithm="ES256",
                        headers={"typ": "at+jwt", "kid": "idp-1"})
    assert "Signature" in _refusal(setup, w.vm, forged, setup.vm_token())
    unknown = jwt.encode(claims, stranger, algorithm="ES256",
                         headers={"typ": "at+jwt", "kid": "idp-9"})
    assert "does not hold" in _refusal(setup, w.vm, unknown, setup.vm_token())
    plain = jwt.encode(claims, setup.idp_key, algorithm="ES256", headers={"typ": "JWT"})
    assert "is not an access token" in _refusal(setup, w.vm, plain, setup.vm_token())


def test_a_caller_certificate_revoked_in_the_crl_is_refused(setup: Setup) -> None:
    """TLS checks the caller's chain but not the IAM CA's revocation list: authorize does."""
    w = setup.world
    vm_token = setup.vm_token()
    setup.authorize(w.vm, setup.access(w.vm, [w.hv]), vm_token)
    w.ca.revoke(serial=w.vm.certificate.serial_number)
    message = _refusal(setup, w.vm, setup.access(w.vm, [w.hv]), vm_token)
    assert message.startswith("caller") and "was revoked" in message, message
