"""The module's side of the grid's TLS, each case provoked for real: a server with a
certificate of the same CA that is not a grid's gets nothing (no tokens, no PIN); a grid
that refuses this host's certificate ends the call at once, not in a reconnect loop; and
missing TLS files are named as this host's configuration, not as the grid being gone."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from idm.authority import Authority
from p11grid import ca
from p11grid.sandbox_grid import TRUST_DOMAIN, free_port

HOST = Path(__file__).resolve().parent / "grid_host.py"


def _module_config(sandbox: dict[str, str], tmp_path: Path, endpoint: str,
                   replace: tuple[str, str] | None = None) -> Path:
    text = Path(sandbox["P11GRID_CONF"]).read_text()
    text = re.sub(r"^endpoints = .*$", f'endpoints = ["{endpoint}"]', text, flags=re.MULTILINE)
    text = re.sub(r'^log_file = .*$', f'log_file = "{tmp_path / "module.log"}"', text,
                  count=1, flags=re.MULTILINE)
    text = text.replace("timeout = 5.0", "timeout = 4.0")
    if replace is not None:
        text = text.replace(*replace)
    config = tmp_path / "p11grid.toml"
    config.write_text(text)
    return config


def _login(sandbox_environ: dict[str, str], config: Path) -> tuple[str, float]:
    """grid_host.py logs in at start: its stderr and how long it took to give up."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(HOST)], input="exit\n",
                          env={**sandbox_environ, "P11GRID_CONF": str(config)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, "logged in through a server that must be refused"
    return done.stderr, time.monotonic() - started


class _Listener:
    """A TLS server on 127.0.0.1 that records what each connection sends it."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.port = free_port()
        self.received = bytearray()
        self.handshakes = 0
        self._socket = socket.create_server(("127.0.0.1", self.port))
        self._socket.settimeout(0.2)
        self._context = context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._socket.accept()
            except TimeoutError:
                continue
            raw.settimeout(2.0)
            try:
                with self._context.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes += 1
                    while chunk := tls.recv(65536):
                        self.received += chunk
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def test_a_server_that_is_not_a_grid_gets_nothing(sandbox: dict[str, str],
                                                   sandbox_environ: dict[str, str],
                                                   tmp_path: Path) -> None:
    # A certificate from the same IAM CA, valid for 127.0.0.1, naming a VM.
    authority = Authority.open(Path(sandbox["P11GRID_CA_DIR"]))
    ca.issue_identity(ca.SandboxCA(authority.key, authority.certificate),
                      tmp_path / "impostor.key", tmp_path / "impostor.pem", "impostor",
                      uri=f"spiffe://{TRUST_DOMAIN}/vm/impostor", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tmp_path / "impostor.pem"), str(tmp_path / "impostor.key"))
    listener = _Listener(context)
    try:
        config = _module_config(sandbox, tmp_path, f"127.0.0.1:{listener.port}")
        _login(sandbox_environ, config)
    finally:
        listener.close()
    assert listener.handshakes >= 1  # it was asked, and it answered the handshake
    assert listener.received == b"", "the module sent a request to a server that is no grid"
    log = (tmp_path / "module.log").read_text()
    assert "vm/impostor, not a grid" in log, log[-2000:]


def test_a_grid_refusing_this_host_ends_the_call_at_once(sandbox: dict[str, str],
                                                          sandbox_environ: dict[str, str],
                                                          tmp_path: Path) -> None:
    # The real grid certificate, but client certificates checked against another CA.
    other = ca.create_ca(tmp_path / "other.key", tmp_path / "other.pem", "another CA")
    assert other.certificate.subject != Authority.open(
        Path(sandbox["P11GRID_CA_DIR"])).certificate.subject
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(grid / "grid.pem"), str(grid / "grid.key"))
    context.load_verify_locations(cafile=str(tmp_path / "other.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = _Listener(context)
    try:
        config = _module_config(sandbox, tmp_path, f"127.0.0.1:{listener.port}")
        _, took = _login(sandbox_environ, config)
        attempts = listener.handshakes
    finally:
        listener.close()
    log = (tmp_path / "module.log").read_text()
    assert "this host's TLS certificate" in log, log[-2000:]
    # Not a reconnect loop until the deadline: a handful of connections at most.
    assert attempts == 0 or attempts <= 3, f"{attempts} connections for one refusal"
    assert took < 4.0 + 3.0


def test_missing_tls_files_are_named(sandbox: dict[str, str],
                                     sandbox_environ: dict[str, str], tmp_path: Path) -> None:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    missing = tmp_path / "no-such-key.pem"
    config = _module_config(sandbox, tmp_path, sandbox["P11GRID_GRID_ADDR"],
                            replace=(str(grid / "vm.key"), str(missing)))
    assert str(missing) in config.read_text()
    _login(sandbox_environ, config)
    log = (tmp_path / "module.log").read_text()
    assert "[grid] certificate/key" in log and str(missing) in log, log[-2000:]
    assert "no grid endpoint answered" not in log
