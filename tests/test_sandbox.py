"""`p11grid sandbox up|down`, checked from outside: SoftHSM2 directly, OpenSSL, nginx, curl.

Nothing here goes through our module: the sandbox must be right before the module is
judged against it.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, ObjectClass

from p11grid import nginx, sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED_VARIABLES = (
    "P11GRID_MODULE",
    "P11GRID_CONF",
    "P11GRID_TOKEN",
    "P11GRID_PIN",
    "P11GRID_RSA_URI",
    "P11GRID_EC_URI",
    "OPENSSL_CONF",
    "P11GRID_DIRECT_MODULE",
    "P11GRID_DIRECT_TOKEN",
    "SOFTHSM2_CONF",
    "P11GRID_CA",
    "P11GRID_SANDBOX",
    "P11GRID_DIRECT_OPENSSL_CONF",
    "P11GRID_LOCAL_CONF",
    "P11GRID_GRID_PIDFILE",
    "P11GRID_GRID_ADDR",
    "P11GRID_GRID_CONF",
    "P11GRID_REGISTRY",
    "P11GRID_PIV_URI",
    "P11GRID_RACS_ADDR",
    "P11GRID_RACS_CERT",
    "P11GRID_RACS_KEY",
    "P11GRID_RACS_CA",
    "PCSCLITE_CSOCK_NAME",
    "P11GRID_VM_TOKEN",
    "P11GRID_IDP_URL",
    "P11GRID_APP_TOKEN",
    "P11GRID_HV_KEY_URI",
    "P11GRID_CA_DIR",
)
KEYS = {"vm-rsa": b"\x01", "vm-ec": b"\x02"}
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # DER OID of prime256v1


def run_command(
    *arguments: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`p11grid ...` in its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "p11grid", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def exported_variables(env_file: Path) -> dict[str, str]:
    """What a shell really gets from `. DIR/env`, read back from `env -0`."""
    result = subprocess.run(
        ["bash", "-c", '. "$1" && env -0', "bash", str(env_file)],
        capture_output=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    return dict(pairs)


# --- reading the token straight from SoftHSM2 --------------------------------------------

TOKEN_ATTRIBUTES = {
    ObjectClass.PRIVATE_KEY: (
        Attribute.KEY_TYPE, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL,
        Attribute.SIGN, Attribute.DECRYPT,
    ),
    ObjectClass.PUBLIC_KEY: (
        Attribute.KEY_TYPE, Attribute.VERIFY, Attribute.ENCRYPT, Attribute.LOCAL,
    ),
    ObjectClass.CERTIFICATE: (
        Attribute.CERTIFICATE_TYPE, Attribute.VALUE, Attribute.SUBJECT, Attribute.ISSUER,
        Attribute.SERIAL_NUMBER,
    ),
}  # fmt: skip
OPTIONAL_ATTRIBUTES = (
    Attribute.MODULUS, Attribute.PUBLIC_EXPONENT, Attribute.EC_POINT, Attribute.EC_PARAMS,
)  # fmt: skip
SECRET_ATTRIBUTES = (Attribute.VALUE, Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1)


def _read_token(
    softhsm_conf: str, library: str, token_label: str, pin: str
) -> list[dict[str, Any]]:
    """Runs in a spawned process: SoftHSM2 reads SOFTHSM2_CONF once per process."""
    os.environ["SOFTHSM2_CONF"] = softhsm_conf
    token = pkcs11.lib(library).get_token(token_label=token_label)
    objects: list[dict[str, Any]] = []
    with token.open(user_pin=pin) as session:
        for item in session.get_objects():
            object_class = item[Attribute.CLASS]
            entry: dict[str, Any] = {
                "CLASS": object_class,
                "LABEL": item[Attribute.LABEL],
                "ID": item[Attribute.ID],
                "TOKEN": item[Attribute.TOKEN],
            }
            for attribute in TOKEN_ATTRIBUTES.get(object_class, ()):
                entry[attribute.name] = item[attribute]
            for attribute in OPTIONAL_ATTRIBUTES:
                try:
                    entry[attribute.name] = item[attribute]
                except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive):
                    pass
            if object_class == ObjectClass.PRIVATE_KEY:
                refused = []
                for attribute in SECRET_ATTRIBUTES:
                    try:
                        item[attribute]
                    except (pkcs11.AttributeSensitive, pkcs11.AttributeTypeInvalid):
                        refused.append(attribute.name)
                entry["refused"] = refused
            objects.append(entry)
    return objects


@dataclass(frozen=True)
class BuiltSandbox:
    directory: Path
    output: str
    variables: dict[str, str]
    objects: list[dict[str, Any]]

    def find(self, object_class: ObjectClass, label: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["CLASS"] == object_class and o["LABEL"] == label]
        assert len(found) == 1, f"expected one {object_class.name} {label!r}, found {found}"
        return found[0]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltSandbox]:
    directory = tmp_path_factory.mktemp("sandbox")
    result = run_command("sandbox", "up", directory)
    assert result.returncode == 0, f"sandbox up failed:\n{result.stdout}\n{result.stderr}"
    variables = exported_variables(directory / "env")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        objects = pool.apply(
            _read_token,
            (
                variables["SOFTHSM2_CONF"],
                variables["P11GRID_DIRECT_MODULE"],
                variables["P11GRID_DIRECT_TOKEN"],
                variables["P11GRID_PIN"],
            ),
        )
    yield BuiltSandbox(directory, result.stdout, variables, objects)
    run_command("sandbox", "down", directory)


# --- the files -------------------------------------------------------------------------


def test_up_reports_each_step(built: BuiltSandbox) -> None:
    lines = built.output.splitlines()
    assert len(lines) >= 8
    assert all(line.startswith("sandbox: ") for line in lines)
    assert lines[-1] == f"sandbox: ready in {built.directory}"


def test_env_exports_every_variable(built: BuiltSandbox) -> None:
    variables = built.variables
    missing = [name for name in EXPECTED_VARIABLES if name not in variables]
    assert not missing
    directory = built.directory
    assert variables["P11GRID_MODULE"] == str(REPO_ROOT / "build" / "libp11grid.so")
    assert variables["P11GRID_CONF"] == str(directory / "p11grid.toml")
    assert variables["P11GRID_TOKEN"] == "vm-se"
    assert re.fullmatch(r"[0-9]{8}", variables["P11GRID_PIN"])  # a PIV PIN is 6 to 8 digits
    assert variables["P11GRID_RSA_URI"] == "pkcs11:token=vm-se;object=vm-rsa;type=private"
    assert variables["P11GRID_EC_URI"] == "pkcs11:token=vm-se;object=vm-ec;type=private"
    assert variables["OPENSSL_CONF"] == str(directory / "openssl.cnf")
    assert Path(variables["P11GRID_DIRECT_MODULE"]).name == "libsofthsm2.so"
    assert Path(variables["P11GRID_DIRECT_MODULE"]).is_file()
    assert variables["P11GRID_DIRECT_TOKEN"] == "vm-se"
    assert variables["SOFTHSM2_CONF"] == str(directory / "softhsm2.conf")
    assert variables["P11GRID_CA"] == str(directory / "ca.pem")
    assert variables["P11GRID_SANDBOX"] == str(directory)
    for name in ("P11GRID_CONF", "OPENSSL_CONF", "SOFTHSM2_CONF", "P11GRID_CA"):
        assert Path(variables[name]).is_file(), name
    # DIR/env holds exactly these, in this order.
    assert tuple(sandbox.load_env(directory / "env")) == EXPECTED_VARIABLES == sandbox.ENV_NAMES
    assert variables["P11GRID_PIV_URI"] == "pkcs11:token=piv-se;object=piv-rsa;type=private"
    assert re.fullmatch(r"127\.0\.0\.1:[0-9]+", variables["P11GRID_RACS_ADDR"])
    assert variables["P11GRID_RACS_ADDR"] != variables["P11GRID_GRID_ADDR"]
    assert variables["P11GRID_RACS_CERT"] == str(directory / "grid" / "racs-client.pem")
    assert variables["P11GRID_RACS_KEY"] == str(directory / "grid" / "racs-client.key")
    assert variables["P11GRID_RACS_CA"] == str(directory / "ca.pem")
    assert variables["PCSCLITE_CSOCK_NAME"] == str(
        directory / "piv" / "run" / "pcscd" / "pcscd.comm")
    assert stat.S_ISSOCK(Path(variables["PCSCLITE_CSOCK_NAME"]).stat().st_mode)
    assert variables["P11GRID_VM_TOKEN"] == str(directory / "identity" / "vm-token.jwt")
    assert re.fullmatch(r"https://127\.0\.0\.1:[0-9]+", variables["P11GRID_IDP_URL"])
    assert variables["P11GRID_APP_TOKEN"] == str(directory / "identity" / "app-token.jwt")


def test_identity_chain_is_live(built: BuiltSandbox) -> None:
    """The IdP answers at P11GRID_IDP_URL; the token file at P11GRID_VM_TOKEN verifies
    check by check; replacing it with a tampered token makes the next session refuse, and
    putting it back makes it work again (foreign, expired and other tokens: see
    test_identity_chain.py)."""
    import json
    import ssl
    import urllib.request

    variables = built.variables
    context = ssl.create_default_context(cafile=variables["P11GRID_CA"])
    with urllib.request.urlopen(variables["P11GRID_IDP_URL"]
                                + "/.well-known/openid-configuration", context=context,
                                timeout=10) as answer:
        discovery = json.load(answer)
    assert discovery["issuer"] == variables["P11GRID_IDP_URL"]
    token_file = Path(variables["P11GRID_VM_TOKEN"])
    good = token_file.read_text()
    verdict = run_command("token", "verify", token_file, "--ca-dir",
                          built.directory / "ca", "--audience",
                          "spiffe://p11grid.sandbox/sp/grid", "--cert",
                          built.directory / "grid" / "vm.pem")
    assert verdict.returncode == 0 and "verdict: valid" in verdict.stdout, verdict.stdout
    # As the issue writes the commands, with only `. DIR/env` behind them.
    environment = {**os.environ, **variables}
    issued = run_command("token", "issue", "vm", "--hv-key", variables["P11GRID_HV_KEY_URI"],
                         "--vm-cert", built.directory / "grid" / "vm.pem", "--audience",
                         "spiffe://p11grid.sandbox/sp/grid", "--ttl", "1h", env=environment)
    assert issued.returncode == 0, issued.stderr
    fresh = built.directory / "fresh-vm-token.jwt"
    fresh.write_text(issued.stdout)
    plain = run_command("token", "verify", fresh, env=environment)
    assert plain.returncode == 0 and "verdict: valid" in plain.stdout, plain.stdout
    assert "audience is not checked" in plain.stdout
    # One layer up: the APP token, signed by the VM's key in the grid, inside its VM token.
    app = run_command("token", "verify", variables["P11GRID_APP_TOKEN"], "--ca-dir",
                      built.directory / "ca", "--audience", "spiffe://p11grid.sandbox/sp/grid",
                      "--vm-token", token_file, "--cert",
                      built.directory / "identity" / "app.pem",
                      "--issuer", "spiffe://p11grid.sandbox/vm/vm-1")
    assert app.returncode == 0 and "PASS  within vm token" in app.stdout, app.stdout

    def list_private_objects() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pkcs11-tool", "--module", variables["P11GRID_MODULE"], "--token-label", "vm-se",
             "--login", "--pin", variables["P11GRID_PIN"], "--list-objects", "--type",
             "privkey"], env={**os.environ, **variables}, capture_output=True, text=True,
            timeout=60)

    head, body, signature = good.strip().split(".")
    tampered = f"{head}.{body[:-2]}{'AA' if body[-2:] != 'AA' else 'BB'}.{signature}"
    try:
        token_file.write_text(tampered + "\n")
        refused = list_private_objects()
        assert "CKR_TOKEN_NOT_RECOGNIZED" in refused.stdout + refused.stderr
        # OpenSSL's engine (libp11 0.4.12 waits forever if C_OpenSession fails): the
        # refusal comes at C_Login, and openssl ends with an error.
        digest = built.directory / "identity-digest.bin"
        digest.write_bytes(b"\x01" * 32)
        engine = subprocess.run(
            ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey",
             variables["P11GRID_EC_URI"], "-sign", "-in", str(digest)],
            env={**os.environ, **variables}, capture_output=True, timeout=120,
            stdin=subprocess.DEVNULL)
        assert engine.returncode != 0 and not engine.stdout
        log = (built.directory / "p11grid.log").read_text()
        assert "refused by the module: signature:" in log
    finally:
        token_file.write_text(good)
    allowed = list_private_objects()
    assert allowed.returncode == 0 and "vm-ec" in allowed.stdout, allowed.stderr
    client = x509.load_pem_x509_certificate(Path(variables["P11GRID_RACS_CERT"]).read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "racs-admin"


def test_env_reads_back_in_python(built: BuiltSandbox) -> None:
    loaded = sandbox.load_env(built.directory / "env")
    assert set(EXPECTED_VARIABLES) <= set(loaded)
    assert loaded == {name: built.variables[name] for name in loaded}


@pytest.mark.parametrize("relative", ["env", "openssl.cnf", "openssl-direct.cnf", "ca/ca.key",
                                      "grid/racs-client.key", "grid/racs.key"])
def test_secrets_are_mode_0600(built: BuiltSandbox, relative: str) -> None:
    mode = stat.S_IMODE((built.directory / relative).stat().st_mode)
    assert mode == 0o600, f"{relative} has mode {mode:o}"


def test_softhsm2_conf(built: BuiltSandbox) -> None:
    settings = dict(
        (part.strip() for part in line.split("=", 1))
        for line in (built.directory / "softhsm2.conf").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert settings == {
        "directories.tokendir": str(built.directory / "tokens"),
        "objectstore.backend": "file",
        "log.level": "ERROR",
        "slots.removable": "false",
        "library.reset_on_fork": "true",
    }


def test_module_config_points_at_the_grid(built: BuiltSandbox) -> None:
    config = tomllib.loads((built.directory / "p11grid.toml").read_text())
    assert config["module"]["backend"] == "grid"
    assert config["grid"]["endpoints"] == [built.variables["P11GRID_GRID_ADDR"]]
    assert config["secure_element"] == [{"label": "vm-se", "seid": "vm-se"},
                                        {"label": "piv-se", "seid": "piv-se"}]
    pid = int(Path(built.variables["P11GRID_GRID_PIDFILE"]).read_text())
    assert Path(f"/proc/{pid}").exists(), "the grid service named by the pid file runs"


def test_local_module_config(built: BuiltSandbox) -> None:
    config = tomllib.loads((built.directory / "p11grid-local.toml").read_text())
    assert config["module"] == {
        "backend": "local",
        "log_file": str(built.directory / "p11grid.log"),
        "log_level": "info",
    }
    assert config["secure_element"] == [
        {
            "label": "vm-se",
            "driver": "pkcs11",
            "library": built.variables["P11GRID_DIRECT_MODULE"],
            "token_label": "vm-se",
            "environment": {"SOFTHSM2_CONF": str(built.directory / "softhsm2.conf")},
        }
    ]


def test_openssl_conf_loads_the_engine_on_our_module(built: BuiltSandbox) -> None:
    text = (built.directory / "openssl.cnf").read_text()
    assert "openssl_conf = openssl_init" in text
    assert "engines = engine_section" in text
    assert "engine_id = pkcs11" in text
    assert f'MODULE_PATH = "{REPO_ROOT / "build" / "libp11grid.so"}"' in text
    assert f'PIN = "{built.variables["P11GRID_PIN"]}"' in text
    assert "init = 1" in text
    engine = re.search(r'dynamic_path = "([^"]+)"', text)
    assert engine and Path(engine.group(1)).is_file()


def test_openssl_default_provider_still_works_with_the_config(
    built: BuiltSandbox, tmp_path: Path
) -> None:
    environment = {**os.environ, "OPENSSL_CONF": built.variables["OPENSSL_CONF"]}
    shown = subprocess.run(
        ["openssl", "x509", "-in", built.variables["P11GRID_CA"], "-noout", "-subject"],
        capture_output=True, text=True, env=environment, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "p11grid sandbox CA" in shown.stdout
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-subj", "/CN=scratch", "-keyout", str(tmp_path / "k.pem"),
         "-out", str(tmp_path / "c.pem")],
        capture_output=True, text=True, env=environment, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr


# --- the token -------------------------------------------------------------------------


def test_token_holds_two_keys_and_two_certificates_with_matching_ids(built: BuiltSandbox) -> None:
    summary = sorted((o["CLASS"].name, o["LABEL"], o["ID"]) for o in built.objects)
    assert summary == sorted(
        (object_class, label, key_id)
        for label, key_id in KEYS.items()
        for object_class in ("PRIVATE_KEY", "PUBLIC_KEY", "CERTIFICATE")
    )
    assert all(o["TOKEN"] for o in built.objects)


@pytest.mark.parametrize("label", sorted(KEYS))
def test_private_keys_were_generated_inside_and_cannot_leave(
    built: BuiltSandbox, label: str
) -> None:
    private = built.find(ObjectClass.PRIVATE_KEY, label)
    assert private["SENSITIVE"] is True
    assert private["EXTRACTABLE"] is False
    # LOCAL + ALWAYS_SENSITIVE + NEVER_EXTRACTABLE: generated in the token, never imported.
    assert private["LOCAL"] is True
    assert private["ALWAYS_SENSITIVE"] is True
    assert private["NEVER_EXTRACTABLE"] is True
    assert private["PRIVATE"] is True
    assert private["SIGN"] is True
    assert private["DECRYPT"] is (label == "vm-rsa")
    assert set(private["refused"]) == {a.name for a in SECRET_ATTRIBUTES}


@pytest.mark.parametrize("label", sorted(KEYS))
def test_public_keys(built: BuiltSandbox, label: str) -> None:
    public = built.find(ObjectClass.PUBLIC_KEY, label)
    assert public["VERIFY"] is True
    assert public["ENCRYPT"] is (label == "vm-rsa")
    if label == "vm-rsa":
        assert len(public["MODULUS"]) * 8 == 2048
    else:
        assert public["EC_PARAMS"] == P256_PARAMS


def _token_public_key(public: dict[str, Any]) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    if "MODULUS" in public:
        return rsa.RSAPublicNumbers(
            int.from_bytes(public["PUBLIC_EXPONENT"], "big"),
            int.from_bytes(public["MODULUS"], "big"),
        ).public_key()
    point = public["EC_POINT"]
    assert point[0] == 0x04 and point[1] == len(point) - 2, "EC_POINT is a DER OCTET STRING"
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("label", sorted(KEYS))
def test_certificates_verify_and_certify_the_token_keys(built: BuiltSandbox, label: str) -> None:
    authority = x509.load_pem_x509_certificate(Path(built.variables["P11GRID_CA"]).read_bytes())
    pem_file = built.directory / f"{label}.pem"
    certificate = x509.load_pem_x509_certificate(pem_file.read_bytes())
    certificate.verify_directly_issued_by(authority)

    stored = built.find(ObjectClass.CERTIFICATE, label)
    assert stored["VALUE"] == certificate.public_bytes(serialization.Encoding.DER)
    assert stored["SUBJECT"] == certificate.subject.public_bytes()
    assert stored["ISSUER"] == authority.subject.public_bytes()
    assert stored["SERIAL_NUMBER"][0] == 0x02  # DER INTEGER
    assert int.from_bytes(stored["SERIAL_NUMBER"][2:], "big") == certificate.serial_number

    token_key = _token_public_key(built.find(ObjectClass.PUBLIC_KEY, label))
    assert _spki(certificate.public_key()) == _spki(token_key)

    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 29 <= lifetime.days <= 31

    checked = subprocess.run(
        ["openssl", "verify", "-CAfile", built.variables["P11GRID_CA"], "-purpose", "sslserver",
         "-verify_hostname", "localhost", "-verify_ip", "127.0.0.1", str(pem_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_ca_key_is_a_file_that_matches_the_ca(built: BuiltSandbox) -> None:
    key = serialization.load_pem_private_key((built.directory / "ca" / "ca.key").read_bytes(), None)
    authority = x509.load_pem_x509_certificate(Path(built.variables["P11GRID_CA"]).read_bytes())
    assert _spki(key.public_key()) == _spki(authority.public_key())
    constraints = authority.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True


@pytest.mark.parametrize("label", sorted(KEYS))
def test_openssl_signs_in_the_token_through_the_engine(
    built: BuiltSandbox, label: str, tmp_path: Path
) -> None:
    """The engine section works when pointed at SoftHSM2 (openssl-direct.cnf)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"signed inside the token")
    value = digest.finalize()
    (tmp_path / "digest").write_bytes(value)
    uri = built.variables["P11GRID_RSA_URI" if label == "vm-rsa" else "P11GRID_EC_URI"]
    command = ["openssl", "pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri,
               "-sign", "-in", str(tmp_path / "digest")]  # fmt: skip
    if label == "vm-rsa":
        command += ["-pkeyopt", "digest:sha256"]
    environment = {
        **os.environ,
        "OPENSSL_CONF": str(built.directory / "openssl-direct.cnf"),
        "SOFTHSM2_CONF": built.variables["SOFTHSM2_CONF"],
    }
    signed = subprocess.run(command, capture_output=True, env=environment, timeout=60)
    assert signed.returncode == 0, signed.stderr.decode()
    certificate = x509.load_pem_x509_certificate((built.directory / f"{label}.pem").read_bytes())
    public_key = certificate.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signed.stdout, value, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(signed.stdout, value, ec.ECDSA(Prehashed(hashes.SHA256())))


# --- nginx on the sandbox (engine on SoftHSM2 directly) -----------------------------------


def test_nginx_serves_tls_with_token_keys(built: BuiltSandbox) -> None:
    server = nginx.start(built.directory, openssl_conf=built.directory / "openssl-direct.cnf")
    try:
        recorded = sandbox.read_state(built.directory)["processes"]
        assert ("nginx", server.pid) in [(p["name"], p["pid"]) for p in recorded]
        client_environment = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
        for label in ("vm-rsa", "vm-ec"):
            for versions in (["--tlsv1.2", "--tls-max", "1.2"], ["--tlsv1.3"]):
                fetched = subprocess.run(
                    ["curl", "-sS", "--max-time", "30", "--cacert", built.variables["P11GRID_CA"],
                     *versions, server.url(label)],
                    capture_output=True, text=True, env=client_environment, timeout=60,
                )  # fmt: skip
                assert fetched.returncode == 0, fetched.stderr + nginx.tail(server.error_log)
                assert f"key={label} " in fetched.stdout
    finally:
        status = nginx.stop(server)
    assert status == 0
    assert sorted(p["name"] for p in sandbox.read_state(built.directory)["processes"]) == \
        ["grid", "idp", "piv"]


# --- refusing, and tearing down --------------------------------------------------------


def test_up_refuses_a_live_sandbox(built: BuiltSandbox) -> None:
    before = sorted(p.name for p in built.directory.iterdir())
    again = run_command("sandbox", "up", built.directory)
    assert again.returncode != 0
    assert "already holds a live sandbox" in again.stderr
    assert sorted(p.name for p in built.directory.iterdir()) == before


def test_up_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    refused = run_command("sandbox", "up", tmp_path)
    assert refused.returncode != 0
    assert "not empty" in refused.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_down_refuses_a_directory_that_is_no_sandbox(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    refused = run_command("sandbox", "down", tmp_path)
    assert refused.returncode != 0
    assert (tmp_path / "precious.txt").exists()


def test_down_stops_recorded_processes_and_removes_the_directory(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "box"  # up creates missing parents
    created = run_command("sandbox", "up", directory)
    assert created.returncode == 0, created.stderr
    # A stubborn service: ignores SIGTERM, so down must escalate to SIGKILL.
    service = subprocess.Popen(
        ["bash", "-c", "trap '' TERM; while :; do sleep 0.1; done"], start_new_session=True
    )
    pcscd = int((directory / "piv" / "pcscd.pid").read_text())
    assert _alive(pcscd)
    try:
        sandbox.record_process(directory, "stubborn", service.pid, process_group=service.pid)
        started = time.monotonic()
        removed = run_command("sandbox", "down", "--deadline", "2", directory)
        assert removed.returncode == 0, removed.stderr
        assert service.wait(timeout=30) != 0
        assert time.monotonic() - started < 20
        assert "killed stubborn" in removed.stdout
        # With this 2 s deadline pcscd occasionally needs the SIGKILL: either way it ends.
        assert re.search(r"(stopped|killed) piv", removed.stdout), removed.stdout
        assert re.search(r"(stopped|killed) grid", removed.stdout), removed.stdout
        assert not _alive(pcscd), "pcscd of the virtual PIV card outlived down"
    finally:
        if service.poll() is None:
            service.kill()
    assert not directory.exists()
    again = run_command("sandbox", "down", directory)
    assert again.returncode == 0
    assert "already gone" in again.stdout


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_up_stops_what_it_started_when_a_later_step_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def grid_fails(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the grid service did not start (test)")

    monkeypatch.setattr(sandbox.sandbox_grid, "start", grid_fails)
    directory = tmp_path / "box"
    seen: list[int] = []

    def say(line: str) -> None:
        if (directory / "piv" / "pcscd.pid").exists() and not seen:
            seen.append(int((directory / "piv" / "pcscd.pid").read_text()))

    with pytest.raises(RuntimeError, match="did not start"):
        sandbox.up(directory, say=say)
    assert seen, "the PIV launcher had started"
    deadline = time.monotonic() + 10
    while _alive(seen[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(seen[0]), "pcscd of the failed sandbox still runs"
    assert not directory.exists()


def test_grid_config_has_a_racs_server(built: BuiltSandbox) -> None:
    config = tomllib.loads((built.directory / "grid" / "grid.toml").read_text())
    assert config["racs"] == {
        "listen": built.variables["P11GRID_RACS_ADDR"],
        "certificate": str(built.directory / "grid" / "racs.pem"),
        "key": str(built.directory / "grid" / "racs.key"),
        "client_ca": built.variables["P11GRID_CA"],
    }


def test_required_tools_are_installed() -> None:
    """The sandbox and these tests need them; `make install` provides them."""
    for tool in ("softhsm2-util", "openssl", "curl", "pkcs11-tool"):
        assert shutil.which(tool), f"{tool} is missing: run make install"


def test_up_leaves_nothing_behind_when_a_step_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox.paths, "softhsm_util", lambda: Path("/bin/false"))
    directory = tmp_path / "box"
    with pytest.raises(sandbox.SandboxError, match="softhsm2-util --init-token failed"):
        sandbox.up(directory, say=lambda line: None)
    assert not directory.exists()


def test_up_refuses_a_path_that_configs_cannot_hold(tmp_path: Path) -> None:
    refused = run_command("sandbox", "up", tmp_path / "two words")
    assert refused.returncode != 0
    assert "use a path of" in refused.stderr
    assert not (tmp_path / "two words").exists()


def test_tokens_renew_across_expiry_during_a_long_nginx_run(built: BuiltSandbox) -> None:
    """Access tokens of 4 s (the provider restarted with that lifetime): nginx keeps
    serving for ~12 s while the module renews its authorization ahead of each expiry,
    without the application noticing; renewals are amortized, not one per signature."""
    import json
    import time as clock

    directory = built.directory
    identity = directory / "identity"
    state = sandbox.read_state(directory)
    (entry,) = [p for p in state["processes"] if p["name"] == "idp"]
    sandbox.stop_process(entry, lambda line: None)
    config = identity / "idp.toml"
    config.write_text(config.read_text() + "access_token_lifetime = 4\n")
    started_at = (identity / "idp.out").stat().st_size
    with open(identity / "idp.out", "ab") as output:
        idp = subprocess.Popen([sys.executable, "-m", "p11grid", "idp", "serve", "--config",
                                str(config)], stdout=output, stderr=output,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    sandbox.record_process(directory, "idp", idp.pid, process_group=idp.pid)
    deadline = clock.monotonic() + 30
    while "serving" not in (identity / "idp.out").read_bytes()[started_at:].decode():
        assert clock.monotonic() < deadline, "the provider did not come back"
        clock.sleep(0.1)
    audit = directory / "grid" / "audit.log"
    before = len(audit.read_text().splitlines())
    server = nginx.start(directory)
    try:
        client_environment = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
        served = 0
        finish = clock.monotonic() + 12
        while clock.monotonic() < finish:
            fetched = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--cacert", built.variables["P11GRID_CA"],
                 server.url("vm-ec")], capture_output=True, text=True,
                env=client_environment, timeout=60)
            assert fetched.returncode == 0, fetched.stderr + nginx.tail(server.error_log)
            served += 1
            clock.sleep(0.2)
    finally:
        assert nginx.stop(server) == 0
    records = [json.loads(line.split(" ", 2)[2])
               for line in audit.read_text().splitlines()[before:] if line.strip()]
    signs = [r for r in records if r["op"] == "sign" and r["seid"] == "vm-se"]
    authorizations = [r for r in records if r["op"] == "authorize" and r["seid"] == "vm-se"]
    assert all(r["result"] == "ok" for r in signs + authorizations)
    assert len(signs) >= served
    # Master and 2 workers authorize once each, then renew every ~3 s (of 4 s) while busy.
    assert len(authorizations) >= 6, len(authorizations)
    assert len(authorizations) < len(signs) / 2, (len(authorizations), len(signs))
