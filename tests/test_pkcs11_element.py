"""The PKCS#11 token driver's session copies of keys (grid_backend/elements/pkcs11_token.py),
against a real SoftHSM2 token: signatures use a session-object copy of the key while the key
is in the token, and a key destroyed in the token (by another process) stops being used
within COPY_CHECK_SECONDS. Runs in a child process: SoftHSM2 reads its configuration once
per process, and this pytest process holds another one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "11223344"

SCRIPT = """
import json, subprocess, sys, time
from grid_backend.elements.pkcs11_token import COPY_CHECK_SECONDS, Pkcs11Token
from grid_backend.secure_element import ElementError

library, pin, conf = sys.argv[1], sys.argv[2], sys.argv[3]
token = Pkcs11Token(library, "copies", {"SOFTHSM2_CONF": conf})
token.open()
token.login(pin)
key = next(o for o in token.private_objects() if o.attributes[0x3] == b"k")
public = next(o for o in token.public_objects()
              if o.attributes[0x3] == b"k" and o.attributes[0x0] == (2).to_bytes(8, "little"))
digest = bytes(range(32))
signature = token.sign(key, 0x1041, None, digest)  # CKM_ECDSA
copy = token._copies[key.ref][0]
# The copy is the driver's own: listings show the token's objects only.
listed = [o.attributes[0x3] for o in token.private_objects()]
report = {"copied": copy != key.ref, "length": len(signature), "listed": listed.count(b"k"),
          "point": public.attributes[0x181].hex(), "signature": signature.hex()}
subprocess.run(["pkcs11-tool", "--module", library, "--token-label", "copies", "--login",
                "--pin", pin, "--delete-object", "--type", "privkey", "--label", "k"],
               env={"SOFTHSM2_CONF": conf, "PATH": "/usr/bin:/bin"}, check=True,
               capture_output=True, timeout=60)
time.sleep(COPY_CHECK_SECONDS + 0.2)
try:
    token.sign(key, 0x1041, None, digest)
    report["after_delete"] = "signed"
except ElementError as exc:
    report["after_delete"] = type(exc).__name__
print(json.dumps(report))
"""


def test_a_session_copy_signs_until_the_key_leaves_the_token(tmp_path: Path) -> None:
    if shutil.which("pkcs11-tool") is None or not Path(SOFTHSM).exists():
        pytest.fail("softhsm2 and opensc (pkcs11-tool) are needed: apt-get install them")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for command in (
            ["softhsm2-util", "--init-token", "--free", "--label", "copies", "--so-pin",
             "55667788", "--pin", PIN],
            ["pkcs11-tool", "--module", SOFTHSM, "--token-label", "copies", "--login", "--pin",
             PIN, "--keypairgen", "--key-type", "EC:prime256v1", "--label", "k", "--id", "41"]):
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
    done = subprocess.run([sys.executable, "-c", SCRIPT, SOFTHSM, PIN, str(conf)],
                          env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["copied"] is True, "signed with the token object, not a session copy"
    assert report["listed"] == 1, "the session copy shows up among the element's objects"
    # The copy's signature verifies with the token's public key.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    point = bytes.fromhex(report["point"])
    point = point[2:] if point[0] == 0x04 and len(point) == 67 else point  # DER OCTET STRING
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    signature = bytes.fromhex(report["signature"])
    public.verify(utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                             int.from_bytes(signature[32:], "big")),
                  bytes(range(32)), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # Destroyed in the token by another process: refused within COPY_CHECK_SECONDS.
    assert report["after_delete"] == "KeyRefused", report
