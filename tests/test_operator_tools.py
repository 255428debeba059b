"""Operator tools against the session's sandbox: `p11grid config openssl|nginx|p11kit|
systemd-*` (what they print works in OpenSSL's engine, nginx, p11-kit, GnuTLS's p11tool and
systemd-analyze) and `p11grid status` (health, and each failure named)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

P11GRID = [sys.executable, "-m", "p11grid"]


def _config(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*P11GRID, "config", *arguments], env=env, capture_output=True,
                          text=True, timeout=60)


def _verify_with_vm_ec(sandbox: dict[str, str], signature: bytes, digest: bytes) -> None:
    """The signature verifies with the public key of the sandbox's vm-ec certificate."""
    certificate = x509.load_pem_x509_certificate(
        (Path(sandbox["P11GRID_SANDBOX"]) / "vm-ec.pem").read_bytes())
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_openssl_snippet_signs_through_the_engine(sandbox: dict[str, str],
                                                  sandbox_environ: dict[str, str],
                                                  tmp_path: Path) -> None:
    printed = _config("openssl", "--pin", sandbox["P11GRID_PIN"], env=sandbox_environ)
    assert printed.returncode == 0, printed.stderr
    assert f'MODULE_PATH = "{sandbox["P11GRID_MODULE"]}"' in printed.stdout
    (tmp_path / "openssl.cnf").write_text(printed.stdout)
    digest = hashlib.sha256(b"p11grid config openssl").digest()
    (tmp_path / "digest").write_bytes(digest)
    signed = subprocess.run(
        ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey",
         sandbox["P11GRID_EC_URI"], "-sign", "-in", str(tmp_path / "digest")],
        env={**sandbox_environ, "OPENSSL_CONF": str(tmp_path / "openssl.cnf")},
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert signed.returncode == 0, signed.stderr
    _verify_with_vm_ec(sandbox, signed.stdout, digest)


def test_openssl_provider_snippet_signs_through_pkcs11_provider(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """`p11grid config openssl --provider`: where pkcs11-provider is installed (Debian 13),
    OpenSSL signs with the printed config; where it is not packaged (Debian 12) the command
    says so and exits 1; on Debian 13 a missing provider is an installation fault."""
    from p11grid import snippets

    major = snippets.debian_major()
    if snippets.find_pkcs11_provider() is None:
        refused = _config("openssl", "--provider", env=dict(os.environ))
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert snippets.pkcs11_provider_missing_reason(major) in refused.stderr
        if major is not None and major >= snippets.PKCS11_PROVIDER_FIRST_DEBIAN:
            pytest.fail(refused.stderr.strip(), pytrace=False)
        return
    sandbox: dict[str, str] = request.getfixturevalue("sandbox")
    sandbox_environ: dict[str, str] = request.getfixturevalue("sandbox_environ")
    pin_file = tmp_path / "vm-se.pin"
    pin_file.touch(mode=0o600)
    pin_file.write_text(sandbox["P11GRID_PIN"] + "\n")
    printed = _config("openssl", "--provider", "--pin-file", str(pin_file),
                      env=sandbox_environ)
    assert printed.returncode == 0, printed.stderr
    assert f'pkcs11-module-path = "{sandbox["P11GRID_MODULE"]}"' in printed.stdout
    assert f'pkcs11-module-token-pin = "file:{pin_file}"' in printed.stdout
    assert sandbox["P11GRID_PIN"] not in printed.stdout
    (tmp_path / "openssl.cnf").write_text(printed.stdout)
    digest = hashlib.sha256(b"p11grid config openssl --provider").digest()
    (tmp_path / "digest").write_bytes(digest)
    signed = subprocess.run(
        ["openssl", "pkeyutl", "-sign", "-inkey", sandbox["P11GRID_EC_URI"], "-in",
         str(tmp_path / "digest")],
        env={**sandbox_environ, "OPENSSL_CONF": str(tmp_path / "openssl.cnf")},
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert signed.returncode == 0, signed.stderr
    _verify_with_vm_ec(sandbox, signed.stdout, digest)


def test_provider_key_snippet_and_its_refusals(tmp_path: Path) -> None:
    """`p11grid config provider-key`: the PEM pkcs11-provider decodes, holding the key's URI
    without the PIN file or the module (the provider's config names those), read back by
    OpenSSL; a URI holding a PIN, naming no key or not a private key is refused."""
    env = dict(os.environ)
    written = _config("provider-key", "--key-uri",
                      "pkcs11:token=hv-se;object=hv-key?module-path=/usr/lib/softhsm/"
                      "libsofthsm2.so&pin-source=/etc/hv.pin", "--install",
                      str(tmp_path / "keys"), env=env)
    assert written.returncode == 0, written.stderr
    pem = tmp_path / "keys" / "p11grid-key.pem"
    assert pem.read_text().startswith("-----BEGIN PKCS#11 PROVIDER URI-----\n")
    parsed = subprocess.run(["openssl", "asn1parse", "-in", str(pem)], capture_output=True,
                            text=True, timeout=60, env=env)
    assert parsed.returncode == 0, parsed.stderr
    assert ":PKCS#11 Provider URI v1.0" in parsed.stdout
    assert ":pkcs11:token=hv-se;object=hv-key;type=private" in parsed.stdout, parsed.stdout
    for uri, reason in (("pkcs11:token=t;object=k?pin-value=1234", "holds a PIN"),
                        ("pkcs11:token=t;object=k;type=cert", "type other than"),
                        ("pkcs11:token=t", "no object= or id="),
                        ("/etc/hv.key", "not a PKCS#11 URI")):
        refused = _config("provider-key", "--key-uri", uri, env=env)
        assert refused.returncode == 2 and reason in refused.stderr, (uri, refused.stderr)
        assert "1234" not in refused.stderr + refused.stdout
    mixed = _config("nginx", "--provider", env=env)
    assert mixed.returncode == 2 and "are for `p11grid config openssl`" in mixed.stderr


def test_nginx_snippet_passes_nginx_t(sandbox: dict[str, str], sandbox_environ: dict[str, str],
                                      tmp_path: Path) -> None:
    """`nginx -t` loads the key through the engine: the snippet is complete."""
    printed = _config("nginx", "--key-uri", sandbox["P11GRID_EC_URI"], "--certificate",
                      str(Path(sandbox["P11GRID_SANDBOX"]) / "vm-ec.pem"), "--listen",
                      "127.0.0.1:1", env=sandbox_environ)
    assert printed.returncode == 0, printed.stderr
    main, _, server = printed.stdout.partition("# inside http { }:")
    assert "env P11GRID_CONF;" in main
    (tmp_path / "logs").mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
                      f"{main}\nevents {{}}\nhttp {{\naccess_log off;\n{server}}}\n")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(config)],
                             env=sandbox_environ, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


def test_p11kit_and_gnutls_find_the_module(p11kit_registration: Path,
                                           sandbox: dict[str, str],
                                           sandbox_environ: dict[str, str]) -> None:
    assert f"module: {sandbox['P11GRID_MODULE']}" in p11kit_registration.read_text()
    listed = subprocess.run(["p11-kit", "list-modules"], env=sandbox_environ,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    # "p11grid: PATH" (p11-kit 0.24) or "module: p11grid" then "path: PATH" (0.25)
    assert sandbox["P11GRID_MODULE"] in listed.stdout, listed.stdout
    ours = listed.stdout[listed.stdout.index(sandbox["P11GRID_MODULE"]):]
    assert "token: vm-se" in ours and "token: piv-se" in ours
    tokens = subprocess.run(["p11tool", "--list-tokens"], env=sandbox_environ,
                            capture_output=True, text=True, timeout=120).stdout
    assert "manufacturer=p11grid;serial=" in tokens and "token=vm-se" in tokens


def test_gnutls_signs_with_the_module(sandbox: dict[str, str],
                                      sandbox_environ: dict[str, str]) -> None:
    """GnuTLS's p11tool loading our module itself (through p11-kit it would also load the
    system's SoftHSM2 module, the library that holds the sandbox's hypervisor key: see
    docs/return-values.md on a library loaded twice in one process)."""
    tested = subprocess.run(
        ["p11tool", "--provider", sandbox["P11GRID_MODULE"], "--login", "--test-sign",
         sandbox["P11GRID_EC_URI"]], env={**sandbox_environ,
                                          "GNUTLS_PIN": sandbox["P11GRID_PIN"]},
        capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "Verifying against public key in the token... ok" in tested.stdout + tested.stderr


def test_install_into_a_missing_directory_and_clear_errors(tmp_path: Path) -> None:
    env = dict(os.environ)
    made = _config("p11kit", "--install", str(tmp_path / "new" / "modules"), env=env)
    assert made.returncode == 0 and (tmp_path / "new" / "modules" / "p11grid.module").exists()
    refused = _config("p11kit", "--install", "/proc/p11grid.module", env=env)
    assert refused.returncode == 1 and "cannot write /proc/p11grid.module" in refused.stderr
    missing = _config("nginx", env=env)
    assert missing.returncode == 2 and "--key-uri and --certificate" in missing.stderr


@pytest.mark.parametrize("service", ["grid", "idp"])
def test_systemd_units_verify(service: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    written = _config(f"systemd-{service}", "--service-config", f"/etc/p11grid/{service}.toml",
                      "--install", str(tmp_path), env=env)
    assert written.returncode == 0, written.stderr
    unit = tmp_path / f"p11grid-{service}.service"
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary, *arguments = exec_start.split("=", 1)[1].split()
    assert Path(binary).is_file() and os.access(binary, os.X_OK), binary
    assert arguments == [service, "serve", "--config", f"/etc/p11grid/{service}.toml"]
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (Debian package systemd)"
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                              timeout=60)
    assert verified.returncode == 0, verified.stderr
    helped = subprocess.run([binary, *arguments[:2], "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--config" in helped.stdout


def test_status_reports_health_and_each_failure(sandbox: dict[str, str],
                                                sandbox_environ: dict[str, str],
                                                tmp_path: Path) -> None:
    healthy = subprocess.run([*P11GRID, "status"], env=sandbox_environ, capture_output=True,
                             text=True, timeout=120)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    for line in ("ok    grid 127.0.0.1:", "ok    slot vm-se (element vm-se): bound to us",
                 "ok    OpenID provider https://127.0.0.1:", "ok    VM-Auth-Token: valid for "
                 "spiffe://p11grid.sandbox/vm/vm-1", "status: healthy"):
        assert line in healthy.stdout, healthy.stdout
    # A dead endpoint and a foreign token file: each named, status not healthy.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    token = tmp_path / "tampered.jwt"
    head, body, signature = Path(sandbox["P11GRID_VM_TOKEN"]).read_text().strip().split(".")
    token.write_text(f"{head}.{body[:-2]}{'AA' if body[-2:] != 'AA' else 'BB'}.{signature}")
    config = tmp_path / "p11grid.toml"
    config.write_text(Path(sandbox["P11GRID_CONF"]).read_text()
                      .replace(sandbox["P11GRID_GRID_ADDR"], dead)
                      .replace(sandbox["P11GRID_VM_TOKEN"], str(token)))
    unhealthy = subprocess.run([*P11GRID, "status"], capture_output=True, text=True,
                               env={**sandbox_environ, "P11GRID_CONF": str(config)},
                               timeout=120)
    assert unhealthy.returncode == 1
    assert f"FAIL  grid {dead}: GridUnreachable" in unhealthy.stdout, unhealthy.stdout
    assert "FAIL  VM-Auth-Token" in unhealthy.stdout and "signature" in unhealthy.stdout
    assert "status: NOT healthy" in unhealthy.stdout


def test_an_installed_file_holding_the_pin_is_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "p11grid-openssl.cnf"
    target.write_text("an older, world-readable file\n")
    target.chmod(0o644)
    env = dict(os.environ)
    written = _config("openssl", "--pin", "123456", "--install", str(target), env=env)
    assert written.returncode == 0, written.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    assert "123456" in target.read_text() and "older" not in target.read_text()
    without_pin = _config("openssl", "--install", str(tmp_path / "plain.cnf"), env=env)
    assert without_pin.returncode == 0, without_pin.stderr
    assert "123456" not in (tmp_path / "plain.cnf").read_text()
