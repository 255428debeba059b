"""An element that only does raw RSA and raw ECDSA (as a PIV card does): the module composes
PKCS#1 v1.5, PSS, OAEP and hash-and-sign itself. Real SoftHSM2, restricted by the module
config's `mechanisms`, in a fresh process; cryptography judges the results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import hashlib, os, sys
import pkcs11
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

lib = pkcs11.lib(os.environ["P11GRID_MODULE"])
token = lib.get_token(token_label=os.environ["P11GRID_TOKEN"])
message = b"composed in the module"
with token.open(user_pin=os.environ["P11GRID_PIN"]) as s:
    rsa_private = s.get_key(ObjectClass.PRIVATE_KEY, label="vm-rsa")
    rsa_public_object = s.get_key(ObjectClass.PUBLIC_KEY, label="vm-rsa")
    public = rsa.RSAPublicNumbers(
        int.from_bytes(rsa_public_object[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(rsa_public_object[Attribute.MODULUS], "big")).public_key()
    signature = rsa_private.sign(message, mechanism=Mechanism.SHA384_RSA_PKCS)
    public.verify(signature, message, padding.PKCS1v15(), hashes.SHA384())
    signature = rsa_private.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                                 mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
    public.verify(signature, message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                  salt_length=32), hashes.SHA256())
    ciphertext = public.encrypt(b"secret", padding.OAEP(
        mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))
    assert rsa_private.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                               mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None)) == b"secret"
    ciphertext = public.encrypt(b"secret", padding.PKCS1v15())
    assert rsa_private.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS) == b"secret"
    ec_private = s.get_key(ObjectClass.PRIVATE_KEY, label="vm-ec")
    signature = ec_private.sign(message, mechanism=Mechanism.ECDSA_SHA384)
    assert len(signature) == 64
print("composed: ok")
'''


def test_raw_only_element(sandbox: dict[str, str], sandbox_environ: dict[str, str],
                          tmp_path: Path) -> None:
    original = Path(sandbox["P11GRID_LOCAL_CONF"]).read_text()
    assert "[secure_element.environment]" in original
    restricted = original.replace(
        "[secure_element.environment]",
        'mechanisms = ["RSA_X_509", "ECDSA"]\n[secure_element.environment]')
    config = tmp_path / "raw-only.toml"
    config.write_text(restricted.replace(
        str(Path(sandbox["P11GRID_SANDBOX"]) / "p11grid.log"), str(tmp_path / "raw.log")))
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            env={**sandbox_environ, "P11GRID_CONF": str(config)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "composed: ok" in result.stdout
