"""The grid service as its callers and its operator see it: authentication by certificate,
authorization by the registry, the audit trail, and the administration CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from grid_backend.client import GridPool, GridSettings
from grid_backend.protocol import ElementRefused
from p11grid import ca

VENV_BIN = Path(sys.executable).parent


def _authority(sandbox: dict[str, str]) -> ca.SandboxCA:
    directory = Path(sandbox["P11GRID_SANDBOX"])
    key = serialization.load_pem_private_key((directory / "ca" / "ca.key").read_bytes(), None)
    certificate = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    return ca.SandboxCA(key=key, certificate=certificate)  # type: ignore[arg-type]


def _pool(sandbox: dict[str, str], certificate: Path, key: Path) -> GridPool:
    host, port = sandbox["P11GRID_GRID_ADDR"].rsplit(":", 1)
    return GridPool(GridSettings(endpoints=((host, int(port)),), ca=Path(sandbox["P11GRID_CA"]),
                                 certificate=certificate, key=key, timeout=5.0))


def test_bound_identity_sees_its_element(sandbox: dict[str, str]) -> None:
    grid = Path(sandbox["P11GRID_SANDBOX"]) / "grid"
    pool = _pool(sandbox, grid / "vm.pem", grid / "vm.key")
    hello = pool.call("hello", {}, idempotent=True)
    assert hello["identity"] == "spiffe://p11grid.sandbox/vm/vm-1"
    listed = pool.call("list", {}, idempotent=True)["elements"]
    assert [e["seid"] for e in listed] == ["piv-se", "vm-se"]  # the sandbox binds both
    pool.close()


def test_unbound_identity_is_refused(sandbox: dict[str, str], sandbox_environ: dict[str, str],
                                     tmp_path: Path) -> None:
    ca.issue_identity(_authority(sandbox), tmp_path / "other.key", tmp_path / "other.pem",
                      "vm-2", uri="spiffe://p11grid.sandbox/vm/vm-2")
    pool = _pool(sandbox, tmp_path / "other.pem", tmp_path / "other.key")
    assert pool.call("list", {}, idempotent=True)["elements"] == []
    with pytest.raises(ElementRefused):
        pool.call("objects", {"seid": "vm-se"}, idempotent=True)
    # Through the module: the first look at the objects answers CKR_TOKEN_NOT_RECOGNIZED.
    config = tmp_path / "p11grid.toml"
    config.write_text(Path(sandbox["P11GRID_CONF"]).read_text()
                      .replace(str(Path(sandbox["P11GRID_SANDBOX"]) / "grid" / "vm.pem"),
                               str(tmp_path / "other.pem"))
                      .replace(str(Path(sandbox["P11GRID_SANDBOX"]) / "grid" / "vm.key"),
                               str(tmp_path / "other.key")))
    result = subprocess.run(
        ["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "--list-objects"],
        env={**sandbox_environ, "P11GRID_CONF": str(config)}, capture_output=True, text=True,
        timeout=60)
    assert "CKR_TOKEN_NOT_RECOGNIZED" in result.stdout + result.stderr


def test_no_client_certificate_no_service(sandbox: dict[str, str]) -> None:
    host, port = sandbox["P11GRID_GRID_ADDR"].rsplit(":", 1)
    context = ssl.create_default_context(cafile=sandbox["P11GRID_CA"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        # TLS 1.3 reports the missing certificate on the first read.
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            tls.sendall(b"\x00\x00\x00\x01\x90")
            if not tls.recv(1):
                raise ConnectionResetError("closed")


def test_audit_lines_name_who_what_and_never_secrets(sandbox: dict[str, str],
                                                     sandbox_environ: dict[str, str],
                                                     tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"audited")
    subprocess.run(["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "--login", "--pin",
                    sandbox["P11GRID_PIN"], "--sign", "--mechanism", "ECDSA-SHA256", "--id",
                    "02", "--input-file", str(data), "--output-file", str(tmp_path / "sig")],
                   env=sandbox_environ, check=True, capture_output=True, timeout=60)
    audit = (Path(sandbox["P11GRID_SANDBOX"]) / "grid" / "audit.log").read_text()
    records = [json.loads(line.split(" ", 2)[2]) for line in audit.splitlines()]
    signs = [r for r in records if r["op"] == "sign" and r["key"] == "vm-ec"]
    assert signs and signs[-1]["result"] == "ok" and signs[-1]["mechanism"] == "0x1041"
    assert {"caller", "seid", "ms"} <= set(signs[-1])
    assert sandbox["P11GRID_PIN"] not in audit


def test_administration_cli(tmp_path: Path) -> None:
    """add-se, keygen (inside the element), bind, list, on a token of its own."""
    softhsm = tmp_path / "softhsm2.conf"
    (tmp_path / "tokens").mkdir()
    softhsm.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n"
                       "objectstore.backend = file\nlog.level = ERROR\n")
    environ = {**os.environ, "SOFTHSM2_CONF": str(softhsm),
               "P11GRID_REGISTRY": str(tmp_path / "registry.sqlite")}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "cli-se", "--pin",
                    "123456", "--so-pin", "12345678"], env=environ, check=True,
                   capture_output=True)
    library = subprocess.run(["sh", "-c", "ls /usr/lib/softhsm/libsofthsm2.so "
                              "/usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1"],
                             capture_output=True, text=True).stdout.strip()

    def grid(*arguments: str) -> str:
        result = subprocess.run([str(VENV_BIN / "p11grid"), "grid", *arguments], env=environ,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    grid("add-se", "--seid", "cli-se", "--driver", "pkcs11", "--library", library,
         "--token-label", "cli-se", "--env", f"SOFTHSM2_CONF={softhsm}")
    grid("keygen", "--seid", "cli-se", "--label", "k-ec", "--id", "0a", "--kind", "ec256",
         "--pin", "123456")
    grid("bind", "--identity", "spiffe://p11grid.test/vm/a", "--seid", "cli-se")
    grid("admin", "--identity", "operator-1", "--seid", "cli-se")
    listing = grid("list")
    assert "administered by operator-1" in listing
    assert "cli-se\tpkcs11" in listing and "key k-ec\tid=0a\tec256" in listing
    assert "bound to spiffe://p11grid.test/vm/a" in listing
    # The key really is in the element, private and not extractable.
    objects = subprocess.run(["pkcs11-tool", "--module", library, "--token-label", "cli-se",
                              "--login", "--pin", "123456", "--list-objects"], env=environ,
                             capture_output=True, text=True, check=True).stdout
    assert "label:      k-ec" in objects and "never extractable" in objects
    again = subprocess.run([str(VENV_BIN / "p11grid"), "grid", "add-se", "--seid", "cli-se",
                            "--driver", "pkcs11", "--library", library, "--token-label", "x"],
                           env=environ, capture_output=True, text=True)
    assert again.returncode == 1 and "already registered" in again.stderr


def _discovering_config(sandbox: dict[str, str], tmp_path: Path, endpoint: str | None = None
                        ) -> Path:
    """The sandbox's module config without its [[secure_element]] tables."""
    text = Path(sandbox["P11GRID_CONF"]).read_text()
    text = re.sub(r"\[\[secure_element\]\]\n(?:[a-z_]+ = .*\n)*", "", text)
    assert "[[secure_element]]" not in text and "[identity]" in text
    if endpoint is not None:
        text = text.replace(sandbox["P11GRID_GRID_ADDR"], endpoint)
    config = tmp_path / "discover.toml"
    config.write_text(text)
    return config


def test_slots_discovered_from_the_grid(sandbox: dict[str, str],
                                        sandbox_environ: dict[str, str],
                                        tmp_path: Path) -> None:
    env = {**sandbox_environ, "P11GRID_CONF": str(_discovering_config(sandbox, tmp_path))}
    listed = subprocess.run(["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "-L"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    labels = [line.split(":", 1)[1].strip() for line in listed.stdout.splitlines()
              if line.strip().startswith("token label")]
    assert labels == ["piv-se", "vm-se"]  # what the registry binds to vm-1, in its order
    objects = subprocess.run(
        ["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "--token-label", "vm-se",
         "--login", "--pin", sandbox["P11GRID_PIN"], "--list-objects", "--type", "privkey"],
        env=env, capture_output=True, text=True, timeout=60)
    assert objects.returncode == 0, objects.stderr
    assert "label:      vm-ec" in objects.stdout and "label:      vm-rsa" in objects.stdout


def test_slot_discovery_with_the_grid_gone_fails_clearly(sandbox: dict[str, str],
                                                          sandbox_environ: dict[str, str],
                                                          tmp_path: Path) -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{unused.getsockname()[1]}"
    env = {**sandbox_environ,
           "P11GRID_CONF": str(_discovering_config(sandbox, tmp_path, endpoint))}
    listed = subprocess.run(["pkcs11-tool", "--module", sandbox["P11GRID_MODULE"], "-L"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0
    assert "CKR_FUNCTION_FAILED" in listed.stdout + listed.stderr
