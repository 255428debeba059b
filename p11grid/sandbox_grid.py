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

from grid_backend.registry import ElementRecord, KeyRecord, SqliteRegistry
from p11grid import ca

TRUST_DOMAIN = "p11grid.sandbox"
VM_NAME = "vm-1"
VM_IDENTITY = f"spiffe://{TRUST_DOMAIN}/vm/{VM_NAME}"
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def issue_identities(layout: GridLayout, authority: ca.SandboxCA) -> None:
    """The grid's server identity and the VM's client identity, both from the sandbox CA."""
    layout.directory.mkdir(mode=0o700, exist_ok=True)
    ca.issue_identity(authority, layout.path("grid.key"), layout.path("grid.pem"), "grid",
                      uri=f"spiffe://{TRUST_DOMAIN}/grid/grid", server=True)
    ca.issue_identity(authority, layout.path("vm.key"), layout.path("vm.pem"), VM_NAME,
                      uri=VM_IDENTITY)


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


def write_config(layout: GridLayout, ca_cert: Path, port: int) -> None:
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
    )


def module_config_text(layout: GridLayout, ca_cert: Path, port: int, module_log: Path,
                       token_label: str) -> str:
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
        "\n"
        "[[secure_element]]\n"
        f"label = {_toml(token_label)}\n"
        f"seid = {_toml(token_label)}\n"
    )


def start(layout: GridLayout, ca_cert: Path, port: int) -> int:
    """Start the grid service; return its pid once it completes TLS handshakes."""
    with open(layout.path("grid.out"), "ab") as output:
        # Its own session: the service outlives `sandbox up`; `sandbox down` stops it.
        process = subprocess.Popen(
            [sys.executable, "-m", "p11grid", "grid", "serve", "--config", str(layout.config)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"})
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.load_cert_chain(str(layout.path("vm.pem")), str(layout.path("vm.key")))
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = layout.path("grid.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the grid service exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return process.pid
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"the grid service did not answer on 127.0.0.1:{port} within "
                       f"{START_TIMEOUT_SECONDS:.0f} s")
