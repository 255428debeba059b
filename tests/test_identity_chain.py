"""The whole identity chain, live: an IAM CA, the hypervisor's key inside its own SoftHSM2
token, the OpenID provider (`p11grid idp serve`), the grid (`p11grid grid serve` with
`[identity]`) and the PKCS#11 module driven by pkcs11-tool. The module verifies the
VM-Auth-Token, authenticates to the provider with the HV key, and opens the session only
with all three elements; each refusal names its reason in the module's log."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from idm.authority import Authority, write_file
from idm.identity import Identity
from idm.tokens import issue_token
from tests.test_idm_tokens import SoftSigner

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "build" / "libp11grid.so"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
DOMAIN = "chain.test"
SP = f"spiffe://{DOMAIN}/sp/grid"
PIN = "13572468"
HV_PIN = "86427531"
HOUR = datetime.timedelta(hours=1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _key_file(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), mode=0o600)
    return key


def _issue(ca: Authority, root: Path, kind: str, name: str, **names: Any
           ) -> ec.EllipticCurvePrivateKey:
    key = _key_file(root / f"{name}.key")
    certificate = ca.issue(Identity(DOMAIN, kind, name), key.public_key(), **names)
    (root / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key


def _start(command: list[str], env: dict[str, str], ready: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if ready not in line:
        process.kill()
        why = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"{command[:3]}: {line}{why}")
    return process


@dataclasses.dataclass
class Chain:
    root: Path
    ca: Authority
    env: dict[str, str]
    idp_config: Path

    def vm_token(self, vm: str = "vm-1", audience: str = SP, hv: str = "hv-1",
                 key: str = "hv-key") -> str:
        """Signed by hv-1's key inside its token, through `p11grid token issue vm` (this
        process never loads SoftHSM2: the module under test loads it, in-process)."""
        out = self.root / "issued.jwt"
        subprocess.run([str(VENV_BIN / "p11grid"), "token", "issue", "vm", "--hv-key",
                        f"pkcs11:token=hv-se;object={key}", "--module", SOFTHSM, "--env",
                        f"SOFTHSM2_CONF={self.root / 'hv-softhsm2.conf'}", "--pin", HV_PIN,
                        "--hv-cert", str(self.root / f"{hv}.pem"),
                        "--vm-cert", str(self.root / f"{vm}.pem"), "--audience", audience,
                        "--out", str(out)], check=True, capture_output=True, timeout=60)
        return out.read_text().strip()

    def soft_app_token(self, vm: str, lifetime: datetime.timedelta) -> str:
        """An APP-Auth-Token for app/web signed by `vm`'s key (a file here)."""
        key = serialization.load_pem_private_key((self.root / f"{vm}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = lambda name: x509.load_pem_x509_certificate(  # noqa: E731
            (self.root / f"{name}.pem").read_bytes())
        return issue_token("app", SoftSigner(key), [cert(vm)], cert("web"), SP, lifetime)

    def soft_vm_token(self, hv: str, vm: str = "vm-1", **changes: Any) -> str:
        """Signed by a hypervisor whose key is a file here (tls_client_auth to the provider)."""
        key = serialization.load_pem_private_key((self.root / f"{hv}.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = lambda name: x509.load_pem_x509_certificate(  # noqa: E731
            (self.root / f"{name}.pem").read_bytes())
        arguments: dict[str, Any] = {"kind": "vm", "signer": SoftSigner(key),
                                     "chain": [cert(hv)], "subject_certificate": cert(vm),
                                     "audience": SP, "lifetime": HOUR}
        arguments.update(changes)
        return issue_token(**arguments)

    def module_config(self, name: str, identity: str, vm: str = "vm-1") -> Path:
        path = self.root / f"{name}.toml"
        path.write_text(f"""
[module]
backend = "grid"
log_file = "{self.root / (name + '.log')}"

[grid]
endpoints = ["127.0.0.1:{self.env['GRID_PORT']}"]
ca = "{self.root / 'ca' / 'ca.pem'}"
certificate = "{self.root / (vm + '.pem')}"
key = "{self.root / (vm + '.key')}"
timeout = 10.0

[[secure_element]]
label = "se-1"

[identity]
audience = "{SP}"
ca = "{self.root / 'ca' / 'ca.pem'}"
crl = "{self.root / 'ca' / 'crl.pem'}"
idp = "https://127.0.0.1:{self.env['IDP_PORT']}"
{identity}
""")
        return path

    def sign(self, config: Path) -> subprocess.CompletedProcess[str]:
        data = self.root / "data.bin"
        data.write_bytes(b"\x42" * 32)
        return subprocess.run(
            ["pkcs11-tool", "--module", str(MODULE), "--token-label", "se-1", "--login",
             "--pin", PIN, "--sign", "-m", "ECDSA", "--label", "k-ec", "-i", str(data),
             "-o", str(self.root / "sig.bin")],
            env={**self.env, "P11GRID_CONF": str(config)}, capture_output=True, text=True,
            timeout=120)


HV_BY_KEY_IN_TOKEN = """hv_certificate = "{root}/hv-1.pem"
hv_key = "pkcs11:token=hv-se;object=hv-key?pin-source={root}/hv.pin"
hv_module = "{softhsm}"
hv_environment = {{ SOFTHSM2_CONF = "{root}/hv-softhsm2.conf" }}"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("chain")
    ca = Authority.init(root / "ca", DOMAIN)
    _issue(ca, root, "grid", "grid-1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    _issue(ca, root, "idp", "idp-1", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    for vm in ("vm-1", "vm-2"):
        _issue(ca, root, "vm", vm)
    _issue(ca, root, "hv", "hv-3")  # a hypervisor whose key is a file
    _issue(ca, root, "app", "web")  # an application in vm-1
    # The hypervisor's key: generated inside its own token, certified through a CSR.
    (root / "hv-tokens").mkdir()
    hv_conf = root / "hv-softhsm2.conf"
    hv_conf.write_text(f"directories.tokendir = {root / 'hv-tokens'}\n"
                       "objectstore.backend = file\nlibrary.reset_on_fork = true\n")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "hv-se", "--pin",
                    HV_PIN, "--so-pin", "12345678"], check=True, capture_output=True,
                   env={**os.environ, "SOFTHSM2_CONF": str(hv_conf)})
    write_file(root / "hv.pin", HV_PIN.encode() + b"\n", mode=0o600)
    subprocess.run([str(VENV_BIN / "p11grid"), "ca", "issue", "--ca-dir", str(root / "ca"),
                    "--kind", "hv", "--name", "hv-1", "--module", SOFTHSM, "--env",
                    f"SOFTHSM2_CONF={hv_conf}", "--key-uri", "pkcs11:token=hv-se;object=hv-key",
                    "--pin", HV_PIN, "--generate", "ec256", "--out", str(root / "hv-1.pem")],
                   check=True, capture_output=True, timeout=120)
    # A second hypervisor key, RSA, in the same token: result containers are sealed to it.
    subprocess.run([str(VENV_BIN / "p11grid"), "ca", "issue", "--ca-dir", str(root / "ca"),
                    "--kind", "hv", "--name", "hv-r", "--module", SOFTHSM, "--env",
                    f"SOFTHSM2_CONF={hv_conf}", "--key-uri",
                    "pkcs11:token=hv-se;object=hv-rsa-key", "--pin", HV_PIN, "--generate",
                    "rsa2048", "--out", str(root / "hv-r.pem")],
                   check=True, capture_output=True, timeout=120)
    authority = _key_file(root / "grid-authority.key")  # signs the grid's result containers
    (root / "grid-authority.pub.pem").write_bytes(authority.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # The grid's element, bound to vm-1 only.
    (root / "tokens").mkdir()
    softhsm = root / "softhsm2.conf"
    softhsm.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("P11GRID_", "OPENSSL_"))}
    env.update({"SOFTHSM2_CONF": str(softhsm), "P11GRID_REGISTRY": str(root / "reg.sqlite")})
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "se-1", "--pin", PIN,
                    "--so-pin", "12345678"], env=env, check=True, capture_output=True)
    for arguments in (["add-se", "--seid", "se-1", "--driver", "pkcs11", "--library", SOFTHSM,
                       "--token-label", "se-1", "--env", f"SOFTHSM2_CONF={softhsm}"],
                      ["keygen", "--seid", "se-1", "--label", "k-ec", "--id", "01", "--kind",
                       "ec256", "--pin", PIN],
                      ["bind", "--identity", f"spiffe://{DOMAIN}/vm/vm-1", "--seid", "se-1"],
                      ["bind", "--identity", f"spiffe://{DOMAIN}/app/web", "--seid", "se-1"]):
        subprocess.run([str(VENV_BIN / "p11grid"), "grid", *arguments], env=env, check=True,
                       capture_output=True, timeout=120)
    # The OpenID provider.
    idp_port = _free_port()
    idp_metrics = _free_port()
    (root / "recorded").mkdir()
    idp_config = root / "idp.toml"
    idp_config.write_text(f"""[idp]
listen = "127.0.0.1:{idp_port}"
metrics = "127.0.0.1:{idp_metrics}"
issuer = "https://127.0.0.1:{idp_port}"
certificate = "{root / 'idp-1.pem'}"
key = "{root / 'idp-1.key'}"
ca_dir = "{root / 'ca'}"
signing_key = "{root / 'idp-signing.pem'}"
audiences = ["{SP}"]
recorded_tokens = "{root / 'recorded'}"
log_file = "{root / 'idp.log'}"
""")
    idp = _start([str(VENV_BIN / "p11grid"), "idp", "serve", "--config", str(idp_config)], env,
                 "serving")
    context = ssl.create_default_context(cafile=str(root / "ca" / "ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{idp_port}/jwks", context=context,
                                timeout=10) as answer:
        (root / "idp-jwks.json").write_text(json.dumps(json.load(answer)))
    # The grid, enforcing the three elements.
    grid_port = _free_port()
    (root / "grid.toml").write_text(f"""[grid]
listen = "127.0.0.1:{grid_port}"
certificate = "{root / 'grid-1.pem'}"
key = "{root / 'grid-1.key'}"
client_ca = "{root / 'ca' / 'ca.pem'}"
registry = "{root / 'reg.sqlite'}"
audit_log = "{root / 'audit.log'}"
log_file = "{root / 'grid.log'}"

[identity]
sp = "{SP}"
ca_dir = "{root / 'ca'}"
idp_issuer = "https://127.0.0.1:{idp_port}"
idp_jwks = "{root / 'idp-jwks.json'}"
result_authority_key = "{root / 'grid-authority.key'}"
result_header = "rsa-oaep-sha1"
""")
    grid = _start([str(VENV_BIN / "p11grid"), "grid", "serve", "--config",
                   str(root / "grid.toml")], env, "serving")
    env.update({"GRID_PORT": str(grid_port), "IDP_PORT": str(idp_port),
                "IDP_METRICS": str(idp_metrics)})
    try:
        yield Chain(root, ca, env, idp_config)
    finally:
        for process in (grid, idp):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)


def _option2(chain: Chain, name: str, token: str) -> Path:
    token_file = chain.root / f"{name}.jwt"
    token_file.write_text(token + "\n")
    return chain.module_config(name, f'vm_token = "{token_file}"\n' + HV_BY_KEY_IN_TOKEN.format(
        root=chain.root, softhsm=SOFTHSM))


def test_option_2_token_file_opens_the_session(chain: Chain) -> None:
    config = _option2(chain, "option2", chain.vm_token())
    signed = chain.sign(config)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert len((chain.root / "sig.bin").read_bytes()) == 64
    audit = (chain.root / "audit.log").read_text()
    assert '"op": "authorize", "result": "ok"' in audit and '"op": "sign", "result": "ok"' in audit
    idp_log = (chain.root / "idp.log").read_text()
    assert "hv/hv-1" in idp_log  # the provider authenticated the hypervisor


def test_option_1_the_provider_hands_out_the_recorded_token(chain: Chain) -> None:
    recorded = chain.root / "recorded-input.jwt"
    recorded.write_text(chain.vm_token() + "\n")
    subprocess.run([str(VENV_BIN / "p11grid"), "idp", "record", "--config",
                    str(chain.idp_config), "--token", str(recorded)], env=chain.env, check=True,
                   capture_output=True, timeout=60)
    config = chain.module_config("option1", f'vm = "spiffe://{DOMAIN}/vm/vm-1"\n'
                                 + HV_BY_KEY_IN_TOKEN.format(root=chain.root, softhsm=SOFTHSM))
    signed = chain.sign(config)
    assert signed.returncode == 0, signed.stdout + signed.stderr


@pytest.mark.parametrize(("defect", "says"), [
    ("tampered", "signature"),
    ("foreign", "confirmation"),
    ("expired", "expiry"),
    ("another audience", "audience"),
])
def test_a_bad_token_file_refuses_the_next_session(chain: Chain, defect: str, says: str) -> None:
    good = chain.vm_token()
    if defect == "tampered":
        head, body, signature = good.split(".")
        token = f"{head}.{body[:-4]}{'AAAA' if body[-4:] != 'AAAA' else 'BBBB'}.{signature}"
    elif defect == "foreign":
        token = chain.vm_token("vm-2")
    elif defect == "expired":
        token = chain.soft_vm_token("hv-3", now=datetime.datetime.now(datetime.UTC) - 2 * HOUR)
        good = chain.soft_vm_token("hv-3")
    else:
        token = chain.vm_token(audience=f"spiffe://{DOMAIN}/sp/other")
    name = "bad-" + defect.replace(" ", "-")
    if defect == "expired":  # that hypervisor's key is a file: tls_client_auth
        token_file = chain.root / f"{name}.jwt"
        token_file.write_text(token + "\n")
        config = chain.module_config(name, f'vm_token = "{token_file}"\n'
                                     f'hv_certificate = "{chain.root / "hv-3.pem"}"\n'
                                     f'hv_key_file = "{chain.root / "hv-3.key"}"\n')
    else:
        config = _option2(chain, name, token)
    refused = chain.sign(config)
    assert refused.returncode != 0
    assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
    log = (chain.root / f"{name}.log").read_text()
    assert f"refused by the module: {says}:" in log, log
    assert token not in log  # the token itself never goes to the log
    # The same config with the defect removed works again.
    (chain.root / f"{name}.jwt").write_text(good + "\n")
    assert chain.sign(config).returncode == 0


def test_tls_client_auth_then_a_revoked_hypervisor(chain: Chain) -> None:
    """A second hypervisor whose key is a file authenticates with tls_client_auth; once the
    CA revokes it, its VM token is refused at the next session."""
    _issue(chain.ca, chain.root, "hv", "hv-2")
    token = chain.soft_vm_token("hv-2")
    token_file = chain.root / "hv2.jwt"
    token_file.write_text(token)
    config = chain.module_config("hv2", f'vm_token = "{token_file}"\n'
                                 f'hv_certificate = "{chain.root / "hv-2.pem"}"\n'
                                 f'hv_key_file = "{chain.root / "hv-2.key"}"\n')
    signed = chain.sign(config)  # tls_client_auth to the provider, then the grid
    assert signed.returncode == 0, signed.stdout + signed.stderr
    chain.ca.revoke(identity=Identity(DOMAIN, "hv", "hv-2"))
    refused = chain.sign(config)
    assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
    assert "revoked" in (chain.root / "hv2.log").read_text()


def test_the_grid_refuses_a_vm_not_bound_to_the_element(chain: Chain) -> None:
    """vm-2's token is good (the module and the provider accept it), but the registry does
    not bind vm-2 to se-1: the grid refuses, and the module says so."""
    token_file = chain.root / "vm2.jwt"
    token_file.write_text(chain.vm_token("vm-2"))
    config = chain.module_config("vm2", f'vm_token = "{token_file}"\n'
                                 + HV_BY_KEY_IN_TOKEN.format(root=chain.root, softhsm=SOFTHSM),
                                 vm="vm-2")
    refused = chain.sign(config)
    assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
    assert "is not bound to spiffe://chain.test/vm/vm-2" in (chain.root / "vm2.log").read_text()


HV_RSA = """hv_certificate = "{root}/hv-r.pem"
hv_key = "pkcs11:token=hv-se;object=hv-rsa-key?pin-source={root}/hv.pin"
hv_module = "{softhsm}"
hv_environment = {{ SOFTHSM2_CONF = "{root}/hv-softhsm2.conf" }}"""


def test_sealed_results_open_only_with_the_hv_key_and_the_grid_authority(chain: Chain) -> None:
    """Result containers (DESIGN.md 4): the grid seals each signature to the HV's RSA key
    and signs the container; the module verifies, unwraps with the HV key in its token and
    only then returns the signature, which verifies. A wrong authority key: refused."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

    token_file = chain.root / "sealed.jwt"
    token_file.write_text(chain.vm_token(hv="hv-r", key="hv-rsa-key"))
    sealed = f'vm_token = "{token_file}"\n' + HV_RSA.format(root=chain.root, softhsm=SOFTHSM)
    config = chain.module_config("sealed", sealed + f'\nresult_authority = '
                                 f'"{chain.root / "grid-authority.pub.pem"}"\n')
    signed = chain.sign(config)
    assert signed.returncode == 0, signed.stdout + signed.stderr
    public = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM, "--token-label", "se-1", "--read-object",
         "--type", "pubkey", "--label", "k-ec"], env=chain.env, capture_output=True,
        check=True, timeout=60).stdout
    key = serialization.load_der_public_key(public)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    raw = (chain.root / "sig.bin").read_bytes()
    key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big")),
               b"\x42" * 32, ec.ECDSA(Prehashed(hashes.SHA256())))
    # Another authority key: the container's trailer does not verify; nothing is returned.
    stranger = _key_file(chain.root / "stranger.key")
    (chain.root / "stranger.pub.pem").write_bytes(stranger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong = chain.module_config("sealed-wrong", sealed + f'\nresult_authority = '
                                f'"{chain.root / "stranger.pub.pem"}"\n')
    refused = chain.sign(wrong)
    assert refused.returncode != 0 and "CKR_DEVICE_ERROR" in refused.stdout + refused.stderr
    assert "result was refused" in (chain.root / "sealed-wrong.log").read_text()
    # Containers sealed to an EC hypervisor key cannot be: the grid says so.
    ec_hv = chain.module_config("sealed-ec", f'vm_token = "{token_file}"\n'.replace(
        "sealed.jwt", "option2.jwt") + HV_BY_KEY_IN_TOKEN.format(root=chain.root,
                                                                softhsm=SOFTHSM)
        + f'\nresult_authority = "{chain.root / "grid-authority.pub.pem"}"\n')
    (chain.root / "option2.jwt").write_text(chain.vm_token())
    refused = chain.sign(ec_hv)
    assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
    assert "is not RSA" in (chain.root / "sealed-ec.log").read_text()


def test_app_level_key_through_the_module(chain: Chain) -> None:
    """One layer up: an application with its own identity (TLS certificate app/web) uses
    the element after the module verified its APP token (signed by vm-1) inside the VM
    token, vm-1 vouched for it at the provider (tls_client_auth), and the grid checked the
    nested act (APP <- VM <- HV). An APP token from another VM, or one outliving its VM
    token, is refused by the module."""
    import json

    vm_token_file = chain.root / "app-vm.jwt"
    vm_token_file.write_text(chain.vm_token())
    vm_expiry = json.loads(base64.urlsafe_b64decode(
        vm_token_file.read_text().split(".")[1] + "=="))["exp"]

    def app_token(vm: str, lifetime: datetime.timedelta) -> Path:
        file = chain.root / f"app-from-{vm}.jwt"
        file.write_text(chain.soft_app_token(vm, lifetime))
        return file

    def config(name: str, token_file: Path) -> Path:
        return chain.module_config(name, f'vm_token = "{vm_token_file}"\n'
                                   f'app_token = "{token_file}"\n'
                                   f'vm_certificate = "{chain.root / "vm-1.pem"}"\n'
                                   f'vm_key_file = "{chain.root / "vm-1.key"}"\n'
                                   + HV_BY_KEY_IN_TOKEN.format(root=chain.root,
                                                               softhsm=SOFTHSM), vm="web")

    signed = chain.sign(config("app", app_token("vm-1", HOUR / 2)))
    assert signed.returncode == 0, signed.stdout + signed.stderr
    audit = (chain.root / "audit.log").read_text()
    assert f'"caller": "spiffe://{DOMAIN}/app/web", "ms"' in audit
    assert "APP-Auth-Token of spiffe://chain.test/app/web verified" in \
        (chain.root / "app.log").read_text()
    refused = chain.sign(config("app-other-vm", app_token("vm-2", HOUR / 2)))
    assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
    assert "refused by the module: authenticated issuer" in \
        (chain.root / "app-other-vm.log").read_text()
    outliving = app_token("vm-1", 2 * HOUR)
    claims = json.loads(base64.urlsafe_b64decode(outliving.read_text().split(".")[1] + "=="))
    assert claims["exp"] > vm_expiry
    refused = chain.sign(config("app-outliving", outliving))
    assert "refused by the module: within vm token" in \
        (chain.root / "app-outliving.log").read_text()


def test_provider_metrics_count_exchanges_by_level_and_result(chain: Chain) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    signed = chain.sign(_option2(chain, "metrics", chain.vm_token()))
    assert signed.returncode == 0, signed.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{chain.env['IDP_METRICS']}/metrics",
                                timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    requests = {tuple(sorted(s.labels.items())): s.value
                for s in families["p11grid_idp_requests"].samples if s.name.endswith("_total")}
    assert requests[(("operation", "vm"), ("result", "ok"))] >= 1
    assert any(s.labels.get("operation") == "vm" and s.name.endswith("_count")
               for s in families["p11grid_idp_request_seconds"].samples)
