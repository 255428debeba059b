"""VM-/APP-Auth-Tokens: the IAM root CA, issuance, and the deny matrix of verification.

Each refusal is produced by exactly one defect in an otherwise good token, refused by the
check named, and the good token itself is accepted. The keys here are software keys
(cryptography): signing inside secure elements is tested in test_idm_pkcs11.py and by
the `p11grid token` CLI tests.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from idm.authority import Authority, AuthorityError
from idm.chain import ChainRefused, TrustAnchor, verify_chain
from idm.identity import Identity, IdentityError
from idm.tokens import (
    Expectations,
    ReplayCache,
    TokenRefused,
    issue_token,
    thumbprint,
    verify_token,
)

DOMAIN = "p11grid.test"
SP = "spiffe://p11grid.test/sp/grid-sp"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
HOUR = datetime.timedelta(hours=1)


class SoftSigner:
    """A software ES256 key standing where a secure element's key stands in production."""

    jws_algorithm = "ES256"

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key

    def sign_jws(self, signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclasses.dataclass
class Entity:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def signer(self) -> SoftSigner:
        return SoftSigner(self.key)


@dataclasses.dataclass
class World:
    ca: Authority
    hv: Entity
    vm: Entity
    other_vm: Entity
    app: Entity

    def anchor(self) -> TrustAnchor:
        return TrustAnchor.load(self.ca.directory / "ca.pem", self.ca.directory / "crl.pem")

    def expect(self, **changes: Any) -> Expectations:
        base = Expectations(anchor=self.anchor(), audience=SP, max_lifetime=2 * HOUR,
                            presented_certificate=self.vm.certificate,
                            authenticated_issuer=_id(self.hv), bound=lambda s: s.name == "vm-1",
                            now=NOW)
        return dataclasses.replace(base, **changes)


def _id(entity: Entity) -> Identity:
    from idm.identity import identity_of

    return identity_of(entity.certificate)


def _entity(ca: Authority, kind: str, name: str,
            validity: datetime.timedelta = datetime.timedelta(days=30)) -> Entity:
    key = ec.generate_private_key(ec.SECP256R1())
    return Entity(key, ca.issue(Identity(DOMAIN, kind, name), key.public_key(), validity))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    ca = Authority.init(tmp_path_factory.mktemp("ca") / "ca", DOMAIN)
    return World(ca, _entity(ca, "hv", "hv-1"), _entity(ca, "vm", "vm-1"),
                 _entity(ca, "vm", "vm-2"), _entity(ca, "app", "web"))


def _vm_token(world: World, **overrides: Any) -> str:
    arguments: dict[str, Any] = {"kind": "vm", "signer": world.hv.signer,
                                 "chain": [world.hv.certificate],
                                 "subject_certificate": world.vm.certificate, "audience": SP,
                                 "lifetime": HOUR, "now": NOW}
    arguments.update(overrides)
    return issue_token(**arguments)


def _forge(token: str, signer: SoftSigner, header: dict[str, Any] | None = None,
           **claims: Any) -> str:
    """The token with header fields and claims changed, signed again by `signer`."""
    head_b64, body_b64, _ = token.split(".")

    def load(part: str) -> dict[str, Any]:
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))

    def dump(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    new_header = {**load(head_b64), **(header or {})}
    body = load(body_b64)
    for name, value in claims.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    signing_input = f"{dump(new_header)}.{dump(body)}"
    signature = signer.sign_jws(signing_input.encode())
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _refused_by(token: str, kind: str, expect: Expectations) -> str:
    report = verify_token(token, kind, expect)
    failed = [c.name for c in report.checks if not c.passed]
    assert failed, f"accepted: {report.checks}"
    return failed[0]


# --- the CA -----------------------------------------------------------------------------------

def test_chain_reaches_root_and_names_the_identity(world: World) -> None:
    assert verify_chain(world.vm.certificate, [], world.anchor(), NOW) == _id(world.vm)
    assert world.vm.certificate.subject.rfc4514_string() == "CN=vm-1"


def test_chain_refusals_each_say_why(world: World, tmp_path: Path) -> None:
    stranger_ca = Authority.init(tmp_path / "other", DOMAIN)
    stranger = _entity(stranger_ca, "vm", "vm-1")
    with pytest.raises(ChainRefused, match="does not chain to the IAM root"):
        verify_chain(stranger.certificate, [], world.anchor(), NOW)
    with pytest.raises(ChainRefused, match="expired"):
        verify_chain(world.vm.certificate, [], world.anchor(), NOW + datetime.timedelta(days=31))
    foreign_ca = Authority.init(tmp_path / "foreign", "elsewhere.test")
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = foreign_ca.issue(Identity("elsewhere.test", "vm", "vm-1"), key.public_key())
    with pytest.raises(ChainRefused, match="not in the trust domain"):
        verify_chain(foreign, [], world.anchor(), NOW)


def test_revocation_is_seen_through_the_crl(tmp_path: Path) -> None:
    ca = Authority.init(tmp_path / "ca", DOMAIN)
    vm = _entity(ca, "vm", "vm-9")
    anchor = TrustAnchor.load(ca.directory / "ca.pem", ca.directory / "crl.pem")
    assert verify_chain(vm.certificate, [], anchor).name == "vm-9"
    revoked = ca.revoke(identity=Identity(DOMAIN, "vm", "vm-9"), reason="keyCompromise")
    assert [r.serial for r in revoked] == [f"{vm.certificate.serial_number:x}"]
    anchor = TrustAnchor.load(ca.directory / "ca.pem", ca.directory / "crl.pem")
    with pytest.raises(ChainRefused, match="was revoked"):
        verify_chain(vm.certificate, [], anchor)
    with pytest.raises(AuthorityError, match="no live certificate"):
        ca.revoke(identity=Identity(DOMAIN, "vm", "vm-9"))
    # A CRL signed by someone else is not believed.
    other = Authority.init(tmp_path / "other", DOMAIN)
    forged = TrustAnchor(anchor.root, x509.load_pem_x509_crl(
        (other.directory / "crl.pem").read_bytes()), DOMAIN)
    with pytest.raises(ChainRefused, match="not signed by the IAM root"):
        verify_chain(vm.certificate, [], forged)


def test_ca_refuses_what_it_must(world: World, tmp_path: Path) -> None:
    with pytest.raises(AuthorityError, match="outside this CA's trust domain"):
        world.ca.issue(Identity("elsewhere.test", "vm", "x"), world.vm.key.public_key())
    with pytest.raises(AuthorityError, match="already holds a CA"):
        Authority.init(world.ca.directory, DOMAIN)
    with pytest.raises(IdentityError, match="kind"):
        Identity(DOMAIN, "robot", "r2")
    assert oct((world.ca.directory / "ca.key").stat().st_mode & 0o777) == "0o600"


# --- tokens: the good ones ------------------------------------------------------------------

def test_good_vm_token_passes_every_check(world: World) -> None:
    report = verify_token(_vm_token(world), "vm", world.expect(replay=ReplayCache()))
    assert report.ok, report.refusal()
    assert {c.name for c in report.checks} >= {
        "format", "typ", "chain", "signature", "claims", "issuer", "authenticated issuer",
        "subject", "binding", "audience", "expiry", "not before", "lifetime",
        "confirmation", "replay"}
    assert report.issuer == _id(world.hv) and report.subject == _id(world.vm)
    assert report.claims["cnf"]["x5t#S256"] == thumbprint(world.vm.certificate)


def test_good_app_token_lives_inside_its_vm_token(world: World) -> None:
    vm_report = verify_token(_vm_token(world), "vm", world.expect()).require()
    app = issue_token("app", world.vm.signer, [world.vm.certificate], world.app.certificate,
                      SP, 10 * HOUR, not_after=vm_report.expires, now=NOW)
    expect = world.expect(presented_certificate=world.app.certificate,
                          authenticated_issuer=_id(world.vm), bound=None, vm_token=vm_report)
    report = verify_token(app, "app", expect)
    assert report.ok, report.refusal()
    assert report.expires <= vm_report.expires  # capped at issuance


# --- tokens: the deny matrix ---------------------------------------------------------------

def test_bad_signature(world: World) -> None:
    head, body, signature = _vm_token(world).split(".")
    tampered = f"{head}.{body}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    assert _refused_by(tampered, "vm", world.expect()) == "signature"
    # A claim changed after signing:
    other_body = _forge(_vm_token(world), world.hv.signer, aud="spiffe://x/sp/y").split(".")[1]
    assert _refused_by(f"{head}.{other_body}.{signature}", "vm", world.expect()) == "signature"


def test_chain_not_reaching_the_root(world: World, tmp_path: Path) -> None:
    rogue_ca = Authority.init(tmp_path / "rogue", DOMAIN)
    rogue_hv = _entity(rogue_ca, "hv", "hv-1")
    token = _vm_token(world, signer=rogue_hv.signer, chain=[rogue_hv.certificate])
    assert _refused_by(token, "vm", world.expect()) == "chain"


def test_revoked_or_expired_signer(tmp_path: Path) -> None:
    ca = Authority.init(tmp_path / "ca", DOMAIN)
    world = World(ca, _entity(ca, "hv", "hv-1"), _entity(ca, "vm", "vm-1"),
                  _entity(ca, "vm", "vm-2"), _entity(ca, "app", "web"))
    token = _vm_token(world)
    assert verify_token(token, "vm", world.expect()).ok
    later = NOW + datetime.timedelta(days=31)
    late_token = _vm_token(world, now=later)
    assert _refused_by(late_token, "vm", world.expect(now=later)) == "chain"
    ca.revoke(identity=_id(world.hv))
    assert _refused_by(token, "vm", world.expect()) == "chain"


def test_wrong_typ(world: World) -> None:
    token = _forge(_vm_token(world), world.hv.signer, header={"typ": "JWT"})
    assert _refused_by(token, "vm", world.expect()) == "typ"


def test_wrong_audience(world: World) -> None:
    token = _vm_token(world, audience="spiffe://p11grid.test/sp/another-sp")
    assert _refused_by(token, "vm", world.expect()) == "audience"
    several = _forge(_vm_token(world), world.hv.signer, aud=[SP, "spiffe://x/sp/y"])
    assert _refused_by(several, "vm", world.expect()) == "audience"


def test_expired_and_not_yet_valid_with_sixty_seconds_of_leeway(world: World) -> None:
    token = _vm_token(world)
    exp = NOW + HOUR
    assert verify_token(token, "vm", world.expect(now=exp + datetime.timedelta(seconds=59))).ok
    assert _refused_by(token, "vm", world.expect(now=exp + datetime.timedelta(seconds=61))) \
        == "expiry"
    assert verify_token(token, "vm", world.expect(now=NOW - datetime.timedelta(seconds=59))).ok
    assert _refused_by(token, "vm", world.expect(now=NOW - datetime.timedelta(seconds=61))) \
        == "not before"


def test_lifetime_over_the_cap(world: World) -> None:
    token = _vm_token(world, lifetime=3 * HOUR)
    assert _refused_by(token, "vm", world.expect()) == "lifetime"
    assert verify_token(token, "vm", world.expect(max_lifetime=3 * HOUR)).ok


def test_cnf_not_matching_the_presented_certificate(world: World) -> None:
    token = _vm_token(world)
    expect = world.expect(presented_certificate=world.other_vm.certificate)
    assert _refused_by(token, "vm", expect) == "confirmation"


def test_iss_not_the_authenticated_identity(world: World, tmp_path: Path) -> None:
    token = _vm_token(world)
    hv2 = _entity(world.ca, "hv", "hv-2")
    assert _refused_by(token, "vm", world.expect(authenticated_issuer=_id(hv2))) \
        == "authenticated issuer"
    # An iss claim that is not the key's owner:
    lying = _forge(token, world.hv.signer, iss=_id(hv2).uri)
    assert _refused_by(lying, "vm", world.expect(authenticated_issuer=None)) == "issuer"


def test_sub_not_bound_to_the_requested_element(world: World) -> None:
    token = _vm_token(world)
    assert _refused_by(token, "vm", world.expect(bound=lambda s: False)) == "binding"


def test_app_token_outliving_its_vm_token_or_from_another_vm(world: World) -> None:
    vm_report = verify_token(_vm_token(world), "vm", world.expect()).require()
    expect = world.expect(presented_certificate=world.app.certificate,
                          authenticated_issuer=_id(world.vm), bound=None, vm_token=vm_report)
    outliving = issue_token("app", world.vm.signer, [world.vm.certificate],
                            world.app.certificate, SP, 2 * HOUR, now=NOW)
    assert _refused_by(outliving, "app", expect) == "within vm token"
    foreign = issue_token("app", world.other_vm.signer, [world.other_vm.certificate],
                          world.app.certificate, SP, HOUR / 2, now=NOW)
    assert _refused_by(foreign, "app", dataclasses.replace(
        expect, authenticated_issuer=_id(world.other_vm))) == "vm token"


def test_replayed_jti(world: World) -> None:
    cache = ReplayCache()
    token = _vm_token(world)
    assert verify_token(token, "vm", world.expect(replay=cache)).ok
    assert _refused_by(token, "vm", world.expect(replay=cache)) == "replay"
    assert verify_token(_vm_token(world), "vm", world.expect(replay=cache)).ok  # a new jti


def test_missing_claims_and_junk(world: World) -> None:
    token = _forge(_vm_token(world), world.hv.signer, jti=None)
    assert _refused_by(token, "vm", world.expect()) == "claims"
    assert _refused_by("not.a.token", "vm", world.expect()) == "format"
    assert _refused_by("", "vm", world.expect()) == "format"
    unsigned = _forge(_vm_token(world), world.hv.signer, header={"alg": "none"})
    assert _refused_by(unsigned, "vm", world.expect()) == "format"
    with pytest.raises(TokenRefused, match="vm token refused: audience"):
        verify_token(_vm_token(world, audience="x"), "vm", world.expect()).require()


def test_issuer_rules_at_issuance(world: World) -> None:
    with pytest.raises(TokenRefused, match="signed by a hv key"):
        _vm_token(world, signer=world.vm.signer, chain=[world.vm.certificate])
    with pytest.raises(TokenRefused, match="the subject of a vm token is a vm"):
        _vm_token(world, subject_certificate=world.app.certificate)
    with pytest.raises(TokenRefused, match="already be expired"):
        issue_token("app", world.vm.signer, [world.vm.certificate], world.app.certificate,
                    SP, HOUR, not_after=NOW - HOUR, now=NOW)
