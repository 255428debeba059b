"""The result container (idm/container.py): round trips, and every refusal with its reason."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idm.container import (
    MAX_CONTEXT_LEN,
    MAX_RESULT_LEN,
    ContainerRefused,
    Signer,
    SoftwareAuthority,
    SoftwareUnwrapper,
    Unwrapper,
    pack,
    unpack,
)

# Keys are made once: RSA generation dominates the run time otherwise.
HV_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_HV_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_AUTHORITY_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_AUTHORITY_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_AUTHORITY_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

EC_AUTHORITY = SoftwareAuthority(EC_AUTHORITY_KEY)
RSA_AUTHORITY = SoftwareAuthority(RSA_AUTHORITY_KEY)
HV = SoftwareUnwrapper(HV_KEY)
CONTEXT = b"req-42|C_Sign|spiffe://example.org/vm/vm-1"

# Offsets into a version-1 container made with a 2048-bit HV key (header 256 bytes).
HEADER_ID_AT = 5
HEADER_AT = 8
IV_AT = HEADER_AT + 256
BODY_LEN_AT = IV_AT + 16
BODY_AT = BODY_LEN_AT + 4


class RecordingUnwrapperDouble:
    """Test double for `Unwrapper`: delegates to the real key and records every call, so a
    test can show that a refused container never reached the HV key."""

    def __init__(self, real: Unwrapper = HV) -> None:
        self.real = real
        self.calls: list[str] = []

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes:
        self.calls.append(header_algorithm)
        return self.real.decrypt(header_algorithm, wrapped_key)


class FixedSignerDouble:
    """Test double for `Signer`: claims an algorithm and answers fixed bytes."""

    def __init__(self, algorithm: str, signature: bytes) -> None:
        self.algorithm = algorithm
        self._signature = signature

    def sign(self, data: bytes) -> bytes:
        return self._signature


def make(result: bytes = b"signature bytes", *,
         hv_public_key: rsa.RSAPublicKey | None = None, authority: Signer = EC_AUTHORITY,
         context: bytes = CONTEXT, header_algorithm: str = "rsa-oaep-sha256") -> bytes:
    public = hv_public_key if hv_public_key is not None else HV_KEY.public_key()
    return pack(result, public, authority, context,
                header_algorithm=header_algorithm)  # type: ignore[arg-type]


def body_end(container: bytes) -> int:
    (body_len,) = struct.unpack_from(">I", container, BODY_LEN_AT)
    return BODY_AT + body_len


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[index] ^= mask
    return bytes(changed)


def refused(container: bytes, *, hv: Unwrapper = HV,
            authority: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None = None,
            context: bytes = CONTEXT, allow_pkcs1v15: bool = False) -> str:
    public = authority if authority is not None else EC_AUTHORITY_KEY.public_key()
    with pytest.raises(ContainerRefused) as caught:
        unpack(container, hv, public, context, allow_pkcs1v15=allow_pkcs1v15)
    return caught.value.reason


# --- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("result", [b"", b"\x00", b"x" * 15, b"y" * 16, b"z" * 17,
                                    bytes(range(256)) * 4096],
                         ids=["empty", "one-byte", "15", "16", "17", "1MiB"])
def test_round_trip_sizes(result: bytes) -> None:
    assert len(result) <= MAX_RESULT_LEN
    assert unpack(make(result), HV, EC_AUTHORITY_KEY.public_key(), CONTEXT) == result


def test_round_trip_at_the_cap_and_refusal_past_it() -> None:
    result = b"\xa5" * MAX_RESULT_LEN
    assert unpack(make(result), HV, EC_AUTHORITY_KEY.public_key(), CONTEXT) == result
    with pytest.raises(ValueError, match="at most"):
        make(result + b"!")


def test_round_trip_rsa_pss_authority() -> None:
    container = make(b"hello", authority=RSA_AUTHORITY)
    assert unpack(container, HV, RSA_AUTHORITY_KEY.public_key(), CONTEXT) == b"hello"
    assert container[body_end(container)] == 2  # trailer id: rsa-pss-sha256


def test_round_trip_ecdsa_authority_layout() -> None:
    container = make(b"hello")
    assert container[:6] == b"P11C\x01\x01"  # magic, version 1, rsa-oaep-sha256
    assert container[body_end(container)] == 1  # trailer id: ecdsa-p256-sha256


def test_round_trip_pkcs1v15_when_enabled() -> None:
    container = make(b"legacy", header_algorithm="rsa-pkcs1v15")
    assert container[HEADER_ID_AT] == 2
    assert unpack(container, HV, EC_AUTHORITY_KEY.public_key(), CONTEXT,
                  allow_pkcs1v15=True) == b"legacy"


def test_each_pack_is_fresh() -> None:
    first, second = make(b"same"), make(b"same")
    assert first[HEADER_AT:BODY_AT] != second[HEADER_AT:BODY_AT]  # new key and IV each time


# --- refusals ------------------------------------------------------------------------------

def test_pkcs1v15_refused_without_opt_in_before_unwrapping() -> None:
    spy = RecordingUnwrapperDouble()
    reason = refused(make(b"legacy", header_algorithm="rsa-pkcs1v15"), hv=spy)
    assert reason == "PKCS#1 v1.5 header refused: compatibility mode not enabled"
    assert spy.calls == []


@pytest.mark.parametrize("where", ["header", "iv", "body", "body-last-block"])
def test_tampered_ciphertext_refused_before_decryption(where: str) -> None:
    container = make(b"a result of some length, more than one block")
    index = {"header": HEADER_AT + 7, "iv": IV_AT + 3, "body": BODY_AT,
             "body-last-block": body_end(container) - 1}[where]
    spy = RecordingUnwrapperDouble()
    assert refused(flip(container, index), hv=spy) == "signature does not verify"
    assert spy.calls == []


def test_tampered_signature_refused() -> None:
    container = make(b"result")
    last = len(container) - 1
    reason = refused(flip(container, last))
    assert reason in ("signature does not verify", "signature is not canonical DER")
    rsa_container = make(b"result", authority=RSA_AUTHORITY)
    reason = refused(flip(rsa_container, len(rsa_container) - 1),
                     authority=RSA_AUTHORITY_KEY.public_key())
    assert reason == "signature does not verify"


def test_downgrade_of_header_algorithm_refused() -> None:
    # Relabel an OAEP header as PKCS#1 v1.5; even with compatibility mode on, the
    # signature covers the id, so the HV key is never asked.
    container = make(b"result")
    downgraded = bytearray(container)
    downgraded[HEADER_ID_AT] = 2
    spy = RecordingUnwrapperDouble()
    assert refused(bytes(downgraded), hv=spy, allow_pkcs1v15=True) == "signature does not verify"
    assert spy.calls == []


def test_swapped_trailer_algorithm_refused() -> None:
    container = bytearray(make(b"result"))
    container[body_end(bytes(container))] = 2  # claims RSA-PSS; the ECDSA key disagrees
    assert refused(bytes(container)).startswith("signature length")


def test_unknown_algorithm_ids_refused() -> None:
    container = make(b"result")
    header_bad = bytearray(container)
    header_bad[HEADER_ID_AT] = 9
    assert refused(bytes(header_bad)) == "unknown header algorithm id 9"
    trailer_bad = bytearray(container)
    trailer_bad[body_end(container)] = 0
    assert refused(bytes(trailer_bad)) == "unknown trailer algorithm id 0"


def test_unknown_version_and_magic_refused() -> None:
    container = make(b"result")
    assert refused(flip(container, 4, 0x02)) == "unsupported version 3"
    assert refused(b"XXXX" + container[4:]) == "not a result container (bad magic)"


def test_replay_for_another_request_refused() -> None:
    container = make(b"result")
    spy = RecordingUnwrapperDouble()
    other = b"req-43|C_Sign|spiffe://example.org/vm/vm-1"
    assert refused(container, hv=spy, context=other) == "signature does not verify"
    assert spy.calls == []


def test_context_length_enforced() -> None:
    container = make(b"result")
    assert refused(container, context=b"").startswith("context is 0 bytes")
    assert refused(container, context=b"c" * (MAX_CONTEXT_LEN + 1)).startswith("context is")
    with pytest.raises(ValueError, match="context"):
        make(b"result", context=b"")


@pytest.mark.parametrize("cut", [0, 3, 5, 7, HEADER_AT + 10, IV_AT + 5, BODY_LEN_AT + 2,
                                 BODY_AT + 1, -70, -2, -1])
def test_truncated_refused(cut: int) -> None:
    container = make(b"result")
    assert refused(container[:cut]).startswith(("truncated", "signature length"))


def test_trailing_garbage_refused() -> None:
    assert refused(make(b"result") + b"\x00") == "1 trailing bytes"
    assert refused(make(b"result") + b"junk") == "4 trailing bytes"


def test_bad_lengths_refused() -> None:
    container = make(b"result")
    short_header = bytearray(container)
    struct.pack_into(">H", short_header, 6, 255)
    assert refused(bytes(short_header)) == "header length 255 outside 256..1024"
    odd_body = bytearray(container)
    struct.pack_into(">I", odd_body, BODY_LEN_AT, 17)
    assert refused(bytes(odd_body)).startswith("body length 17 is not a multiple of 16")
    huge_body = bytearray(container)
    struct.pack_into(">I", huge_body, BODY_LEN_AT, 1 << 31)
    assert refused(bytes(huge_body)).startswith("body length 2147483648")
    empty_body = bytearray(container)
    struct.pack_into(">I", empty_body, BODY_LEN_AT, 0)
    assert refused(bytes(empty_body)).startswith("body length 0")


def test_wrong_authority_key_refused() -> None:
    container = make(b"result")
    spy = RecordingUnwrapperDouble()
    assert refused(container, hv=spy, authority=OTHER_EC_AUTHORITY_KEY.public_key()) == \
        "signature does not verify"
    assert refused(container, hv=spy, authority=RSA_AUTHORITY_KEY.public_key()) == \
        "trailer algorithm ecdsa-p256-sha256 does not match the authority key (rsa-pss-sha256)"
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert refused(container, hv=spy, authority=p384) == \
        "authority key is neither EC P-256 nor RSA 2048..8192"
    assert spy.calls == []


def test_wrong_hv_key_refused() -> None:
    spy = RecordingUnwrapperDouble(SoftwareUnwrapper(OTHER_HV_KEY))
    assert refused(make(b"result"), hv=spy) == "HV key could not unwrap the header"
    assert spy.calls == ["rsa-oaep-sha256"]  # got this far only because the signature held


class _ShortKeyUnwrapperDouble:
    """Test double: an element that answers a key of the wrong length."""

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes:
        return b"\x00" * 16


class _WrongKeyUnwrapperDouble:
    """Test double: an element that answers a well-sized but wrong AES key."""

    def decrypt(self, header_algorithm: str, wrapped_key: bytes) -> bytes:
        return b"\x11" * 32


def test_unwrapped_key_length_checked() -> None:
    assert refused(make(b"result"), hv=_ShortKeyUnwrapperDouble()) == \
        "unwrapped key is 16 bytes, want 32"


def test_bad_padding_refused_without_detail() -> None:
    # A wrong AES key decrypts to noise; the reason names no byte. Tried over several
    # containers since noise ends in valid padding (b"\x01") about 1 time in 256.
    reasons = set()
    for i in range(8):
        try:
            unpack(make(bytes([i]) * 40), _WrongKeyUnwrapperDouble(),
                   EC_AUTHORITY_KEY.public_key(), CONTEXT)
        except ContainerRefused as refusal:
            reasons.add(refusal.reason)
    assert reasons == {"body padding is invalid"}


def test_non_canonical_ecdsa_der_refused() -> None:
    container = make(b"result")
    while len(container) - body_end(container) - 3 > 71:  # room for one more byte
        container = make(b"result")
    end = body_end(container)
    signature = container[end + 3:]
    # Same (r, s) with a long-form length byte: valid BER, not DER.
    ber = b"\x30\x81" + signature[1:]
    forged = container[:end + 1] + struct.pack(">H", len(ber)) + ber
    assert refused(forged) == "signature is not canonical DER"


# --- pack arguments ------------------------------------------------------------------------

def test_pack_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown header algorithm"):
        make(header_algorithm="rsa-oaep-md5")
    with pytest.raises(ValueError, match="1024 bits"):
        make(hv_public_key=rsa.generate_private_key(65537, 1024).public_key())
    with pytest.raises(TypeError):
        make(hv_public_key=EC_AUTHORITY_KEY.public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown trailer algorithm"):
        make(authority=FixedSignerDouble("ed25519", b"\x00" * 64))
    with pytest.raises(ValueError, match="signer returned 64 bytes"):
        make(authority=FixedSignerDouble("rsa-pss-sha256", b"\x00" * 64))
    raw_rs = b"\x01" * 64  # PKCS#11 CKM_ECDSA answers r||s, not DER
    with pytest.raises(ValueError, match="not canonical DER"):
        make(authority=FixedSignerDouble("ecdsa-p256-sha256", raw_rs))
    with pytest.raises(ValueError, match="P-256"):
        SoftwareAuthority(ec.generate_private_key(ec.SECP384R1()))


# --- properties ----------------------------------------------------------------------------

_FAST = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(result=st.binary(max_size=600), context=st.binary(min_size=1, max_size=64),
       rsa_authority=st.booleans())
def test_property_round_trip(result: bytes, context: bytes, rsa_authority: bool) -> None:
    authority = RSA_AUTHORITY if rsa_authority else EC_AUTHORITY
    public = (RSA_AUTHORITY_KEY if rsa_authority else EC_AUTHORITY_KEY).public_key()
    container = pack(result, HV_KEY.public_key(), authority, context)
    assert unpack(container, HV, public, context) == result


# One container, flipped everywhere: the bit index is drawn over its whole length.
_FLIP_BASE = make(b"flip me: a result spanning blocks" * 2)


@settings(max_examples=400, deadline=None)
@given(bit=st.integers(min_value=0, max_value=len(_FLIP_BASE) * 8 - 1))
def test_property_any_single_bit_flip_refused(bit: int) -> None:
    spy = RecordingUnwrapperDouble()
    flipped = flip(_FLIP_BASE, bit // 8, 1 << (bit % 8))
    with pytest.raises(ContainerRefused):
        unpack(flipped, spy, EC_AUTHORITY_KEY.public_key(), CONTEXT)
    assert spy.calls == []  # every flip is caught by the parser or the signature


@settings(max_examples=60, deadline=None)
@given(context_bit=st.integers(min_value=0, max_value=len(CONTEXT) * 8 - 1))
def test_property_any_context_bit_flip_refused(context_bit: int) -> None:
    other = flip(CONTEXT, context_bit // 8, 1 << (context_bit % 8))
    with pytest.raises(ContainerRefused, match="signature does not verify"):
        unpack(_FLIP_BASE, HV, EC_AUTHORITY_KEY.public_key(), other)


def test_every_single_bit_flip_of_the_signed_fields_is_refused() -> None:
    # Exhaustive over the fixed-layout prefix (magic to the start of the body).
    spy = RecordingUnwrapperDouble()
    for bit in range(BODY_AT * 8):
        refused(flip(_FLIP_BASE, bit // 8, 1 << (bit % 8)), hv=spy)
    assert spy.calls == []


def test_oaep_sha1_header_round_trip() -> None:
    """For HV elements whose OAEP is SHA-1 only (SoftHSM2)."""
    container = make(b"result", header_algorithm="rsa-oaep-sha1")
    assert container[HEADER_ID_AT] == 3
    assert unpack(container, SoftwareUnwrapper(HV_KEY), EC_AUTHORITY_KEY.public_key(),
                  CONTEXT) == b"result"
