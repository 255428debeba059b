"""The grid part of a sandbox: TLS identities, the registry, the grid service's config,
and the grid service itself, started in the background and recorded in state.json."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from grid_backend.registry import ElementRecord, KeyRecord, SqliteRegistry
from idm.authority import Authority, write_file
from idm.identity import Identity
from p11grid import ca

TRUST_DOMAIN = "p11grid.sandbox"
VM_NAME = "vm-1"
VM_IDENTITY = f"spiffe://{TRUST_DOMAIN}/vm/{VM_NAME}"
RACS_ADMIN = "racs-admin"  # the CN RACS lets use every element it exposes
START_TIMEOUT_SECONDS = 30.0


def _toml(value: str) -> str:
    return json.dumps(value)


@dataclass(frozen=True)
class GridLayout:
    """Where a sandbox keeps its grid."""

    directory: Path  # DIR/grid

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def config(self) -> Path:
        return self.directory / "grid.toml"

    @property
    def registry(self) -> Path:
        return self.directory / "registry.sqlite"

    @property
    def pid_file(self) -> Path:
        return self.directory / "grid.pid"

    @property
    def log(self) -> Path:
        return self.directory / "grid.log"

    @property
    def audit_log(self) -> Path:
        return self.directory / "audit.log"

    @property
    def racs_client_cert(self) -> Path:
        return self.directory / "racs-client.pem"

    @property
    def racs_client_key(self) -> Path:
        return self.directory / "racs-client.key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tls_identity(iam: Authority, kind: str, name: str, key_path: Path, cert_path: Path,
                  server: bool = False) -> None:
    """A TLS identity with a file key, issued by the IAM CA itself (so `p11grid ca revoke`
    reaches it, and the grid refuses it at the next authorize once revoked)."""
    key = ec.generate_private_key(ec.SECP256R1())
    write_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    certificate = iam.issue(Identity(iam.trust_domain, kind, name), key.public_key(),
                            dns_names=[ca.SERVER_NAME] if server else (),
                            ip_addresses=[str(ca.SERVER_IP)] if server else ())
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def issue_identities(layout: GridLayout, iam: Authority) -> None:
    """From the IAM CA: the grid's and its RACS server's server identities, the VM's
    client identity, and the RACS administrator's client identity (CN racs-admin)."""
    layout.directory.mkdir(mode=0o700, exist_ok=True)
    _tls_identity(iam, "grid", "grid", layout.path("grid.key"), layout.path("grid.pem"),
                  server=True)
    _tls_identity(iam, "grid", "racs", layout.path("racs.key"), layout.path("racs.pem"),
                  server=True)
    _tls_identity(iam, "vm", VM_NAME, layout.path("vm.key"), layout.path("vm.pem"))
    _tls_identity(iam, "user", RACS_ADMIN, layout.racs_client_key, layout.racs_client_cert)


def write_registry(layout: GridLayout, seid: str, library: Path, token_label: str,
                   softhsm_conf: Path, keys: list[tuple[str, str, str]]) -> None:
    registry = SqliteRegistry(layout.registry)
    try:
        registry.add_element(ElementRecord(seid, seid, "pkcs11", {
            "library": str(library), "token_label": token_label,
            "environment": {"SOFTHSM2_CONF": str(softhsm_conf)}}))
        for label, key_id, kind in keys:
            registry.add_key(KeyRecord(seid, label, key_id, kind))
        registry.bind(VM_IDENTITY, seid)
    finally:
        registry.close()


def register_piv(layout: GridLayout, seid: str, settings: dict[str, object],
                 keys: list[tuple[str, str, str]]) -> None:
    """A PIV card in the registry: bound to the VM, administered (over RACS) by racs-admin."""
    registry = SqliteRegistry(layout.registry)
    try:
        registry.add_element(ElementRecord(seid, seid, "piv", dict(settings)))
        for label, key_id, kind in keys:
            registry.add_key(KeyRecord(seid, label, key_id, kind))
        registry.bind(VM_IDENTITY, seid)
        registry.add_administrator(RACS_ADMIN, seid)
    finally:
        registry.close()


def write_config(layout: GridLayout, ca_cert: Path, port: int, racs_port: int,
                 identity_table: str = "") -> None:
    layout.config.write_text(
        "# The sandbox's grid service (p11grid grid serve --config this-file)\n"
        "[grid]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f"certificate = {_toml(str(layout.path('grid.pem')))}\n"
        f"key = {_toml(str(layout.path('grid.key')))}\n"
        f"client_ca = {_toml(str(ca_cert))}\n"
        f"registry = {_toml(str(layout.registry))}\n"
        f"audit_log = {_toml(str(layout.audit_log))}\n"
        f"log_file = {_toml(str(layout.log))}\n"
        f"pid_file = {_toml(str(layout.pid_file))}\n"
        "\n"
        "[racs]\n"
        f'listen = "127.0.0.1:{racs_port}"\n'
        f"certificate = {_toml(str(layout.path('racs.pem')))}\n"
        f"key = {_toml(str(layout.path('racs.key')))}\n"
        f"client_ca = {_toml(str(ca_cert))}\n"
        + identity_table
    )


def module_config_text(layout: GridLayout, ca_cert: Path, port: int, module_log: Path,
                       token_labels: list[str]) -> str:
    """One slot per element; each element's seid is its token label."""
    return (
        "# p11grid module configuration of the sandbox (read via $P11GRID_CONF):\n"
        "# the keys are in the grid, reached over TLS.\n"
        "[module]\n"
        'backend = "grid"\n'
        f"log_file = {_toml(str(module_log))}\n"
        'log_level = "info"\n'
        "\n"
        "[grid]\n"
        f'endpoints = ["127.0.0.1:{port}"]\n'
        f"ca = {_toml(str(ca_cert))}\n"
        f"certificate = {_toml(str(layout.path('vm.pem')))}\n"
        f"key = {_toml(str(layout.path('vm.key')))}\n"
        "timeout = 5.0\n"
    ) + "".join(
        f"\n[[secure_element]]\nlabel = {_toml(label)}\nseid = {_toml(label)}\n"
        for label in token_labels
    )


def start(layout: GridLayout, ca_cert: Path, port: int, racs_port: int,
          environment: dict[str, str]) -> int:
    """Start the grid service with `environment` added to ours; return its pid once both
    the grid and its RACS server complete TLS handshakes."""
    with open(layout.path("grid.out"), "ab") as output:
        # Its own session: the service outlives `sandbox up`; `sandbox down` stops it.
        process = subprocess.Popen(
            [sys.executable, "-m", "p11grid", "grid", "serve", "--config", str(layout.config)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"},
                 **environment})
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    grid_context = ssl.create_default_context(cafile=str(ca_cert))
    grid_context.load_cert_chain(str(layout.path("vm.pem")), str(layout.path("vm.key")))
    racs_context = ssl.create_default_context(cafile=str(ca_cert))
    racs_context.load_cert_chain(str(layout.racs_client_cert), str(layout.racs_client_key))
    # RACS starts after the grid's listener: wait for both.
    waiting = [(port, grid_context), (racs_port, racs_context)]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = layout.path("grid.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the grid service exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", waiting[0][0]), timeout=1.0) as raw, \
                    waiting[0][1].wrap_socket(raw, server_hostname="127.0.0.1"):
                waiting.pop(0)
            if not waiting:
                return process.pid
        except OSError:
            time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"the grid service did not answer on 127.0.0.1:{waiting[0][0]} within "
                       f"{START_TIMEOUT_SECONDS:.0f} s")
