"""RSA encodings done in the module when the element only does raw RSA (RFC 8017).

Decoding of decrypted blocks avoids data-dependent branches and early exits so that the
time taken does not tell a padding oracle where the block went wrong; the one branch on
the combined verdict comes last.
"""

from __future__ import annotations

import os

from provider.constants import CKR
from provider.mechanisms import HASHES, new_hash
from provider.return_values import CKRError


def mgf1(seed: bytes, length: int, hash_mechanism: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        h = new_hash(hash_mechanism)
        h.update(seed + counter.to_bytes(4, "big"))
        out += h.digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def emsa_pkcs1_v15(payload: bytes, k: int) -> bytes:
    """Block type 1 padding of `payload` (a DigestInfo, or raw data for CKM_RSA_PKCS)."""
    if len(payload) > k - 11:
        raise CKRError(CKR.DATA_LEN_RANGE, f"{len(payload)} bytes do not fit a {k}-byte key")
    return b"\x00\x01" + b"\xff" * (k - 3 - len(payload)) + b"\x00" + payload


def emsa_pss(m_hash: bytes, modulus_bits: int, hash_mechanism: int, mgf_hash: int,
             salt_length: int) -> bytes:
    """EMSA-PSS-ENCODE over an already computed message hash, as a k-byte block."""
    h_len = HASHES[hash_mechanism].size
    if len(m_hash) != h_len:
        raise CKRError(CKR.DATA_LEN_RANGE, f"PSS input must be a {h_len}-byte hash")
    em_bits = modulus_bits - 1
    em_len = (em_bits + 7) // 8
    if em_len < h_len + salt_length + 2:
        raise CKRError(CKR.MECHANISM_PARAM_INVALID, "salt too long for this key")
    salt = os.urandom(salt_length)
    h = new_hash(hash_mechanism)
    h.update(b"\x00" * 8 + m_hash + salt)
    digest = h.digest()
    db = b"\x00" * (em_len - salt_length - h_len - 2) + b"\x01" + salt
    masked = bytearray(_xor(db, mgf1(digest, em_len - h_len - 1, mgf_hash)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + digest + b"\xbc"
    k = (modulus_bits + 7) // 8
    return b"\x00" * (k - em_len) + em


def _ct_eq(a: int, b: int) -> int:
    """1 if a == b else 0, for small non-negative ints, without a branch."""
    x = a ^ b
    return ((x - 1) >> 63) & 1 if x < (1 << 62) else 0


def oaep_decode(block: bytes, k: int, hash_mechanism: int, mgf_hash: int,
                label: bytes) -> bytes:
    """EME-OAEP decoding of the raw RSA output `block` (k bytes)."""
    h_len = HASHES[hash_mechanism].size
    if k < 2 * h_len + 2 or len(block) > k:
        raise CKRError(CKR.ENCRYPTED_DATA_INVALID, "decryption error")
    em = block.rjust(k, b"\x00")
    l_hash = new_hash(hash_mechanism)
    l_hash.update(label)
    expected_l_hash = l_hash.digest()
    y, masked_seed, masked_db = em[0], em[1:1 + h_len], em[1 + h_len:]
    seed = _xor(masked_seed, mgf1(masked_db, h_len, mgf_hash))
    db = _xor(masked_db, mgf1(seed, k - h_len - 1, mgf_hash))
    import hmac

    good = _ct_eq(y, 0) & int(hmac.compare_digest(db[:h_len], expected_l_hash))
    # Find the 0x01 separator after the zero padding, looking at every byte.
    looking, index, bad_byte = 1, 0, 0
    for i in range(h_len, len(db)):
        byte = db[i]
        is_one, is_zero = _ct_eq(byte, 1), _ct_eq(byte, 0)
        index |= i * (looking & is_one)
        bad_byte |= looking & (1 - is_one) & (1 - is_zero)
        looking &= 1 - is_one
    good &= (1 - looking) & (1 - bad_byte)
    if not good:
        raise CKRError(CKR.ENCRYPTED_DATA_INVALID, "decryption error")
    return db[index + 1:]


def pkcs1_v15_decode(block: bytes, k: int) -> bytes:
    """EME-PKCS1-v1_5 decoding (block type 2) of the raw RSA output `block`."""
    if len(block) > k or k < 11:
        raise CKRError(CKR.ENCRYPTED_DATA_INVALID, "decryption error")
    em = block.rjust(k, b"\x00")
    good = _ct_eq(em[0], 0) & _ct_eq(em[1], 2)
    looking, index = 1, 0
    for i in range(2, k):
        is_zero = _ct_eq(em[i], 0)
        index |= i * (looking & is_zero)
        looking &= 1 - is_zero
    # At least 8 padding bytes, and a separator was found.
    good &= (1 - looking) & (1 - _ct_eq(min(index, 10) // 10, 0))
    if not good:
        raise CKRError(CKR.ENCRYPTED_DATA_INVALID, "decryption error")
    return em[index + 1:]
