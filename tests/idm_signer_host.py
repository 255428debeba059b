"""Runs idm.pkcs11_signer scenarios in a process of their own and prints JSON.

python-pkcs11 loads a library once per process and SoftHSM2 reads SOFTHSM2_CONF once, at
initialisation; the pytest process already holds SoftHSM2 and our module for other tests.
So tests/test_idm_pkcs11.py starts this script with a spec (JSON in argv[1]) and checks
what it prints: public keys, signatures and errors, verified there with `cryptography`.
SOFTHSM2_CONF is deliberately *not* in this process's environment: the signer's
`environment` argument has to put it there.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from idm.pkcs11_signer import Pkcs11Signer, SignerError, generate_key_pair
from idm.pkcs11_uri import parse_pkcs11_uri, resolve_pin

TBS = bytes(range(256)) * 3  # stands in for a TBSCertificate / CertificationRequestInfo


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def describe(signer: Pkcs11Signer) -> dict[str, Any]:
    header = b64url(json.dumps({"alg": signer.jws_algorithm, "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "spiffe://example.org/vm/vm1"}).encode())
    signing_input = f"{header}.{payload}"
    jws = signer.sign_jws(signing_input.encode())
    return {
        "alg": signer.jws_algorithm,
        "spki": signer.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo).hex(),
        "jwt": f"{signing_input}.{b64url(jws)}",
        "jws_length": len(jws),
        "tbs": TBS.hex(),
        "x509_signature": signer.sign_x509(TBS).hex(),
        "repr": repr(signer),
    }


def failure(action: Callable[[], object]) -> dict[str, Any]:
    try:
        action()
    except SignerError as exc:
        return {"type": type(exc).__name__,
                "bases": [cls.__name__ for cls in type(exc).__mro__],
                "message": str(exc)}
    return {"type": None}


def main_phase(spec: dict[str, Any]) -> dict[str, Any]:
    module, pin = Path(spec["module"]), spec["pin"]
    env = {"SOFTHSM2_CONF": spec["conf"]}
    out: dict[str, Any] = {"keys": {}, "errors": {}}

    def uri(text: str) -> Any:
        return parse_pkcs11_uri(text)

    generated = {
        "ec256": "pkcs11:token=t1;object=k-ec256",  # id derived from the label
        "ec384": "pkcs11:token=t1;object=k-ec384;id=%38%34",
        "rsa2048": "pkcs11:token=t1;object=k-rsa;id=%52%53%41",
    }
    for kind, text in generated.items():
        generate_key_pair(module, uri(text), pin, kind, env)
    for kind, text in generated.items():
        with Pkcs11Signer(module, uri(text + ";type=private"), pin, env) as signer:
            out["keys"][kind] = describe(signer)

    # A key pkcs11-tool made (not us), and the PIN from the URI's pin-source.
    pin_uri = uri(f"pkcs11:token=t1;object=ext-ec?pin-source=file:{spec['pin_file']}")
    with Pkcs11Signer(module, pin_uri, resolve_pin(pin_uri, None)) as signer:
        out["keys"]["ext-ec"] = describe(signer)

    # Two signers on one token share the process's login: closing one keeps the other
    # working, and a different PIN is refused while the login is held.
    first = Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256"), pin)
    second = Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-rsa"), pin)
    out["errors"]["wrong_pin_while_logged_in"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec384"), spec["wrong_pin"]))
    first.close()
    second.sign_jws(b"still logged in")
    second.close()
    out["shared_login"] = "ok"
    out["errors"]["closed"] = failure(lambda: second.sign_jws(b"closed"))

    errors = out["errors"]
    errors["wrong_pin"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256"), spec["wrong_pin"]))
    errors["unknown_object"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=nope"), pin))
    errors["unknown_id"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256;id=%FF"), pin))
    errors["no_pin"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256"), None))
    errors["type_cert"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256;type=cert"), pin))
    errors["key_ambiguous"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=dup"), pin))
    errors["unsupported_curve"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=ec521"), pin))
    errors["token_missing"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=nope;object=k-ec256"), pin))
    errors["token_ambiguous"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=twin;object=k"), pin))
    errors["module_missing"] = failure(
        lambda: Pkcs11Signer(Path("/nonexistent/libnope.so"), uri("pkcs11:token=t1"), pin))
    errors["environment_changed"] = failure(
        lambda: Pkcs11Signer(module, uri("pkcs11:token=t1;object=k-ec256"), pin,
                             {"SOFTHSM2_CONF": "/elsewhere/softhsm2.conf"}))
    errors["exists_label"] = failure(
        lambda: generate_key_pair(module, uri("pkcs11:token=t1;object=k-ec256"), pin, "ec256"))
    errors["exists_id"] = failure(
        lambda: generate_key_pair(module, uri("pkcs11:token=t1;object=fresh;id=%38%34"), pin,
                                  "ec384"))
    errors["generate_wrong_pin"] = failure(
        lambda: generate_key_pair(module, uri("pkcs11:token=t1;object=fresh"),
                                  spec["wrong_pin"], "ec256"))
    errors["generate_no_object"] = failure(
        lambda: generate_key_pair(module, uri("pkcs11:token=t1"), pin, "ec256"))
    errors["generate_bad_kind"] = failure(
        lambda: generate_key_pair(module, uri("pkcs11:token=t1;object=fresh"), pin, "ec521"))
    return out


def fallback_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """After the test removed public-key objects: the public half comes from a certificate
    (EC) or from the private key's modulus (RSA)."""
    module, pin = Path(spec["module"]), spec["pin"]
    env = {"SOFTHSM2_CONF": spec["conf"]}
    out: dict[str, Any] = {"keys": {}}
    for name, text in (("ec384", "pkcs11:token=t1;object=k-ec384"),
                       ("rsa2048", "pkcs11:token=t1;object=k-rsa")):
        with Pkcs11Signer(module, parse_pkcs11_uri(text), pin, env) as signer:
            out["keys"][name] = describe(signer)
    return out


def main() -> int:
    spec = json.loads(sys.argv[1])
    phase = {"main": main_phase, "fallback": fallback_phase}[spec["phase"]]
    print(json.dumps(phase(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
