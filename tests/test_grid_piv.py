"""The sandbox's virtual PIV card (`piv-se`) through our module and the grid, and through
the grid's RACS server by hand.

The card runs with its own pcscd in a network namespace of its own; the grid service
drives it over PC/SC and composes what the card lacks (it only does raw RSA): PKCS#1 v1.5
and PSS signatures, PKCS#1 v1.5 and OAEP decryption. python-pkcs11 runs in a subprocess:
the module instance inside this pytest process is shared with other tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

PIV_TOKEN = "piv-se"
PIV_KEY = "piv-rsa"
SELECT_PIV = "00A4040009A00000030800001000"

# Run with the sandbox's environment; reads the ciphertexts and writes the results as JSON.
PKCS11_SCRIPT = r"""
import json, os, sys
import pkcs11
from pkcs11 import Attribute, MGF, Mechanism, ObjectClass

request = json.load(sys.stdin)
lib = pkcs11.lib(os.environ["P11GRID_MODULE"])
token = lib.get_token(token_label=request["token"])
message = bytes.fromhex(request["message"])
with token.open(user_pin=os.environ["P11GRID_PIN"]) as session:
    key = session.get_key(ObjectClass.PRIVATE_KEY, label=request["label"])
    certificate = next(session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                            Attribute.LABEL: request["label"]}))
    oaep = (Mechanism.SHA256, MGF.SHA256, None)
    result = {
        "certificate": certificate[Attribute.VALUE].hex(),
        "pkcs1": key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS).hex(),
        "pss": key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                        mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32)).hex(),
        "pkcs1_plain": key.decrypt(bytes.fromhex(request["pkcs1_ciphertext"]),
                                   mechanism=Mechanism.RSA_PKCS).hex(),
        "oaep_plain": key.decrypt(bytes.fromhex(request["oaep_ciphertext"]),
                                  mechanism=Mechanism.RSA_PKCS_OAEP,
                                  mechanism_param=oaep).hex(),
    }
json.dump(result, sys.stdout)
"""


def _environ(sandbox_environ: dict[str, str], openssl: bool = False) -> dict[str, str]:
    if openssl:
        return sandbox_environ
    # s_client and friends need no engine: keep them from loading our module.
    return {k: v for k, v in sandbox_environ.items() if k != "OPENSSL_CONF"}


def _piv_certificate(sandbox: dict[str, str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (Path(sandbox["P11GRID_SANDBOX"]) / f"{PIV_KEY}.pem").read_bytes())


def _rsa_public(certificate: x509.Certificate) -> rsa.RSAPublicKey:
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    return public


def test_the_sandbox_card_is_certified_by_the_sandbox_ca(sandbox: dict[str, str]) -> None:
    certificate = _piv_certificate(sandbox)
    authority = x509.load_pem_x509_certificate(Path(sandbox["P11GRID_CA"]).read_bytes())
    certificate.verify_directly_issued_by(authority)
    assert _rsa_public(certificate).key_size == 2048
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert sandbox["P11GRID_PIV_URI"] == f"pkcs11:token={PIV_TOKEN};object={PIV_KEY};type=private"


def test_python_pkcs11_signs_and_decrypts_with_the_card(
        sandbox: dict[str, str], sandbox_environ: dict[str, str]) -> None:
    certificate = _piv_certificate(sandbox)
    public = _rsa_public(certificate)
    message = b"signed by a virtual PIV card through p11grid and the grid"
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=None)
    request = {
        "token": PIV_TOKEN, "label": PIV_KEY, "message": message.hex(),
        "pkcs1_ciphertext": public.encrypt(b"pkcs1 secret", padding.PKCS1v15()).hex(),
        "oaep_ciphertext": public.encrypt(b"oaep secret", oaep).hex(),
    }
    done = subprocess.run([sys.executable, "-c", PKCS11_SCRIPT], input=json.dumps(request),
                          env=sandbox_environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert bytes.fromhex(result["certificate"]) == certificate.public_bytes(
        serialization.Encoding.DER)
    public.verify(bytes.fromhex(result["pkcs1"]), message, padding.PKCS1v15(), hashes.SHA256())
    public.verify(bytes.fromhex(result["pss"]), message,
                  padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                  hashes.SHA256())
    assert bytes.fromhex(result["pkcs1_plain"]) == b"pkcs1 secret"
    assert bytes.fromhex(result["oaep_plain"]) == b"oaep secret"
    # The card only did raw RSA: the grid's audit log names the element and the mechanism.
    audit = (Path(sandbox["P11GRID_SANDBOX"]) / "grid" / "audit.log").read_text()
    lines = [json.loads(line.split(" ", 2)[2]) for line in audit.splitlines()
             if f'"{PIV_TOKEN}"' in line]
    signs = [e for e in lines if e.get("op") == "sign" and e.get("result") == "ok"]
    decrypts = [e for e in lines if e.get("op") == "decrypt" and e.get("result") == "ok"]
    assert signs and decrypts, audit[-2000:]
    assert {e["mechanism"] for e in signs + decrypts} == {"0x3"}  # CKM_RSA_X_509


def test_openssl_engine_signs_with_the_card(sandbox: dict[str, str],
                                            sandbox_environ: dict[str, str],
                                            tmp_path: Path) -> None:
    digest = hashlib.sha256(b"openssl through the engine and the PIV card").digest()
    (tmp_path / "digest").write_bytes(digest)
    done = subprocess.run(
        ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey",
         sandbox["P11GRID_PIV_URI"], "-sign", "-in", str(tmp_path / "digest"), "-out",
         str(tmp_path / "signature"), "-pkeyopt", "digest:sha256"],
        env=_environ(sandbox_environ, openssl=True), capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    _rsa_public(_piv_certificate(sandbox)).verify(
        (tmp_path / "signature").read_bytes(), digest, padding.PKCS1v15(),
        Prehashed(hashes.SHA256()))


def test_pkcs11_tool_lists_both_tokens_keys(sandbox: dict[str, str],
                                            sandbox_environ: dict[str, str]) -> None:
    slots = subprocess.run(["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"],
                            "--list-slots"], env=sandbox_environ, capture_output=True,
                           text=True, timeout=60)
    assert slots.returncode == 0, slots.stderr
    assert "token label        : vm-se" in slots.stdout
    assert f"token label        : {PIV_TOKEN}" in slots.stdout
    expected = {"vm-se": ("vm-rsa", "vm-ec"), PIV_TOKEN: (PIV_KEY,)}
    for token, labels in expected.items():
        listing = subprocess.run(
            ["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "--token-label", token,
             "--login", "--pin", sandbox["P11GRID_PIN"], "--list-objects"],
            env=sandbox_environ, capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        private = listing.stdout.split("Private Key Object")[1:]
        assert private, listing.stdout
        for label in labels:
            assert any(f"label:      {label}\n" in block for block in private), listing.stdout


class SClient:
    """`openssl s_client -quiet` as a person at a terminal uses it: lines in, lines out."""

    def __init__(self, sandbox: dict[str, str], environ: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["openssl", "s_client", "-quiet", "-connect", sandbox["P11GRID_RACS_ADDR"],
             "-cert", sandbox["P11GRID_RACS_CERT"], "-key", sandbox["P11GRID_RACS_KEY"],
             "-CAfile", sandbox["P11GRID_RACS_CA"], "-verify_return_error"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=environ)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\r\n"))
        self.lines.put(None)

    def request(self, *lines: str, timeout: float = 20.0) -> list[str]:
        """Send lines; return the reply, BEGIN to END."""
        assert self.process.stdin is not None
        self.process.stdin.write("".join(f"{line}\n" for line in lines))
        self.process.stdin.flush()
        reply: list[str] = []
        deadline = time.monotonic() + timeout
        while not reply or reply[-1] != "END":
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no complete RACS reply within {timeout:.0f} s: {reply}")
            if line is None:
                errors = self.process.stderr.read() if self.process.stderr else ""
                pytest.fail(f"s_client ended: {reply} {errors}")
            if line or reply:
                reply.append(line)
        return reply

    def close(self) -> None:
        # -quiet implies -ign_eof: s_client waits for the server, which keeps an idle
        # session for ten minutes; end it ourselves.
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_racs_by_hand_with_openssl_s_client(sandbox: dict[str, str],
                                            sandbox_environ: dict[str, str]) -> None:
    client = SClient(sandbox, _environ(sandbox_environ))
    try:
        # Only the last command's result is returned unless a line ends with APPEND.
        reply = client.request("BEGIN", "LIST APPEND", f"POWERON {PIV_TOKEN} APPEND",
                               f"APDU {PIV_TOKEN} {SELECT_PIV}", "END")
        assert reply[0] == "BEGIN" and reply[-1] == "END", reply
        assert reply[1] == f"+004 001 {PIV_TOKEN}", reply
        assert reply[2].startswith("+008 002 3B"), reply  # the card's ATR
        assert reply[3].startswith("+006 003 61") and reply[3].endswith("9000"), reply
        # The same session, once more: the element stays powered on and locked to it.
        again = client.request("BEGIN second", f"APDU {PIV_TOKEN} {SELECT_PIV}", "END")
        assert again[0] == "BEGIN second" and again[1].startswith("+006 001 61"), again
    finally:
        client.close()


def test_racs_refuses_the_vm_identity(sandbox: dict[str, str],
                                      sandbox_environ: dict[str, str]) -> None:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    as_vm = {**sandbox, "P11GRID_RACS_CERT": str(grid / "vm.pem"),
             "P11GRID_RACS_KEY": str(grid / "vm.key")}
    client = SClient(as_vm, _environ(sandbox_environ))
    try:
        assert client.request("BEGIN", "LIST", "END")[1].rstrip() == "+004 001"  # nothing
        refused = client.request("BEGIN", f"POWERON {PIV_TOKEN}", "END")
        assert refused[1].startswith("-6"), refused
    finally:
        client.close()


def test_the_card_still_signs_after_racs_sessions_reset_it(
        sandbox: dict[str, str], sandbox_environ: dict[str, str], tmp_path: Path) -> None:
    # A RACS session that powered the card on powers it off at its end (a card reset on
    # the shared reader): the grid's PIV driver selects and verifies again by itself.
    client = SClient(sandbox, _environ(sandbox_environ))
    try:
        client.request("BEGIN", f"POWERON {PIV_TOKEN}", "END")
    finally:
        client.close()
    time.sleep(0.5)  # the server notices the closed connection and powers the card off
    test_openssl_engine_signs_with_the_card(sandbox, sandbox_environ, tmp_path)
    assert os.path.exists(sandbox["PCSCLITE_CSOCK_NAME"])


def test_piv_settings_from_the_registry(sandbox: dict[str, str]) -> None:
    from grid_backend.elements import open_element
    from grid_backend.secure_element import ElementFailure
    from grid_backend.transports.pcsc import PcscTransport
    from grid_backend.transports.racs import RacsTransport

    card = open_element("piv", {"transport": "pcsc", "reader": "Virtual PCD",
                                "labels": {"9a": "piv-rsa", "9C": "signer"}})
    assert isinstance(card.transport, PcscTransport)  # type: ignore[attr-defined]
    assert card.labels == {0x9A: "piv-rsa", 0x9C: "signer"}  # type: ignore[attr-defined]
    remote = open_element("piv", {
        "transport": "racs", "server": "127.0.0.1:7777", "seid": "SE1",
        "certificate": sandbox["P11GRID_RACS_CERT"], "key": sandbox["P11GRID_RACS_KEY"],
        "ca": sandbox["P11GRID_RACS_CA"]})
    assert isinstance(remote.transport, RacsTransport)  # type: ignore[attr-defined]
    assert remote.transport.name == "racs://127.0.0.1:7777/SE1"  # type: ignore[attr-defined]
    # A card behind the grid's own RACS server, driven over RACS as a remote grid would.
    behind_racs = open_element("piv", {
        "transport": "racs", "server": sandbox["P11GRID_RACS_ADDR"], "seid": PIV_TOKEN,
        "certificate": sandbox["P11GRID_RACS_CERT"], "key": sandbox["P11GRID_RACS_KEY"],
        "ca": sandbox["P11GRID_RACS_CA"], "labels": {"9a": PIV_KEY}})
    try:
        labels = {o.attributes[0x3] for o in behind_racs.public_objects()}
        assert labels == {PIV_KEY.encode()}
    finally:
        behind_racs.close()
    for settings, complaint in (
            ({"transport": "pcsc"}, "reader is missing"),
            ({"transport": "usb", "reader": "x"}, "not pcsc or racs"),
            ({"reader": "x", "labels": {"9b": "no such slot"}}, "no key slot"),
            ({"reader": "x", "labels": {"zz": "x"}}, "not hex"),
            ({"transport": "racs", "server": "nowhere", "seid": "S", "certificate": "c",
              "key": "k", "ca": "a"}, "not host:port")):
        with pytest.raises(ElementFailure, match=complaint):
            open_element("piv", settings)
