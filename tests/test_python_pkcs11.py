"""python-pkcs11 drives libp11grid.so in this process; cryptography judges every result."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.rsa import decode_rsa_public_key

MESSAGE = b"the private key lives in a remote grid of secure elements" * 7
HASH = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
MGF_OF = {"sha256": MGF.SHA256, "sha384": MGF.SHA384, "sha512": MGF.SHA512}
MECH_OF = {"sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384, "sha512": Mechanism.SHA512}
DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
}


@pytest.fixture(scope="module")
def session(p11lib: Any, sandbox: dict[str, str]) -> Iterator[Any]:
    token = p11lib.get_token(token_label=sandbox["P11GRID_TOKEN"])
    with token.open(user_pin=sandbox["P11GRID_PIN"]) as s:
        yield s


def private(session: Any, label: str) -> Any:
    return session.get_key(ObjectClass.PRIVATE_KEY, label=label)


def public(session: Any, label: str) -> Any:
    """The public key as cryptography sees it, read from the token's public key object."""
    key = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
    if key.key_type == KeyType.RSA:
        der = decode_rsa_public_key(pkcs11.util.rsa.encode_rsa_public_key(key))
        numbers = rsa.RSAPublicNumbers(int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(key[Attribute.MODULUS], "big"))
        del der
        return numbers.public_key()
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    return load_der_public_key(pkcs11.util.ec.encode_ec_public_key(key))


RSA_KEYS = ["vm-rsa", "t-rsa3072"]
EC_KEYS = [("vm-ec", "sha256"), ("t-ec384", "sha384")]


@pytest.mark.parametrize("label", RSA_KEYS)
@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512"])
def test_hash_and_sign_pkcs1(session: Any, label: str, name: str) -> None:
    mechanism = getattr(Mechanism, f"{name.upper()}_RSA_PKCS")
    signature = private(session, label).sign(MESSAGE, mechanism=mechanism)
    public(session, label).verify(signature, MESSAGE, padding.PKCS1v15(), HASH[name]())


@pytest.mark.parametrize("label", RSA_KEYS)
def test_raw_pkcs1_over_digest_info(session: Any, label: str) -> None:
    digest_info = DIGEST_INFO["sha256"] + hashlib.sha256(MESSAGE).digest()
    signature = private(session, label).sign(digest_info, mechanism=Mechanism.RSA_PKCS)
    public(session, label).verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("label", RSA_KEYS)
@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512"])
def test_hash_and_sign_pss(session: Any, label: str, name: str) -> None:
    mechanism = getattr(Mechanism, f"{name.upper()}_RSA_PKCS_PSS")
    salt = HASH[name].digest_size
    signature = private(session, label).sign(
        MESSAGE, mechanism=mechanism, mechanism_param=(MECH_OF[name], MGF_OF[name], salt))
    public(session, label).verify(
        signature, MESSAGE, padding.PSS(mgf=padding.MGF1(HASH[name]()), salt_length=salt),
        HASH[name]())


@pytest.mark.parametrize("name", ["sha256", "sha384"])
def test_raw_pss_over_hash(session: Any, name: str) -> None:
    digest = hashlib.new(name, MESSAGE).digest()
    signature = private(session, "vm-rsa").sign(
        digest, mechanism=Mechanism.RSA_PKCS_PSS,
        mechanism_param=(MECH_OF[name], MGF_OF[name], len(digest)))
    public(session, "vm-rsa").verify(
        signature, digest,
        padding.PSS(mgf=padding.MGF1(HASH[name]()), salt_length=len(digest)),
        utils.Prehashed(HASH[name]()))


def _der(signature: bytes) -> bytes:
    half = len(signature) // 2
    return utils.encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                      int.from_bytes(signature[half:], "big"))


@pytest.mark.parametrize(("label", "name"), EC_KEYS)
def test_raw_ecdsa(session: Any, label: str, name: str) -> None:
    digest = hashlib.new(name, MESSAGE).digest()
    signature = private(session, label).sign(digest, mechanism=Mechanism.ECDSA)
    public(session, label).verify(_der(signature), digest,
                                  ec.ECDSA(utils.Prehashed(HASH[name]())))


@pytest.mark.parametrize(("label", "_"), EC_KEYS)
@pytest.mark.parametrize("name", ["sha256", "sha384"])
def test_hash_and_sign_ecdsa(session: Any, label: str, _: str, name: str) -> None:
    mechanism = getattr(Mechanism, f"ECDSA_{name.upper()}")
    signature = private(session, label).sign(MESSAGE, mechanism=mechanism)
    public(session, label).verify(_der(signature), MESSAGE, ec.ECDSA(HASH[name]()))


@pytest.mark.parametrize(("label", "mechanism"), [
    ("vm-rsa", Mechanism.SHA256_RSA_PKCS), ("vm-ec", Mechanism.ECDSA_SHA256)])
def test_multi_part_sign_equals_single_part_message(session: Any, label: str,
                                                    mechanism: Any) -> None:
    chunks = [MESSAGE[i:i + 17] for i in range(0, len(MESSAGE), 17)]
    signature = private(session, label).sign(iter(chunks), mechanism=mechanism)
    key = public(session, label)
    if label == "vm-rsa":
        key.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    else:
        key.verify(_der(signature), MESSAGE, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("label", "mechanism", "param"), [
    ("vm-rsa", Mechanism.SHA256_RSA_PKCS, None),
    ("vm-rsa", Mechanism.SHA384_RSA_PKCS_PSS, (Mechanism.SHA384, MGF.SHA384, 48)),
    ("vm-ec", Mechanism.ECDSA_SHA256, None),
    ("t-ec384", Mechanism.ECDSA_SHA384, None),
])
def test_module_verifies_good_and_refuses_bad(session: Any, label: str, mechanism: Any,
                                              param: Any) -> None:
    signature = private(session, label).sign(MESSAGE, mechanism=mechanism,
                                              mechanism_param=param)
    key = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
    assert key.verify(MESSAGE, signature, mechanism=mechanism, mechanism_param=param)
    chunks = [MESSAGE[:10], MESSAGE[10:]]
    assert key.verify(iter(chunks), signature, mechanism=mechanism, mechanism_param=param)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not key.verify(MESSAGE, tampered, mechanism=mechanism, mechanism_param=param)
    assert not key.verify(MESSAGE + b"!", signature, mechanism=mechanism,
                          mechanism_param=param)


@pytest.mark.parametrize("label", RSA_KEYS)
def test_decrypt_pkcs1(session: Any, label: str) -> None:
    secret = os.urandom(48)
    ciphertext = public(session, label).encrypt(secret, padding.PKCS1v15())
    assert private(session, label).decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS) == secret


@pytest.mark.parametrize("label", RSA_KEYS)
@pytest.mark.parametrize(("name", "oaep_label"), [
    ("sha1", None), ("sha256", None), ("sha256", b"p11grid label"), ("sha384", b"x"),
    ("sha512", None)])
def test_decrypt_oaep(session: Any, label: str, name: str, oaep_label: bytes | None) -> None:
    algorithm = {"sha1": hashes.SHA1, **HASH}[name]
    mech = {"sha1": Mechanism.SHA_1, **MECH_OF}[name]
    mgf = {"sha1": MGF.SHA1, **MGF_OF}[name]
    secret = os.urandom(32)
    ciphertext = public(session, label).encrypt(secret, padding.OAEP(
        mgf=padding.MGF1(algorithm()), algorithm=algorithm(), label=oaep_label))
    plaintext = private(session, label).decrypt(
        ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(mech, mgf, oaep_label))
    assert plaintext == secret


@pytest.mark.parametrize("param", [(Mechanism.SHA256, MGF.SHA256, None),
                                   (Mechanism.SHA_1, MGF.SHA1, None)])
def test_decrypt_oaep_refuses_tampered_ciphertext(session: Any, param: Any) -> None:
    algorithm = hashes.SHA256 if param[0] == Mechanism.SHA256 else hashes.SHA1
    ciphertext = bytearray(public(session, "vm-rsa").encrypt(b"secret", padding.OAEP(
        mgf=padding.MGF1(algorithm()), algorithm=algorithm(), label=None)))
    ciphertext[-1] ^= 0x55
    with pytest.raises((pkcs11.exceptions.EncryptedDataInvalid, pkcs11.exceptions.DataInvalid)):
        private(session, "vm-rsa").decrypt(bytes(ciphertext), mechanism=Mechanism.RSA_PKCS_OAEP,
                                           mechanism_param=param)


def test_decrypt_oaep_wrong_label_is_refused(session: Any) -> None:
    ciphertext = public(session, "vm-rsa").encrypt(b"secret", padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"right"))
    with pytest.raises(pkcs11.exceptions.EncryptedDataInvalid):
        private(session, "vm-rsa").decrypt(
            ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=(Mechanism.SHA256, MGF.SHA256, b"wrong"))


@pytest.mark.parametrize("name", ["sha256", "sha384", "sha512"])
def test_digest(session: Any, name: str) -> None:
    assert session.digest(MESSAGE, mechanism=MECH_OF[name]) == hashlib.new(name, MESSAGE).digest()
    chunks = iter([MESSAGE[:5], MESSAGE[5:]])
    assert session.digest(chunks, mechanism=MECH_OF[name]) == hashlib.new(name, MESSAGE).digest()


def test_random(session: Any) -> None:
    first, second = session.generate_random(256), session.generate_random(256)
    assert len(first) == 32 and len(second) == 32 and first != second


def test_private_keys_are_sensitive_and_not_extractable(session: Any) -> None:
    key = private(session, "vm-rsa")
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        key[Attribute.PRIVATE_EXPONENT]
    with pytest.raises(pkcs11.exceptions.AttributeTypeInvalid):
        key[Attribute.CHECK_VALUE]


def test_certificates_are_objects(session: Any, sandbox: dict[str, str]) -> None:
    from cryptography import x509

    certificates = {c[Attribute.LABEL]: c for c in
                    session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE})}
    assert {"vm-rsa", "vm-ec"} <= set(certificates)
    certificate = x509.load_der_x509_certificate(certificates["vm-rsa"][Attribute.VALUE])
    assert certificate.public_key().public_numbers() == public(session, "vm-rsa").public_numbers()
    assert certificates["vm-rsa"][Attribute.ID] == private(session, "vm-rsa")[Attribute.ID]


def test_find_objects_by_template(session: Any) -> None:
    def labels(template: dict[Any, Any]) -> set[str]:
        return {o[Attribute.LABEL] for o in session.get_objects(template)}

    assert labels({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC}) \
        == {"vm-ec", "t-ec384"}
    assert labels({Attribute.ID: b"\x01"}) == {"vm-rsa"}
    assert labels({Attribute.LABEL: "vm-ec", Attribute.PRIVATE: True}) == {"vm-ec"}
    assert labels({Attribute.TOKEN: True, Attribute.LABEL: "nothing-like-this"}) == set()
    handles = [o.handle for o in session.get_objects({Attribute.LABEL: "vm-rsa"})]
    assert handles == [o.handle for o in session.get_objects({Attribute.LABEL: "vm-rsa"})]


def test_signature_invalid_inputs_are_refused(session: Any) -> None:
    with pytest.raises(pkcs11.exceptions.DataLenRange):
        private(session, "vm-rsa").sign(b"x" * 300, mechanism=Mechanism.RSA_PKCS)
    with pytest.raises(pkcs11.exceptions.MechanismInvalid):
        private(session, "vm-rsa").sign(MESSAGE, mechanism=Mechanism.MD5_RSA_PKCS)
    with pytest.raises(pkcs11.exceptions.KeyTypeInconsistent):
        private(session, "vm-ec").sign(MESSAGE, mechanism=Mechanism.SHA256_RSA_PKCS)
    with pytest.raises(InvalidSignature):
        public(session, "vm-rsa").verify(b"\x00" * 256, MESSAGE, padding.PKCS1v15(),
                                         hashes.SHA256())
