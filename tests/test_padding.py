"""The module's own RSA encodings (used when an element does raw RSA only), judged by
cryptography: blocks we encode must verify, blocks cryptography encrypts must decode, and
junk must be refused with CKR_ENCRYPTED_DATA_INVALID and nothing else.

The padding functions take the MGF1 hash as a hash mechanism (CKM_SHA256), as the
operations pass it after looking up CKG_MGF1_*.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from provider.constants import CKM, CKR
from provider.mechanisms import HASHES
from provider.padding import emsa_pkcs1_v15, emsa_pss, oaep_decode, pkcs1_v15_decode
from provider.return_values import CKRError

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NUMBERS = KEY.private_numbers()
N, D, K = NUMBERS.public_numbers.n, NUMBERS.d, 256
HASH_OF = {CKM.SHA_1: hashes.SHA1, CKM.SHA256: hashes.SHA256, CKM.SHA384: hashes.SHA384,
           CKM.SHA512: hashes.SHA512}


def raw(block: bytes) -> bytes:
    """What an element's CKM_RSA_X_509 does with the private key."""
    return pow(int.from_bytes(block, "big"), D, N).to_bytes(K, "big")


@pytest.mark.parametrize("mechanism", list(HASH_OF))
@pytest.mark.parametrize("label", [b"", b"a label"])
def test_oaep_decodes_what_cryptography_encrypts(mechanism: int, label: bytes) -> None:
    algorithm = HASH_OF[mechanism]()
    ciphertext = KEY.public_key().encrypt(b"secret", padding.OAEP(
        mgf=padding.MGF1(algorithm), algorithm=algorithm, label=label or None))
    assert oaep_decode(raw(ciphertext), K, mechanism, mechanism, label) == b"secret"


def test_oaep_refuses_wrong_label_and_wrong_hash() -> None:
    ciphertext = KEY.public_key().encrypt(b"secret", padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"right"))
    for mechanism, label in ((CKM.SHA256, b"wrong"), (CKM.SHA384, b"right")):
        with pytest.raises(CKRError) as refusal:
            oaep_decode(raw(ciphertext), K, mechanism, mechanism, label)
        assert refusal.value.rv == CKR.ENCRYPTED_DATA_INVALID


def test_pkcs1_decodes_what_cryptography_encrypts() -> None:
    for message in (b"", b"x", b"y" * 245):
        ciphertext = KEY.public_key().encrypt(message, padding.PKCS1v15())
        assert pkcs1_v15_decode(raw(ciphertext), K) == message


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=K))
def test_junk_blocks_are_refused_cleanly(block: bytes) -> None:
    for decode in (lambda b: oaep_decode(b, K, CKM.SHA256, CKM.SHA256, b""),
                   lambda b: pkcs1_v15_decode(b, K)):
        try:
            decode(block)
        except CKRError as refusal:
            assert refusal.rv == CKR.ENCRYPTED_DATA_INVALID


def test_pkcs1_refuses_short_padding() -> None:
    block = b"\x00\x02" + b"\x01" * 5 + b"\x00" + b"m" * (K - 8)
    with pytest.raises(CKRError):
        pkcs1_v15_decode(block, K)


@pytest.mark.parametrize("mechanism", [CKM.SHA256, CKM.SHA384, CKM.SHA512])
def test_pss_blocks_verify(mechanism: int) -> None:
    digest = hashlib.new(HASHES[mechanism].name, b"message").digest()
    block = emsa_pss(digest, 2048, mechanism, mechanism, len(digest))
    algorithm = HASH_OF[mechanism]()
    KEY.public_key().verify(raw(block), digest, padding.PSS(
        mgf=padding.MGF1(algorithm), salt_length=len(digest)), Prehashed(algorithm))


def test_pkcs1_signature_blocks_verify() -> None:
    digest = hashlib.sha256(b"message").digest()
    block = emsa_pkcs1_v15(HASHES[CKM.SHA256].digest_info_prefix + digest, K)
    KEY.public_key().verify(raw(block), b"message", padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(CKRError):
        emsa_pkcs1_v15(b"x" * (K - 10), K)
