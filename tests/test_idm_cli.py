"""`p11grid ca` and `p11grid token` as an operator runs them, with the HV key generated
and used inside a real SoftHSM2 token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

P11GRID = str(Path(sys.executable).parent / "p11grid")
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "56781234"
DOMAIN = "cli.test"
SP = f"spiffe://{DOMAIN}/sp/grid"
HV_KEY = "pkcs11:token=hv-se;object=hv-key"


def _run(*arguments: str, env: dict[str, str] | None = None,
         expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([P11GRID, *arguments], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == expect, f"{arguments}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("idm-cli")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "hv-se",
                    "--so-pin", "12345678", "--pin", PIN], env=env, check=True,
                   capture_output=True, timeout=60)
    ca = root / "ca"
    _run("ca", "init", "--ca-dir", str(ca), "--trust-domain", DOMAIN)
    _run("ca", "issue", "--ca-dir", str(ca), "--kind", "hv", "--name", "hv-1",
         "--module", SOFTHSM, "--env", f"SOFTHSM2_CONF={conf}", "--key-uri", HV_KEY,
         "--pin", PIN, "--generate", "ec256", "--out", str(root / "hv.pem"))
    _run("ca", "issue", "--ca-dir", str(ca), "--kind", "vm", "--name", "vm-1",
         "--key-out", str(root / "vm.key"), "--out", str(root / "vm.pem"))
    return {"root": root, "ca": ca, "conf": conf}


def _issue_vm_token(world: dict[str, Path], name: str, *extra: str) -> Path:
    out = world["root"] / name
    _run("token", "issue", "vm", "--hv-key", HV_KEY, "--module", SOFTHSM,
         "--env", f"SOFTHSM2_CONF={world['conf']}", "--pin", PIN,
         "--hv-cert", str(world["root"] / "hv.pem"), "--vm-cert", str(world["root"] / "vm.pem"),
         "--audience", SP, "--out", str(out), *extra)
    return out


def test_hv_certificate_certifies_the_key_inside_the_token(world: dict[str, Path]) -> None:
    hv = x509.load_pem_x509_certificate((world["root"] / "hv.pem").read_bytes())
    assert hv.subject.rfc4514_string() == "CN=hv-1"
    uris = hv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{DOMAIN}/hv/hv-1"]
    listed = _run("ca", "list", "--ca-dir", str(world["ca"])).stdout
    assert "hv/hv-1" in listed and "vm/vm-1" in listed
    # The key was generated in the token and stays there: a second --generate is refused.
    again = _run("ca", "issue", "--ca-dir", str(world["ca"]), "--kind", "hv", "--name", "hv-1",
                 "--module", SOFTHSM, "--env", f"SOFTHSM2_CONF={world['conf']}",
                 "--key-uri", HV_KEY, "--pin", PIN, "--generate", "ec256", expect=1)
    assert "hv-key" in again.stderr


def test_vm_token_signed_in_the_token_verifies_check_by_check(world: dict[str, Path]) -> None:
    token = _issue_vm_token(world, "vm.jwt", "--ttl", "1h")
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    verdict = _run("token", "verify", str(token), "--ca-dir", str(world["ca"]),
                   "--audience", SP, "--cert", str(world["root"] / "vm.pem"),
                   "--issuer", f"spiffe://{DOMAIN}/hv/hv-1").stdout
    for check in ("format", "typ", "chain", "signature", "issuer", "authenticated issuer",
                  "subject", "audience", "expiry", "not before", "lifetime", "confirmation"):
        assert f"PASS  {check}:" in verdict, verdict
    assert verdict.rstrip().endswith("verdict: valid")


def test_verify_refusals_print_the_failed_check(world: dict[str, Path]) -> None:
    token = _issue_vm_token(world, "vm-refused.jwt")
    wrong_audience = _run("token", "verify", str(token), "--ca-dir", str(world["ca"]),
                          "--audience", f"spiffe://{DOMAIN}/sp/other", expect=1).stdout
    assert "FAIL  audience:" in wrong_audience and "REFUSED (audience" in wrong_audience
    capped = _run("token", "verify", str(token), "--ca-dir", str(world["ca"]),
                  "--audience", SP, "--max-lifetime", "10m", expect=1).stdout
    assert "FAIL  lifetime:" in capped
    wrong_cert = _run("token", "verify", str(token), "--ca-dir", str(world["ca"]),
                      "--audience", SP, "--cert", str(world["root"] / "hv.pem"), expect=1).stdout
    assert "FAIL  confirmation:" in wrong_cert


def test_wrong_pin_is_refused_without_echo(world: dict[str, Path]) -> None:
    failed = _run("token", "issue", "vm", "--hv-key", HV_KEY, "--module", SOFTHSM,
                  "--env", f"SOFTHSM2_CONF={world['conf']}", "--pin", "99990000",
                  "--hv-cert", str(world["root"] / "hv.pem"),
                  "--vm-cert", str(world["root"] / "vm.pem"), "--audience", SP, expect=1)
    assert "PIN" in failed.stderr and "99990000" not in failed.stderr + failed.stdout


def _x5c_serial(token: Path) -> int:
    import base64
    import json

    header = token.read_text().split(".")[0]
    chain = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["x5c"]
    return x509.load_der_x509_certificate(base64.b64decode(chain[0])).serial_number


def test_a_renewed_certificate_replaces_the_one_in_the_token(world: dict[str, Path]) -> None:
    """`ca issue --key-uri` stores the certificate next to the key, replacing the one
    before: `token issue` without --hv-cert then signs with the current certificate."""
    first = x509.load_pem_x509_certificate((world["root"] / "hv.pem").read_bytes())
    renewed = _run("ca", "issue", "--ca-dir", str(world["ca"]), "--kind", "hv", "--name",
                   "hv-1", "--module", SOFTHSM, "--env", f"SOFTHSM2_CONF={world['conf']}",
                   "--key-uri", HV_KEY, "--pin", PIN, "--out", str(world["root"] / "hv2.pem"))
    assert "stored the certificate next to the key in token 'hv-se'" in renewed.stderr
    second = x509.load_pem_x509_certificate((world["root"] / "hv2.pem").read_bytes())
    assert second.serial_number != first.serial_number
    out = world["root"] / "vm-renewed.jwt"
    _run("token", "issue", "vm", "--hv-key", HV_KEY, "--module", SOFTHSM,
         "--env", f"SOFTHSM2_CONF={world['conf']}", "--pin", PIN,
         "--vm-cert", str(world["root"] / "vm.pem"), "--audience", SP, "--out", str(out))
    assert _x5c_serial(out) == second.serial_number
    # One certificate next to the key, not two (two would make the key's lookup ambiguous).
    listed = subprocess.run(["pkcs11-tool", "--module", SOFTHSM, "--token-label", "hv-se",
                             "--list-objects", "--type", "cert"],
                            env={**os.environ, "SOFTHSM2_CONF": str(world["conf"])},
                            capture_output=True, text=True, timeout=60)
    assert listed.stdout.count("Certificate Object") == 1, listed.stdout


def test_revoked_hv_makes_its_tokens_fail(world: dict[str, Path], tmp_path: Path) -> None:
    token = _issue_vm_token(world, "vm-before-revocation.jwt")
    _run("ca", "issue", "--ca-dir", str(world["ca"]), "--kind", "hv", "--name", "hv-spare",
         "--key-out", str(tmp_path / "spare.key"), "--out", str(tmp_path / "spare.pem"))
    _run("ca", "revoke", "--ca-dir", str(world["ca"]), "--kind", "hv", "--name", "hv-1",
         "--reason", "keyCompromise")
    verdict = _run("token", "verify", str(token), "--ca-dir", str(world["ca"]),
                   "--audience", SP, expect=1).stdout
    assert "FAIL  chain:" in verdict and "revoked" in verdict
