"""The grid service with `[identity]`: no element request without an authorization, and an
authorization only for the three elements (a real `p11grid grid serve`, a real SoftHSM2
element, certificates from the IAM CA; access tokens made as the OpenID provider makes
them, signed with a key whose JWKS the grid reads)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from grid_backend.client import GridPool, GridSettings
from grid_backend.protocol import AuthorizationNeeded, IdentityRefused
from idm.authority import Authority, write_file
from idm.identity import Identity
from idm.tokens import issue_token, thumbprint
from tests.test_idm_tokens import SoftSigner

VENV_BIN = Path(sys.executable).parent
DOMAIN = "grid.test"
SP = f"spiffe://{DOMAIN}/sp/grid"
ISSUER = "https://127.0.0.1:8443"
PIN = "24681357"
HOUR = datetime.timedelta(hours=1)


@dataclasses.dataclass
class Grid:
    root: Path
    ca: Authority
    port: int
    hv_key: ec.EllipticCurvePrivateKey
    idp_key: ec.EllipticCurvePrivateKey
    env: dict[str, str]
    metrics_port: int

    def pool(self, name: str) -> GridPool:
        return GridPool(GridSettings(endpoints=(("127.0.0.1", self.port),),
                                     ca=self.root / "ca" / "ca.pem",
                                     certificate=self.root / f"{name}.pem",
                                     key=self.root / f"{name}.key", timeout=5.0, spin=0.0))

    def certificate(self, name: str) -> Any:
        from cryptography import x509

        return x509.load_pem_x509_certificate((self.root / f"{name}.pem").read_bytes())

    def vm_token(self, vm: str = "vm-1", audience: str = SP) -> str:
        return issue_token("vm", SoftSigner(self.hv_key), [self.certificate("hv-1")],
                           self.certificate(vm), audience, HOUR)

    def access(self, vm: str = "vm-1", lifetime: int = 300, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": f"spiffe://{DOMAIN}/vm/{vm}", "aud": SP, "iat": now,
                "exp": now + lifetime, "jti": secrets.token_hex(8), "client_id": "hv",
                "act": {"sub": f"spiffe://{DOMAIN}/hv/hv-1"},
                "cnf": {"x5t#S256": thumbprint(self.certificate(vm))}, **claims}
        return jwt.encode(body, self.idp_key, algorithm="ES256",
                          headers={"typ": "at+jwt", "kid": "idp-1"})


def _issue(ca: Authority, root: Path, kind: str, name: str, **names: Any
           ) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(root / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    certificate = ca.issue(Identity(DOMAIN, kind, name), key.public_key(), **names)
    (root / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("grid-identity")
    ca = Authority.init(root / "ca", DOMAIN)
    _issue(ca, root, "grid", "grid-1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    hv_key = _issue(ca, root, "hv", "hv-1")
    for vm in ("vm-1", "vm-2"):
        _issue(ca, root, "vm", vm)
    idp_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(idp_key.public_key()))
    (root / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "idp-1"}]}))
    (root / "tokens").mkdir()
    softhsm = root / "softhsm2.conf"
    softhsm.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                       "log.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(softhsm),
           "P11GRID_REGISTRY": str(root / "registry.sqlite")}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "se-1", "--pin", PIN,
                    "--so-pin", "12345678"], env=env, check=True, capture_output=True)

    def admin(*arguments: str) -> None:
        subprocess.run([str(VENV_BIN / "p11grid"), "grid", *arguments], env=env, check=True,
                       capture_output=True, timeout=120)

    admin("add-se", "--seid", "se-1", "--driver", "pkcs11", "--library",
          "/usr/lib/softhsm/libsofthsm2.so", "--token-label", "se-1",
          "--env", f"SOFTHSM2_CONF={softhsm}")
    admin("keygen", "--seid", "se-1", "--label", "k-ec", "--id", "01", "--kind", "ec256",
          "--pin", PIN)
    admin("bind", "--identity", f"spiffe://{DOMAIN}/vm/vm-1", "--seid", "se-1")
    admin("bind", "--identity", f"spiffe://{DOMAIN}/vm/vm-2", "--seid", "se-1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    (root / "grid.toml").write_text(f"""
[grid]
listen = "127.0.0.1:{port}"
metrics = "127.0.0.1:{metrics_port}"
certificate = "{root / 'grid-1.pem'}"
key = "{root / 'grid-1.key'}"
client_ca = "{root / 'ca' / 'ca.pem'}"
registry = "{root / 'registry.sqlite'}"
audit_log = "{root / 'audit.log'}"
log_file = "{root / 'grid.log'}"

[identity]
sp = "{SP}"
ca_dir = "{root / 'ca'}"
idp_issuer = "{ISSUER}"
idp_jwks = "{root / 'jwks.json'}"
max_token_lifetime = 7200
""")
    process = subprocess.Popen([str(VENV_BIN / "p11grid"), "grid", "serve", "--config",
                                str(root / "grid.toml")], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready = process.stdout.readline()
    assert "serving" in ready, process.stderr.read() if process.stderr else ""
    try:
        yield Grid(root, ca, port, hv_key, idp_key, env, metrics_port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def _authorize(pool: GridPool, **arguments: Any) -> dict[str, Any]:
    return pool.call("authorize", {"seid": "se-1", **arguments}, idempotent=False)


def test_no_element_request_without_authorization(grid: Grid) -> None:
    pool = grid.pool("vm-1")
    with pytest.raises(AuthorizationNeeded, match="present the identity tokens"):
        pool.call("objects", {"seid": "se-1"}, idempotent=True)
    with pytest.raises(AuthorizationNeeded):
        pool.call("objects", {"seid": "se-1", "authorization": "made-up"}, idempotent=True)
    pool.close()


def test_three_elements_open_the_element(grid: Grid) -> None:
    pool = grid.pool("vm-1")
    granted = _authorize(pool, access_token=grid.access(), vm_token=grid.vm_token())
    assert granted["subject"] == f"spiffe://{DOMAIN}/vm/vm-1"
    assert granted["actors"] == [f"spiffe://{DOMAIN}/hv/hv-1"]
    handle = {"seid": "se-1", "authorization": granted["authorization"]}
    assert pool.call("objects", handle, idempotent=True)["objects"]
    session = pool.call("login", {**handle, "pin": PIN}, idempotent=False)
    key = next(ref for ref, attributes in session["objects"] if attributes.get(3) == b"k-ec")
    signature = pool.call("sign", {**handle, "session": session["session"], "ref": key,
                                   "mechanism": 0x1041, "parameters": None,
                                   "data": b"\x11" * 32}, idempotent=False)["result"]
    assert len(signature) == 64
    # The handle is the caller's: another VM's connection cannot use it.
    other = grid.pool("vm-2")
    with pytest.raises(AuthorizationNeeded):
        other.call("objects", handle, idempotent=True)
    audit = (grid.root / "audit.log").read_text()
    assert '"op": "authorize", "result": "ok"' in audit
    assert grid.vm_token()[:40] not in audit  # no token in the audit trail
    pool.close()
    other.close()


def test_refusals_name_the_failed_check(grid: Grid) -> None:
    pool = grid.pool("vm-1")
    cases = [
        ({}, "an access token from the OpenID provider and a VM-Auth-Token are required"),
        ({"access_token": grid.access(), "vm_token": grid.vm_token(audience="spiffe://x/sp/y")},
         "vm token audience"),
        ({"access_token": grid.access("vm-2"), "vm_token": grid.vm_token()},
         "is not the caller"),
        ({"access_token": grid.access(), "vm_token": grid.vm_token("vm-2")},
         "vm token confirmation"),
    ]
    for arguments, says in cases:
        with pytest.raises(IdentityRefused, match=says):
            _authorize(pool, **arguments)
    replayed = grid.access()
    _authorize(pool, access_token=replayed, vm_token=grid.vm_token())
    with pytest.raises(IdentityRefused, match="presented before"):
        _authorize(pool, access_token=replayed, vm_token=grid.vm_token())
    pool.close()


def test_authorization_ends_with_its_tokens(grid: Grid) -> None:
    pool = grid.pool("vm-1")
    granted = _authorize(pool, access_token=grid.access(lifetime=2), vm_token=grid.vm_token())
    handle = {"seid": "se-1", "authorization": granted["authorization"]}
    assert pool.call("objects", handle, idempotent=True)["objects"]
    time.sleep(max(0.0, granted["expires"] - time.time()) + 0.2)
    with pytest.raises(AuthorizationNeeded, match="ended with its tokens"):
        pool.call("objects", handle, idempotent=True)
    pool.close()


def test_prometheus_metrics(grid: Grid) -> None:
    """Requests by operation and result (failures by reason), durations, gauges: scraped
    over HTTP and read with prometheus_client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    pool = grid.pool("vm-1")
    granted = _authorize(pool, access_token=grid.access(), vm_token=grid.vm_token())
    pool.call("login", {"seid": "se-1", "authorization": granted["authorization"],
                        "pin": PIN}, idempotent=False)
    with pytest.raises(IdentityRefused):
        _authorize(pool)
    with urllib.request.urlopen(f"http://127.0.0.1:{grid.metrics_port}/metrics",
                                timeout=10) as answer:
        text = answer.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("p11grid_grid_requests_total",
                    (("operation", "authorize"), ("result", "ok")))] >= 1
    assert samples[("p11grid_grid_requests_total",
                    (("operation", "authorize"), ("result", "identity")))] >= 1
    assert samples[("p11grid_grid_request_seconds_count", (("operation", "login"),))] >= 1
    assert samples[("p11grid_grid_connections", ())] >= 1
    assert samples[("p11grid_grid_sessions", ())] >= 1
    assert samples[("p11grid_grid_authorizations", ())] >= 1
    pool.close()
