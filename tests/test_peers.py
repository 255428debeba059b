"""Real peers load libp11grid.so: pkcs11-tool, the OpenSSL CLI through the libp11 engine,
and nginx with two workers serving TLS 1.2 and 1.3 with keys held by the module."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from p11grid import nginx


def pkcs11_tool(sandbox: dict[str, str], environ: dict[str, str], *args: str,
                login: bool = True) -> str:
    command = ["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"]]
    if login:
        command += ["--login", "--pin", sandbox["P11GRID_PIN"]]
    result = subprocess.run([*command, *args], env=environ, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_pkcs11_tool_test_reports_no_errors(sandbox: dict[str, str],
                                            sandbox_environ: dict[str, str]) -> None:
    # pkcs11-tool exits 0 even when it counts errors: judge its words.
    output = pkcs11_tool(sandbox, sandbox_environ, "--allow-sw", "--test")
    assert "No errors" in output, output
    assert re.search(r"RSA-PKCS-OAEP.*\n\s*OK", output) or "OAEP" in output


def test_pkcs11_tool_test_fork(sandbox: dict[str, str],
                               sandbox_environ: dict[str, str]) -> None:
    output = pkcs11_tool(sandbox, sandbox_environ, "--test-fork")
    assert "Calling C_Initialize in forked child" in output
    assert "error" not in output.lower(), output


def test_pkcs11_tool_concurrent_initialize(sandbox: dict[str, str],
                                           sandbox_environ: dict[str, str]) -> None:
    output = pkcs11_tool(sandbox, sandbox_environ, "--test-threads", "IN:GI:SL:T0",
                         "--test-threads", "IL:GI:SL:T0", login=False)
    # OpenSC 0.23 (Debian 12) ends with "all threads have ended with CKR_OK"; 0.26 (Debian
    # 13) prints no summary. Both print each thread's result: "rv = 0" or "rv:CKR_OK".
    results = re.findall(r"^Test thread (\d+) returning rv(?: = |:)(\S+)$", output, re.MULTILINE)
    assert sorted(thread for thread, _ in results) == ["0", "1"], output
    assert all(rv in ("0", "CKR_OK") for _, rv in results), output


def test_pkcs11_tool_lists_and_signs(sandbox: dict[str, str], sandbox_environ: dict[str, str],
                                     tmp_path: Path) -> None:
    listing = pkcs11_tool(sandbox, sandbox_environ, "--list-objects")
    for label in ("vm-rsa", "vm-ec"):
        assert f"label:      {label}" in listing
    data = tmp_path / "data"
    data.write_bytes(b"pkcs11-tool signs through p11grid")
    signature = tmp_path / "sig"
    pkcs11_tool(sandbox, sandbox_environ, "--sign", "--mechanism", "SHA256-RSA-PKCS",
                "--id", "01", "--input-file", str(data), "--output-file",
                str(signature))
    certificate = x509.load_pem_x509_certificate(
        (Path(sandbox["P11GRID_SANDBOX"]) / "vm-rsa.pem").read_bytes())
    certificate.public_key().verify(signature.read_bytes(), data.read_bytes(),
                                    padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("label", ["vm-rsa", "vm-ec"])
def test_openssl_engine_signs(label: str, sandbox: dict[str, str],
                              sandbox_environ: dict[str, str], tmp_path: Path) -> None:
    digest = hashlib.sha256(b"openssl through the engine").digest()
    (tmp_path / "digest").write_bytes(digest)
    uri = sandbox["P11GRID_RSA_URI" if label == "vm-rsa" else "P11GRID_EC_URI"]
    result = subprocess.run(
        ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri,
         "-sign", "-in", str(tmp_path / "digest"), "-out", str(tmp_path / "signature"),
         *(["-pkeyopt", "digest:sha256"] if label == "vm-rsa" else [])],
        env=sandbox_environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    signature = (tmp_path / "signature").read_bytes()
    public = x509.load_pem_x509_certificate(
        (Path(sandbox["P11GRID_SANDBOX"]) / f"{label}.pem").read_bytes()).public_key()
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if label == "vm-rsa":
        public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.fixture(scope="module")
def nginx_server(sandbox: dict[str, str]) -> Iterator[nginx.NginxServer]:
    server = nginx.start(Path(sandbox["P11GRID_SANDBOX"]), workers=2,
                         keys=("vm-rsa", "vm-ec", "piv-rsa"))
    try:
        yield server
    finally:
        nginx.stop(server)


TLS = {"1.2": ["--tlsv1.2", "--tls-max", "1.2"], "1.3": ["--tlsv1.3"]}
ANSWER = re.compile(r"key=(\S+) protocol=(\S+) cipher=(\S+) pid=(\d+)")


def fetch(server: nginx.NginxServer, label: str, version: str, ca: str) -> tuple[str, ...]:
    port = server.ports[label]
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "P11GRID_CONF")}
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", "--cacert", ca,
         "--resolve", f"localhost:{port}:127.0.0.1", *TLS[version], server.url(label)],
        env=environ, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        # What nginx and the module said: a failed handshake's cause is in their logs.
        module_log = server.directory / "p11grid.log"
        problems = [line for line in module_log.read_text(errors="replace").splitlines()
                    if " INFO " not in line or "CKR_" in line][-12:]
        raise AssertionError(f"{result.stderr}\nnginx:\n{nginx.tail(server.error_log)}\n"
                             "module log (not INFO, or a CK_RV):\n" + "\n".join(problems))
    answer = ANSWER.search(result.stdout)
    assert answer, result.stdout
    return answer.groups()


@pytest.mark.parametrize(("label", "version"), [
    ("vm-rsa", "1.2"), ("vm-rsa", "1.3"), ("vm-ec", "1.2"), ("vm-ec", "1.3"),
    # The PIV card does raw RSA only: PKCS#1 v1.5 (TLS 1.2) and PSS (TLS 1.3) are
    # composed in the module.
    ("piv-rsa", "1.2"), ("piv-rsa", "1.3")])
def test_nginx_serves_from_both_workers(nginx_server: nginx.NginxServer, label: str,
                                        version: str, sandbox: dict[str, str]) -> None:
    """TLS 1.3 with an RSA key signs with RSA-PSS (TLS 1.3 forbids PKCS#1 v1.5 there)."""
    requests = 24
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: fetch(nginx_server, label, version,
                                                sandbox["P11GRID_CA"]), range(requests)))
    assert all(a[0] == label and a[1] == f"TLSv{version}" for a in answers), answers
    workers = {a[3] for a in answers}
    assert len(workers) == 2, f"only workers {workers} served"
