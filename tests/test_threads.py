"""Many threads through one module instance initialized with C_Initialize(NULL).

python-pkcs11 passes NULL to C_Initialize and releases its own lock around every call, so
the module must stay thread-safe whatever the initialization arguments say.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key

THREADS = 8
SIGNATURES_PER_THREAD = 500


def test_eight_threads_sign_500_times_each(p11lib: Any, sandbox: dict[str, str]) -> None:
    token = p11lib.get_token(token_label=sandbox["P11GRID_TOKEN"])
    with token.open(user_pin=sandbox["P11GRID_PIN"]) as holder:
        ec_public = load_der_public_key(encode_ec_public_key(
            holder.get_key(ObjectClass.PUBLIC_KEY, label="vm-ec")))
        rsa_public = holder.get_key(ObjectClass.PUBLIC_KEY, label="vm-rsa")
        modulus = int.from_bytes(rsa_public[Attribute.MODULUS], "big")
        from cryptography.hazmat.primitives.asymmetric import rsa

        rsa_key = rsa.RSAPublicNumbers(65537, modulus).public_key()

        def work(index: int) -> list[tuple[bytes, bytes, str]]:
            # Each thread opens its own sessions; the login is the application's.
            with token.open() as session:
                ec_private = session.get_key(ObjectClass.PRIVATE_KEY, label="vm-ec")
                rsa_private = session.get_key(ObjectClass.PRIVATE_KEY, label="vm-rsa")
                done = []
                for n in range(SIGNATURES_PER_THREAD):
                    message = f"thread {index} signature {n}".encode()
                    if n % 25 == 0:
                        done.append((message, rsa_private.sign(
                            message, mechanism=Mechanism.SHA256_RSA_PKCS), "rsa"))
                    else:
                        done.append((message, ec_private.sign(
                            message, mechanism=Mechanism.ECDSA_SHA256), "ec"))
                return done

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            results = [s for batch in pool.map(work, range(THREADS)) for s in batch]

    assert len(results) == THREADS * SIGNATURES_PER_THREAD
    for message, signature, kind in results[::7]:  # a spread sample, every thread
        if kind == "rsa":
            rsa_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            half = len(signature) // 2
            der = utils.encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                             int.from_bytes(signature[half:], "big"))
            ec_public.verify(der, hashlib.sha256(message).digest(),
                             ec.ECDSA(utils.Prehashed(hashes.SHA256())))
