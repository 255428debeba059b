"""NSS, the third family of PKCS#11 consumers (Firefox, Thunderbird, certutil), with the
module added to an NSS database by modutil: it lists the tokens, finds the keys after a
login, and makes certificate requests signed inside the grid that OpenSSL verifies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

TIMEOUT = 120


def _nss(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.fixture()
def nss_database(tmp_path: Path, sandbox: dict[str, str],
                 sandbox_environ: dict[str, str]) -> Path:
    for tool in ("modutil", "certutil"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install libnss3-tools (make install does)")
    database = tmp_path / "nssdb"
    database.mkdir()
    created = _nss("certutil", "-N", "-d", f"sql:{database}", "--empty-password",
                   env=sandbox_environ)
    assert created.returncode == 0, created.stderr
    added = _nss("modutil", "-add", "p11grid", "-libfile", sandbox["P11GRID_MODULE"],
                 "-dbdir", f"sql:{database}", "-force", env=sandbox_environ)
    assert added.returncode == 0, added.stdout + added.stderr
    return database


def test_modutil_lists_the_grid_tokens(nss_database: Path,
                                       sandbox_environ: dict[str, str]) -> None:
    listed = _nss("modutil", "-list", "-dbdir", f"sql:{nss_database}", env=sandbox_environ)
    assert listed.returncode == 0, listed.stderr
    ours = listed.stdout[listed.stdout.index("p11grid"):]
    assert "status: loaded" in ours
    assert "token: vm-se" in ours and "token: piv-se" in ours
    assert "manufacturer=p11grid" in ours


def test_certutil_signs_requests_inside_the_grid(nss_database: Path, tmp_path: Path,
                                                 sandbox: dict[str, str],
                                                 sandbox_environ: dict[str, str]) -> None:
    password = tmp_path / "pin"
    password.write_text(sandbox["P11GRID_PIN"] + "\n")
    noise = tmp_path / "noise"
    noise.write_bytes(b"certutil reads noise even when it makes no key" * 2)
    keys = _nss("certutil", "-K", "-d", f"sql:{nss_database}", "-h", "vm-se", "-f",
                str(password), env=sandbox_environ)
    assert keys.returncode == 0, keys.stderr
    assert "vm-rsa" in keys.stdout and "vm-ec" in keys.stdout
    certificates = Path(sandbox["P11GRID_SANDBOX"])
    for key_id, label in (("01", "vm-rsa"), ("02", "vm-ec")):
        request = tmp_path / f"{label}.csr"
        made = _nss("certutil", "-R", "-d", f"sql:{nss_database}", "-h", "vm-se", "-f",
                    str(password), "-z", str(noise), "-k", key_id, "-s", f"CN=nss {label}",
                    "-Z", "SHA256", "-a", "-o", str(request), env=sandbox_environ)
        assert made.returncode == 0, made.stdout + made.stderr
        verified = subprocess.run(["openssl", "req", "-in", str(request), "-verify", "-noout"],
                                  capture_output=True, text=True, timeout=TIMEOUT)
        assert verified.returncode == 0 and "verify OK" in verified.stdout + verified.stderr
        # The request carries the grid key's public half: the one in the sandbox's
        # certificate for that key.
        request_key = subprocess.run(["openssl", "req", "-in", str(request), "-pubkey",
                                      "-noout"], capture_output=True, text=True,
                                     timeout=TIMEOUT).stdout
        certificate_key = subprocess.run(
            ["openssl", "x509", "-in", str(certificates / f"{label}.pem"), "-pubkey",
             "-noout"], capture_output=True, text=True, timeout=TIMEOUT).stdout
        assert request_key and request_key == certificate_key


def test_a_wrong_pin_is_refused(nss_database: Path, tmp_path: Path,
                                sandbox_environ: dict[str, str]) -> None:
    password = tmp_path / "wrong"
    password.write_text("not-the-pin\n")
    refused = _nss("certutil", "-K", "-d", f"sql:{nss_database}", "-h", "vm-se", "-f",
                   str(password), env=sandbox_environ)
    assert refused.returncode != 0
    assert "SEC_ERROR_BAD_PASSWORD" in refused.stdout + refused.stderr


P11KIT_PROXY = Path("/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so")


def test_nss_finds_the_module_through_p11_kit(p11kit_registration: Path, tmp_path: Path,
                                              sandbox_environ: dict[str, str]) -> None:
    """How NSS programs find registered modules: p11-kit's proxy in the NSS database (as
    distributions wire it), and our p11-kit module file, installed by `p11grid config
    p11kit --install`, behind it."""
    if not P11KIT_PROXY.exists():
        pytest.fail(f"{P11KIT_PROXY} is missing: apt-get install p11-kit-modules")
    database = tmp_path / "nssdb"
    database.mkdir()
    assert _nss("certutil", "-N", "-d", f"sql:{database}", "--empty-password",
                env=sandbox_environ).returncode == 0
    added = _nss("modutil", "-add", "p11-kit-proxy", "-libfile", str(P11KIT_PROXY),
                 "-dbdir", f"sql:{database}", "-force", env=sandbox_environ)
    assert added.returncode == 0, added.stdout + added.stderr
    listed = _nss("modutil", "-list", "-dbdir", f"sql:{database}", env=sandbox_environ)
    assert listed.returncode == 0, listed.stderr
    ours = listed.stdout[listed.stdout.index("p11-kit-proxy"):]
    # Our tokens (SoftHSM2's own registration shows the sandbox's token vm-se too, but
    # with SoftHSM2 as its manufacturer).
    assert "token=vm-se;manufacturer=p11grid" in ours, listed.stdout
    assert "token=piv-se;manufacturer=p11grid" in ours, listed.stdout
    # Gone with the module file: they came through it.
    p11kit_registration.unlink()
    again = _nss("modutil", "-list", "-dbdir", f"sql:{database}", env=sandbox_environ)
    assert again.returncode == 0 and "manufacturer=p11grid" not in again.stdout
