"""Key generation on a PIV card: the driver's generate_key and `p11grid grid keygen`.

Every card here is a fresh virtual PIV card (grid_backend/virtual_piv) of this test's own,
issued without keys. The driver tests reach it through a direct in-process link (below);
the CLI test through pcscd and vpcd in a network namespace of its own, as tests/test_piv.py
does, with the CLI and every PC/SC user in subprocesses: libpcsclite picks its socket once
per process, and this pytest process may already have picked another test's pcscd.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID
from pkcs11.constants import Attribute, ObjectClass
from pkcs11.mechanisms import Mechanism

from grid_backend.elements.piv_card import (
    ManagementKeyRefused,
    PivCard,
    self_signed_certificate,
)
from grid_backend.registry import SqliteRegistry
from grid_backend.secure_element import (
    ElementFailure,
    ElementObject,
    KeyRefused,
    NotLoggedIn,
    PinIncorrect,
)
from grid_backend.virtual_piv.applet import PivApplet
from grid_backend.virtual_piv.issue import initialize_card, parse_key_requests
from grid_backend.virtual_piv.launcher import (
    LauncherFailed,
    client_socket,
    launch,
    missing_requirements,
    stop,
    wait_until_ready,
)
from grid_backend.virtual_piv.state import CardState

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PIN = "123456"
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class DirectAppletLink:
    """A direct in-process link to a virtual PIV card: each APDU goes straight to
    PivApplet.process, the card application tests/test_piv.py also reaches over PC/SC and
    OpenSC. No PC/SC in between; every exchange is kept."""

    name = "direct in-process link"

    def __init__(self, directory: Path) -> None:
        self.card = PivApplet(CardState.load(directory))
        self.exchanges: list[tuple[bytes, bytes]] = []

    def connect(self) -> bytes:
        if not self.card.powered:
            self.card.power_on()
        return b"\x3b"

    def transmit(self, apdu: bytes) -> bytes:
        response = self.card.process(apdu)
        self.exchanges.append((apdu, response))
        return response

    def reset(self, warm: bool = True) -> bytes:
        self.card.reset()
        return b"\x3b"

    def disconnect(self) -> None:
        self.card.power_off()


@pytest.fixture
def fresh_card(tmp_path: Path) -> Path:
    """A new virtual card with its CHUID and no keys."""
    directory = tmp_path / "card"
    initialize_card(directory, PIN, [], "CN=unused")
    return directory


def _management_key(directory: Path) -> bytes:
    return CardState.load(directory).management_key


def _card_public_key(directory: Path, slot: int) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The public half of the key the card holds in `slot`, from its state file."""
    private = serialization.load_pem_private_key(CardState.load(directory).keys[slot].private_pem,
                                                 password=None)
    assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return private.public_key()


def _object(objects: list[ElementObject], object_class: int, object_id: bytes) -> ElementObject:
    for obj in objects:
        if obj.attributes[Attribute.CLASS] == int(object_class).to_bytes(8, sys.byteorder) \
                and obj.attributes[Attribute.ID] == object_id:
            return obj
    raise AssertionError(f"no object of class {object_class} with id {object_id.hex()}")


def _certificate(card: PivCard, object_id: bytes) -> x509.Certificate:
    obj = _object(card.public_objects(), ObjectClass.CERTIFICATE, object_id)
    return x509.load_der_x509_certificate(obj.attributes[Attribute.VALUE])


def _common_name(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# The driver, over the direct in-process link ----------------------------------------------

def test_keygen_ec256_in_9c_and_rsa2048_in_9d(fresh_card: Path) -> None:
    link = DirectAppletLink(fresh_card)
    card = PivCard(link)
    card.open()
    assert card.public_objects() == []  # a fresh card: no certificate, nothing shown
    key = _management_key(fresh_card)
    card.generate_key(PIN, "kg-sign", b"\x02", "ec256", management_key=key)  # OpenSC's id
    card.generate_key(PIN, "kg-rsa", b"\x9d", "rsa2048", management_key=key)  # the slot

    public = card.public_objects()
    assert {(o.attributes[Attribute.ID], o.attributes[Attribute.LABEL]) for o in public} \
        == {(b"\x02", b"kg-sign"), (b"\x03", b"kg-rsa")}
    ec_certificate = _certificate(card, b"\x02")
    rsa_certificate = _certificate(card, b"\x03")
    for certificate, label, slot in ((ec_certificate, "kg-sign", 0x9C),
                                     (rsa_certificate, "kg-rsa", 0x9D)):
        assert _common_name(certificate) == label
        assert certificate.issuer == certificate.subject
        certificate.verify_directly_issued_by(certificate)  # self-signed, and it verifies
        assert certificate.public_key() == _card_public_key(fresh_card, slot)
    ec_public = ec_certificate.public_key()
    rsa_public = rsa_certificate.public_key()
    assert isinstance(ec_public, ec.EllipticCurvePublicKey)
    assert isinstance(rsa_public, rsa.RSAPublicKey) and rsa_public.key_size == 2048
    point = ec_public.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)
    assert _object(public, ObjectClass.PUBLIC_KEY, b"\x02").attributes[Attribute.EC_POINT] \
        == b"\x04\x41" + point
    modulus = _object(public, ObjectClass.PUBLIC_KEY, b"\x03").attributes[Attribute.MODULUS]
    assert int.from_bytes(modulus, "big") == rsa_public.public_numbers().n

    # The management key's authentication does not outlive generate_key.
    put_data = bytes.fromhex("00DB3FFF075C035FC10B5300")
    assert link.transmit(put_data)[-2:] == b"\x69\x82"

    with pytest.raises(NotLoggedIn):
        card.private_objects()
    card.login(PIN)
    private = card.private_objects()
    assert {o.attributes[Attribute.ID] for o in private} == {b"\x02", b"\x03"}
    message = b"signed by a key the card generated for p11grid grid keygen"
    signature = card.sign(_object(private, ObjectClass.PRIVATE_KEY, b"\x02"), Mechanism.ECDSA,
                          None, hashlib.sha256(message).digest())
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                     int.from_bytes(signature[32:], "big"))
    ec_public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    signature = card.sign(_object(private, ObjectClass.PRIVATE_KEY, b"\x03"),
                          Mechanism.RSA_X_509, None, block)
    rsa_public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    card.close()

    # Another driver instance, as after a restart, finds the keys; labels come from settings.
    again = PivCard(DirectAppletLink(fresh_card), labels={0x9C: "kg-sign"})
    assert {o.attributes[Attribute.LABEL] for o in again.public_objects()} \
        == {b"kg-sign", b"KEY MAN key"}
    again.close()


def test_keygen_replaces_the_key_of_a_slot(fresh_card: Path) -> None:
    card = PivCard(DirectAppletLink(fresh_card))
    key = _management_key(fresh_card)
    card.generate_key(PIN, "first", b"\x01", "ec256", management_key=key)
    first = _certificate(card, b"\x01")
    card.generate_key(PIN, "second", b"\x9a", "rsa2048", management_key=key)
    second = _certificate(card, b"\x01")
    assert _common_name(second) == "second" and second.public_key() != first.public_key()
    assert second.public_key() == _card_public_key(fresh_card, 0x9A)
    assert len(card.public_objects()) == 2
    card.close()


def test_wrong_management_key_is_refused_and_nothing_written(fresh_card: Path) -> None:
    before = (fresh_card / "card.json").read_bytes()
    card = PivCard(DirectAppletLink(fresh_card))
    wrong = bytes(24)
    with pytest.raises(ManagementKeyRefused, match="6982") as refused:
        card.generate_key(PIN, "never", b"\x02", "ec256", management_key=wrong)
    assert refused.value.sw == 0x6982
    assert "security status not satisfied" in str(refused.value)
    assert card.public_objects() == []
    # The PIN's retry counter was written (and restored); keys and data objects were not.
    after = json.loads((fresh_card / "card.json").read_bytes())
    assert after["keys"] == {} and after["objects"] == json.loads(before)["objects"]
    card.close()


def test_missing_or_malformed_management_key_is_refused_before_the_card(
        fresh_card: Path) -> None:
    link = DirectAppletLink(fresh_card)
    card = PivCard(link)
    with pytest.raises(ElementFailure, match="needs its management key"):
        card.generate_key(PIN, "never", b"\x02", "ec256")
    with pytest.raises(ElementFailure, match="24 bytes"):
        card.generate_key(PIN, "never", b"\x02", "ec256", management_key=bytes(16))
    assert link.exchanges == []  # the card was never spoken to


def test_bad_slot_and_bad_kind_are_refused(fresh_card: Path) -> None:
    link = DirectAppletLink(fresh_card)
    card = PivCard(link)
    key = _management_key(fresh_card)
    for key_id in (b"\x05", b"\x9b", b"\x82", b"", b"\x01\x02"):
        with pytest.raises(KeyRefused, match="names no PIV key slot"):
            card.generate_key(PIN, "never", key_id, "ec256", management_key=key)
    for kind in ("rsa3072", "ec384", "ed25519"):
        with pytest.raises(KeyRefused, match="known: rsa2048, ec256"):
            card.generate_key(PIN, "never", b"\x02", kind, management_key=key)
    assert link.exchanges == []
    # 04 is slot 9E to the driver; this card has no 9E and says so (6A86) at GENERATE.
    with pytest.raises(KeyRefused, match="no key slot 9E"):
        card.generate_key(PIN, "never", b"\x04", "ec256", management_key=key)
    assert CardState.load(fresh_card).keys == {}


def test_wrong_pin_stops_before_the_slot_changes(fresh_card: Path) -> None:
    link = DirectAppletLink(fresh_card)
    card = PivCard(link)
    with pytest.raises(PinIncorrect, match="2 tries left"):
        card.generate_key("654321", "never", b"\x02", "ec256",
                          management_key=_management_key(fresh_card))
    assert not any(apdu[1] == 0x47 for apdu, _ in link.exchanges)  # no GENERATE sent
    assert CardState.load(fresh_card).keys == {}


# The shared self-signing helper -----------------------------------------------------------

def _builder(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helper")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public_key).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)))


def test_a_card_that_signs_wrongly_stops_at_the_helper() -> None:
    """The helper's sign callable is the card's private-key operation; here a real key in
    this process plays it: the right key gives a verifying certificate, another key not."""
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())

    def signer(private: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
        def sign(digest: bytes) -> bytes:
            return private.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

        return sign

    good = self_signed_certificate(_builder(key.public_key()), key.public_key(), signer(key))
    good.verify_directly_issued_by(good)
    with pytest.raises(ElementFailure, match="does not verify"):
        self_signed_certificate(_builder(key.public_key()), key.public_key(), signer(other))


def test_issuance_self_signs_rsa_through_the_shared_helper(tmp_path: Path) -> None:
    certificates = initialize_card(tmp_path / "card", PIN, parse_key_requests("9d:rsa2048"),
                                   "CN=issued")
    certificate = certificates[0x9D]
    certificate.verify_directly_issued_by(certificate)
    assert certificate.public_key() == _card_public_key(tmp_path / "card", 0x9D)


# The CLI, against a card behind pcscd and vpcd ---------------------------------------------

@dataclass
class Reader:
    card: Path
    environ: dict[str, str]


@pytest.fixture
def card_in_a_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    missing = missing_requirements()
    if missing:
        pytest.fail(f"the PIV keygen CLI test needs {', '.join(missing)}")
    work = tmp_path_factory.mktemp("pivkg")  # short: pcscd's socket path lives under it
    initialize_card(work / "card", PIN, [], "CN=unused")
    launcher = launch(work, [(work / "card", 35963)], work / "launcher.log")
    try:
        try:
            wait_until_ready(launcher, work, work / "launcher.log")
        except LauncherFailed as exc:
            pytest.fail(str(exc))
        environ = {name: value for name, value in os.environ.items()
                   if name not in ("P11GRID_PIV_MANAGEMENT_KEY", "P11GRID_PIN")}
        environ.update(PCSCLITE_CSOCK_NAME=str(client_socket(work)),
                       P11GRID_REGISTRY=str(work / "registry.sqlite"))
        yield Reader(work / "card", environ)
    finally:
        stop(launcher)


# Opens the element as the grid does after a restart (registry settings), lists its
# certificates with their labels.
GRID_VIEW = r"""
import json, sys
from pathlib import Path
from pkcs11.constants import Attribute, ObjectClass
from grid_backend.elements import open_element
from grid_backend.registry import SqliteRegistry

record = SqliteRegistry(Path(sys.argv[1])).element(sys.argv[2])
card = open_element(record.driver, record.settings)
certificate = int(ObjectClass.CERTIFICATE).to_bytes(8, sys.byteorder)
json.dump([[o.attributes[Attribute.LABEL].decode(), o.attributes[Attribute.ID].hex(),
            o.attributes[Attribute.VALUE].hex()]
           for o in card.public_objects() if o.attributes[Attribute.CLASS] == certificate],
          sys.stdout)
card.close()
"""


def test_cli_keygen_on_a_piv_element(card_in_a_reader: Reader) -> None:
    environ = card_in_a_reader.environ
    secret = _management_key(card_in_a_reader.card).hex()

    def grid(*arguments: str, extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(VENV_BIN / "p11grid"), "grid", *arguments],
                              env={**environ, **(extra or {})}, capture_output=True, text=True,
                              timeout=120)
        assert secret not in done.stdout + done.stderr  # the key is never echoed
        return done

    settings = {"transport": "pcsc", "reader": "Virtual PCD 00 00",
                "labels": {"9C": "stale", "9a": "auth"}}
    assert grid("add-se", "--seid", "piv-kg", "--driver", "piv", "--settings",
                json.dumps(settings)).returncode == 0
    keygen = ("keygen", "--seid", "piv-kg", "--label", "cli-sign", "--id", "9c", "--kind",
              "ec256", "--pin", PIN)

    missing = grid(*keygen)
    assert missing.returncode == 2
    assert "--management-key" in missing.stderr
    assert "P11GRID_PIV_MANAGEMENT_KEY" in missing.stderr
    short = grid(*keygen, "--management-key", secret[:32])
    assert short.returncode == 2 and "24 bytes" in short.stderr
    not_hex = grid(*keygen, extra={"P11GRID_PIV_MANAGEMENT_KEY": "zz" + secret[2:]})
    assert not_hex.returncode == 2 and "48 hex digits" in not_hex.stderr
    wrong = grid(*keygen, "--management-key", "00" * 24)
    assert wrong.returncode == 1 and "6982" in wrong.stderr, wrong.stderr
    assert CardState.load(card_in_a_reader.card).keys == {}  # nothing written

    done = grid(*keygen, extra={"P11GRID_PIV_MANAGEMENT_KEY": secret})
    assert done.returncode == 0, done.stderr
    assert "cli-sign" in done.stdout and "slot 9c" in done.stdout

    registry_path = Path(environ["P11GRID_REGISTRY"])
    registry = SqliteRegistry(registry_path)
    assert registry.element("piv-kg").settings["labels"] == {"9a": "auth", "9c": "cli-sign"}
    registry.close()
    assert "key cli-sign\tid=02\tec256" in grid("list").stdout

    view = subprocess.run([sys.executable, "-c", GRID_VIEW, str(registry_path), "piv-kg"],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
    assert view.returncode == 0, view.stderr
    (label, object_id, der), = json.loads(view.stdout)
    assert (label, object_id) == ("cli-sign", "02")
    certificate = x509.load_der_x509_certificate(bytes.fromhex(der))
    assert _common_name(certificate) == "cli-sign"
    certificate.verify_directly_issued_by(certificate)
    assert certificate.public_key() == _card_public_key(card_in_a_reader.card, 0x9C)

    # A label another slot already carries is refused before the card is touched.
    clash = grid("keygen", "--seid", "piv-kg", "--label", "auth", "--id", "03", "--kind",
                 "ec256", "--pin", PIN, extra={"P11GRID_PIV_MANAGEMENT_KEY": secret})
    assert clash.returncode == 1 and "already names another key" in clash.stderr
    assert set(CardState.load(card_in_a_reader.card).keys) == {0x9C}
