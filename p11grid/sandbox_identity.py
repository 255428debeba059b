"""The identity part of a sandbox (issue 4): the hypervisor's key in its own SoftHSM2
token, certified by the IAM CA through a CSR made inside the token; the OpenID provider;
the VM-Auth-Token the hypervisor signs for the sandbox's VM. Everything is done with the
operator's own commands (`p11grid ca issue`, `p11grid token issue vm`, `p11grid idp serve`),
run as subprocesses, so that the SoftHSM2 the hypervisor's token lives in is never loaded
into the process that builds the sandbox.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from idm.authority import Authority, write_file
from idm.identity import Identity

HV_NAME = "hv-1"
HV_TOKEN = "hv-se"
HV_KEY_LABEL = "hv-key"
SP_NAME = "grid"
VM_TOKEN_TTL = "12h"
START_TIMEOUT_SECONDS = 30.0


def _toml(value: str) -> str:
    return json.dumps(value)


@dataclass(frozen=True)
class IdentityLayout:
    directory: Path  # DIR/identity
    trust_domain: str
    # The hypervisor's token lives in the sandbox's SoftHSM2 store (a token of its own,
    # hv-se), so that `. DIR/env` is all `p11grid token issue vm` needs.
    hv_softhsm_conf: Path
    softhsm_library: Path

    @property
    def hv_pin_file(self) -> Path:
        return self.directory / "hv.pin"

    @property
    def hv_certificate(self) -> Path:
        return self.directory / "hv.pem"

    @property
    def hv_key_uri(self) -> str:
        return (f"pkcs11:token={HV_TOKEN};object={HV_KEY_LABEL}?module-path="
                f"{self.softhsm_library}&pin-source={self.hv_pin_file}")

    @property
    def vm_token(self) -> Path:
        return self.directory / "vm-token.jwt"

    @property
    def vm_signing_certificate(self) -> Path:
        """The VM's identity certificate over its key in the grid (vm-ec): the key that
        signs APP-Auth-Tokens, through our own module."""
        return self.directory / "vm-signing.pem"

    @property
    def app_certificate(self) -> Path:
        return self.directory / "app.pem"

    @property
    def app_token(self) -> Path:
        return self.directory / "app-token.jwt"

    @property
    def idp_config(self) -> Path:
        return self.directory / "idp.toml"

    @property
    def idp_jwks(self) -> Path:
        return self.directory / "idp-jwks.json"

    @property
    def idp_log(self) -> Path:
        return self.directory / "idp.log"

    @property
    def idp_pid_file(self) -> Path:
        return self.directory / "idp.pid"

    @property
    def sp(self) -> str:
        return Identity(self.trust_domain, "sp", SP_NAME).uri


def _p11grid(*arguments: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "p11grid", *arguments], capture_output=True,
                            text=True, timeout=120, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"p11grid {' '.join(arguments[:3])}: {result.stderr.strip()}")
    return result.stdout


def create_hypervisor(layout: IdentityLayout, ca_dir: Path, softhsm_library: Path) -> None:
    """Token hv-se with a random PIN (in a 0600 file the key URI names), the HV key
    generated inside it, its certificate from the IAM CA, stored in the token too."""
    layout.directory.mkdir(mode=0o700, exist_ok=True)
    pin = "".join(secrets.choice("0123456789") for _ in range(8))
    write_file(layout.hv_pin_file, f"{pin}\n".encode(), mode=0o600)
    environment = {**os.environ, "SOFTHSM2_CONF": str(layout.hv_softhsm_conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", HV_TOKEN, "--pin", pin,
                    "--so-pin", "".join(secrets.choice("0123456789") for _ in range(8))],
                   env=environment, check=True, capture_output=True, timeout=60)
    _p11grid("ca", "issue", "--ca-dir", str(ca_dir), "--kind", "hv", "--name", HV_NAME,
             "--module", str(softhsm_library), "--env",
             f"SOFTHSM2_CONF={layout.hv_softhsm_conf}", "--key-uri", layout.hv_key_uri,
             "--generate", "ec256", "--out", str(layout.hv_certificate))
    # `ca issue` also stored the certificate next to the key: `token issue vm` then
    # needs no certificate file.


def issue_vm_token(layout: IdentityLayout, softhsm_library: Path, vm_certificate: Path) -> None:
    _p11grid("token", "issue", "vm", "--hv-key", layout.hv_key_uri, "--module",
             str(softhsm_library), "--env", f"SOFTHSM2_CONF={layout.hv_softhsm_conf}",
             "--hv-cert", str(layout.hv_certificate), "--vm-cert", str(vm_certificate),
             "--audience", layout.sp, "--ttl", VM_TOKEN_TTL, "--out", str(layout.vm_token))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_idp(layout: IdentityLayout, authority: Authority) -> tuple[int, str]:
    """The OpenID provider, in its own session; (pid, issuer URL) once it answers TLS."""
    from idm.idp import SigningKey

    key = ec.generate_private_key(ec.SECP256R1())
    write_file(layout.directory / "idp.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    certificate = authority.issue(Identity(layout.trust_domain, "idp", "idp"), key.public_key(),
                                  dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (layout.directory / "idp.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM))
    signing = SigningKey.load_or_create(layout.directory / "idp-signing.pem")
    layout.idp_jwks.write_text(json.dumps({"keys": [signing.jwk()]}))
    (layout.directory / "recorded").mkdir(mode=0o700, exist_ok=True)
    port = _free_port()
    issuer = f"https://127.0.0.1:{port}"
    layout.idp_config.write_text(
        "# The sandbox's OpenID provider (p11grid idp serve --config this-file)\n[idp]\n"
        f'listen = "127.0.0.1:{port}"\nissuer = {_toml(issuer)}\n'
        f"certificate = {_toml(str(layout.directory / 'idp.pem'))}\n"
        f"key = {_toml(str(layout.directory / 'idp.key'))}\n"
        f"ca_dir = {_toml(str(authority.directory))}\n"
        f"signing_key = {_toml(str(layout.directory / 'idp-signing.pem'))}\n"
        f"audiences = [{_toml(layout.sp)}]\n"
        f"recorded_tokens = {_toml(str(layout.directory / 'recorded'))}\n"
        f"log_file = {_toml(str(layout.idp_log))}\n"
        f"pid_file = {_toml(str(layout.idp_pid_file))}\n")
    with open(layout.directory / "idp.out", "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "p11grid", "idp", "serve", "--config", str(layout.idp_config)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"})
    context = ssl.create_default_context(cafile=str(authority.directory / "ca.pem"))
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (layout.directory / "idp.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the OpenID provider exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return process.pid, issuer
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"the OpenID provider did not answer on 127.0.0.1:{port} within "
                       f"{START_TIMEOUT_SECONDS:.0f} s")


def grid_identity_table(layout: IdentityLayout, ca_dir: Path, issuer: str) -> str:
    return ("\n[identity]\n"
            f"sp = {_toml(layout.sp)}\n"
            f"ca_dir = {_toml(str(ca_dir))}\n"
            f"idp_issuer = {_toml(issuer)}\n"
            f"idp_jwks = {_toml(str(layout.idp_jwks))}\n")


def module_identity_table(layout: IdentityLayout, ca_dir: Path, issuer: str,
                          softhsm_library: Path) -> str:
    """Option 2 (the token file $P11GRID_VM_TOKEN), private_key_jwt with the HV's key."""
    return ("\n[identity]\n"
            f"audience = {_toml(layout.sp)}\n"
            f"ca = {_toml(str(ca_dir / 'ca.pem'))}\n"
            f"crl = {_toml(str(ca_dir / 'crl.pem'))}\n"
            f"idp = {_toml(issuer)}\n"
            f"vm_token = {_toml(str(layout.vm_token))}\n"
            f"hv_certificate = {_toml(str(layout.hv_certificate))}\n"
            f"hv_key = {_toml(layout.hv_key_uri)}\n"
            f"hv_module = {_toml(str(softhsm_library))}\n"
            f"hv_environment = {{ SOFTHSM2_CONF = {_toml(str(layout.hv_softhsm_conf))} }}\n")


APP_NAME = "web"
VM_SIGNING_KEY = "vm-ec"


def issue_app(layout: IdentityLayout, ca_dir: Path, module: Path, module_conf: Path,
              token_label: str, pin: str) -> None:
    """One layer up: the VM's own identity certificate over its key in the grid (the CA
    certifies a CSR the VM signed through libp11grid.so), an APP identity, and the
    APP-Auth-Token the VM signs for it with that key, never outliving the VM token."""
    key_uri = f"pkcs11:token={token_label};object={VM_SIGNING_KEY}"
    through_module = ("--module", str(module), "--pin", pin, "--env",
                      f"P11GRID_CONF={module_conf}")
    _p11grid("ca", "issue", "--ca-dir", str(ca_dir), "--kind", "vm", "--name", "vm-1",
             "--key-uri", key_uri, *through_module, "--out", str(layout.vm_signing_certificate))
    _p11grid("ca", "issue", "--ca-dir", str(ca_dir), "--kind", "app", "--name", APP_NAME,
             "--key-out", str(layout.directory / "app.key"), "--out",
             str(layout.app_certificate))
    _p11grid("token", "issue", "app", "--vm-key", key_uri, *through_module, "--vm-cert",
             str(layout.vm_signing_certificate), "--app-cert", str(layout.app_certificate),
             "--vm-token", str(layout.vm_token), "--audience", layout.sp, "--ttl", "1h",
             "--out", str(layout.app_token))
