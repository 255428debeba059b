"""RACS test helpers: a throwaway PKI, a RACS server in a thread, scripted conversations."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from grid_backend.racs.client import RacsClient, RacsUnreachable
from grid_backend.racs.server import RacsServer, RacsServerConfig


@dataclass(frozen=True, slots=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    server: Identity
    clients: dict[str, Identity]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_pki(directory: Path, client_cns: list[str]) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, one client certificate per CN."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RACS test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                            False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              False)
               .sign(ca_key, hashes.SHA256()))
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
        cert = builder.sign(ca_key, hashes.SHA256())
        identity = Identity(directory / f"{cn}.pem", directory / f"{cn}.key")
        identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(identity.key, key)
        return identity

    server = issue("racs-server", ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    clients = {cn: issue(cn, ExtendedKeyUsageOID.CLIENT_AUTH, []) for cn in client_cns}
    return Pki(ca_path, server, clients)


class ServerThread:
    """A RacsServer running on its own event loop in a thread, on 127.0.0.1:<free port>."""

    def __init__(self, config: RacsServerConfig):
        self.server = RacsServer(config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="racs-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("RACS server did not start")
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def alive(self) -> bool:
        return self._thread.is_alive()


def client_for(server: ServerThread, pki: Pki, cn: str, timeout: float = 5.0) -> RacsClient:
    identity = pki.clients[cn]
    client = RacsClient("127.0.0.1", server.port, identity.cert, identity.key, pki.ca,
                        timeout=timeout)
    client.connect()
    return client


def converse(client: RacsClient, script: str, timeout: float = 5.0) -> str:
    """Send the script's lines at once; return every reply line (LF-ended) that arrives
    until each BEGIN has had its reply or the server closes the session."""
    lines = [line for line in script.strip("\n").split("\n")]
    expected = sum(1 for line in lines if line.split()[:1] == ["BEGIN"])
    client.send_lines(lines)
    deadline = time.monotonic() + timeout
    received: list[str] = []
    replies = 0
    try:
        while replies < expected:
            line = client.read_line(deadline)
            received.append(line)
            replies += line == "END"
    except RacsUnreachable:
        received.append("<closed>")
    return "".join(f"{line}\n" for line in received)


def session_closed(client: RacsClient, timeout: float = 3.0) -> bool:
    """Did the server end this session (EOF within timeout)?"""
    try:
        client.read_line(time.monotonic() + timeout)
    except RacsUnreachable as exc:
        return "closed" in str(exc)
    return False


def tls_refused(port: int, ca: Path, identity: Identity | None) -> bool:
    """Try a TLS session and one request; True if the server would not have it."""
    context = ssl.create_default_context(cafile=str(ca))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"BEGIN\nLIST\nEND\n")
            return tls.recv(100) == b""  # TLS 1.3: the refusal arrives after the handshake
    except (ssl.SSLError, ConnectionError, OSError):
        return True
