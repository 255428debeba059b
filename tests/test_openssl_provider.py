"""OpenSSL 3 through pkcs11-provider (packaged from Debian 13 on) with real peers: the
OpenSSL CLI signs with the grid's RSA and EC keys through libp11grid.so, `openssl s_server`
serves TLS 1.2 and 1.3 with them to a client that verifies the chain, and Python's own
`ssl` module authenticates the hypervisor at the OpenID provider with `tls_client_auth`,
its key staying in its SoftHSM2 token. On Debian 12 pkcs11-provider is not packaged: the
tests skip with one reason, and the engine path (test_peers.py) is what runs there; on
Debian 13 a missing provider is an installation fault and fails every test."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import selectors
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from idm.identity import identity_of
from p11grid import sandbox_grid, sandbox_identity, snippets

DEBIAN = snippets.debian_major()
PROVIDER = snippets.find_pkcs11_provider()
PACKAGED_HERE = DEBIAN is not None and DEBIAN >= snippets.PKCS11_PROVIDER_FIRST_DEBIAN
if PROVIDER is None and not PACKAGED_HERE:  # one skip for the whole module, said once
    pytest.skip(f"pkcs11-provider is not packaged on "
                f"{f'Debian {DEBIAN}' if DEBIAN is not None else 'this system'}; the engine "
                "path is tested in test_peers.py", allow_module_level=True)

TIMEOUT = 90  # seconds for one OpenSSL or Python child: the first key reaches the grid
AUDIENCE = f"spiffe://{sandbox_grid.TRUST_DOMAIN}/sp/{sandbox_identity.SP_NAME}"
HANG_HINT = ("no answer: a call into libp11grid.so from inside pkcs11-provider's own start "
             "(its C_GenerateRandom probe) must not wait on itself (docs/openssl-provider.md)")


@pytest.fixture(scope="module")
def provider() -> Path:
    if PROVIDER is None:
        pytest.fail(f"{snippets.pkcs11_provider_missing_reason(DEBIAN)}: Debian {DEBIAN} "
                    "packages it and `make install` installs it there", pytrace=False)
    return PROVIDER


@pytest.fixture(scope="module")
def pin_file(sandbox: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("provider-pin") / "vm-se.pin"
    path.touch(mode=0o600)
    path.write_text(sandbox["P11GRID_PIN"] + "\n")
    return path


@pytest.fixture(scope="module")
def provider_conf(provider: Path, sandbox: dict[str, str], pin_file: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OPENSSL_CONF for pkcs11-provider on our module, the PIN in a file of its own."""
    path = tmp_path_factory.mktemp("provider-conf") / "openssl-provider.cnf"
    path.write_text(snippets.openssl_provider_conf(
        provider, Path(sandbox["P11GRID_MODULE"]), None, pin_file, "test: pkcs11-provider"))
    return path


def provider_environ(sandbox_environ: dict[str, str], conf: Path) -> dict[str, str]:
    return {**sandbox_environ, "OPENSSL_CONF": str(conf)}


def plain_environ() -> dict[str, str]:
    """For OpenSSL playing the remote peer: no provider, no engine, no module."""
    return {k: v for k, v in os.environ.items()
            if k not in ("OPENSSL_CONF", "P11GRID_CONF", "PKCS11_PROVIDER_MODULE")}


def run(command: list[str], environ: dict[str, str], what: str,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(command, env=environ, capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass  # failed below, outside the handler: one message, no chained traceback
    pytest.fail(f"{what}: {HANG_HINT} (within {timeout:.0f} s)", pytrace=False)


def audit_records(sandbox: dict[str, str], op: str) -> list[dict[str, str]]:
    log = Path(sandbox["P11GRID_SANDBOX"]) / "grid" / "audit.log"
    records = [json.loads(line.split(" ", 2)[2]) for line in log.read_text().splitlines()
               if line.strip()]
    return [r for r in records if r.get("op") == op]


def public_key_pem(sandbox: dict[str, str], label: str, tmp_path: Path) -> Path:
    certificate = Path(sandbox["P11GRID_SANDBOX"]) / f"{label}.pem"
    result = run(["openssl", "x509", "-in", str(certificate), "-pubkey", "-noout"],
                 plain_environ(), "openssl x509 -pubkey")
    assert result.returncode == 0, result.stderr
    path = tmp_path / f"{label}.pub.pem"
    path.write_bytes(result.stdout)
    return path


SIGNINGS = {  # id: (key, openssl dgst options for the signature, and to verify it)
    "rsa-pkcs1": ("vm-rsa", []),
    "rsa-pss": ("vm-rsa", ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]),
    "ec": ("vm-ec", []),
}


def key_uri(sandbox: dict[str, str], label: str) -> str:
    return sandbox["P11GRID_RSA_URI" if label == "vm-rsa" else "P11GRID_EC_URI"]


@pytest.mark.parametrize("signing", list(SIGNINGS))
def test_openssl_signs_through_the_provider(signing: str, provider_conf: Path,
                                            sandbox: dict[str, str],
                                            sandbox_environ: dict[str, str],
                                            tmp_path: Path) -> None:
    """`openssl dgst -sign pkcs11:...` with OPENSSL_CONF loading pkcs11-provider on our
    module; plain OpenSSL verifies with the certificate's public key, and the grid's
    audit log shows the signature was made there."""
    label, options = SIGNINGS[signing]
    data = tmp_path / "data"
    data.write_bytes(f"OpenSSL 3 signs through pkcs11-provider ({signing})".encode())
    before = len(audit_records(sandbox, "sign"))
    signed = run(["openssl", "dgst", "-sha256", "-sign", key_uri(sandbox, label), *options,
                  "-out", str(tmp_path / "signature"), str(data)],
                 provider_environ(sandbox_environ, provider_conf), f"openssl dgst -sign {label}")
    assert signed.returncode == 0, signed.stderr.decode(errors="replace")
    verified = run(["openssl", "dgst", "-sha256", "-verify",
                    str(public_key_pem(sandbox, label, tmp_path)), *options, "-signature",
                    str(tmp_path / "signature"), str(data)], plain_environ(), "openssl verify")
    assert verified.returncode == 0 and b"Verified OK" in verified.stdout, verified.stderr
    made = audit_records(sandbox, "sign")[before:]
    assert any(r.get("key") == label and r.get("result") == "ok" for r in made), made


def test_openssl_command_line_provider_options(sandbox: dict[str, str],
                                               sandbox_environ: dict[str, str],
                                               provider: Path, pin_file: Path,
                                               tmp_path: Path) -> None:
    """No provider section: `-provider pkcs11 -provider default`, PKCS11_PROVIDER_MODULE
    naming our module and the PIN file in the URI (pin-source); `pkeyutl` signs a digest.
    The config still says `default_properties = ?provider=default`: `-propquery` covers
    the command's own fetches only, and without the default the hashing the module does
    inside the process goes to the token, whose digest sessions ask for a PIN."""
    digest = hashlib.sha256(b"pkcs11-provider from the command line").digest()
    (tmp_path / "digest").write_bytes(digest)
    properties = tmp_path / "openssl-properties.cnf"
    properties.write_text("openssl_conf = openssl_init\n[openssl_init]\n"
                          "alg_section = algorithm_section\n[algorithm_section]\n"
                          "default_properties = ?provider=default\n")
    environ = {**plain_environ(), "P11GRID_CONF": sandbox["P11GRID_CONF"],
               "OPENSSL_CONF": str(properties),
               "PKCS11_PROVIDER_MODULE": sandbox["P11GRID_MODULE"]}
    uri = f"{sandbox['P11GRID_EC_URI']}?pin-source=file:{pin_file}"
    signed = run(["openssl", "pkeyutl", "-provider", "pkcs11", "-provider", "default",
                  "-sign", "-inkey", uri, "-in", str(tmp_path / "digest"), "-out",
                  str(tmp_path / "signature")], environ, "openssl pkeyutl -provider pkcs11")
    assert signed.returncode == 0, signed.stderr.decode(errors="replace")
    verified = run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey",
                    str(public_key_pem(sandbox, "vm-ec", tmp_path)), "-in",
                    str(tmp_path / "digest"), "-sigfile", str(tmp_path / "signature")],
                   plain_environ(), "openssl pkeyutl -verify")
    assert verified.returncode == 0 and b"Signature Verified Successfully" in verified.stdout, \
        verified.stdout + verified.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def s_server(sandbox: dict[str, str], environ: dict[str, str], label: str,
             version: str) -> Iterator[int]:
    """`openssl s_server` holding the grid key through the provider; yields its port once
    it accepts (the key is loaded, and so reached in the grid, before that)."""
    port = _free_port()
    certificate = Path(sandbox["P11GRID_SANDBOX"]) / f"{label}.pem"
    process = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(certificate),
         "-key", key_uri(sandbox, label), f"-tls{version.replace('.', '_')}", "-www",
         "-naccept", "1"],
        env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    assert process.stdout is not None
    output = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + TIMEOUT
            while b"ACCEPT" not in output:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"openssl s_server with {label}: {HANG_HINT}", pytrace=False)
                if selector.select(timeout=left):
                    chunk = os.read(process.stdout.fileno(), 4096)
                    if not chunk:
                        process.wait(timeout=10)
                        pytest.fail(f"openssl s_server with {label} exited "
                                    f"{process.returncode}: {output.decode(errors='replace')}",
                                    pytrace=False)
                    output += chunk
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()


@pytest.mark.parametrize(("label", "version"), [
    ("vm-rsa", "1.2"), ("vm-rsa", "1.3"), ("vm-ec", "1.2"), ("vm-ec", "1.3")])
def test_s_server_serves_tls_with_the_grid_key(label: str, version: str, provider_conf: Path,
                                               sandbox: dict[str, str],
                                               sandbox_environ: dict[str, str]) -> None:
    """A real handshake on 127.0.0.1: the server's key is in the grid (TLS 1.3 with RSA
    signs RSA-PSS), the client verifies the chain to the sandbox CA and the name."""
    before = len(audit_records(sandbox, "sign"))
    context = ssl.create_default_context(cafile=sandbox["P11GRID_CA"])
    tls = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    context.minimum_version = context.maximum_version = tls
    expected = x509.load_pem_x509_certificate(
        (Path(sandbox["P11GRID_SANDBOX"]) / f"{label}.pem").read_bytes())
    with s_server(sandbox, provider_environ(sandbox_environ, provider_conf), label,
                  version) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as client:
        assert client.version() == f"TLSv{version}"
        served = client.getpeercert(binary_form=True)
        assert served == expected.public_bytes(serialization.Encoding.DER)
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200 ok"), answer[:200]
    made = audit_records(sandbox, "sign")[before:]
    assert any(r.get("key") == label and r.get("result") == "ok" for r in made), made


# Python's ssl module as the hypervisor's client at the OpenID provider: the standard
# library only (idm.idp_client imports nothing else), so that no other OpenSSL in the
# process (cryptography carries its own) reads the provider's config.
HV_CLIENT = r"""
import base64, json, os, sys
from pathlib import Path
from idm import idp_client

issuer, ca, certificate, key_file, client_id, vm_token, audience = sys.argv[1:8]
idp = idp_client.IdpConnection.discover(issuer, ca, timeout=30)
auth = idp_client.TlsClientAuth(Path(certificate), Path(key_file), client_id)
try:
    issued = idp_client.exchange_vm_token(idp, auth, Path(vm_token).read_text().strip(),
                                          audience)
except idp_client.IdpClientError as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
    os._exit(3)
claims = issued.access_token.split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
print(json.dumps({"claims": claims}), flush=True)
os._exit(0)  # the result is out; see hv_conf for SoftHSM2 at exit
"""


@pytest.fixture(scope="module")
def hv_key(sandbox: dict[str, str]) -> tuple[str, Path, Path]:
    """The HV key's URI path, the library of its token (SoftHSM2) and its PIN file."""
    path, _, query = sandbox["P11GRID_HV_KEY_URI"].partition("?")
    attributes = dict(urllib.parse.parse_qsl(query))
    return path, Path(attributes["module-path"]), Path(attributes["pin-source"])


@pytest.fixture(scope="module")
def hv_conf(provider: Path, hv_key: tuple[str, Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pkcs11-provider on the HV's token library. `no-deinit`: SoftHSM2 crashes at exit
    when the provider finalizes it after its own destructors ran."""
    _, library, pin_source = hv_key
    path = tmp_path_factory.mktemp("hv-provider") / "openssl-hv.cnf"
    path.write_text(snippets.openssl_provider_conf(provider, library, None, pin_source,
                                                   "test: the HV key through pkcs11-provider",
                                                   quirks=("no-deinit",)))
    return path


@pytest.fixture(scope="module")
def hv_key_pem(hv_key: tuple[str, Path, Path], sandbox: dict[str, str],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PEM naming the HV key in its token, from `p11grid config provider-key`."""
    path = tmp_path_factory.mktemp("hv-key") / "hv-key.pem"
    made = run([sys.executable, "-m", "p11grid", "config", "provider-key", "--key-uri",
                sandbox["P11GRID_HV_KEY_URI"], "--install", str(path)], plain_environ(),
               "p11grid config provider-key")
    assert made.returncode == 0, made.stderr
    text = path.read_text()
    assert text.startswith("-----BEGIN PKCS#11 PROVIDER URI-----\n"), text
    assert "PRIVATE KEY" not in text
    return path


def hv_client(sandbox: dict[str, str], conf: Path, key_file: Path,
              hv_certificate: Path) -> tuple[subprocess.CompletedProcess[bytes], str]:
    client_id = identity_of(x509.load_pem_x509_certificate(hv_certificate.read_bytes())).uri
    environ = {**plain_environ(), "OPENSSL_CONF": str(conf),
               "SOFTHSM2_CONF": sandbox["SOFTHSM2_CONF"]}
    result = run([sys.executable, "-c", HV_CLIENT, sandbox["P11GRID_IDP_URL"],
                  sandbox["P11GRID_CA"], str(hv_certificate), str(key_file), client_id,
                  sandbox["P11GRID_VM_TOKEN"], AUDIENCE], environ,
                 "Python ssl with the HV key through pkcs11-provider")
    return result, client_id


def test_python_ssl_authenticates_the_hypervisor_with_tls_client_auth(
        sandbox: dict[str, str], hv_conf: Path, hv_key_pem: Path) -> None:
    """The real use: the hypervisor authenticates to the OpenID provider by mutual TLS
    (RFC 8705 tls_client_auth) from Python's ssl module, `load_cert_chain(hv.pem,
    hv-key.pem)` where hv-key.pem only names the key in its token; the provider sees the
    HV identity and exchanges the VM-Auth-Token for an access token."""
    hv_certificate = Path(sandbox["P11GRID_SANDBOX"]) / "identity" / "hv.pem"
    idp_log = Path(sandbox["P11GRID_SANDBOX"]) / "identity" / "idp.log"
    seen_before = idp_log.read_text().count("by tls_client_auth")
    result, client_id = hv_client(sandbox, hv_conf, hv_key_pem, hv_certificate)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    claims = json.loads(result.stdout)["claims"]
    assert claims["client_id"] == client_id and claims["act"] == {"sub": client_id}, claims
    assert claims["sub"] == sandbox_grid.VM_IDENTITY and claims["aud"] == AUDIENCE, claims
    lines = [line for line in idp_log.read_text().splitlines() if "by tls_client_auth" in line]
    assert len(lines) > seen_before, "the provider logged no tls_client_auth request"
    assert f"({client_id} by tls_client_auth): issued access token" in lines[-1], lines[-1]


def test_python_ssl_cannot_read_the_key_file_without_the_provider(
        sandbox: dict[str, str], provider: Path, hv_key_pem: Path, tmp_path: Path) -> None:
    """The control: the same client with OpenSSL's defaults only cannot load hv-key.pem;
    it is pkcs11-provider that turns it into the key."""
    plain = tmp_path / "openssl-plain.cnf"
    plain.write_text("# OpenSSL's defaults, no provider section\n")
    result, _ = hv_client(sandbox, plain, hv_key_pem,
                          Path(sandbox["P11GRID_SANDBOX"]) / "identity" / "hv.pem")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot set up TLS" in json.loads(result.stdout)["error"], result.stdout


def test_tampered_vm_token_fails_the_provider_path_with_an_error(
        provider_conf: Path, sandbox: dict[str, str], sandbox_environ: dict[str, str],
        tmp_path: Path) -> None:
    """A tampered VM-Auth-Token: the identity gate refuses the session, and openssl,
    through pkcs11-provider, ends with an error (not a hang, not a signature)."""
    token_file = Path(sandbox["P11GRID_VM_TOKEN"])
    module_log = Path(sandbox["P11GRID_SANDBOX"]) / "p11grid.log"
    good = token_file.read_text()
    head, body, signature = good.strip().split(".")
    tampered = f"{head}.{body[:-2]}{'AA' if body[-2:] != 'AA' else 'BB'}.{signature}"
    data = tmp_path / "data"
    data.write_bytes(b"must not be signed")
    logged_before = module_log.read_text(errors="replace").count("refused by the module")
    try:
        token_file.write_text(tampered + "\n")
        refused = run(["openssl", "dgst", "-sha256", "-sign", sandbox["P11GRID_EC_URI"],
                       "-out", str(tmp_path / "signature"), str(data)],
                      provider_environ(sandbox_environ, provider_conf),
                      "openssl dgst -sign with a tampered VM token")
    finally:
        token_file.write_text(good)
    assert refused.returncode != 0, "openssl signed with a tampered VM-Auth-Token"
    signature_file = tmp_path / "signature"
    assert not signature_file.exists() or signature_file.stat().st_size == 0
    log = module_log.read_text(errors="replace")
    assert log.count("refused by the module") > logged_before
    assert "refused by the module: signature:" in log


def test_provider_key_pem_is_what_pkcs11_provider_decodes(provider: Path,
                                                          hv_key_pem: Path) -> None:
    """The layout pkcs11-provider's decoder reads (src/pk11_uri.h): SEQUENCE {
    VisibleString "PKCS#11 Provider URI v1.0", UTF8String URI }, checked by OpenSSL."""
    parsed = run(["openssl", "asn1parse", "-in", str(hv_key_pem)], plain_environ(),
                 "openssl asn1parse")
    assert parsed.returncode == 0, parsed.stderr
    text = parsed.stdout.decode()
    assert "VISIBLESTRING     :PKCS#11 Provider URI v1.0" in text, text
    assert "UTF8STRING        :pkcs11:token=hv-se;object=hv-key;type=private" in text, text
    der = base64.b64decode("".join(hv_key_pem.read_text().splitlines()[1:-1]))
    assert b"pin-source" not in der and b"module-path" not in der, der
